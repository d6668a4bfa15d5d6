"""Where the server's sessions are stored between turns: one interface, two implementations.

:class:`SessionBackend` is what the session table (:class:`~.sessions.SessionStore`) needs:
each session's metadata, its saved state, a commit per turn that either stores the turn or
raises, and leases, so that two processes never both write one session.

* :class:`~.state_dir.DirBackend`: a local state directory (:class:`~.state_dir.StateDir`, whole
  states; a chain of per-turn deltas for states that grow with the conversation). One process
  serves a directory: it locks it at start (``flock``), and holds every session. It lives with
  the directory's code and is re-exported here.
* :class:`RedisBackend`: Redis, shared by several processes (replicas). A session is four keys
  with one hash tag (``streamingllm:{sess-X}:meta|base|log|lease``, so Redis Cluster keeps them on
  one node) and its transcript (``:messages``). A turn appends the delta from the previous
  turn's state (:func:`~.delta.diff_state`) to the log; when the log outgrows ``compact_ratio``
  times the base, the whole state becomes the new base. The commit is one Lua script: it checks
  that the lease is ours and the version the one we continue, then writes the state, the
  metadata (with the new version) and the keys' TTL, all or nothing. A lease is a key holding
  its owner's id, renewed by a thread; a process that dies loses its leases when they expire,
  and another takes its sessions over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
from contextlib import contextmanager
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from .state_dir import FORMAT, Held, Record
from .state_dir import DirBackend, StateDirInUseError  # noqa: F401 (their old home: imports keep working)

log = logging.getLogger(__name__)  # whole messages (f-strings): the server redacts the session ids in them


class StoreError(RuntimeError):
    """The session store cannot serve a request now (503); ``retry_after``: seconds to wait."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class SessionOwnedError(StoreError):
    """Another live process holds the session's lease (503 + Retry-After: until it expires)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The session store cannot be reached (503 + Retry-After)."""


class LeaseLostError(StoreError):
    """Our lease on the session expired and another process may have written it: the commit is
    refused, and the turn is not acknowledged."""


class SessionBackend(Protocol):
    """The session table's store (see the module's docstring).

    Attributes:
        shared: other processes hold sessions in it too: an id this process does not know is
            looked up in the store, and every request takes the session's lease first.
        bytes_written: bytes written by every commit since this process started.
        last_bytes: bytes written by the last commit.
        quarantined: unreadable entries set aside since this process started.
    """

    shared: bool
    bytes_written: int
    last_bytes: int
    quarantined: int

    def scan(self) -> list[Record]:
        """The sessions to know at start, least recently used first (a shared store: none)."""

    def lookup(self, sid: str) -> Record | None:
        """``sid``'s record as stored now (None: no such session)."""

    def create(self, sid: str, meta: dict) -> None:
        """Store a new session's metadata (version 0); ValueError when ``sid`` exists."""

    def read_meta(self, sid: str) -> dict | None:
        """``sid``'s metadata with its transcript (``messages``); None when there is none."""

    def load(self, sid: str, version: int, session) -> None:
        """Restore ``session`` to ``sid``'s saved ``version`` (ValueError when it cannot be)."""

    def save(self, sid: str, version: int, meta: dict, session) -> int:
        """Commit ``session``'s state as the version after ``version``, with ``meta``; returns the
        new version. Raises when the turn is not stored (the previous version is intact)."""

    def remove(self, sid: str, version: int) -> None:
        """Delete ``sid`` from the store."""

    def acquire(self, sid: str) -> None:
        """Take or renew ``sid``'s lease (SessionOwnedError, StoreUnavailableError)."""

    def renew(self) -> None:
        """Renew every lease held."""

    def release(self, sid: str) -> None:
        """Give ``sid``'s lease back (and whatever is kept to continue it)."""

    def close(self) -> None:
        """Release every lease and the store's resources."""


# --- Redis ---------------------------------------------------------------------------------------

# KEYS: meta, base, log, lease, messages. ARGV: owner, expected version, meta JSON, "base" or
# "log", the blob, TTL (ms, 0: none), messages kept, then the messages appended (JSON each).
_COMMIT = """
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return redis.error_reply('LEASE') end
local meta = redis.call('GET', KEYS[1])
if not meta then return redis.error_reply('GONE') end
local version = cjson.decode(meta)['version']
if version ~= tonumber(ARGV[2]) then return redis.error_reply('VERSION ' .. tostring(version)) end
if ARGV[4] == 'base' then
  redis.call('SET', KEYS[2], ARGV[5])
  redis.call('DEL', KEYS[3])
else
  redis.call('RPUSH', KEYS[3], ARGV[5])
end
local keep = tonumber(ARGV[7])
if keep == 0 then redis.call('DEL', KEYS[5]) else redis.call('LTRIM', KEYS[5], 0, keep - 1) end
for i = 8, #ARGV do redis.call('RPUSH', KEYS[5], ARGV[i]) end
redis.call('SET', KEYS[1], ARGV[3])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  for _, i in ipairs({1, 2, 3, 5}) do redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""
# KEYS: lease, meta, base, log, messages. ARGV: owner, lease TTL (ms), session TTL (ms, 0: none).
# Returns 0 when the lease is ours now, else the milliseconds the other owner's lease has left.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return math.max(redis.call('PTTL', KEYS[1]), 1) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if tonumber(ARGV[3]) > 0 then
  for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_PARTS = ("meta", "base", "log", "lease", "messages")


def keys_of(sid: str) -> dict[str, str]:
    """Session ``sid``'s Redis keys by part (:data:`_PARTS`), all with the hash tag ``{sid}``."""
    return {part: f"streamingllm:{{{sid}}}:{part}" for part in _PARTS}


def default_owner() -> str:
    """A lease owner id unique to this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def redact_url(url: str) -> str:
    """``url`` without its password (named in messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """Sessions in Redis, shared by several processes, each under a lease (see the module).

    Args:
        url: ``redis://`` or ``rediss://`` URL (``redis://host:6379/0``; a password in it is
            never logged).
        owner: this process's id in the leases (default :func:`default_owner`).
        session_ttl: seconds a session's keys live after its last request (0: forever).
        lease_ttl: seconds a lease lives unless renewed (> 0); renewed every third of it. A
            process that dies holds its sessions this long.
        compact_ratio: the log of deltas is folded into a new base (the whole state) when its
            bytes would exceed this many times the base's (> 0).
        socket_timeout: seconds a Redis command may take before the store counts as unreachable.

    Raises StoreUnavailableError (naming the URL) when Redis cannot be reached now.
    """

    shared = True
    quarantined = 0

    def __init__(self, url: str, owner: str | None = None, session_ttl: float = 0.0, lease_ttl: float = 10.0,
                 compact_ratio: float = 1.0, socket_timeout: float = 2.0):
        from ..checks import check_float

        check_float("session_ttl", session_ttl, 0)
        for name, value in (("lease_ttl", lease_ttl), ("compact_ratio", compact_ratio),
                            ("socket_timeout", socket_timeout)):
            check_float(name, value, 0, open_min=True)
        self.url, self.where, self.owner = url, redact_url(url), owner or default_owner()
        self.session_ms, self.lease_ms = int(session_ttl * 1000), max(1, int(lease_ttl * 1000))
        self.compact_ratio = compact_ratio
        self.bytes_written = self.last_bytes = 0
        self.client = connect(url, socket_timeout)
        import redis

        self._down = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._refused = redis.exceptions.ResponseError
        self._commit, self._acquire, self._renew, self._release = (
            self.client.register_script(s) for s in (_COMMIT, _ACQUIRE, _RENEW, _RELEASE))
        self._leases: set[str] = set()
        self._held: dict[str, Held] = {}
        self._guard = threading.Lock()  # the lease set: the renewing thread reads it
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_loop, name="streamingllm-leases", daemon=True)
        self._renewer.start()

    @contextmanager
    def _reachable(self, doing: str = "the session store is unreachable"):
        """Redis's connection errors and timeouts as StoreUnavailableError."""
        try:
            yield
        except self._down as err:
            raise StoreUnavailableError(f"{doing} ({self.where}): {err}", retry_after=2.0) from None

    def scan(self) -> list[Record]:
        return []  # a shared store is not listed: a session is looked up when a request names it

    def lookup(self, sid: str) -> Record | None:
        meta = self.read_meta(sid, messages=False)
        return None if meta is None else Record(sid, meta, has_cache=meta["version"] > 0)

    def create(self, sid: str, meta: dict) -> None:
        k = keys_of(sid)
        text = json.dumps({**meta, "messages": None, "format": FORMAT, "version": 0})
        with self._reachable():
            if not self.client.set(k["meta"], text, nx=True, px=self.session_ms or None):
                raise ValueError("the session id given exists already")

    def read_meta(self, sid: str, messages: bool = True) -> dict | None:
        """``sid``'s metadata, with its transcript unless ``messages`` is False."""
        k = keys_of(sid)
        with self._reachable():
            pipe = self.client.pipeline(transaction=True)
            pipe.get(k["meta"])
            if messages:
                pipe.lrange(k["messages"], 0, -1)
            found = pipe.execute()
        if found[0] is None:
            return None
        meta = json.loads(found[0])
        if messages and meta.get("stats") is not None:
            meta["messages"] = [json.loads(m) for m in found[1]]
        return meta

    def load(self, sid: str, version: int, session) -> None:
        from .delta import apply_delta, decode

        k = keys_of(sid)
        with self._reachable():
            meta, base, deltas = self.client.pipeline(transaction=True).get(k["meta"]).get(k["base"]).lrange(
                k["log"], 0, -1).execute()
        stored = None if meta is None else json.loads(meta)["version"]
        if stored != version or base is None:
            raise ValueError(f"the session store holds version {stored} of {sid}, not {version}")
        state = decode(base)
        for blob in deltas:
            state = apply_delta(state, decode(blob))
        session.restore(state, source=f"{sid} in the session store")
        self._held[sid] = Held(version, state, len(base), sum(map(len, deltas)))

    def save(self, sid: str, version: int, meta: dict, session) -> int:
        from .delta import appended, diff_state, encode

        state = session.state()
        held = self._held.get(sid)
        prev = held.state if held is not None and held.version == version else None
        delta = None if prev is None else diff_state(prev, state)
        blob = None if delta is None or "whole" in delta else encode(delta)  # no delta: a new base
        whole = blob is None or held.log_bytes + len(blob) > self.compact_ratio * held.base_bytes
        if whole:
            blob = encode(state)
        transcript = appended([] if prev is None else prev["messages"], state["messages"])
        keep, added = transcript["keep"], [json.dumps(m) for m in transcript["added"]]
        text = json.dumps({**meta, "messages": None, "format": FORMAT, "version": version + 1})
        args = [self.owner, version, text, "base" if whole else "log", blob, self.session_ms, keep, *added]
        with self._reachable("the session store is unreachable; the turn was not saved"):
            try:
                self._commit(keys=list(keys_of(sid).values()), args=args)
            except self._refused as err:
                self._held.pop(sid, None)
                raise LeaseLostError(_refusal(sid, str(err)), retry_after=self.lease_ms / 1000) from None
        self._held[sid] = Held(version + 1, state, len(blob) if whole else held.base_bytes,
                               0 if whole else held.log_bytes + len(blob))
        self.last_bytes = len(blob) + len(text) + sum(map(len, added))
        self.bytes_written += self.last_bytes
        return version + 1

    def remove(self, sid: str, version: int) -> None:
        with self._reachable():
            self.client.delete(*keys_of(sid).values())
        self.release(sid)

    def acquire(self, sid: str) -> None:
        k = keys_of(sid)
        with self._reachable():
            left = self._acquire(keys=[k["lease"], k["meta"], k["base"], k["log"], k["messages"]],
                                 args=[self.owner, self.lease_ms, self.session_ms])
        if left:
            raise SessionOwnedError(f"session {sid} is held by another server process (its lease ends within "
                                    f"{left / 1000:.1f} s)", retry_after=max(1, math.ceil(left / 1000)))
        with self._guard:
            self._leases.add(sid)

    def renew(self) -> None:
        with self._guard:
            held = list(self._leases)
        lost = []
        with self._reachable():
            for sid in held:
                if not self._renew(keys=[keys_of(sid)["lease"]], args=[self.owner, self.lease_ms]):
                    lost.append(sid)
        with self._guard:
            self._leases.difference_update(lost)
        for sid in lost:
            log.warning(f"lost the lease on session {sid} (expired); its next commit is refused unless it is "
                        "taken again first")

    def release(self, sid: str) -> None:
        with self._guard:
            self._leases.discard(sid)
        self._held.pop(sid, None)
        try:
            with self._reachable():
                self._release(keys=[keys_of(sid)["lease"]], args=[self.owner])
        except StoreUnavailableError as err:  # it expires by itself
            log.warning(f"cannot release the lease on {sid}: {err}")

    def close(self) -> None:
        self._stop.set()
        self._renewer.join(timeout=self.lease_ms / 1000)  # a renewal under way would log the released leases as lost
        with self._guard:
            held = list(self._leases)
        for sid in held:
            self.release(sid)
        self.client.close()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            try:
                self.renew()
            except StoreUnavailableError as err:
                log.warning(f"cannot renew the session leases: {err}")
            except Exception as err:  # noqa: BLE001 (the thread must go on renewing)
                log.error(f"renewing the session leases failed: {err!r}")


def _refusal(sid: str, reply: str) -> str:
    """The LeaseLostError message for the commit script's refusal ``reply``."""
    why = {"LEASE": "this process no longer holds its lease (it expired)",
           "GONE": "it is no longer in the store (expired or deleted)",
           "VERSION": "another process saved a newer turn"}.get(reply.split()[0] if reply else "", reply)
    return f"session {sid} was not saved: {why}; the turn is not acknowledged, retry it"


def is_redis_url(where) -> bool:
    return isinstance(where, str) and urlsplit(where).scheme in ("redis", "rediss")


def connect(url: str, socket_timeout: float = 2.0):
    """A redis-py client of ``url`` that answered PING: MissingExtraError without redis-py,
    StoreUnavailableError (naming the URL) when Redis does not answer within ``socket_timeout``
    seconds. It reconnects by itself after Redis comes back."""
    from ..checks import ArgumentError
    from ..extras import require

    redis = require("redis", "--session-store redis://...")
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not is_redis_url(url):
        raise ArgumentError("session_store", "must be a redis:// or rediss:// URL or a directory", redact_url(url))
    # one retry: the first command after Redis restarts finds a dead pooled connection
    client = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                  retry=Retry(NoBackoff(), 1))
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
        client.close()
        raise StoreUnavailableError(f"cannot reach the session store {redact_url(url)}: {err}", 2.0) from None
    return client


def open_backend(where: str | os.PathLike, *, owner: str | None = None, session_ttl: float = 0.0,
                 lease_ttl: float = 10.0) -> SessionBackend:
    """The backend for ``--session-store``: a :class:`RedisBackend` for a ``redis://`` or
    ``rediss://`` URL, else a :class:`DirBackend` on the directory ``where``."""
    if is_redis_url(where):
        return RedisBackend(where, owner, session_ttl, lease_ttl)
    return DirBackend(where)
