"""What the server writes to its log: internal errors under an id, and no session ids.

Session ids are bearer tokens (whoever knows one can continue, read or delete the conversation),
so they are kept out of the log: :func:`redact` replaces each with a short fingerprint that
still tells one session from another, and :class:`RedactSessionIds` applies it to uvicorn's
access and error logs (request paths such as ``/v1/sessions/{id}``) and to the package's own
(``streamingllm.*``: tracebacks and warnings naming files in the state directory), which
:func:`install_redaction` writes to stderr.

A client never sees an exception's type, message or a server path: :func:`internal_error` logs
the traceback under a fresh id and returns the message a 500 carries, which names that id.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import sys
import traceback

logger = logging.getLogger("streamingllm.serve")

SESSION_ID = re.compile(r"sess-[A-Za-z0-9_-]{8,}")
LOGGERS = ("uvicorn.access", "uvicorn.error")  # where uvicorn writes request lines and tracebacks


def redact(text: str) -> str:
    """``text`` with each session id replaced by ``sess-#`` and 8 hex digits of its SHA-256."""
    return SESSION_ID.sub(lambda m: "sess-#" + hashlib.sha256(m.group().encode()).hexdigest()[:8], text)


class RedactSessionIds(logging.Filter):
    """A logging filter that redacts session ids in a record's message, arguments and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            record.exc_info = None
        return True


class _RedactedStderr(logging.StreamHandler):
    """stderr, session ids redacted: where the package's loggers write in a server."""

    def __init__(self):
        super().__init__()
        self.addFilter(RedactSessionIds())
        self.setFormatter(logging.Formatter("%(levelname)s:  %(name)s: %(message)s"))

    @property
    def stream(self):  # the current stderr (as logging's last-resort handler does), not the one at start
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def install_redaction() -> None:
    """Add :class:`RedactSessionIds` to uvicorn's loggers, and a redacting stderr handler to the
    package's (once each; uvicorn's logging setup keeps them)."""
    for name in LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactSessionIds) for f in log.filters):
            log.addFilter(RedactSessionIds())
    package = logging.getLogger("streamingllm")
    if not any(isinstance(h, _RedactedStderr) for h in package.handlers):
        package.addHandler(_RedactedStderr())


def internal_error(err: BaseException) -> str:
    """Log ``err``'s traceback (session ids redacted) under a new id; the message a 500 answers with."""
    eid = f"err-{secrets.token_hex(6)}"
    details = redact("".join(traceback.format_exception(err)).rstrip("\n"))
    logger.error("internal error %s:\n%s", eid, details)
    return f"internal error {eid}: the server's log has the details"
