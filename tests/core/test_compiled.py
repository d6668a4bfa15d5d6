"""The decode step compiled where it pays (streamingllm.compiled), and the host work a prepared
step avoids (no device reads of the position ids, sink rotations from a device table)."""

from __future__ import annotations

import shutil

import pytest
import torch

from streamingllm import SinkCache
from streamingllm.checks import ArgumentError
from streamingllm.compiled import DecodeStep, compiles
from streamingllm.feed import Sampling, generate_tokens, prefill
from streamingllm.rotation import TABLE_ROWS, Rotator
from tiny import VOCAB, tiny_model

TOL = 1e-4


def _sampled(model, compile, n=70, window=16):
    """Tokens sampled with a fixed seed (the tiny model's greedy text repeats one token)."""
    return [int(t) for t in generate_tokens(model, SinkCache(model, 4, window), [5, 7, 11], max_new_tokens=n,
                                            sampling=Sampling(temperature=1.0, seed=0), compile=compile)]


def test_compile_choices():
    assert compiles("auto", torch.device("cuda")) and not compiles("auto", torch.device("cpu"))
    assert compiles("on", "cpu") and not compiles("off", "cuda") and compiles(True, "cpu")
    with pytest.raises(ArgumentError, match="compile must be one of auto, on, off, got 'yes'"):
        DecodeStep(tiny_model("llama"), "yes")


def test_prepared_steps_generate_what_ordinary_steps_do(compile_as_identity):
    """With torch.compile standing in as the identity, compile='on' runs every step after the cache
    filled prepared (static shapes), and generates the very tokens of ordinary steps."""
    model = tiny_model("llama")
    plain = _sampled(model, "off")
    compiled = _sampled(model, "on")
    assert compiled == plain and len(set(plain[30:])) >= 5
    assert len(compile_as_identity.calls) == 70 - 1 - (20 - 3)  # every decode forward once the 4 + 16 cache was full


def test_a_failed_compilation_says_why_and_decodes_eagerly(monkeypatch):
    model = tiny_model("llama")
    said = []

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    step = DecodeStep(model, "on", on_compile=said.append)
    with pytest.warns(RuntimeWarning, match="torch.compile of the decode step failed, decoding eagerly: "
                                            "RuntimeError: no C\\+\\+ compiler found"):
        tokens = _sampled(model, step)
    assert tokens == _sampled(model, "off")
    assert not step.compiled and step.failure == "RuntimeError: no C++ compiler found"
    assert said == ["compiling the decode step for a 20-token cache (once per model and cache size)..."]


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_really_compiled_steps_equal_eager():
    """The real thing on the CPU (freezing, inductor's C++ GEMM template): the compiled step's logits
    equal eager ones, and a second call with the same cache size does not compile again."""
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 90), generator=torch.Generator().manual_seed(3))
    said = []
    step = DecodeStep(model, "on", on_compile=said.append)
    out = {}
    for name, decode in (("eager", DecodeStep(model, "off")), ("compiled", step)):
        cache = SinkCache(model, 4, 16)
        prefill(model, cache, ids[:, :30])
        with torch.no_grad():
            out[name] = torch.cat([decode(ids[:, t : t + 1], cache) for t in range(30, 90)], 1)
    assert step.compiled and (out["compiled"] - out["eager"]).abs().max().item() <= TOL
    assert len(said) == 2 and said[1].startswith("decode step compiled in")
    torch._dynamo.reset()


def test_handed_out_position_ids_are_recognised_without_reading_them():
    """A prepared or library-fed forward passes back the ids the cache handed out: the cache knows
    their value without reading the device (a meta tensor cannot be read at all), unless they were
    modified since."""
    model = tiny_model("llama")
    cache = SinkCache(model, 4, 16)
    prefill(model, cache, torch.randint(0, VOCAB, (1, 40)))
    ids = cache.position_ids(1, device="meta")
    assert cache._handed.first(ids) == cache.timeline.next_position()
    assert cache._handed.first(ids.reshape(1, 1)) == cache.timeline.next_position()  # a view, as models pass it
    mine = torch.tensor([[7]])
    assert cache._handed.first(mine) == 7  # not handed out: read
    handed = cache.position_ids(1)
    handed.fill_(3)  # modified after it was handed out: read again
    assert cache._handed.first(handed) == 3


def test_single_rotations_come_from_a_table_equal_to_the_direct_computation():
    rotator = Rotator(1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    for delta in (0, 1, 517, TABLE_ROWS - 1, TABLE_ROWS, 70_000):
        cos, sin = rotator.cos_sin((delta,), torch.device("cpu"), torch.float32)
        angles = delta * rotator.inv_freq64
        assert torch.equal(cos[0], angles.cos().float()) and torch.equal(sin[0], angles.sin().float())
    table_row = rotator.cos_sin((5,), torch.device("cpu"), torch.float32)[0]
    assert table_row.untyped_storage().nbytes() >= TABLE_ROWS * 4 * 4  # a view of the table, not a fresh tensor


def test_a_ring_step_writes_every_layers_sinks_at_once():
    """The layers' buffers are views of one tensor per device, and a ring step rotates the sinks
    straight into all of them; the result is the reference's (test_cache covers it at length)."""
    model = tiny_model("llama")
    cache = SinkCache(model, 4, 16)
    prefill(model, cache, torch.randint(0, VOCAB, (1, 40)))
    keys = cache.groups[0].buffers.keys[0]
    assert all(layer.keys.data_ptr() == keys[i].data_ptr() for i, layer in enumerate(cache.layers))
    calls = []
    original = cache.sinks.rotate_into
    cache.sinks.rotate_into = lambda *a: (calls.append(a), original(*a))
    cache.prepare_decode_step()
    assert len(calls) == 1


def test_a_servers_lone_stream_goes_the_compiled_way(compile_as_identity):
    """decode_rows with one stream and a DecodeStep (what the server's engine passes) runs that
    stream's steps prepared, with the logits of the ordinary forward."""
    from streamingllm.feed import decode_rows

    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(5))
    step = DecodeStep(model, "on")
    out = {}
    for name, decode in (("plain", None), ("compiled", step)):
        cache = SinkCache(model, 4, 16)
        prefill(model, cache, ids[:, :30])
        out[name] = torch.stack([decode_rows(model, [cache], ids[0, t : t + 1], decode) for t in range(30, 60)])
    assert len(compile_as_identity.calls) == 30 and (out["compiled"] - out["plain"]).abs().max().item() <= TOL
