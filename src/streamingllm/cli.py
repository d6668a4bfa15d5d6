"""The ``streamingllm`` command line: ``generate`` and ``chat``."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .models import DEFAULT_MODEL, ModelLoadError
from .corpus import CorpusError
from .families import UnsupportedModelError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model: {DEFAULT_MODEL} (default), a folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sink-size", type=int, default=4, help="attention-sink tokens kept (>= 0; 0 = window attention)")
    p.add_argument("--window-size", type=int, default=1020, help="most recent tokens kept (>= 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (>= 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--chunk-size", type=int, default=256, help="prompt tokens per forward pass")
    p.add_argument("--fast-prefill", action="store_true", help="plain causal mask inside prompt chunks (approximate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamingllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt, streaming tokens to stdout")
    g.add_argument("prompt", nargs="?", help="the prompt text; '-' or omitted reads stdin")
    g.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens (with --chat-template)")
    g.add_argument("--stats", action="store_true", help="print tokens/s, cache fill and resident memory to stderr every 256 tokens")
    _add_model_args(g)
    _add_generation_args(g)
    c = sub.add_parser("chat", help="multi-turn chat; memory stays bounded by the cache")
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    _add_generation_args(c)
    _add_perplexity_parser(sub)
    b = sub.add_parser("bench", help="speed and memory: latency vs cache size (decode), endless streams (stream)")
    from .bench import add_bench_arguments

    add_bench_arguments(b)
    return parser


def _add_perplexity_parser(sub) -> None:
    p = sub.add_parser(
        "perplexity",
        help="per-token perplexity of dense, window, recompute and streaming attention on long text",
        description="Score a long text with dense attention, window attention, sliding window with "
        "re-computation and StreamingLLM; write per-token NLL (CSV), a summary and plots (PNG).",
    )
    p.add_argument("files", nargs="*", help="text files, concatenated in order ('-' = stdin)")
    p.add_argument("--corpus", choices=["austen"], help="built-in corpus: Jane Austen's six novels (fetched once from Debian)")
    p.add_argument("--dataset", metavar="NAME", help="Hugging Face dataset id, e.g. emozilla/pg19 (needs `datasets` and the hub)")
    p.add_argument("--dataset-split", default="test", help="split of --dataset (default: test)")
    p.add_argument("--dataset-field", default="text", help="text column of --dataset (default: text)")
    p.add_argument("--methods", nargs="+", default=["dense", "window", "recompute", "streaming"], metavar="METHOD",
                   help="any of dense window recompute streaming (default: all four)")
    p.add_argument("--sink-size", type=int, nargs="+", default=[4], metavar="S", help="attention sinks, one or more values (default 4)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--window-size", type=int, nargs="+", metavar="W", help="recent tokens kept, one or more values (every S with every W)")
    size.add_argument("--cache-size", type=int, nargs="+", metavar="L", help="total cache S+W, one or more values; W = L - S (default 1024)")
    p.add_argument("--sink-text", metavar="TEXT", help=r"use these tokens as the sinks instead of the text's first tokens, cycled to S tokens (e.g. '\n'); \n and \t are unescaped")
    p.add_argument("--num-tokens", type=int, help="tokens of the text to score (default: all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many tokens of the text first (default 0)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per forward pass (default 256); results do not depend on it")
    p.add_argument("--recompute-every", default="auto", metavar="K",
                   help="recompute scores every K-th token only (it costs a forward of L+1 tokens per token); "
                   "'auto' (default) scores about 256 tokens, 1 scores all")
    p.add_argument("--max-dense-tokens", type=int, default=65536, help="refuse dense on longer texts (default 65536)")
    p.add_argument("--segment-tokens", type=int, help="summary columns: perplexity per segment of this many tokens (default: quarters)")
    p.add_argument("--smooth", type=int, default=256, help="plot: moving mean over this many tokens (default 256)")
    p.add_argument("--out", type=Path, default=Path("perplexity_out"), help="output folder (default: perplexity_out)")
    _add_model_args(p)


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt is not None:
            raise ValueError("give the prompt either as an argument or with --prompt-file, not both")
        try:
            text = args.prompt_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"--prompt-file: cannot read {args.prompt_file}: {err.strerror}") from err
    elif args.prompt is None or args.prompt == "-":
        text = sys.stdin.read()
    else:
        text = args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty: give some text (argument, --prompt-file or stdin)")
    return text


def _rss_mib() -> float:
    """Resident memory of this process now, in MiB (Linux), else peak RSS."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(args):
    from .cache import SinkCache
    from .models import load
    from .stream import Sampling

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for flag, value, least in [("--sink-size", args.sink_size, 0), ("--window-size", args.window_size, 1),
                               ("--max-new-tokens", args.max_new_tokens, 0), ("--chunk-size", args.chunk_size, 1)]:
        if value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value}")
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    cache = SinkCache(model, sink_size=args.sink_size, window_size=args.window_size)
    return model, tokenizer, cache, sampling


def _encode(tokenizer, messages=None, text=None):
    import torch

    if messages is not None:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = out if torch.is_tensor(out) else out["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[0]


def _stop_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return ids


class _Printer:
    """Decodes tokens incrementally (multi-byte characters, spaces) and writes them as they come."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], 0

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)
        if len(self.ids) > 64:  # keep decoding cost constant
            self.ids, self.printed = [], 0


def cmd_generate(args) -> int:
    from .stream import generate_tokens

    text = _read_prompt(args)
    model, tokenizer, cache, sampling = _setup(args)
    ids = _encode(tokenizer, messages=[{"role": "user", "content": text}]) if args.chat_template else _encode(tokenizer, text=text)
    printer = _Printer(tokenizer, sys.stdout)
    stops = _stop_ids(tokenizer) if args.chat_template and not args.ignore_eos else set()
    start, count = time.perf_counter(), 0
    for token in generate_tokens(
        model, cache, ids, args.max_new_tokens, sampling, stops, chunk_size=args.chunk_size, exact_prefill=not args.fast_prefill
    ):
        printer.add(int(token[0]))
        count += 1
        if args.stats and count % 256 == 0:
            rate = count / (time.perf_counter() - start)
            print(
                f"\n[{count} tokens, {rate:.1f} tok/s, cache {cache.cached_tokens}/{cache.max_cached_tokens} tokens, "
                f"seen {cache.seen_tokens}, RSS {_rss_mib():.0f} MiB]",
                file=sys.stderr,
                flush=True,
            )
    sys.stdout.write("\n")
    if args.stats:
        print(
            f"[done: {count} tokens in {time.perf_counter() - start:.1f} s, cache {cache.cached_tokens}/"
            f"{cache.max_cached_tokens} tokens, seen {cache.seen_tokens}, RSS {_rss_mib():.0f} MiB]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args) -> int:
    from .stream import generate_tokens, prefill

    model, tokenizer, cache, sampling = _setup(args)
    stops = _stop_ids(tokenizer)
    render = lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    encode = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    recent = [{"role": "system", "content": args.system}] if args.system else []  # the last messages only
    interactive = sys.stdin.isatty()
    print(f"streamingllm chat: {args.model}, cache {args.sink_size}+{args.window_size} tokens. Ctrl-D to quit.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        user = {"role": "user", "content": line.strip()}
        # The cache already holds the conversation: feed only the text this turn adds to the template.
        full = render(recent + [user], True)
        new_text = full[len(render(recent, False)) :] if cache.seen_tokens else full
        print("bot> ", end="", flush=True)
        printer, reply, stopped = _Printer(tokenizer, sys.stdout), [], False
        for token in generate_tokens(model, cache, encode(new_text), args.max_new_tokens, sampling, stops, chunk_size=args.chunk_size):
            tid = int(token[0])
            if tid in stops:
                stopped = True
                break
            reply.append(tid)
            printer.add(tid)
        reply_text = tokenizer.decode(reply, skip_special_tokens=True)
        # feed the assistant turn's end as the template writes it (and the last token, if it was cut off)
        assistant = {"role": "assistant", "content": reply_text}
        closed = render([user, assistant], False)
        tail = closed[closed.rfind(reply_text) + len(reply_text) :] if reply_text else closed[len(render([user], True)) :]
        last = encode(tail) if stopped or not reply else encode(tokenizer.decode(reply[-1:]) + tail)
        if len(last):
            prefill(model, cache, last)
        recent = [user, assistant]
        fill = cache.cached_tokens / cache.max_cached_tokens
        print(f"\n[cache {cache.cached_tokens}/{cache.max_cached_tokens} tokens ({fill:.0%} full), {cache.seen_tokens} seen]", file=sys.stderr, flush=True)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _read_source(args) -> str:
    from .corpus import austen_text, hub_dataset_text, read_texts

    given = [name for name, on in (("files", bool(args.files)), ("--corpus", args.corpus), ("--dataset", args.dataset)) if on]
    if len(given) != 1:
        raise ValueError(f"give exactly one text source: files (or '-' for stdin), --corpus austen, or --dataset NAME (got {len(given)})")
    if args.files:
        text = read_texts(args.files)
    elif args.corpus:
        text = austen_text()
    else:
        need = None if args.num_tokens is None else (args.offset + args.num_tokens) * 12
        text = hub_dataset_text(args.dataset, args.dataset_split, args.dataset_field, max_chars=need)
    if not text.strip():
        raise ValueError("the text is empty: give a file, stdin, --corpus or --dataset with some text")
    return text


def _tokenize(tokenizer, text: str, offset: int, num_tokens: int | None) -> list[int]:
    """Token ids ``[offset : offset + num_tokens]`` of ``text``, after the tokenizer's BOS if it adds one."""
    budget = None if num_tokens is None else (offset + num_tokens) * 12  # characters surely enough
    while True:
        piece = text if budget is None or budget >= len(text) else text[:budget]
        ids = tokenizer(piece, add_special_tokens=False, verbose=False).input_ids
        if num_tokens is None or len(ids) >= offset + num_tokens + 1 or piece is text:
            break
        budget *= 4
    ids = ids[offset:]
    probe = tokenizer("a").input_ids
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        ids = [tokenizer.bos_token_id] + ids  # the stream starts as the model saw texts start in training
    return ids if num_tokens is None else ids[:num_tokens]


def cmd_perplexity(args) -> int:
    import torch
    from tqdm import tqdm

    from .models import load
    from .perplexity import (evaluate, format_summary, make_settings, plot_curves, plot_sweep, summarize,
                             write_nll_csv, write_summary_csv)

    for flag, value, least in [("--offset", args.offset, 0), ("--chunk-size", args.chunk_size, 1),
                               ("--smooth", args.smooth, 1), ("--max-dense-tokens", args.max_dense_tokens, 2)]:
        if value < least:
            raise ValueError(f"{flag} must be an integer >= {least}, got {value}")
    if args.num_tokens is not None and args.num_tokens < 2:
        raise ValueError(f"--num-tokens must be an integer >= 2, got {args.num_tokens}")
    if args.segment_tokens is not None and args.segment_tokens < 1:
        raise ValueError(f"--segment-tokens must be an integer >= 1, got {args.segment_tokens}")
    every = args.recompute_every
    if every != "auto" and not (every.isdigit() and int(every) >= 1):
        raise ValueError(f"--recompute-every must be 'auto' or an integer >= 1, got {every!r}")
    for flag, values, least in [("--sink-size", args.sink_size, 0), ("--window-size", args.window_size or [], 1),
                                ("--cache-size", args.cache_size or [], 1)]:
        for v in values:
            if v < least:
                raise ValueError(f"{flag} values must be integers >= {least}, got {v}")
    try:  # check methods and sizes before loading anything
        make_settings(args.methods, args.sink_size, args.window_size, args.cache_size, sink_ids=[0] if args.sink_text else None)
    except ValueError as err:
        raise ValueError(f"--methods/--sink-size/--window-size/--cache-size: {err}") from err
    if args.sink_text is not None and not _unescape(args.sink_text):
        raise ValueError("--sink-text is empty: give the text whose tokens become the sinks, e.g. '\\n'")
    text = _read_source(args)
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    ids = _tokenize(tokenizer, text, args.offset, args.num_tokens)
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} token(s) after --offset {args.offset}: need at least 2")
    if args.num_tokens is not None and len(ids) < args.num_tokens:
        print(f"note: the text has only {len(ids)} tokens after --offset {args.offset} (asked for {args.num_tokens})", file=sys.stderr)
    sink_ids = sink_name = None
    if args.sink_text is not None:
        sink_text = _unescape(args.sink_text)
        sink_ids = tokenizer(sink_text, add_special_tokens=False).input_ids
        sink_name = '"' + sink_text.encode("unicode_escape").decode() + '"'
        if not sink_ids:
            raise ValueError(f"--sink-text {args.sink_text!r} gives no tokens")
    settings = make_settings(args.methods, args.sink_size, args.window_size, args.cache_size, sink_ids, sink_name or "")
    every = max(1, round((len(ids) - 1) / 256)) if every == "auto" else int(every)
    trained = getattr(model.config, "max_position_embeddings", None)
    print(f"scoring {len(ids):,} tokens (offset {args.offset}) with {len(settings)} setting{'s' if len(settings) > 1 else ''}; model {args.model}, "
          f"trained length {trained}", file=sys.stderr)
    if any(s.method == "recompute" for s in settings) and every > 1:
        print(f"recompute: scoring every {every}th token only (--recompute-every {every}): each costs a forward of L+1 tokens",
              file=sys.stderr)
    bar = lambda setting, total: tqdm(total=total, desc=setting.label, unit="tok", file=sys.stderr,
                                      mininterval=1 if sys.stderr.isatty() else 15)
    torch.set_grad_enabled(False)
    results = evaluate(model, ids, settings, chunk_size=args.chunk_size, recompute_every=every,
                       max_dense_tokens=args.max_dense_tokens, progress_factory=bar)
    summary = summarize(results, len(ids), args.segment_tokens)
    print(format_summary(summary))
    args.out.mkdir(parents=True, exist_ok=True)
    write_nll_csv(results, args.out / "nll.csv")
    write_summary_csv(summary, args.out / "summary.csv")
    source = args.corpus or args.dataset or ", ".join(map(str, args.files))
    title = f"{args.model} on {source}: {len(ids):,} tokens"
    plot_curves(results, args.out / "curves.png", smooth=args.smooth, trained_length=trained, title=title)
    written = ["nll.csv", "summary.csv", "curves.png"]
    if plot_sweep(results, args.out / "sweep.png", title=title):
        written.append("sweep.png")
    print(f"wrote {', '.join(str(args.out / w) for w in written)}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench_command

    return run_bench_command(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "chat": cmd_chat, "perplexity": cmd_perplexity, "bench": cmd_bench}
        return commands[args.command](args)
    except (ValueError, TypeError, ModelLoadError, UnsupportedModelError, CorpusError) as err:
        print(f"streamingllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
