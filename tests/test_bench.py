"""The benchmark's own logic (streamingllm.bench): statistics, reports, storage checks, errors.

Tiny random models only; no timing is asserted anywhere.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import transformers as tf

from streamingllm import SinkCache, bench
from streamingllm.cli import main
from tiny import tiny_config, tiny_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000


# --- statistics -------------------------------------------------------------------------


def test_latency_stats_odd_count_hand_computed():
    # sorted ms: 1 2 3 4 10; median = 3; p90: h = 4 * 0.9 = 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
    s = bench.latency_stats([0.004, 0.001, 0.003, 0.010, 0.002])
    assert s["n"] == 5
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(7.6)
    assert s["mean_ms"] == pytest.approx(4.0)


def test_latency_stats_even_count_and_single_sample():
    # sorted ms: 1 2 3 4; median: h = 1.5 -> 2.5; p90: h = 2.7 -> 3 + 0.7 = 3.7
    s = bench.latency_stats([0.002, 0.004, 0.001, 0.003])
    assert (s["median_ms"], s["p90_ms"], s["mean_ms"]) == pytest.approx((2.5, 3.7, 2.5))
    one = bench.latency_stats([0.05])
    assert (one["median_ms"], one["p90_ms"], one["mean_ms"], one["n"]) == pytest.approx((50.0, 50.0, 50.0, 1))


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 2.0, 2.0, 7.5, 3.25]
    for q in (0, 10, 25, 50, 90, 99, 100):
        assert bench.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


@pytest.mark.parametrize("samples, error, message", [
    ([], ValueError, "empty"),
    ([0.1, -0.2], ValueError, "finite and >= 0"),
    ([0.1, float("nan")], ValueError, "finite"),
    (["1"], TypeError, "numbers"),
    (0.5, TypeError, "sequence"),
])
def test_latency_stats_rejects_bad_samples(samples, error, message):
    with pytest.raises(error, match=message):
        bench.latency_stats(samples)


def test_speedups_from_given_rows():
    rows = [
        {"size": 256, "method": "streaming", "median_ms": 2.0},
        {"size": 256, "method": "recompute", "median_ms": 90.0},
        {"size": 256, "method": "dense", "median_ms": 2.5},
        {"size": 1024, "method": "streaming", "median_ms": 4.0},
        {"size": 1024, "method": "recompute", "median_ms": 600.0},
        {"size": 4096, "method": "streaming", "median_ms": 8.0},  # no recompute arm at this size
    ]
    assert bench.speedups(rows) == pytest.approx({256: 45.0, 1024: 150.0})
    assert bench.speedups(rows, method="dense") == pytest.approx({256: 36.0})


# --- decode benchmark end to end --------------------------------------------------------


def test_bench_decode_end_to_end_writes_csv_and_png(llama, tmp_path):
    seen = []
    rows = bench.bench_decode(llama, sizes=[8, 24], methods=["streaming", "dense", "recompute"], steps=5, warmup=1,
                              recompute_steps=2, block=2, progress=False, on_row=seen.append)
    assert [(r["size"], r["method"]) for r in rows] == [
        (n, m) for n in (8, 24) for m in ("streaming", "dense", "recompute")]
    assert len(seen) == 6
    for r in rows:
        assert r["steps"] == (2 if r["method"] == "recompute" else 5)
        assert 0 < r["median_ms"] <= r["p90_ms"] and r["mean_ms"] > 0
        assert r["peak_mib"] > 0 and r["mem_source"] in ("cuda", "rss_hwm", "rss")
        by = {x["method"]: x for x in rows if x["size"] == r["size"]}
        assert r["vs_dense"] == pytest.approx(r["median_ms"] / by["dense"]["median_ms"])
        assert r["speedup_vs_recompute"] == pytest.approx(by["recompute"]["median_ms"] / r["median_ms"])
    state = {(r["size"], r["method"]): r["state_mib"] for r in rows}
    # dense: the storage of N + 1 tokens (a step's torch.cat, cropped back to N as a view), layers x K/V x fp32
    c = llama.config
    assert state[(24, "dense")] * 2**20 == pytest.approx(c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 25 * 4)
    assert state[(8, "recompute")] == 0 and state[(24, "streaming")] > 0

    csv_path = bench.write_csv(rows, tmp_path / "out" / "decode.csv", bench.DECODE_COLUMNS)
    header, table = read_csv(csv_path)
    assert header == bench.DECODE_COLUMNS and len(table) == 6
    for line in table:
        for col in ("size", "steps", "median_ms", "p90_ms", "mean_ms", "state_mib", "peak_mib", "vs_dense",
                    "speedup_vs_recompute"):
            assert math.isfinite(float(line[col])), (col, line)
    png = bench.plot_decode(rows, tmp_path / "out" / "decode.png", title="tiny")
    assert_png(png)
    text = bench.decode_table(rows)
    assert "stream speed-up" in text and "stream/dense" in text and len(text.splitlines()) == 4


def test_bench_decode_subset_of_methods(llama):
    rows = bench.bench_decode(llama, sizes=[12], methods=["dense", "streaming"], steps=3, warmup=0, progress=False)
    assert [r["method"] for r in rows] == ["streaming", "dense"]
    assert all(r["speedup_vs_recompute"] is None for r in rows)
    rows = bench.bench_decode(llama, sizes=[12], methods=["recompute"], steps=8, recompute_steps=3, warmup=0,
                              recompute_logits="last", progress=False)
    assert [(r["method"], r["steps"]) for r in rows] == [("recompute", 3)]


def test_recompute_forward_is_plain_by_default(llama):
    fwd = bench._Forward(llama)
    ids = torch.randint(0, 97, (1, 10))
    assert fwd.plain(ids).shape == (1, 10, 97)  # every token's logits, as a plain forward (the paper's baseline)
    fwd.last_logits_only = True
    assert fwd.plain(ids).shape == (1, 1, 97)


def test_compiled_arm_uses_prepared_steps(llama, monkeypatch):
    """streaming-compiled / compile=True: prepared static steps (torch.compile stubbed out here)."""
    compiled_calls = []

    def fake_compile(fn, **kwargs):
        def run(*args, **kw):
            compiled_calls.append(kw["position_ids"])
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    rows = bench.bench_decode(llama, sizes=[12], methods=["streaming-compiled", "streaming", "dense"], steps=3, warmup=1,
                              progress=False)
    assert [r["method"] for r in rows] == ["streaming", "streaming-compiled", "dense"]
    assert len(compiled_calls) == 2 + 1 + 3  # compile steps, warm-up, timed: only the compiled arm
    res = bench.bench_stream(llama, 60, sample_every=30, methods=["streaming"], window_size=16, progress=False,
                             compile=True)
    assert res.storage_unchanged and len(compiled_calls) == 6 + 60 - 20  # every step after the cache filled
    with pytest.raises(TypeError, match="compile must be True or False"):
        bench.bench_stream(llama, 10, compile="yes", progress=False)


def test_compiled_arm_is_dropped_when_compilation_fails(llama, monkeypatch, capsys):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = bench.bench_decode(llama, sizes=[12, 20], methods=["streaming-compiled", "dense"], steps=2, warmup=0,
                              progress=False)
    assert [(r["size"], r["method"]) for r in rows] == [(12, "dense"), (20, "dense")]
    assert "torch.compile failed, dropping the streaming-compiled arm: RuntimeError: no C++ compiler" in capsys.readouterr().err


# --- stream benchmark -------------------------------------------------------------------


def test_bench_stream_generate_end_to_end(llama, tmp_path):
    res = bench.bench_stream(llama, 400, sample_every=100, max_dense_tokens=250, window_size=28, progress=False)
    stream = [r for r in res.rows if r["method"] == "streaming"]
    dense = [r for r in res.rows if r["method"] == "dense"]
    assert [r["tokens"] for r in stream] == [100, 200, 300, 400]
    assert [r["tokens"] for r in dense] == [100, 200, 250]  # stopped by max_dense_tokens, last sample at the stop
    assert res.dense_tokens == 250 and res.dense_stop == "max_dense_tokens"
    assert all(r["cached_tokens"] == 32 for r in stream)
    assert [r["cached_tokens"] for r in dense] == [100, 200, 250]
    assert len({r["state_mib"] for r in stream}) == 1  # flat
    assert dense[0]["state_mib"] < dense[1]["state_mib"] < dense[2]["state_mib"]  # grows
    assert res.first_full_tokens == 32 and res.storage_unchanged and res.storage_growth_bytes == 0
    assert "0 bytes" in bench.stream_summary(res)

    header, table = read_csv(bench.write_csv(res.rows, tmp_path / "stream.csv", bench.STREAM_COLUMNS))
    assert header == bench.STREAM_COLUMNS and len(table) == 7
    assert all(math.isfinite(float(line[c])) for line in table for c in header if c not in ("method", "gpu_mib"))
    assert all(line["gpu_mib"] == "" for line in table)  # CPU: no CUDA memory column values
    assert_png(bench.plot_stream(res.rows, tmp_path / "stream.png"))


def test_streaming_storage_does_not_grow_teacher_forced_chunks(llama):
    res = bench.bench_stream(llama, 5000, sample_every=1000, mode="teacher-forced", methods=["streaming"],
                             window_size=60, chunk_size=256, progress=False)
    assert [r["tokens"] for r in res.rows] == [1024, 2048, 3072, 4096, 5000]  # first chunk end past each 1000
    assert res.first_full_tokens is not None and res.first_full_tokens <= 256
    assert res.storage_first_full and res.storage_first_full == res.storage_end
    assert res.storage_growth_bytes == 0 and res.storage_unchanged
    assert all(r["cached_tokens"] == 64 for r in res.rows)


def test_storage_layout_detects_growth(llama):
    """The storage check can fail: a DynamicCache reallocates on every token."""
    fwd = bench._Forward(llama)
    dense = bench._new_dense(llama)
    fwd.feed(dense, torch.randint(0, 97, (1, 10)))
    before = bench.storage_layout(dense)
    fwd(torch.tensor([[3]]), dense)
    assert bench.storage_layout(dense) != before
    assert bench.storage_bytes(dense) > sum(n for _, n in before)
    sink = SinkCache(llama, 4, 12)
    fwd.feed(sink, torch.randint(0, 97, (1, 40)))
    before = bench.storage_layout(sink)
    for t in range(30):
        fwd(torch.tensor([[t]]), sink)
    assert bench.storage_layout(sink) == before


def test_bench_stream_teacher_forced_given_ids_match_prefill(llama):
    """Teacher-forced chunked streaming feeds the given ids exactly like stream.prefill."""
    from streamingllm import prefill

    ids = torch.randint(0, 97, (300,), generator=torch.Generator().manual_seed(1))
    a, b = SinkCache(llama, 4, 28), SinkCache(llama, 4, 28)
    last_a = bench._Forward(llama).feed(a, ids[None], chunk_size=64)
    last_b = prefill(llama, b, ids, chunk_size=64)
    assert torch.allclose(last_a, last_b, atol=1e-5)
    res = bench.bench_stream(llama, 300, sample_every=300, mode="teacher-forced", methods=["streaming"],
                             window_size=28, chunk_size=64, token_ids=ids[:100], progress=False)
    assert res.rows[-1]["tokens"] == 300  # 100 ids repeated to 300


# --- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sizes=[4, 64]), ValueError, "sizes must each be > the sink size"),
    (dict(sizes=[16], sink_size=16), ValueError, "sizes must each be > the sink size"),
    (dict(sizes=[]), ValueError, "sizes must list at least one"),
    (dict(sizes=[16, 16]), ValueError, "must not repeat"),
    (dict(sizes=[16.5]), TypeError, "sizes must be integers"),
    (dict(sizes=[16], steps=0), ValueError, "steps must be an integer >= 1"),
    (dict(sizes=[16], warmup=-1), ValueError, "warmup must be an integer >= 0"),
    (dict(sizes=[16], recompute_steps=0), ValueError, "recompute_steps must be an integer >= 1"),
    (dict(sizes=[16], block=0), ValueError, "block must be an integer >= 1"),
    (dict(sizes=[16], methods=["streaming", "beam"]), ValueError, "methods must be among"),
    (dict(sizes=[16], recompute_logits="some"), ValueError, "recompute_logits must be one of \\['all', 'last'\\]"),
])
def test_bench_decode_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        bench.bench_decode(None, progress=False, **kwargs)  # rejected before the model is touched


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tokens=0), "num_tokens must be an integer >= 1"),
    (dict(sample_every=0), "sample_every must be an integer >= 1"),
    (dict(max_dense_tokens=-1), "max_dense_tokens must be an integer >= 0"),
    (dict(mode="beam"), "mode must be one of \\['generate', 'teacher-forced'\\]"),
    (dict(chunk_size=8), "chunk_size must be 1 in generate mode"),
    (dict(methods=["recompute"]), "methods must be among \\['streaming', 'dense'\\]"),
    (dict(window_size=0), "window_size must be an integer >= 1"),
])
def test_bench_stream_bad_arguments(kwargs, message):
    kwargs = {"num_tokens": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        bench.bench_stream(None, progress=False, **kwargs)


@pytest.mark.parametrize("argv, message", [
    (["bench", "decode", "--sizes", "4", "256"], "--sizes must each be > the sink size (4)"),
    (["bench", "decode", "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["bench", "decode", "--recompute-steps", "0"], "--recompute-steps must be an integer >= 1"),
    (["bench", "stream", "--sample-every", "0"], "--sample-every must be an integer >= 1, got 0"),
    (["bench", "stream", "--max-dense-tokens", "-5"], "--max-dense-tokens must be an integer >= 0, got -5"),
    (["bench", "stream", "--mode", "beam"], "--mode must be one of ['generate', 'teacher-forced'], got 'beam'"),
    (["bench", "stream", "--chunk-size", "4"], "--chunk-size must be 1 in generate mode"),
    (["bench", "stream", "--random-weights", "--mode", "teacher-forced", "--text-file", "x.txt"], "--text-file needs"),
    (["bench", "decode", "--threads", "0"], "--threads must be an integer >= 1"),
    (["bench", "decode", "--recompute-logits", "none"], "--recompute-logits must be one of ['all', 'last'], got 'none'"),
])
def test_cli_bench_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"streamingllm: error: {message}" in err and "Traceback" not in err


def test_cli_bench_end_to_end_on_a_tiny_model_folder(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_config("llama").save_pretrained(folder)
    out = tmp_path / "out"
    common = ["--model", str(folder), "--random-weights", "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(["bench", "decode", "--sizes", "8", "16", "--steps", "3", "--warmup", "1", "--methods", "streaming",
                 "dense", "recompute", *common]) == 0
    assert main(["bench", "stream", "--num-tokens", "120", "--sample-every", "40", "--window-size", "20",
                 "--max-dense-tokens", "80", *common]) == 0
    printed = capsys.readouterr().out
    assert "stream speed-up" in printed and "storage growth after it filled" in printed
    assert "dense arm stopped after 80 tokens (max_dense_tokens)" in printed
    header, rows = read_csv(out / "decode.csv")
    assert header == bench.DECODE_COLUMNS and len(rows) == 6
    header, rows = read_csv(out / "stream.csv")
    assert header == bench.STREAM_COLUMNS and [r["tokens"] for r in rows] == ["40", "80", "120", "40", "80"]
    assert_png(out / "decode.png")
    assert_png(out / "stream.png")


def test_default_model_random_weights_config():
    """--random-weights builds the default model's architecture from the shipped config."""
    cfg = dict(bench.SMOLLM2_135M_CONFIG)
    config = tf.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim, config.vocab_size) == (576, 3, 64, 49152)
    assert config.rope_parameters["rope_theta"] == 100000.0
    SinkCache(config, 4, 1020)  # a supported family


@pytest.mark.slow
def test_shipped_config_matches_the_default_model():
    """The shipped architecture is the GGUF's (read from its metadata; no weights loaded)."""
    from streamingllm.models import DEFAULT_MODEL, ModelLoadError, resolve

    try:
        source, gguf = resolve(DEFAULT_MODEL)
    except ModelLoadError as err:
        pytest.skip(str(err))
    real = tf.AutoConfig.from_pretrained(source, gguf_file=gguf).to_dict()
    for key, value in bench.SMOLLM2_135M_CONFIG.items():
        if isinstance(value, float):
            assert real[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert real[key] == value, key
