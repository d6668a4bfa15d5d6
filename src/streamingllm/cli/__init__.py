"""The ``streamingllm`` command line: thin adapters that parse flags, call the library and print.

One module per command: ``generate`` and ``chat`` (over the core), ``perplexity`` (over
:mod:`streamingllm.evals`) and ``bench`` (over :mod:`streamingllm.bench`); ``options`` holds the
options they share. The library never imports this package.
Errors are one line on stderr and exit status 2; library messages name the Python parameter and
are shown with the matching flag.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..checks import ArgumentError
from ..extras import MissingExtraError
from ..families import UnsupportedModelError
from ..models import ModelLoadError
from .options import HelpFormatter

DESCRIPTION = """\
Endless text streams with constant memory for Hugging Face causal LMs (StreamingLLM:
attention sinks + a rolling window, exact for transformers 5).

commands:
  generate     continue a prompt, streaming tokens however long the output
  chat         a multi-turn chat whose memory stays bounded
  serve        an OpenAI-compatible server with one bounded cache per conversation
  perplexity   the paper's evaluation: dense, window, recompute and streaming on long text
  attention    attention maps and attention-sink statistics per layer (the paper's Figure 2)
  streameval   question answering over an endless stream (the paper's StreamEval)
  passkey      passkey retrieval against depth and cache size
  pretrain     train small models with and without attention sinks from scratch (Table 3)
  bench        speed and memory: latency vs cache size, endless streams"""


def build_parser() -> argparse.ArgumentParser:
    from . import attention, bench, chat, generate, passkey, perplexity, pretrain, serve, streameval

    parser = argparse.ArgumentParser(prog="streamingllm", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"streamingllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (generate, chat, serve, perplexity, attention, streameval, passkey, pretrain, bench):
        module.register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"streamingllm: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.run(args)
    except ArgumentError as err:
        print(f"streamingllm: error: {err.as_flag()}", file=sys.stderr)
    except (ValueError, TypeError, ModelLoadError, UnsupportedModelError, MissingExtraError, OSError) as err:
        print(f"streamingllm: error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 2
