"""The ``streamingllm`` command line: thin adapters that parse flags, call the library and print.

One module per command: ``generate`` and ``chat`` (over the core), ``perplexity`` (over
:mod:`streamingllm.evals`) and ``bench`` (over :mod:`streamingllm.bench`); ``options`` holds the
options they share. The library never imports this package.
The errors users cause are one line on stderr and exit status 2 (:data:`USER_ERRORS`): the
library's documented errors, whose messages name the Python parameter and are shown with the
matching flag, and the command line's own. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..checks import ArgumentError
from ..client import ServerError, ServerUnreachableError
from ..evals.corpus import CorpusError
from ..extras import MissingExtraError
from ..families import UnsupportedModelError
from ..models import ModelLoadError
from ..timeline import ApproximateChunkError
from .options import CommandError, HelpFormatter

#: The exceptions that mean the user asked for something impossible, shown as one line. The
#: library's documented errors (an ArgumentError names its parameter, shown as the flag; the cache
#: too large for memory is one), the command line's own, and OSError: a file, folder or port named
#: on the command line that cannot be used (the message names it). Anything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ArgumentError, CommandError, UnsupportedModelError, ApproximateChunkError, CorpusError, ModelLoadError,
    MissingExtraError, ServerError, ServerUnreachableError, OSError,
)

DESCRIPTION = """\
Endless text streams with constant memory for Hugging Face causal LMs (StreamingLLM:
attention sinks + a rolling window, exact for transformers 5)."""


def build_parser() -> argparse.ArgumentParser:
    from . import attention, bench, chat, generate, passkey, perplexity, pretrain, serve, streameval

    parser = argparse.ArgumentParser(prog="streamingllm", description=DESCRIPTION,
                                     formatter_class=lambda prog: HelpFormatter(prog, max_help_position=18))
    parser.add_argument("--version", action="version", version=f"streamingllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                help="'streamingllm COMMAND --help' shows its options")
    for module in (generate, chat, serve, perplexity, attention, streameval, passkey, pretrain, bench):
        module.register(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. An unknown flag is reported with the usage of the (sub)command it
    was given to, not the top level's."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"streamingllm: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    warnings.showwarning = _show_warning
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = err.as_flag() if isinstance(err, ArgumentError) else str(err)
        print(f"streamingllm: error: {message}", file=sys.stderr)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 2
