"""SinkCache: the transformers ``Cache`` that holds a StreamingLLM stream.

It builds the layer groups (:mod:`.groups`), plans each forward in every group at layer 0 and
dispatches the layers' updates, answers transformers' questions (sequence length, mask sizes,
query offsets), hands out position ids, and saves and restores its state. Everything else has a
module of its own: the steps' layouts are planned by :class:`~streamingllm.timeline.Timeline`,
carried out by the layers (:mod:`.layers`) on their group's tensors (:mod:`.store`); the prepared
decode step is :mod:`.prepared`, batches of streams are :mod:`.rows`, and the masks :mod:`.masks`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..attention import BAND_AWARE, SINK_ATTENTION, attach_band, attention_implementation, is_sink_attention, \
    use_sink_attention
from ..checks import check_int
from ..compat import update_position_ids
from ..families import FULL, SLIDING, Family, UnsupportedModelError
from . import masks
from .checks import check_cache_sizes, check_memory, check_model, check_rows
from .groups import GLOBAL, SLIDING_POLICY, LayerGroup, Policy, build_groups
from .layers import RopeSinkLayer, SinkLayer
from .prepared import HandedIds, PreparedStep
from .rows import PaddedRows, StackedRows
from .store import layer_devices


class SinkCache(Cache):
    """StreamingLLM's attention-sink cache for transformers 5 models.

    Args:
        model_or_config: the model (preferred: its rotary frequencies are read from it) or its
            config. Decides how positions are handled; unsupported families raise
            :class:`~streamingllm.families.UnsupportedModelError`.
        sink_size: number of initial tokens kept as attention sinks (tokens, >= 0). 0 gives
            plain window attention, the paper's baseline.
        window_size: number of most recent tokens kept (tokens, >= 1).

            In a hybrid model (Gemma 2/3, gpt-oss) these size the global layers; sliding-window
            layers keep the model's own window (:func:`~streamingllm.cache.layer_policies`).
        slack: ALiBi families only: extra buffer slots (tokens) so eviction moves a view instead
            of copying; the window is copied back once every ``slack`` tokens. Default
            ``max(64, window_size // 4)``. RoPE families decode in a ring of exactly
            ``sink_size + window_size + 1`` slots and need none.
        rebase_every: how far (tokens) the stream's positions may run ahead of the in-cache
            positions before :meth:`position_ids` moves them back (a rebase). Default
            ``max(window_size, 256)``; keeps the positions the library's loops give the model
            below about ``2 * (sink_size + window_size) + 256``.
        fast_chunks: accept forwards of several tokens that overflow the window with the model's
            plain causal mask (a long prompt through ``model.generate``): cheaper, but a token
            then also sees up to ``q - 1`` older window tokens, with the sinks one position
            further away per such token (see docs/design.md). Default False: such a forward is
            refused with :class:`~streamingllm.timeline.ApproximateChunkError`.

    A cache larger than the model's trained length is accepted with a warning (positions past
    it were never trained). Buffers are allocated on the first forward, after checking that they
    fit in the device's available memory (:class:`~streamingllm.cache.CacheTooLargeError` otherwise).

    Usage: ``model(input_ids, cache=c)``, ``model.generate(..., cache=c)`` (also multi-turn:
    pass the whole conversation and the same cache; only the new tokens are fed), or the
    library's loops (:func:`~streamingllm.feed.generate_tokens`, :func:`~streamingllm.feed.generate`).
    A forward whose tokens would see more than the window under the model's causal mask (a long
    prompt in one piece) is refused unless it comes with :meth:`exact_chunk_mask` or after
    :meth:`allow_fast_chunk`; :func:`~streamingllm.feed.generate` and
    :func:`~streamingllm.feed.prefill` handle this for you.
    """

    def __init__(self, model_or_config, sink_size: int = 4, window_size: int = 1020, *, slack: int | None = None,
                 rebase_every: int | None = None, fast_chunks: bool = False):
        sink_size, window_size = check_cache_sizes(sink_size, window_size)
        slack = max(64, window_size // 4) if slack is None else check_int("slack", slack, 0)
        rebase_every = max(window_size, 256) if rebase_every is None else check_int("rebase_every", rebase_every, 1)
        config, family = check_model(model_or_config, sink_size, window_size)
        if isinstance(model_or_config, torch.nn.Module) and family.attention_interface:
            use_sink_attention(model_or_config)
        devices = layer_devices(model_or_config, config.num_hidden_layers)
        self._build(config, family, model_or_config, sink_size, window_size, slack, rebase_every, bool(fast_chunks),
                    devices)

    def _build(self, config, family: Family, model_or_config, sink_size: int, window_size: int, slack: int,
               rebase_every: int, fast_chunks: bool, devices: list | None, rotators: dict | None = None) -> None:
        self.config, self.family = config, family
        self.sink_size, self.window_size, self.slack = sink_size, window_size, slack
        self.num_layers = config.num_hidden_layers
        self._devices = devices
        self.groups: list[LayerGroup] = build_groups(  # the global group first, when there is one
            config, family, model_or_config, sink_size, window_size, slack=slack, rebase_every=rebase_every,
            fast_chunks=fast_chunks, devices=devices, rotators=rotators)
        self._group_of: list[LayerGroup] = [next(g for g in self.groups if i in g.layers)
                                            for i in range(self.num_layers)]
        #: Each layer's policy: ``"global"`` (sinks + window) or ``"sliding"`` (the model's own window).
        self.layer_policies: list[Policy] = [g.policy for g in self._group_of]
        #: The primary group's timeline and sink store: the global layers' (the sliding ones' when all slide).
        self.timeline, self.sinks = self.groups[0].timeline, self.groups[0].sinks
        #: Exact chunks through the sink-aware attention compute each query's sink logits from one
        #: zero-key copy of the sinks (False: one rotated copy of the sinks per query, the reference).
        self.sink_scores = True
        self._band: torch.Tensor | None = None  # this forward's exact band mask, for sink-aware attention
        self._rows: PaddedRows | None = None  # the rows' own streams, once a left-padded batch arrived
        self._pending: PreparedStep | None = None  # the prepared step, until its forward has run
        self._next_layer = 0  # the layer whose update the running forward calls next
        self._position: torch.Tensor | None = None  # (1, 1) int64: a prepared step's position id
        self._handed = HandedIds()  # the position ids last handed out
        layer_class = RopeSinkLayer if family.positions == "rope" else SinkLayer
        super().__init__(layers=[layer_class(g, g.layers.index(i)) for i, g in enumerate(self._group_of)])

    def _empty_like(self) -> SinkCache:
        """A new empty cache for the same model and settings, sharing this one's rotators and devices."""
        row = object.__new__(type(self))
        t = self.timeline
        row._build(self.config, self.family, self.config, self.sink_size, self.window_size, self.slack,
                   t.rebase_every, t.fast_chunks, self._devices, {g.layer_type: g.rotator for g in self.groups})
        return row

    @property
    def _global(self) -> LayerGroup | None:
        """The group of global layers (sinks + window), if the model has any."""
        return self.groups[0] if self.groups[0].policy == GLOBAL else None

    @property
    def _local(self) -> LayerGroup | None:
        """The group of sliding layers kept at their native window, if the model has any."""
        return self.groups[-1] if self.groups[-1].policy == SLIDING_POLICY else None

    def native_window(self, layer_idx: int) -> int | None:
        """The model's own sliding window (tokens, the query included) that layer ``layer_idx`` keeps,
        or None for a global layer (sinks + window)."""
        group = self._group_of[layer_idx]
        return group.timeline.window_size + 1 if group.policy == SLIDING_POLICY else None

    # --- one forward: plan at layer 0, then dispatch each layer's update ----------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values of layer ``layer_idx`` and return those to attend to."""
        if layer_idx == 0:
            self._begin_forward(key_states, kwargs)
        elif layer_idx != self._next_layer:
            raise RuntimeError(f"SinkCache: update() for layer {layer_idx} while layer {self._next_layer} was expected; "
                               "a forward runs every layer in order, starting at layer 0")
        self._next_layer = (layer_idx + 1) % self.num_layers
        if self._rows is not None:
            return self._rows.update(key_states, value_states, layer_idx)
        group = self._group_of[layer_idx]
        if self._pending is not None:  # static step: no Python-side decision, shapes never change
            keys, values = self._pending.write(self.layers[layer_idx], group.slots, key_states, value_states)
            if layer_idx == self.num_layers - 1:
                self._pending = None
            return keys, values
        keys, values = self.layers[layer_idx].update(key_states, value_states, group.step)
        if self._band is not None and group.policy == GLOBAL:
            if self._band.device != keys.device:
                self._band = self._band.to(keys.device)  # layers are in device order: moved once per device
            attach_band(keys, self._band)
        return keys, values

    def _begin_forward(self, key_states: torch.Tensor, kwargs: dict) -> None:
        """Layer 0 of a forward: plan it, unless prepare_decode_step() planned it already and this
        forward is the one it was prepared for."""
        if self._next_layer != 0 and self._pending is None:  # the previous forward stopped part-way (an exception)
            raise RuntimeError(f"SinkCache: the previous forward stopped after layer {self._next_layer - 1} of "
                               f"{self.num_layers}, so the cache holds its tokens in some layers only; call reset()")
        positions = update_position_ids(kwargs)
        if self._pending is not None:
            if self._next_layer == 0 and key_states.shape[-2] == 1 and (
                    torch.compiler.is_compiling() or positions is None
                    or self._handed.first(positions) == self._pending.position):
                return  # the forward that was prepared
            self._undo_prepared()  # another forward (or the prepared one stopped part-way): plan it as it is
        if self._rows is None and positions is not None and _padded(positions):
            self._start_rows(key_states.shape[0])
        if self._rows is not None:
            self._rows.begin(None if positions is None else positions.expand(key_states.shape[0], -1),
                             key_states.shape[-2])
            return
        p0 = None if positions is None else self._handed.first(positions)
        if not self.sinks.allocated:
            self._allocate(key_states)
        q, glob = key_states.shape[-2], self._global
        self._band = None
        if glob is not None and glob.timeline.needs_band(q) and self._sink_attention():
            glob.timeline.expect_exact(q)  # a new turn through model.generate, say: its band rides on the keys
            self._band = self._exact_band(q, key_states.dtype, key_states.device)
        scores = q > 1 and self._scores_layout()  # a single token is never an exact chunk
        for group in self.groups:
            group.plan(q, p0, sink_scores=scores)

    def _sink_attention(self) -> bool:
        """The model attends through the sink-aware attention, which reads a band attached to the keys."""
        return self.family.positions == "rope" and is_sink_attention(self.config)

    def _scores_layout(self) -> bool:
        """Exact chunks of this cache give the sinks as one zero-key copy whose logits the
        attention computes (:class:`~streamingllm.attention.SinkScores`), not one copy per group."""
        return self.sink_scores and self._sink_attention()

    def _allocate(self, key_states: torch.Tensor) -> None:
        """Allocate the cache-wide tensors, after checking that all the buffers fit."""
        check_memory(self.estimated_bytes(key_states), key_states.device, self.sink_size, self.window_size)
        moved = self._devices is not None and self._devices[0] != key_states.device
        for group in self.groups:
            group.allocate(key_states, follow_keys=moved)  # moved: the model moved since the cache was built
        self._position = torch.zeros((1, 1), dtype=torch.long, device=key_states.device)

    def estimated_bytes(self, key_states: torch.Tensor) -> int:
        """Bytes all layers' buffers take for keys/values shaped like ``key_states`` (B, H, T, D)."""
        return sum(group.estimated_bytes(key_states) for group in self.groups)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (for memory accounting: :func:`streamingllm.memory.storage_bytes`)."""
        out = [t for group in self.groups for t in group.tensors()]
        out += [self._position] if self._position is not None else []
        for layer in self.layers:
            if layer.is_initialized:
                out += [layer.keys, layer.values, layer.sink_values]
        return out + (self._rows.tensors() if self._rows is not None else [])

    # --- positions ------------------------------------------------------------------------

    def prepare_decode_step(self) -> torch.Tensor | None:
        """Do the bookkeeping of the next single-token forward now, before the model runs.

        Once the cache is full, a RoPE model's single-token steps use the ring layout: this plans
        the next one, follows a position rebase, rotates and writes the sinks, and returns the
        position ids (a (1, 1) int64 tensor, reused) to pass to the model:
        ``model(input_ids=tok, cache=c, position_ids=c.prepare_decode_step())``. Inside that
        forward each layer's update is then two ``index_copy_`` of the new key/value into fixed
        buffers, attended to whole: static shapes, no Python-side decisions and no recompilation
        per token, so the forward can be compiled with ``torch.compile(model.forward)``.
        The results are identical to an ordinary step (:class:`~streamingllm.cache.prepared.PreparedStep`).

        The step is undone, and the forward planned as usual, when the forward that follows is not
        the one prepared (several tokens, or other position ids than the returned ones) or when an
        earlier prepared forward stopped part-way (an exception). Families whose position ids do
        not reach the cache get the position the model computes by itself (``get_seq_length()``).

        Returns None (nothing done) when the next step cannot be prepared -- the cache is not full
        yet, or the family is ALiBi: call the model without position ids then.
        """
        self._undo_prepared()
        if self._next_layer != 0 or self._rows is not None:
            return None  # an ordinary forward stopped part-way (the next one reports it), or a padded batch
        if not all(group.full for group in self.groups):
            return None
        p = self.timeline.next_position()
        def planned(step: PreparedStep) -> None:  # kept at once: undone even if what follows fails
            self._pending = step

        PreparedStep.prepare(self.groups, self.layers, self._group_of, p, on_planned=planned)
        self._position.fill_(p)
        return self._handed.hand_out(self._position, p)

    def _undo_prepared(self) -> None:
        """Undo the prepared step, if there is one whose forward has not run."""
        if self._pending is not None:
            self._pending.undo(self.groups, self.layers, self._group_of)
            self._pending, self._next_layer = None, 0

    def position_ids(self, q: int, device=None, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Position ids (1, q) for the next forward of ``q`` tokens, as the library's loops pass them.

        They follow the stream, and move back to the in-cache positions once they have run
        ``rebase_every`` tokens ahead (families whose position ids reach the cache), so the angles
        the model computes stay small however long the stream. None for ALiBi families (no
        positions). Passing none at all is exact too: the model then uses ``get_seq_length()``.

        Args:
            q: tokens in the next forward.
            device: where to put the ids (the model's input device; the CPU when None).
            out: a (1, q) int64 tensor to write them into (a decode loop reuses one), else a new one.
        """
        if self.family.positions != "rope" or self._rows is not None:
            return None
        if q != 1:
            self._undo_prepared()
        p = self.timeline.next_position() if self._pending is None else self._pending.position
        if out is not None:
            torch.arange(p, p + q, out=out.view(-1))
            return self._handed.hand_out(out, p)
        return self._handed.hand_out(torch.arange(p, p + q, device=device)[None], p)

    # --- the transformers Cache API, and what the stream holds ---------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens of the stream consumed so far (before a prepared step's forward runs); the
        cached tokens for families that size their ALiBi bias from it (Falcon with ALiBi). For a
        left-padded batch: the columns consumed, pads included (what ``generate()`` slices by)."""
        if self._rows is not None:
            return self._rows.columns
        seen, held = self._settled()
        return held if self.family.bias_from_seq_length else seen

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """In-cache index of the first new token in layer ``layer_idx`` (the attention masks are
        built in cache order; a hybrid model's sliding layers hold other tokens than its global ones)."""
        return self.layers[layer_idx].timeline.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._rows is not None:
            raise NotImplementedError("SinkCache: beam search over a left-padded batch is not supported; "
                                      "use greedy or sampled generation, or rows of equal length")
        super().reorder_cache(beam_idx)

    def reset(self) -> None:
        super().reset()
        for group in self.groups:
            group.timeline.reset()
            group.sinks.rotated_for = None
        self._pending, self._next_layer, self._rows = None, 0, None

    @property
    def seen_tokens(self) -> int:
        """Tokens of the stream processed so far (exact, unbounded); for a left-padded batch, the
        columns (pads included)."""
        return self._rows.columns if self._rows is not None else self._settled()[0]

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV is held now (at most :attr:`max_cached_tokens`; in a hybrid model, by its
        global layers; for a left-padded batch, the most any row holds)."""
        return self._rows.cached_tokens if self._rows is not None else self._settled()[1]

    @property
    def max_cached_tokens(self) -> int:
        """The most tokens a layer of the primary group keeps: ``sink_size + window_size`` (the
        global layers'), or ``sliding_window - 1`` when every layer keeps the model's own window."""
        return self.timeline.sink_size + self.timeline.window_size

    @property
    def row_caches(self) -> list | None:
        """The rows' own caches when this cache serves a left-padded batch, else None."""
        return None if self._rows is None else self._rows.rows

    def _settled(self) -> tuple[int, int]:
        """(tokens seen, tokens held) by the primary group as of the last forward that ran (not
        counting a prepared step)."""
        if self._pending is None:
            return self.timeline.seen, self.timeline.length
        before = self._pending.before[0]
        return before["seen"], before["n_sink"] + before["window"]

    def _one_stream(self, method: str, refusal: str) -> None:
        """Refuse what only a single stream can do (the rows of a padded batch each have their own),
        saying ``refusal`` (from ``SinkCache.method``); and undo a prepared step whose forward is not coming."""
        if self._rows is not None:
            raise ValueError(f"SinkCache{'.' + method if method else ''}: {refusal}")
        self._undo_prepared()

    # --- exact chunks -----------------------------------------------------------------------

    @property
    def exact_chunks(self) -> bool:
        """True when a chunk can be given its exact band (:meth:`exact_chunk_mask`): RoPE families
        whose attention takes additive float masks (sdpa, eager and the band-aware implementations).
        Otherwise exact feeding goes one token at a time."""
        impl = attention_implementation(self.config)
        return self.family.positions == "rope" and (impl in SINK_ATTENTION or impl in BAND_AWARE)

    def allow_fast_chunk(self, q: int) -> None:
        """Let the next forward, of ``q`` tokens, use the model's plain causal mask although it
        overflows the window (the approximation ``fast_chunks=True`` allows for every forward)."""
        self._one_stream("", "a left-padded batch's rows plan their own chunks; no fast chunk to allow")
        if self._global is not None:  # sliding layers are banded by the model's own mask
            self._global.timeline.allow_fast(q)

    def exact_chunk_mask(self, q: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor | dict | None:
        """Prepare the next forward of ``q`` tokens for exact banded attention.

        Returns the additive 4D mask (1, 1, q, keys) to pass as ``attention_mask``, or None when
        the ordinary causal mask is already exact (the window does not overflow inside the
        chunk). Every token then sees exactly the sinks plus its own last ``window_size``
        tokens, at the positions it would have had if fed one by one. For a hybrid model it is a
        dict of the masks per layer type, as those models take it: ``{"full_attention": the band,
        "sliding_attention": the model's own sliding-window mask over what those layers hold}``.

        Args:
            q: tokens in the next forward.
            dtype: the mask's dtype (the model's); masked entries hold its most negative value.
            device: where to build the mask (the model's device; the CPU when None).

        The mask has ``q`` rows and ``S + window + q`` columns when the model attends through the
        sink-aware attention (the sinks' logits for each query are then added by the attention;
        :attr:`sink_scores`), else ``S * (held + q - S - W) + window + q`` (one copy of the sinks
        per overflowing position). For a prompt of many thousands of tokens in one forward it is
        large, and :func:`~streamingllm.feed.generate` (bounded chunks) is the better way.
        """
        self._one_stream("", "a left-padded batch's rows give their chunks their own bands")
        glob, local = self._global, self._local
        if glob is None or not glob.timeline.overflows(q):
            return None  # the model's own masks are exact (a sliding layer's is its band)
        if not self.exact_chunks:
            raise UnsupportedModelError(
                f"exact chunked attention is not available for {self.family.name} with attn_implementation="
                f"{attention_implementation(self.config)!r} (ALiBi, or no additive float masks): feed it token by token")
        glob.timeline.expect_exact(q)
        band = self._exact_band(q, dtype, device)
        if local is None:
            return band
        t = local.timeline
        return {FULL: band, SLIDING: masks.sliding_band(t.length, t.window_size + 1, q, dtype, device)}

    def _exact_band(self, q: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The global layers' exact band (1, 1, q, keys) for the next forward of ``q`` tokens."""
        t = self._global.timeline
        return masks.exact_band(t.sink_size, t.window_size, t.n_sink, t.window, q, sink_scores=self._scores_layout(),
                                dtype=dtype, device=device)

    # --- batches of streams -----------------------------------------------------------------

    def _start_rows(self, batch: int) -> None:
        """A left-padded batch arrives: give each row a stream of its own (see :mod:`.rows`)."""
        check_rows(self.config, self.family, self.timeline.seen)
        rows = [self._empty_like() for _ in range(batch)]
        for row in rows:
            row.sink_scores = False  # the rows' bands are stacked into one mask: their sinks come as copies
        self._rows = PaddedRows(rows)

    @classmethod
    def stacked(cls, caches: list[SinkCache]) -> StackedRows:
        """A cache for one forward that advances several independent streams by one token each.

        Row ``r`` of that forward is the next token of the stream ``caches[r]`` holds (each a
        batch-1 cache for the same model, with any sizes, lengths and positions): it is stored in
        and attends to that cache only, exactly as a forward of its own would, with the position
        ids ``caches[r].position_ids(1)``. Use :func:`~streamingllm.feed.decode_rows`, which builds
        the forward. Needs sink-aware attention (:attr:`can_stack`); ValueError otherwise.
        """
        return StackedRows(caches)

    @property
    def can_stack(self) -> bool:
        """True when this cache's stream can share decode forwards with others (:meth:`stacked`):
        a batch-1 stream of a family whose attention goes through the sink-aware interface."""
        batch_1 = not self.layers[0].is_initialized or self.layers[0].keys.shape[0] == 1
        return (self._rows is None and batch_1 and self.family.attention_interface and is_sink_attention(self.config)
                and self._pending is None)

    # --- saved state -----------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"family": self.family.name, "num_layers": self.num_layers, "sink_size": self.sink_size,
                "window_size": self.window_size, "policies": list(self.layer_policies)}

    def state_dict(self) -> dict:
        """Everything needed to continue this stream exactly elsewhere (``torch.save`` it): the
        timelines and the tokens the cache holds -- each layer's window in stream order and its sink
        values, in the cache's dtype, and the stored sink keys -- not the empty slots of its buffers
        (about ``2 * layers * kv_heads * head_dim`` elements per held token). Restore with
        :meth:`load_state_dict` into a cache built for the same model and sizes."""
        self._one_stream("state_dict", "a left-padded batch's cache cannot be saved; save each row's")
        layers = [(*layer.held(), layer.sink_values.clone()) if layer.is_initialized else None
                  for layer in self.layers]
        sinks = [layer.sinks.stored(layer.index).clone() for layer in self.layers] if self.sinks.allocated else None
        return {"format": 2, **self._identity(), "layers": layers, "sinks": sinks,
                "timelines": [group.timeline.compacted() for group in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream a :meth:`state_dict` saved: the next forward gives what it would
        have given in the saved cache. Tensors go to each layer's device (the model's, when the
        cache was built from a model). Raises ValueError when the state is for another cache.
        States of the first format (whole buffers, written before issue 23) load too."""
        mine = self._identity()
        theirs = {k: state.get(k, [GLOBAL] * self.num_layers if k == "policies" else None) for k in mine}
        if theirs != mine or state.get("format") not in (1, 2):
            raise ValueError(f"SinkCache.load_state_dict: the state is for {theirs} (format "
                             f"{state.get('format')}), this cache is {mine} (formats 1 and 2)")
        self.reset()
        for group, saved in zip(self.groups, state.get("timelines", [state.get("timeline")])):
            group.timeline.restore(saved)  # the sinks are rewritten at the next step
        if state["sinks"] is None:
            return
        devices = self._devices or [state["layers"][0][0].device] * self.num_layers
        self._allocate(state["layers"][0][0].to(devices[0])[:, :, :1])
        for i, (layer, saved) in enumerate(zip(self.layers, state["layers"])):
            keys, values, sink_values = (t.to(devices[i]) for t in saved)
            layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
            if state["format"] == 2:
                layer.place(keys, values, sink_values)
            else:  # the whole buffer, in the layout its timeline describes
                layer.keys.copy_(keys)
                layer.values.copy_(values)
                layer.sink_values.copy_(sink_values)
            layer.sinks.stored(layer.index).copy_(state["sinks"][i])


def _padded(positions: torch.Tensor) -> bool:
    """True when the rows' position ids differ, or are not consecutive (left padding)."""
    if positions.shape[0] > 1 and bool((positions != positions[:1]).any()):
        return True
    q = positions.shape[-1]
    return q > 1 and bool((positions[:, -1] - positions[:, 0] != q - 1).any())

