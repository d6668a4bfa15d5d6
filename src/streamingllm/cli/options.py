"""Options shared by several commands, defined once: the model, its dtype and device; the cache
sizes and the sampling of ``generate`` and ``chat`` (checked before anything is loaded); and the
help formatter that shows every default."""

from __future__ import annotations

import argparse

from ..models import DEFAULT_MODEL, DTYPES, NAMED_MODELS
from ..compiled import COMPILE
from ..precision import QUANTIZE


class CommandError(Exception):
    """A mistake the command line finds in input that is not one flag's value (an empty prompt, an
    unknown chat command): shown as it is, on one line. A flag's bad value is an
    :class:`~streamingllm.checks.ArgumentError`, shown with the flag."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (but not an absent one: None or off) and keeps
    descriptions' line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_parser(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared help formatter; ``help`` is its line in the parent's
    list of commands (and its description, when none is given)."""
    p = sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    p.set_defaults(command_parser=p)  # where an unknown flag is reported (the innermost command's)
    return p


def add_model_options(p: argparse.ArgumentParser, random_weights: bool = False, compile: bool = False) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--quantize`` (and ``--random-weights``, ``--seed`` when
    asked; ``--compile`` with ``compile``: :func:`add_compile_option`)."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a named model ({', '.join(NAMED_MODELS)}; the first is the default), a transformers "
                        "folder, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps, ...")
    p.add_argument("--quantize", default="none", choices=list(QUANTIZE),
                   help="CPU: int8 weight-only linears (with --dtype bfloat16" + (" and --compile on" if compile else "")
                        + ": the fastest)")
    if random_weights:
        p.add_argument("--random-weights", action="store_true",
                       help="the model's architecture with random weights (no tokenizer, no gguf needed)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    if compile:
        add_compile_option(p)


def add_compile_option(p: argparse.ArgumentParser) -> None:
    """``--compile``: the decode step compiled once the cache is full (:mod:`streamingllm.compiled`)."""
    p.add_argument("--compile", default="auto", choices=list(COMPILE),
                   help="compile the decode step once the cache is full: auto = on CUDA (CUDA graphs); on the CPU "
                   "it pays with --dtype bfloat16 --quantize int8 and takes a minute or two to compile")


def say(line: str) -> None:
    """A status line on stderr (a compilation's warm-up, say)."""
    import sys

    print(f"streamingllm: {line}", file=sys.stderr, flush=True)


def load_model(args, dtype: str | None = None, quantize: str | None = None, chat: bool = False):
    """``(model, tokenizer)`` from the options of :func:`add_model_options` (``dtype`` and
    ``quantize``, when given, instead of ``--dtype`` and ``--quantize``). With ``chat``, a model
    without a chat template is refused from its tokenizer, before its weights are loaded
    (:func:`check_chat_model`). Slow first-use work (assembling a named model) is announced."""
    from ..models import load

    check = (lambda tokenizer: check_chat_model(tokenizer, args.model)) if chat else None
    return load(args.model, dtype=dtype or args.dtype, device=args.device, quantize=quantize or args.quantize,
                random_weights=getattr(args, "random_weights", False), seed=getattr(args, "seed", 0) or 0,
                check_tokenizer=check, announce=say)


def check_chat_model(tokenizer, model: str) -> None:
    """Refuse a model whose tokenizer has no chat template (``chat`` and ``serve`` need one), naming ``--model``."""
    from ..checks import ArgumentError

    if not getattr(tokenizer, "chat_template", None):
        raise ArgumentError("model", "must be a chat (instruct) model: its tokenizer has no chat template", model)


def check_trained_length(args, model=None) -> None:
    """Refuse ``--sink-size`` + ``--window-size`` at or past the model's trained length (the next
    token would sit at an untrained position, and the cache would allocate for nothing), unless
    ``--beyond-trained-length``. Without ``model``, only a named model is checked (its
    architecture is known before loading); with it, any model (before its cache allocates)."""
    from types import SimpleNamespace

    from ..checks import ArgumentError
    from ..families import past_trained_length
    from ..models import ARCHITECTURES

    if getattr(args, "beyond_trained_length", False):
        return
    if model is not None:
        config = model.config
    elif args.model in ARCHITECTURES:
        config = SimpleNamespace(**ARCHITECTURES[args.model])
    else:
        return
    total = args.sink_size + args.window_size
    trained = past_trained_length(config, total)
    if trained is not None:
        raise ArgumentError("window_size", f"with --sink-size {args.sink_size} must keep the cache below the model's "
                            f"trained length of {trained} tokens (--window-size at most {trained - 1 - args.sink_size}"
                            "; --beyond-trained-length allows more, at untrained positions)", args.window_size)


def model_label(model: str) -> str:
    """A model's name for tables and titles: a local file's or folder's name, else the name as given
    (the default model's, a hub id)."""
    from pathlib import Path

    path = Path(model).expanduser()
    return path.name if path.exists() else model


def add_cache_options(p: argparse.ArgumentParser) -> None:
    """``--sink-size`` and ``--window-size`` of one streaming cache, and ``--beyond-trained-length``."""
    p.add_argument("--sink-size", type=int, default=4, help="attention-sink tokens kept (0 = plain window attention)")
    p.add_argument("--window-size", type=int, default=1020,
                   help="most recent tokens kept; the cache stays below the model's trained length")
    p.add_argument("--beyond-trained-length", action="store_true",
                   help="allow a cache at or past the model's trained length (positions it never saw: expect "
                        "quality to collapse)")


def add_memory_options(p: argparse.ArgumentParser) -> None:
    """The memory of evicted blocks (method ``memory``; ``--memory`` where a command has one cache)."""
    g = p.add_argument_group("memory of evicted blocks (InfLLM)")
    g.add_argument("--block-size", type=int, default=128, help="tokens per memory block")
    g.add_argument("--memory-blocks", type=int, default=4, help="blocks retrieved per lookup (top-k)")
    g.add_argument("--repr-keys", type=int, default=4, help="representative keys per block and key/value head")
    g.add_argument("--lookup-chunk", type=int, default=32,
                   help="queries per lookup while reading a prompt (tokens)")
    g.add_argument("--lookup-every", type=int, default=1,
                   help="forwards between lookups (1: every chunk and every decoded token)")
    g.add_argument("--max-cpu-blocks", type=int, default=None,
                   help="blocks kept in CPU memory per layer; past it they spill to --spill-dir, else are forgotten")
    g.add_argument("--spill-dir", default=None, help="directory for blocks past --max-cpu-blocks")


def add_conversation_memory_options(p: argparse.ArgumentParser) -> None:
    """``--memory`` and ``--evict`` of a conversation (chat, serve), with the memory's options."""
    p.add_argument("--memory", action="store_true",
                   help="keep what leaves the window in a memory of blocks and retrieve from it (InfLLM)")
    p.add_argument("--evict", choices=["tokens", "turns"], default="tokens",
                   help="tokens: the oldest tokens leave one by one (StreamingLLM); turns: whole oldest exchanges "
                   "leave before a turn, so the window never holds part of a message")
    add_memory_options(p)


def memory_from_args(args, only_if_asked: bool = False):
    """The :class:`~streamingllm.cache.BlockMemory` the memory options describe (None when
    ``only_if_asked`` and ``--memory`` was not given)."""
    from ..cache import BlockMemory
    from ..checks import ArgumentError

    if only_if_asked and not getattr(args, "memory", False):
        return None
    flags = {"top_k": "memory_blocks", "chunk_size": "lookup_chunk"}  # BlockMemory's names -> this command's
    try:
        return BlockMemory(block_size=args.block_size, top_k=args.memory_blocks, repr_keys=args.repr_keys,
                           chunk_size=args.lookup_chunk, lookup_every=args.lookup_every,
                           max_cpu_blocks=args.max_cpu_blocks, spill_dir=args.spill_dir)
    except ArgumentError as err:
        raise ArgumentError(flags.get(err.param, err.param), err.requirement + err.got,
                            mentions=tuple(flags.get(m, m) for m in err.mentions)) from None


#: The command line's repetition penalties: the default model (SmolLM2-135M) loops without one,
#: greedy or sampled, within a few hundred tokens; 1.1 keeps a long generation going and on topic.
#: In chat, where the penalty also sees the user's question, 1.1 makes it repeat its previous
#: answer instead ("And of Italy?" after France: Paris again); 1.05 answers both. The library's
#: :class:`~streamingllm.sampling.Sampling` stays neutral (1.0).
REPETITION_PENALTY = 1.1
CHAT_REPETITION_PENALTY = 1.05


def add_generation_options(p: argparse.ArgumentParser, chat: bool = False) -> None:
    """Sampling, length and prompt-feeding options of ``generate`` and (with ``chat``) ``chat``."""
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens per reply" if chat else "tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--repetition-penalty", type=float,
                   default=CHAT_REPETITION_PENALTY if chat else REPETITION_PENALTY,
                   help="divide positive / multiply negative logits of recent tokens (1 = off, > 1 discourages "
                        "repeats; small models loop without it)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtract from logits of recent tokens, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract per occurrence among recent tokens, in [-2, 2]")
    p.add_argument("--penalty-last-n", type=int, default=64, help="recent tokens the penalties look at")
    p.add_argument("--min-new-tokens", type=int, default=0,
                   help="suppress the end-of-turn tokens for this many tokens" + ("" if chat else
                        " (a long story stays one reply; better than --ignore-eos)"))
    p.add_argument("--chunk-size", type=int, default=256, help="prompt tokens per forward pass")


def check_generation_options(args, min_new_tokens: int = 0):
    """Check the options of :func:`add_cache_options` and :func:`add_generation_options` before
    anything is loaded; returns the :class:`~streamingllm.feed.Sampling` they ask for."""
    from ..cache import check_cache_sizes
    from ..checks import check_int
    from ..feed import Sampling

    check_cache_sizes(args.sink_size, args.window_size)
    check_int("max_new_tokens", args.max_new_tokens, min_new_tokens)
    check_int("chunk_size", args.chunk_size, 1)
    check_int("min_new_tokens", args.min_new_tokens, 0)
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, penalty_last_n=args.penalty_last_n)
