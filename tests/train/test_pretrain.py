"""Pre-training from scratch (streamingllm.train, `streamingllm pretrain`) on a small synthetic text:
identical starts, the sink token, training steps, checkpoints that stream exactly, bad settings."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers as tf

from streamingllm import SinkCache, load
from streamingllm.checks import ArgumentError
from streamingllm.cli import main
from streamingllm.train import PRESETS, VARIANTS, TrainConfig, build_model, prepare_data, pretrain, variants_of
from streamingllm.train.data import SINK, Windows
from streamingllm.train.loop import inputs_and_labels, learning_rate, loss_of, optimizer_for

from reference import ReferenceSinkCache

WORDS = ("the of and to a in that was her it his she not be with had as he you for but is my on have which all "
         "sister mother house letter morning walk ball dance carriage estate fortune marriage cousin friend").split()


def _text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while words > 0:
        n = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return " ".join(sentences)


TEXTS = (_text(0, 12000), _text(1, 3000))
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(TINY, tmp_path_factory.mktemp("run"), texts=TEXTS)


def test_every_variant_starts_from_the_same_weights(data):
    models = {v: build_model(VARIANTS[v], TINY, data.tokenizer) for v in VARIANTS}
    ref = models["vanilla"].state_dict()
    for name, model in models.items():
        state = model.state_dict()
        assert all(torch.equal(state[k], ref[k]) for k in ref), name
        extra = set(state) - set(ref)
        assert all(k.endswith("sinks") for k in extra) and all(not state[k].any() for k in extra), name
    assert type(models["softmax1"]).__name__ == "SinkLlamaForCausalLM"
    assert type(models["sink-token"]) is tf.LlamaForCausalLM  # an ordinary Llama, fed a <sink> first


def test_the_sink_token_is_prepended_and_every_variant_is_scored_on_the_same_targets(data):
    windows = Windows(data.train_ids, TINY.seq_len, seed=0).batch(3)
    sink = data.tokenizer.convert_tokens_to_ids(SINK)
    ids, labels = inputs_and_labels(windows, None)
    sids, slabels = inputs_and_labels(windows, sink)
    assert torch.equal(ids, windows) and (sids[:, 0] == sink).all() and torch.equal(sids[:, 1:], windows)
    assert torch.equal(slabels[:, 1:], labels)  # the same targets: every window token after the first
    assert (labels[:, 0] == -100).all() and (slabels[:, :2] == -100).all()


def test_the_same_seed_draws_the_same_windows():
    ids = torch.arange(1000)
    a, b = Windows(ids, 16, seed=3), Windows(ids, 16, seed=3)
    assert all(torch.equal(a.batch(4), b.batch(4)) for _ in range(3))
    assert not torch.equal(Windows(ids, 16, seed=4).batch(4), Windows(ids, 16, seed=3).batch(4))


def test_learning_rate_warms_up_then_decays_to_its_floor():
    c = TrainConfig(steps=100, warmup_steps=10, learning_rate=1e-3, min_lr_ratio=0.1)
    lrs = [learning_rate(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_steps_lower_the_loss_on_a_fixed_batch(variant, data):
    v = VARIANTS[variant]
    model = build_model(v, TINY, data.tokenizer).train()
    sink = data.tokenizer.convert_tokens_to_ids(SINK) if v.sink_token else None
    batch = Windows(data.train_ids, TINY.seq_len, seed=1).batch(4)
    opt = optimizer_for(model, TINY.replace(learning_rate=3e-3))
    before = loss_of(model, batch, sink).item()
    for _ in range(5):
        loss = loss_of(model, batch, sink)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_of(model, batch, sink).item() < before - 0.1
    if v.attention_sink == "learned":  # the sink logits are trained too
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n.endswith("sinks"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("pretrain")
    results = pretrain(variants_of(list(VARIANTS)), TINY, out, data=data, progress=False)
    return out, results


def test_pretrain_writes_checkpoints_logs_and_reuses_finished_runs(run, data):
    out, results = run
    assert [r.variant for r in results] == list(VARIANTS)
    for r in results:
        meta = json.loads((r.folder / "training.json").read_text())
        assert meta["variant"] == r.variant and meta["config"]["steps"] == TINY.steps
        assert len(r.log) == TINY.steps and r.log[-1]["val_loss"] is not None
        assert (r.folder / "config.json").is_file() and (r.folder / "train_log.csv").is_file()
    again = pretrain(variants_of(["vanilla"]), TINY, out, data=data, progress=False)
    assert again[0].reused
    assert [row["loss"] for row in again[0].log] == pytest.approx([row["loss"] for row in results[0].log], rel=1e-5)
    changed = pretrain(variants_of(["vanilla"]), TINY.replace(steps=TINY.steps + 1), out, data=data, progress=False)
    assert not changed[0].reused and len(changed[0].log) == TINY.steps + 1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_checkpoint_reloads_with_identical_logits(run, variant):
    out, results = run
    folder = out / variant
    model, tokenizer = load(str(folder))
    again = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer("Her sister walked to the house.").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    sink = tokenizer.convert_tokens_to_ids(SINK)
    assert (ids[0, 0] == sink) == VARIANTS[variant].sink_token  # the sink-token variant's tokenizer adds it


def test_the_sink_token_model_streams_with_one_sink_exactly(run):
    """S = 1 keeps exactly the <sink> the tokenizer prepends; chunked prefill and decode equal the reference."""
    out, _ = run
    model, tokenizer = load(str(out / "sink-token"))
    ids = torch.tensor([tokenizer(TEXTS[1][:1500]).input_ids[:150]])
    assert ids[0, 0] == tokenizer.convert_tokens_to_ids(SINK)
    fast, ref = SinkCache(model, 1, 15), ReferenceSinkCache(model, 1, 15)
    with torch.no_grad():
        a = torch.cat([model(ids[:, i:i + 40], cache=fast).logits for i in range(0, 150, 40)], dim=1)
        b = torch.cat([model(ids[:, t:t + 1], cache=ref).logits for t in range(150)], dim=1)
    assert (a - b).abs().max().item() <= 1e-4
    assert fast.cached_tokens == 16 and fast.seen_tokens == 150


def test_the_command_trains_evaluates_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("streamingllm.train.run.austen_split", lambda held_out: TEXTS)
    out = tmp_path / "run"
    argv = ["pretrain", "--preset", "tiny", "--out", str(out), "--quiet", "--eval-tokens", "200",
            "--variants", "vanilla", "sink-token"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "vanilla" in table and "sink-token" in table and "0+16" in table and "4+12" in table
    for name in ("loss_curves.png", "loss_curves.csv", "table3.csv", "table3.md", "dense.png", "sinks.csv"):
        assert (out / name).is_file(), name
    md = (out / "table3.md").read_text()
    assert "27.87 / 18.49 / 18.05" in md and "1235 / 18.01 / 18.02" in md
    assert main(argv + ["--no-evaluate"]) == 0
    assert "reused" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--variants", "gpt2"], "--variants must be one of vanilla, sink-token, softmax1, sink-logit, got 'gpt2'"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--num-heads", "5"], "--num-heads must divide --hidden-size (32), got 5"),
    (["--num-kv-heads", "3"], "--num-kv-heads must divide --num-heads (4), got 3"),
    (["--learning-rate", "0"], "--learning-rate must be a number > 0"),
    (["--sink-sizes", "0", "16"], "--cache-size must be an integer >= 17, got 16"),
    (["--device", "cuda:7"], "--device must be a device"),
])
def test_bad_settings_are_one_line_naming_the_flag(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("streamingllm.train.run.austen_split", lambda held_out: pytest.fail("read the text"))
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "vanilla").exists()


def test_bad_configuration_in_python_names_the_parameter():
    with pytest.raises(ArgumentError, match="seq_len must be an integer >= 2, got 1"):
        TrainConfig(seq_len=1)
    with pytest.raises(ArgumentError, match="held_out must be one of"):
        TrainConfig(held_out="ulysses")
    with pytest.raises(ArgumentError, match="num_heads must leave an even head size"):
        TrainConfig(hidden_size=30, num_heads=6, num_kv_heads=6)
    with pytest.raises(ArgumentError, match="variants must be one of"):
        variants_of(["vanilla", "bogus"])
