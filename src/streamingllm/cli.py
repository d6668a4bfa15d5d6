"""The ``streamingllm`` command line: ``generate`` and ``chat``."""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from .models import DEFAULT_MODEL, ModelLoadError
from .families import UnsupportedModelError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model: {DEFAULT_MODEL} (default), a folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
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
    c = sub.add_parser("chat", help="multi-turn chat; memory stays bounded by the cache")
    c.add_argument("--system", default=None, help="system prompt")
    _add_model_args(c)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_generate(args) if args.command == "generate" else cmd_chat(args)
    except (ValueError, TypeError, ModelLoadError, UnsupportedModelError) as err:
        print(f"streamingllm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
