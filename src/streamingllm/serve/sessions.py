"""The server's conversations: ids, a least-recently-used budget, and a state directory.

Each session is a :class:`~streamingllm.session.Session` (a sink cache plus its transcript)
under an id the server hands out (``POST /v1/sessions``): ids are unguessable, and a request
reaches only the session it names. The store keeps at most ``max_sessions`` sessions and
``max_kv_bytes`` of cache in memory; past that, the least recently used idle ones are evicted:

* with a state directory, every finished turn is written there before it is acknowledged, so an
  evicted session is only dropped from memory and comes back exactly (``"restored"``), also
  after a restart;
* without one it is dropped, and its next request rebuilds it from the messages it sends.

The response of a session's next request says which (``evicted``). Only the worker thread
touches sessions' caches; the lock guards the table.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..memory import storage_bytes
from ..session import Session

ID_PATTERN = re.compile(r"^sess-[A-Za-z0-9_-]{16,64}$")  # also safe as a file name


class UnknownSessionError(KeyError):
    """No session has this id (404)."""


class SessionBusyError(RuntimeError):
    """The session is serving another request (409)."""


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
    """

    id: str
    pin_system: bool = False
    session: Session | None = None
    busy: bool = False
    evicted: str | None = None
    saved: bool = False


class SessionStore:
    """Sessions by id, with a memory budget.

    Args:
        make_session: ``make_session(system, pin_system) -> Session``: a new, empty session.
        max_sessions: sessions held in memory at most (>= 1).
        max_kv_bytes: bytes of cache held in memory at most, all sessions together (None: no limit).
        state_dir: where sessions are written after every turn and found again after a restart
            (None: sessions live in memory only).
    """

    def __init__(self, make_session: Callable[[str | None, bool], Session], max_sessions: int = 64,
                 max_kv_bytes: int | None = None, state_dir: str | os.PathLike | None = None):
        self.make_session, self.max_sessions, self.max_kv_bytes = make_session, max_sessions, max_kv_bytes
        self.state_dir = None if state_dir is None else Path(state_dir)
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evictions = {"saved": 0, "dropped": 0}
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            for meta in sorted(self.state_dir.glob("sess-*.json"), key=lambda p: p.stat().st_mtime):
                info = json.loads(meta.read_text())
                self._entries[meta.stem] = Entry(meta.stem, bool(info.get("pin_system")),
                                                 saved=self._path(meta.stem, ".pt").exists())

    # --- the table (any thread) ---------------------------------------------------------

    def create(self, pin_system: bool = False) -> str:
        """A new session's id."""
        sid = f"sess-{secrets.token_urlsafe(18)}"
        with self._lock:
            self._entries[sid] = Entry(sid, pin_system)
        if self.state_dir is not None:
            self._write_meta(sid, pin_system)
        return sid

    def claim(self, sid: str) -> Entry:
        """Mark ``sid`` busy for a request (UnknownSessionError, SessionBusyError)."""
        with self._lock:
            entry = self._entries.get(sid) if isinstance(sid, str) and ID_PATTERN.match(sid) else None
            if entry is None:
                raise UnknownSessionError(sid)
            if entry.busy:
                raise SessionBusyError(sid)
            entry.busy = True
            self._entries.move_to_end(sid)
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.busy = False

    def delete(self, sid: str) -> None:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise UnknownSessionError(sid)
            if entry.busy:
                raise SessionBusyError(sid)
            del self._entries[sid]
        if self.state_dir is not None:
            for suffix in (".pt", ".json"):
                self._path(sid, suffix).unlink(missing_ok=True)

    def describe(self, sid: str) -> dict:
        """What ``GET /v1/sessions/{id}`` shows."""
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise UnknownSessionError(sid)
            s = entry.session
            info = {"id": sid, "object": "session", "pin_system": entry.pin_system,
                    "resident": s is not None, "saved": entry.saved, "busy": entry.busy}
            if s is not None:
                info.update(turns=sum(m["role"] == "user" for m in s.messages), seen_tokens=s.cache.seen_tokens,
                            cached_tokens=s.cache.cached_tokens, max_cached_tokens=s.cache.max_cached_tokens,
                            pinned_tokens=s.pinned_tokens, messages=list(s.messages))
            return info

    def counts(self) -> dict:
        """Sessions known, held in memory, and their cache bytes and fill."""
        with self._lock:
            live = [e.session for e in self._entries.values() if e.session is not None]
        cached = sum(s.cache.cached_tokens for s in live)
        room = sum(s.cache.max_cached_tokens for s in live)
        return {"known": len(self._entries), "resident": len(live), "kv_bytes": sum(storage_bytes(s.cache) for s in live),
                "cache_fill": cached / room if room else 0.0}

    # --- sessions (the worker thread) -------------------------------------------------------

    def session(self, entry: Entry, system: str | None) -> tuple[Session, bool]:
        """The session to serve ``entry``'s next conversation (with ``system``), and whether it
        was restored: loaded from the state directory if it was saved, made new otherwise (also
        when the saved state cannot be read: it then counts as dropped). A pinned session whose
        system prompt changes gets a new one (its sink region is sized for the old one). A new
        session replaces the entry's only when :meth:`adopt` says so (a refused request leaves
        the entry as it was)."""
        restored = False
        if entry.session is None and entry.saved:
            try:
                session = self.make_session(self._saved_system(entry.id), entry.pin_system)
                session.load(self._path(entry.id, ".pt"))
            except Exception as err:  # another model or cache size since a restart, a damaged file
                warnings.warn(f"session {entry.id}: its saved state cannot be restored ({err}); starting it anew")
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
        """Write the session's state (after a turn, before it is acknowledged)."""
        if self.state_dir is None or entry.session is None:
            return
        tmp = self._path(entry.id, ".pt.tmp")
        entry.session.save(tmp)
        os.replace(tmp, self._path(entry.id, ".pt"))
        self._write_meta(entry.id, entry.pin_system, entry.session.system)
        entry.saved = True

    def forget_state(self, entry: Entry) -> None:
        """The live session's cache no longer matches its transcript (a turn failed or was cut
        part-way): drop it from memory. A saved state (the last acknowledged turn) is kept, and
        the next request continues from it."""
        entry.session = None
        if not entry.saved:
            entry.evicted = "dropped"

    def enforce_budget(self, reserve_bytes: int = 0) -> None:
        """Evict least recently used idle sessions until the budget holds with ``reserve_bytes`` more."""
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
                live = [x for x in live if x is not e]

    # --- files ------------------------------------------------------------------------------

    def _path(self, sid: str, suffix: str) -> Path:
        return self.state_dir / f"{sid}{suffix}"

    def _write_meta(self, sid: str, pin_system: bool, system: str | None = None) -> None:
        tmp = self._path(sid, ".json.tmp")
        tmp.write_text(json.dumps({"pin_system": pin_system, "system": system}))
        os.replace(tmp, self._path(sid, ".json"))

    def _saved_system(self, sid: str) -> str | None:
        return json.loads(self._path(sid, ".json").read_text()).get("system")
