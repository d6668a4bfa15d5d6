"""Per-turn deltas of a session's saved state, so that a store writes per turn what the turn changed.

A state is the dict :meth:`~streamingllm.session.Session.state` returns. Between two turns most of
a layer's held slots (one slot: a token's key and value in every head) are slots of the previous
state, often at other indexes: eviction shifts them, a decode ring keeps them in place, a
compaction moves them. :func:`diff_state` matches the slots by content, whatever the layout
that moved them: each slot's bits are fingerprinted, every match is checked bit for bit, and a
new slot found in the old state becomes a reference to it (runs of consecutive slots, three ints
a run); the others are stored as literals. Keys and values are matched apart: a rebase rotates every
window key but no value, so its delta holds the window's keys and refers to its values. Sinks, timelines and the small fields are
stored whole (``last``, what the chat template's next delta is computed against, holds the last
turn's messages: the whole history only after a rebuild, whose delta stores the messages whole
anyway); messages only as what was appended (:func:`appended`).

A session with a memory of evicted blocks (:class:`~streamingllm.cache.MemoryCache`) keeps its keys
unrotated, so a token's key and value keep their bits from the window to the partial block to a
block: the rows of its window, partial block and new blocks are matched against the old window's
and partial block's the same way. Its blocks are written once and never changed (they may be
forgotten, past a store's bound): a delta refers to the old state's blocks by count, checked by
their summaries, and stores the summary rows the turn added, which blocks were forgotten, and the
sinks and attention scores whole (small). A turn's delta holds about its own tokens' rows.

``apply_delta(old, diff_state(old, new))`` equals ``new`` bit for bit (:func:`states_equal`).
"""

from __future__ import annotations

import io
import pickle

import torch

FORMAT = 2  # 2: keys and values matched apart
_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit views, by element size
_HASHED = 64  # columns of a slot's bits that bucket it (the match then compares them all)


def shares_history(state: dict) -> bool:
    """True when most of ``state`` is written once and shared by the states after it (a memory's
    blocks): keeping it to diff against costs little, and its deltas save much."""
    return isinstance(state, dict) and isinstance(state.get("cache"), dict) and state["cache"].get("kind") == "memory"


def encode(obj) -> bytes:
    """``obj`` (a state or a delta: dicts, lists, tensors, numbers, strings) as ``torch.save`` bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def decode(data: bytes, map_location=None):
    """What :func:`encode` wrote, read with ``weights_only=True`` (no code runs).

    Args:
        data: the bytes.
        map_location: where the tensors go (a device or its name); None: where they were.

    Raises ValueError when ``data`` is not such bytes.
    """
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as err:  # torch's, for bad bytes
        raise ValueError(f"cannot decode a saved state or delta: {err}".split("\n")[0]) from None


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists and tuples): what a delta stores."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return sum(tensor_bytes(x) for x in obj) if isinstance(obj, (list, tuple)) else 0


def states_equal(a, b) -> bool:
    """True when ``a`` and ``b`` are equal bit for bit: tensors of the same dtype, shape and bits
    (so ``-0.0`` differs from ``0.0`` and a NaN equals itself), containers of the same type, and
    the other values ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b.to(a.device))))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def rebased(old: dict | None, new: dict) -> bool:
    """True when some layer group's position frame moved back between the two states (a rebase,
    which rotates every window key: the delta then holds the whole window)."""
    if not old:
        return False
    drift = [[t["frame_next"] - t["seen"] for t in s["cache"]["timelines"]] for s in (old, new)]
    return len(drift[0]) == len(drift[1]) and any(n < o for o, n in zip(*drift))


def diff_state(old: dict | None, new: dict) -> dict:
    """The delta that turns state ``old`` into state ``new`` (:func:`apply_delta`).

    Args:
        old: the previous state (:meth:`~streamingllm.session.Session.state`), or None for none:
            the delta then holds ``new`` whole, as it does when the caches do not match.
        new: the current state.

    The delta shares ``new``'s small tensors (sinks) and copies the literal slots.
    """
    if _memory_comparable(old, new):
        return _diff_memory_state(old, new)
    if not _comparable(old, new):
        return {"delta": FORMAT, "whole": new}
    cache = new["cache"]
    return {"delta": FORMAT,
            "base": {"timelines": old["cache"]["timelines"], "messages": len(old["messages"])},
            "fields": {k: v for k, v in new.items() if k not in ("cache", "messages")},
            "cache": {k: v for k, v in cache.items() if k != "layers"},
            "layers": [_diff_layer(a, b) for a, b in zip(old["cache"]["layers"], cache["layers"])],
            "messages": appended(old["messages"], new["messages"])}


def apply_delta(old: dict | None, delta: dict) -> dict:
    """The state :func:`diff_state` made ``delta`` from: ``delta`` applied to ``old`` (None for a
    whole delta). Neither is changed; the result may share tensors with both. Raises ValueError
    for a delta of another format, made against another state, or inconsistent."""
    if not isinstance(delta, dict) or delta.get("delta") != FORMAT:
        raise ValueError(f"apply_delta: not a state delta of format {FORMAT}")
    if "whole" in delta:
        return delta["whole"]
    if "memory_layers" in delta:
        return _apply_memory_state(old, delta)
    base = delta["base"]
    if old is None or old["cache"]["timelines"] != base["timelines"] or len(old["messages"]) != base["messages"]:
        raise ValueError("apply_delta: the delta was made against another state (its timelines or message "
                         "count differ): apply the deltas in order, onto the state they were made from")
    keep = delta["messages"]["keep"]
    layers = old["cache"]["layers"]
    if len(layers) != len(delta["layers"]):
        raise ValueError(f"apply_delta: the delta has {len(delta['layers'])} layers, the state {len(layers)}")
    return {**delta["fields"],
            "cache": {**delta["cache"], "layers": [_apply_layer(a, e, i) for i, (a, e) in
                                                   enumerate(zip(layers, delta["layers"]))]},
            "messages": [dict(m) for m in old["messages"][:keep] + delta["messages"]["added"]]}


def appended(old: list[dict], new: list[dict]) -> dict:
    """Transcript ``new`` as what it appends to ``old``: ``{"keep": n, "added": messages}``, where
    ``new`` is ``old[:keep] + added``; ``keep`` is ``len(old)`` when ``old`` is a prefix of ``new``,
    else 0 (an edited history is stored whole). The messages are copies."""
    keep = len(old) if new[: len(old)] == old else 0
    return {"keep": keep, "added": [dict(m) for m in new[keep:]]}


def _comparable(old: dict | None, new: dict) -> bool:
    """A delta against ``old`` makes sense: both hold a cache of the same number of layers."""
    if not old or old["cache"].get("sinks") is None or new["cache"].get("sinks") is None:
        return False
    return len(old["cache"]["layers"]) == len(new["cache"]["layers"]) and "timelines" in old["cache"]


def _memory_comparable(old: dict | None, new: dict) -> bool:
    """Both states hold a memory cache of the same model and settings, and ``new``'s store has
    every block of ``old``'s, with the same summaries (blocks are written once)."""
    if not old or old["cache"].get("kind") != "memory" or new["cache"].get("kind") != "memory":
        return False
    a, b = ({k: v for k, v in s["cache"].items() if k not in ("counts", "layers")} for s in (old, new))
    if a != b or len(old["cache"]["layers"]) != len(new["cache"]["layers"]):
        return False
    for x, y in zip(old["cache"]["layers"], new["cache"]["layers"]):
        if (x["store"] is None) != (y["store"] is None):
            return False
        if x["store"] is not None and x["store"]["summaries"] is not None:
            n = len(x["store"]["blocks"])
            if len(y["store"]["blocks"]) < n or not states_equal(x["store"]["summaries"], y["store"]["summaries"][:n]):
                return False
            if any(p is None and q is not None for p, q in zip(x["store"]["blocks"], y["store"]["blocks"])):
                return False  # a forgotten block came back: not this store's history
    return True


def _diff_memory_state(old: dict, new: dict) -> dict:
    """The delta of a memory session's state (:func:`_memory_comparable`)."""
    return {"delta": FORMAT,
            "base": {"counts": old["cache"]["counts"], "messages": len(old["messages"])},
            "fields": {k: v for k, v in new.items() if k not in ("cache", "messages")},
            "cache": {k: v for k, v in new["cache"].items() if k != "layers"},
            "memory_layers": [_diff_memory_layer(a, b) for a, b in zip(old["cache"]["layers"], new["cache"]["layers"])],
            "messages": appended(old["messages"], new["messages"])}


def _diff_memory_layer(old: dict, new: dict) -> dict:
    """One memory layer: its window's and partial block's keys and values as references to the old
    ones' rows and literals, its blocks as the old ones (minus those forgotten since) and the
    added ones."""
    pool = _pool(old)
    out = {"sinks": new["sinks"], "store": new["store"],
           **{name: _diff_rows(pool, new[name]) for name in ("window", "partial")}}
    if new["store"] is not None and new["store"]["summaries"] is not None:
        n, blocks, summaries = len(old["store"]["blocks"]), new["store"]["blocks"], new["store"]["summaries"]
        out["store"] = {"kept": n, "added": [None if b is None else _diff_rows(pool, b) for b in blocks[n:]],
                        "summaries": summaries[n:],
                        "forgotten": [i for i in range(n) if blocks[i] is None and old["store"]["blocks"][i] is not None]}
    return out


def _apply_memory_state(old: dict | None, delta: dict) -> dict:
    """The memory session's state :func:`_diff_memory_state` made ``delta`` from."""
    base = delta["base"]
    if (old is None or old["cache"].get("kind") != "memory" or old["cache"]["counts"] != base["counts"]
            or len(old["messages"]) != base["messages"]):
        raise ValueError("apply_delta: the delta was made against another state (its counts or message "
                         "count differ): apply the deltas in order, onto the state they were made from")
    layers = old["cache"]["layers"]
    if len(layers) != len(delta["memory_layers"]):
        raise ValueError(f"apply_delta: the delta has {len(delta['memory_layers'])} layers, the state {len(layers)}")
    keep = delta["messages"]["keep"]
    return {**delta["fields"],
            "cache": {**delta["cache"], "layers": [_apply_memory_layer(a, e, i) for i, (a, e) in
                                                   enumerate(zip(layers, delta["memory_layers"]))]},
            "messages": [dict(m) for m in old["messages"][:keep] + delta["messages"]["added"]]}


def _pool(layer: dict) -> tuple | None:
    """A memory layer's window and partial block rows, concatenated: (1, kv_heads, n, head_dim) keys
    and values, what the next state's rows are referred to; None when it holds neither."""
    held = [f for f in (layer["window"], layer["partial"]) if f is not None]
    return tuple(torch.cat([f[i] for f in held], 1)[None] for i in (0, 1)) if held else None


def _diff_rows(pool: tuple | None, new: tuple | None) -> tuple | dict | None:
    """A memory layer's window, partial block or new block ((kv_heads, n, head_dim) keys and values,
    then (kv_heads, n) scores but for a block): its key and value rows as references to the rows
    of ``pool`` (:func:`_pool`) and literals; the scores whole. As it is without a pool."""
    if new is None or pool is None:
        return new
    k, v, *scores = new
    return {"slots": k.shape[1], "scores": scores,
            "keys": _diff_slots(pool[0], k[None]), "values": _diff_slots(pool[1], v[None])}


def _apply_rows(pool: tuple | None, entry, what: str) -> tuple | None:
    """The rows :func:`_diff_rows` described, its references read from ``pool``."""
    if not isinstance(entry, dict):
        return entry
    if pool is None:
        raise ValueError(f"apply_delta: {what}'s references have no rows to refer to in the state")
    return tuple(_apply_slots(pool[i], entry[name], entry["slots"], f"{what} {name}")[0]
                 for i, name in enumerate(("keys", "values"))) + tuple(entry["scores"])


def _apply_memory_layer(old: dict, entry: dict, index: int) -> dict:
    """The memory layer ``entry`` (:func:`_diff_memory_layer`) describes, its references read from ``old``."""
    pool = _pool(old)
    window, partial = (_apply_rows(pool, entry[name], f"layer {index}'s {name}") for name in ("window", "partial"))
    store = entry["store"]
    if store is not None and "kept" in store:
        before = old["store"]
        if before is None or len(before["blocks"]) != store["kept"]:
            raise ValueError(f"apply_delta: layer {index} of the state does not hold the {store['kept']} blocks "
                             "the delta refers to")
        gone = set(store["forgotten"])
        blocks = [None if i in gone else b for i, b in enumerate(before["blocks"])] + [
            _apply_rows(pool, b, f"layer {index}'s block") for b in store["added"]]
        summaries = (store["summaries"] if before["summaries"] is None else before["summaries"]
                     if not len(store["summaries"]) else torch.cat((before["summaries"], store["summaries"])))
        store = {"blocks": blocks, "summaries": summaries}
    return {"sinks": entry["sinks"], "window": window, "partial": partial, "store": store}


def _same_slots(a: tuple | None, b: tuple) -> bool:
    """Layers whose slots can be compared: batch, heads, head size and dtypes alike."""
    if a is None:
        return False
    return all(x.dim() == 4 and x.shape[:2] == y.shape[:2] and x.shape[3] == y.shape[3] and x.dtype == y.dtype
               for x, y in zip(a[:2], b[:2]))


def _diff_layer(old: tuple | None, new: tuple | None) -> dict | None:
    """One layer's entry: None (not initialised), ``whole``, or for its keys and its values apart
    (:func:`_diff_slots`) the runs of references to the old slots and the literal slots."""
    if new is None:
        return None
    if not _same_slots(old, new):
        return {"whole": new}
    keys, values, sink_values = new
    return {"slots": keys.shape[2], "keys": _diff_slots(old[0].to(keys.device), keys),
            "values": _diff_slots(old[1].to(values.device), values), "sink_values": sink_values}


def _diff_slots(old: torch.Tensor, new: torch.Tensor) -> dict:
    """``new``'s slots (dim 2) as ``runs`` of references to ``old``'s ((new index, old index,
    length) rows) and the ``literal`` slots."""
    src = _match(_slot_rows(old), _slot_rows(new))
    return {"runs": _runs(src.cpu()), "literal": new.index_select(2, (src < 0).nonzero().squeeze(1))}


def _apply_layer(old: tuple | None, entry: dict | None, index: int) -> tuple | None:
    """The layer ``entry`` (:func:`_diff_layer`) describes, with its references read from ``old``."""
    if entry is None or "whole" in entry:
        return None if entry is None else entry["whole"]
    lit = (entry["keys"]["literal"], entry["values"]["literal"])
    if not _same_slots(old, lit):
        raise ValueError(f"apply_delta: layer {index} of the state does not match the delta's slots")
    return (*(_apply_slots(o.to(e["literal"].device), e, entry["slots"], f"layer {index}'s {name}")
              for o, e, name in zip(old[:2], (entry["keys"], entry["values"]), ("keys", "values"))),
            entry["sink_values"])


def _apply_slots(old: torch.Tensor, entry: dict, slots: int, what: str) -> torch.Tensor:
    """The ``slots`` slots :func:`_diff_slots` described: its runs read from ``old``, then its literals."""
    literal = entry["literal"]
    out = literal.new_empty(*literal.shape[:2], slots, literal.shape[3])
    covered = torch.zeros(slots, dtype=torch.bool)
    for at, src, n in entry["runs"].tolist():
        if n < 1 or at < 0 or src < 0 or at + n > slots or src + n > old.shape[2] or covered[at : at + n].any():
            raise ValueError(f"apply_delta: {what} has a reference run outside the slots or overlapping "
                             f"another: (at {at}, from {src}, length {n}) of {slots} slots from {old.shape[2]}")
        covered[at : at + n] = True
        out[:, :, at : at + n] = old[:, :, src : src + n]
    free = (~covered).nonzero().squeeze(1).to(out.device)
    if len(free) != literal.shape[2]:
        raise ValueError(f"apply_delta: {what} has {len(free)} slots not referenced but {literal.shape[2]} literal ones")
    out[:, :, free] = literal
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same size: their bits, compared exactly."""
    flat = t.reshape(-1)
    return flat.view(_INTS[t.element_size()]) if t.element_size() in _INTS and not t.is_complex() else flat


def _slot_rows(t: torch.Tensor) -> torch.Tensor:
    """(slots, batch * heads * head_dim) integers: each slot's bits (``t``'s dim 2), one row a slot."""
    return _bits(t.movedim(2, 0).contiguous()).view(t.shape[2], t.shape[0] * t.shape[1] * t.shape[3])


def _match(old_rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """For each new row the index of an old row with the same bits, or -1 (int64, new rows long).

    A random odd-coefficient sum (wrapping in int64) of up to :data:`_HASHED` evenly spread
    columns buckets the rows; every candidate is then compared whole, bit for bit, so a collision
    only costs a literal, never a wrong slot."""
    if not len(old_rows) or not len(new_rows):
        return torch.full((len(new_rows),), -1, dtype=torch.int64, device=new_rows.device)
    width = old_rows.shape[1]
    cols = torch.linspace(0, width - 1, min(width, _HASHED)).long().unique().to(new_rows.device)
    gen = torch.Generator().manual_seed(width)
    coeff = (torch.randint(0, 1 << 31, (len(cols),), generator=gen) * 2 + 1).to(new_rows.device)
    old_h, new_h = ((rows[:, cols].to(torch.int64) * coeff).sum(1) for rows in (old_rows, new_rows))
    sorted_h, order = old_h.sort()
    pos = torch.searchsorted(sorted_h, new_h).clamp(max=len(sorted_h) - 1)
    src = torch.where(sorted_h[pos] == new_h, order[pos], -1)
    same = (old_rows[src.clamp(min=0)] == new_rows).all(1)
    return torch.where(same & (src >= 0), src, -1)


def _runs(src: torch.Tensor) -> torch.Tensor:
    """(runs, 3) int64 rows (new index, old index, length): the maximal runs of consecutive new
    slots that reference consecutive old slots (``src``: :func:`_match`'s answer)."""
    ref = src >= 0
    cont = torch.zeros_like(ref)
    cont[1:] = ref[1:] & ref[:-1] & (src[1:] == src[:-1] + 1)
    start = ref & ~cont
    at = start.nonzero().squeeze(1)
    lengths = torch.bincount((torch.cumsum(start.long(), 0) - 1)[ref], minlength=len(at))
    return torch.stack([at, src[at], lengths], 1)
