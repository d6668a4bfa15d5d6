"""The server's conversations: ids, a least-recently-used budget, and a state directory.

Each session is a :class:`~streamingllm.session.Session` (a sink cache plus its transcript)
under an id the server hands out (``POST /v1/sessions``): ids are unguessable, and a request
reaches only the session it names. The store keeps at most ``max_sessions`` sessions and
``max_kv_bytes`` of cache in memory; past that, the least recently used idle ones are evicted:

* with a state directory, every finished turn is written there before it is acknowledged, so an
  evicted session is only dropped from memory and comes back exactly (``"restored"``), also
  after a restart;
* without one it is dropped, and its next request rebuilds it from the messages it sends.

The response of a session's next request says which (``evicted``). Sessions idle for longer than
``ttl`` expire, in memory and on disk (checked whenever the table is used), and at most
``max_known`` sessions exist at once (:class:`SessionLimitError` beyond). The store is a
:class:`~.backends.SessionBackend`: a state directory (a turn is on disk if and only if it was
acknowledged), or Redis shared with other processes: then a request takes its session's lease
first, an unknown id is looked up there, a local copy older than the store's is dropped, and
sessions leaving memory give their lease back (:meth:`SessionStore.claim`). Only the worker
thread touches sessions' caches; the lock guards the table.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..memory import storage_bytes
from ..session import Session
from .backends import SessionBackend, StoreError
from .state_dir import ID_PATTERN, DirBackend

log = logging.getLogger(__name__)


class UnknownSessionError(KeyError):
    """No session has this id (404)."""


class SessionBusyError(RuntimeError):
    """The session is serving another request (409)."""


class SessionLimitError(RuntimeError):
    """As many sessions as the store may know exist already (429)."""


@dataclass
class Entry:
    """One session's place in the store.

    Attributes:
        id: the session id.
        pin_system: the session pins its system prompt.
        session: the live session, or None while it is evicted (or not yet used).
        busy: a request is running on it.
        evicted: ``"saved"`` or ``"dropped"`` when it was evicted since its last request.
        saved: its state is in the state directory.
        version: the version of its last saved turn (0: none).
        last_used: when a request last ended on it, or it was made (Unix seconds).
    """

    id: str
    pin_system: bool = False
    session: Session | None = None
    busy: bool = False
    evicted: str | None = None
    saved: bool = False
    version: int = 0
    last_used: float = field(default_factory=time.time)


class SessionStore:
    """Sessions by id, with a memory budget.

    Args:
        make_session: ``make_session(system, pin_system) -> Session``: a new, empty session.
        max_sessions: sessions held in memory at most (>= 1).
        max_kv_bytes: bytes of cache held in memory at most, all sessions together (None: no limit).
        state_dir: where sessions are written after every turn and found again after a restart
            (a :class:`~.state_dir.DirBackend` on it; None: see ``backend``).
        backend: the store sessions are written to after every turn (None, and no ``state_dir``:
            sessions live in memory only).
        ttl: seconds a session may stay idle before it expires, in memory and on disk (None or 0: never).
        max_known: sessions that may exist at once, in memory or saved (None: no limit).
        clock: the time now (Unix seconds; tests pass their own).
    """

    def __init__(self, make_session: Callable[[str | None, bool], Session], max_sessions: int = 64,
                 max_kv_bytes: int | None = None, state_dir: str | os.PathLike | None = None,
                 ttl: float | None = None, max_known: int | None = None, clock: Callable[[], float] = time.time,
                 backend: SessionBackend | None = None):
        self.make_session, self.max_sessions, self.max_kv_bytes = make_session, max_sessions, max_kv_bytes
        self.ttl, self.max_known, self.clock = ttl or None, max_known, clock
        if state_dir is not None and backend is not None:
            raise ValueError("SessionStore takes a state_dir or a backend, not both")
        self.backend = backend if state_dir is None else DirBackend(state_dir)
        self.state_dir = getattr(self.backend, "path", None)
        self.shared = self.backend is not None and self.backend.shared
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evictions = {"saved": 0, "dropped": 0}
        self.expired = 0  # sessions expired since this process started
        if self.backend is not None:
            for r in self.backend.scan():
                self._entries[r.id] = Entry(r.id, r.meta["pin_system"], saved=r.has_cache, version=r.meta["version"],
                                            last_used=r.meta["last_used"])
            self.expire()

    # --- the table (any thread) ---------------------------------------------------------

    def create(self, pin_system: bool = False, sid: str | None = None) -> str:
        """A new session's id (SessionLimitError when ``max_known`` sessions exist). ``sid``: the id
        to give it (a replicated server's ingress chooses it, to route by it from the start;
        ValueError unless it is new and of the server's form); default: a new random one."""
        self.expire()
        if sid is None:
            sid = f"sess-{secrets.token_urlsafe(18)}"
        elif not ID_PATTERN.match(sid) or sid in self._entries:
            raise ValueError("the session id given is not a new id of this server's form")
        with self._lock:
            if self.max_known is not None and len(self._entries) >= self.max_known:
                raise SessionLimitError(f"the server holds {len(self._entries)} sessions, its limit")
            entry = self._entries[sid] = Entry(sid, pin_system, last_used=self.clock())
        if self.backend is not None:
            try:
                self.backend.create(sid, self._meta(entry))
            except BaseException:
                with self._lock:
                    self._entries.pop(sid, None)
                raise
        return sid

    def expire(self) -> None:
        """Forget the idle sessions unused for longer than ``ttl``, and delete them from the store
        (a shared store's keys expire by themselves: another process may have used them since)."""
        if self.ttl is None:
            return
        now = self.clock()
        with self._lock:
            gone = [e for e in self._entries.values() if not e.busy and now - e.last_used > self.ttl]
            for e in gone:
                del self._entries[e.id]
            self.expired += len(gone)
        for e in gone:
            self._leave(e.id, e.version, delete=not self.shared)
        if gone:
            log.info("expired %d sessions idle for more than %g s", len(gone), self.ttl)

    def claim(self, sid: str) -> Entry:
        """Mark ``sid`` busy for a request (UnknownSessionError, SessionBusyError; with a shared
        store also SessionOwnedError and StoreUnavailableError, see :meth:`_sync`; its keys
        expire in the store by themselves)."""
        self.expire()
        valid = isinstance(sid, str) and ID_PATTERN.match(sid)
        with self._lock:
            entry = self._entries.get(sid) if valid else None
            if entry is None and not (valid and self.shared):
                raise UnknownSessionError(sid)
            if entry is not None:
                if entry.busy:
                    raise SessionBusyError(sid)
                entry.busy = True
                self._entries.move_to_end(sid)
        try:
            return self._sync(sid, entry) if self.shared else entry
        except BaseException:
            if entry is not None:
                self.release(entry)
            raise

    def _sync(self, sid: str, entry: Entry | None) -> Entry:
        """Take ``sid``'s lease and bring the table up to the shared store: a session this process
        does not know is added (busy), one whose stored version differs from ours is dropped from
        memory (another process continued it) to be restored from the store."""
        self.backend.acquire(sid)
        try:
            record = self.backend.lookup(sid)
            if record is None:  # expired in the store, or deleted by another process
                with self._lock:
                    self._entries.pop(sid, None)
                raise UnknownSessionError(sid)
        except BaseException:
            self.backend.release(sid)
            raise
        version = record.meta["version"]
        with self._lock:
            if entry is None:
                if sid in self._entries:  # claimed meanwhile by another request
                    raise SessionBusyError(sid)
                entry = self._entries[sid] = Entry(sid, record.meta["pin_system"], busy=True, last_used=self.clock())
            if entry.version != version:
                entry.session, entry.version, entry.saved = None, version, record.has_cache
        return entry

    def release(self, entry: Entry) -> None:
        """``entry``'s request has ended; a shared store's lease is given back unless the session
        stays in memory (it is continued here)."""
        with self._lock:
            entry.busy = False
            entry.last_used = self.clock()
            idle = self.shared and entry.session is None
        if idle:
            self._leave(entry.id, entry.version, delete=False)

    def delete(self, sid: str) -> None:
        """Delete ``sid``, here and in the store (what :meth:`claim` raises when it cannot)."""
        entry = self.claim(sid)
        try:
            self._leave(sid, entry.version, delete=True)
        except BaseException:
            self.release(entry)
            raise
        with self._lock:
            self._entries.pop(sid, None)

    def describe(self, sid: str) -> dict:
        """What ``GET /v1/sessions/{id}`` shows: the numbers and the transcript (``messages``) of
        the live session, or else of its last saved turn (read from the store; with a shared
        store, also a session this process does not hold)."""
        self.expire()
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None and not (self.shared and ID_PATTERN.match(sid)):
                raise UnknownSessionError(sid)
            s = None if entry is None else entry.session
            info = {"id": sid, "object": "session", "pin_system": None if entry is None else entry.pin_system,
                    "resident": s is not None, "saved": entry is not None and entry.saved,
                    "busy": entry is not None and entry.busy}
            if s is not None:
                info.update(s.stats(), messages=list(s.messages))
                return info
        meta = self.backend.read_meta(sid) if self.backend is not None and (entry is None or entry.version) else None
        if entry is None:  # a shared store's
            if meta is None:
                raise UnknownSessionError(sid)
            info.update(pin_system=meta["pin_system"], saved=meta["version"] > 0)
        if meta and isinstance(meta.get("stats"), dict) and isinstance(meta.get("messages"), list):
            info.update(meta["stats"], messages=meta["messages"])
        return info

    def counts(self) -> dict:
        """Sessions known, held in memory, and their cache bytes and fill; sessions expired, state
        files quarantined and bytes written to the store since the start."""
        self.expire()
        with self._lock:
            live = [e.session for e in self._entries.values() if e.session is not None]
        cached = sum(s.cache.cached_tokens for s in live)
        room = sum(s.cache.max_cached_tokens for s in live)
        return {"known": len(self._entries), "resident": len(live), "kv_bytes": sum(storage_bytes(s.cache) for s in live),
                "cache_fill": cached / room if room else 0.0, "expired": self.expired,
                "quarantined": 0 if self.backend is None else self.backend.quarantined,
                "store_bytes_written": 0 if self.backend is None else self.backend.bytes_written}

    def close(self) -> None:
        """Close the store's backend when the server stops: a shared store's leases are given back
        at once (another process may take the sessions over now rather than after the lease TTL),
        a state directory's lock too. Every turn acknowledged is stored already."""
        if self.backend is not None:
            self.backend.close()

    # --- sessions (the worker thread) -------------------------------------------------------

    def session(self, entry: Entry, system: str | None) -> tuple[Session, bool]:
        """The session to serve ``entry``'s next conversation (with ``system``), and whether it
        was restored: loaded from the store if it was saved, made new otherwise (also when the
        saved state cannot be read: it then counts as dropped; StoreError when the store cannot
        answer). A pinned session whose
        system prompt changes gets a new one (its sink region is sized for the old one). A new
        session replaces the entry's only when :meth:`adopt` says so (a refused request leaves
        the entry as it was)."""
        restored = False
        if entry.session is None and entry.saved:
            try:
                session = self.make_session((self.backend.read_meta(entry.id) or {}).get("system"), entry.pin_system)
                self.backend.load(entry.id, entry.version, session)
            except StoreError:
                raise
            except Exception as err:  # another model or cache size since a restart, a damaged file
                log.warning(f"session {entry.id}: its saved state (version {entry.version}) cannot be restored "
                            f"({err}); starting it anew")
                entry.saved, entry.evicted = False, "dropped"
            else:
                entry.session, restored = session, True
        if entry.session is None or (entry.pin_system and entry.session.system != system):
            return self.make_session(system, entry.pin_system), restored
        return entry.session, restored

    def adopt(self, entry: Entry, session: Session) -> None:
        """``session`` is ``entry``'s from now on (its request was accepted)."""
        entry.session = session

    def save(self, entry: Entry) -> None:
        """Write the session's state (after a turn, before it is acknowledged); when this raises,
        the turn is not stored and the previous saved turn is intact (LeaseLostError: another
        process may have continued it)."""
        if self.backend is None or entry.session is None:
            return
        entry.last_used = self.clock()
        entry.version = self.backend.save(entry.id, entry.version, self._meta(entry), entry.session)
        entry.saved = True

    def forget_state(self, entry: Entry) -> None:
        """The live session's cache no longer matches its transcript (a turn failed or was cut
        part-way): drop it from memory. A saved state (the last acknowledged turn) is kept, and
        the next request continues from it."""
        entry.session = None
        if not entry.saved:
            entry.evicted = "dropped"

    def enforce_budget(self, reserve_bytes: int = 0) -> None:
        """Evict least recently used idle sessions until the budget holds with ``reserve_bytes`` more
        (a shared store's leases on them are given back)."""
        evicted = []
        with self._lock:
            live = [e for e in self._entries.values() if e.session is not None]
            sizes = {e.id: storage_bytes(e.session.cache) for e in live}
            known = max(sizes.values(), default=0)  # a session not yet allocated will take about this
            used = sum(b or known for b in sizes.values())
            for e in live:  # least recently used first
                over_count = len(live) > self.max_sessions
                over_bytes = self.max_kv_bytes is not None and used + reserve_bytes > self.max_kv_bytes
                if not (over_count or over_bytes):
                    break
                if e.busy:
                    continue
                used -= sizes[e.id] or known
                e.evicted = "saved" if e.saved else "dropped"
                self.evictions[e.evicted] += 1
                e.session = None
                evicted.append(e)
                live = [x for x in live if x is not e]
        for e in evicted if self.shared else ():
            self._leave(e.id, e.version, delete=False)

    def _leave(self, sid: str, version: int, delete: bool) -> None:
        """``sid`` has left memory: delete it from the store (``delete``) and give its lease back."""
        if self.backend is None:
            return
        try:
            if delete:
                self.backend.remove(sid, version)
        finally:
            self.backend.release(sid)

    def _meta(self, entry: Entry) -> dict:
        """``entry``'s metadata for the store (its live session's transcript and numbers)."""
        s = entry.session
        return {"pin_system": entry.pin_system, "system": None if s is None else s.system, "version": entry.version,
                "last_used": entry.last_used, "messages": None if s is None else list(s.messages),
                "stats": None if s is None else s.stats()}
