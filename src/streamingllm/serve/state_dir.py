"""The server's state directory: each session's metadata and cache files, written so that a turn is
on disk if and only if it was acknowledged.

A session ``sess-X`` is two files: ``sess-X.json`` (the metadata: settings, transcript, numbers,
when it was last used, and the *version* of its cache) and ``sess-X.<version>.pt`` (the cache and
transcript, :meth:`Session.save <streamingllm.session.Session.save>`). A turn is saved as: the new
cache under a temporary name, fsync, rename to the next version; then the metadata naming that
version, the same way. The metadata's rename is the commit: a process killed before it leaves the
previous metadata naming the previous cache (removed only after the commit), and the new cache an
orphan that :meth:`StateDir.scan` deletes at the next start. Metadata that cannot be read (empty,
not JSON, wrong fields) is quarantined (renamed ``*.corrupt``) and logged, so one bad file never
stops the server. The directory is owner-only (0700), its files too (0600): the file names are
session ids, which are what a client needs to reach a conversation.

A session whose state grows with the conversation (a memory of evicted blocks:
:func:`~.delta.shares_history`) is saved as a *chain* instead: a whole state, then one file per
turn holding that turn's delta (:func:`~.delta.diff_state`: about the rows of the tokens the turn
fed), until the deltas outgrow ``compact_ratio`` times the whole state, when the next turn writes a
whole state again. The metadata names the chain (``chain``: the versions, whole state first), so
its rename stays the commit; the files of a replaced chain are removed after it, like a replaced
cache, and a chain with a file missing is reported at start (the session starts anew).

:class:`DirBackend` is the directory as a session store (:class:`~.backends.SessionBackend`):
one process serves a directory, which it locks at start (``flock`` on the directory itself).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)  # whole messages (f-strings): the server redacts the session ids in them

ID_PATTERN = re.compile(r"^sess-[A-Za-z0-9_-]{16,64}$")  # also safe as a file name
FORMAT = 2  # the metadata's format (1: {"pin_system", "system"} beside sess-X.pt, read and upgraded)
_CACHE_NAME = re.compile(r"^(sess-[A-Za-z0-9_-]{16,64})(?:\.(\d+))?\.pt$")


class StateDirInUseError(OSError):
    """Another process serves the state directory."""


@dataclass
class Record:
    """One session's metadata as read from disk.

    Attributes:
        id: the session id.
        meta: the metadata (``pin_system``, ``system``, ``version``, ``last_used`` (Unix seconds),
            ``messages`` and ``stats`` (None before the first turn)).
        has_cache: the cache file the metadata names is there.
    """

    id: str
    meta: dict
    has_cache: bool


@dataclass
class Held:
    """What a store keeps of a session it holds, to diff the session's next turn against.

    Attributes:
        version: the stored version ``state`` is.
        state: the stored state at ``version``, as loading it rebuilds it.
        base_bytes: bytes of the whole state the stored version is built on.
        log_bytes: bytes of the deltas stored on top of it.
        chain: the stored versions that make it up, base first (a state directory's files).
    """

    version: int
    state: dict
    base_bytes: int
    log_bytes: int
    chain: list[int] = field(default_factory=list)


class StateDir:
    """Sessions' files in ``path`` (created owner-only; tightened to 0700 with a warning when it
    exists and others can read it).

    Attributes:
        quarantined: metadata files renamed ``*.corrupt`` since this process started.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.quarantined = 0
        if not self.path.is_dir():
            self.path.mkdir(mode=0o700, parents=True)
            os.chmod(self.path, 0o700)  # mkdir's mode is masked by the umask
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            try:
                os.chmod(self.path, 0o700)
                log.warning(f"state dir {self.path} was open to other users (mode {mode:o}): set to 0700 (its "
                            "file names are session ids)")
            except OSError as err:
                log.warning(f"state dir {self.path} is open to other users (mode {mode:o}) and cannot be "
                            f"restricted: {err}")

    def cache_path(self, sid: str, version: int) -> Path:
        return self.path / f"{sid}.{version}.pt"

    def meta_path(self, sid: str) -> Path:
        return self.path / f"{sid}.json"

    # --- reading, at start-up -------------------------------------------------------------------

    def scan(self) -> list[Record]:
        """Every session's record, least recently used first. Temporary files and caches no
        metadata names (a turn that was never acknowledged) are deleted; unreadable metadata is
        quarantined with its caches."""
        for tmp in self.path.glob("sess-*.tmp"):
            tmp.unlink(missing_ok=True)
        records, bad = {}, set()
        for path in self.path.glob("sess-*.json"):
            try:
                records[path.stem] = self._read(path)
            except (OSError, ValueError) as err:
                bad.add(path.stem)
                self._quarantine(path, str(err))
        present: dict[str, set[int]] = {}
        for path in self.path.glob("sess-*.pt"):
            match = _CACHE_NAME.match(path.name)
            sid, version = (match.group(1), int(match.group(2) or 0)) if match else (None, None)
            record = records.get(sid)
            if record is not None and version in chain_of(record.meta):
                present.setdefault(sid, set()).add(version)
            elif sid in bad:
                self._quarantine(path, "its metadata is unreadable")
            else:
                path.unlink(missing_ok=True)
                log.warning(f"state dir: removed {path}, a session state no metadata names (a turn that was "
                            "not acknowledged, or a deleted session)")
        for record in records.values():
            record.has_cache = bool(record.meta["version"]) and set(chain_of(record.meta)) <= present.get(record.id, set())
            if record.meta["version"] and not record.has_cache:
                missing = sorted(set(chain_of(record.meta)) - present.get(record.id, set()))
                names = ", ".join(str(self.cache_path(record.id, v)) for v in missing)
                log.warning(f"state dir: {self.meta_path(record.id)} names {names}, which "
                            f"{'is' if len(missing) == 1 else 'are'} missing: the session starts anew")
        return sorted(records.values(), key=lambda r: r.meta["last_used"])

    def _read(self, path: Path) -> Record:
        sid = path.stem
        if not ID_PATTERN.match(sid):
            raise ValueError("not a session id")
        try:
            meta = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"not JSON: {err}") from None
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        if "format" not in meta:  # format 1: upgraded in place
            meta = self._upgrade(sid, meta, path.stat().st_mtime)
        checks = {"format": lambda v: v == FORMAT, "pin_system": lambda v: isinstance(v, bool),
                  "system": lambda v: v is None or isinstance(v, str),
                  "version": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                  "last_used": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "messages": lambda v: v is None or isinstance(v, list),
                  "stats": lambda v: v is None or isinstance(v, dict)}
        for key, ok in checks.items():
            if key not in meta or not ok(meta[key]):
                raise ValueError(f"its {key!r} is missing or invalid")
        chain = meta.get("chain")
        if chain is not None and not (isinstance(chain, list) and chain and chain[-1] == meta["version"] and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in chain) and chain == sorted(set(chain))):
            raise ValueError("its 'chain' is not the increasing list of versions ending with its version")
        return Record(sid, meta, has_cache=False)

    def _upgrade(self, sid: str, old: dict, mtime: float) -> dict:
        """Format 1 metadata (and its ``sess-X.pt``) as format 2."""
        legacy, version = self.path / f"{sid}.pt", 0
        if legacy.exists():
            version = 1
            os.replace(legacy, self.cache_path(sid, 1))
        meta = {"format": FORMAT, "pin_system": old.get("pin_system"), "system": old.get("system"),
                "version": version, "last_used": mtime, "messages": None, "stats": None}
        self.write_meta(sid, meta)
        return meta

    def _quarantine(self, path: Path, why: str) -> None:
        target = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, target)
        except OSError as err:
            log.warning(f"state dir: cannot quarantine {path} ({why}): {err}")
            return
        self.quarantined += 1
        log.warning(f"state dir: quarantined {path} ({why}): renamed to {target.name}")

    def read_meta(self, sid: str) -> dict | None:
        """``sid``'s metadata as on disk now (None when it cannot be read)."""
        try:
            return json.loads(self.meta_path(sid).read_text())
        except (OSError, ValueError):
            return None

    # --- writing ------------------------------------------------------------------------------

    def write_meta(self, sid: str, meta: dict) -> None:
        """Replace ``sid``'s metadata atomically and durably (the commit of a turn)."""
        text = json.dumps({**meta, "format": FORMAT})
        _write_private(self.meta_path(sid), lambda tmp: tmp.write_text(text))
        _fsync_dir(self.path)

    def save(self, sid: str, version: int, meta: dict, write: Callable[[Path], None],
             chain: list[int] | None = None) -> int:
        """Write ``sid``'s next version after ``version``, then ``meta`` naming it; the previous
        version's files are removed once the new one is committed. Returns the new version.
        Raises when the turn is not on disk (the previous files are intact then).

        Args:
            write: writes the version's file at the path it is given: the whole state
                (``session.save``), or the encoded delta from the stored ``version``.
            chain: for a delta, the stored versions it builds on (whole state first); None for a
                whole state.
        """
        new = version + 1
        old = chain_of(self.read_meta(sid) or {}) if version else []
        chain = [*chain, new] if chain is not None else [new]
        cache = self.cache_path(sid, new)
        _write_private(cache, write)
        _fsync_dir(self.path)
        text = json.dumps({**meta, "format": FORMAT, "version": new, **({"chain": chain} if len(chain) > 1 else {})})
        try:
            _write_private(self.meta_path(sid), lambda tmp: tmp.write_text(text))
        except BaseException:
            cache.unlink(missing_ok=True)
            raise
        try:  # committed: from here on nothing may raise (the turn is on disk)
            _fsync_dir(self.path)
            for v in set(old) - set(chain):
                self.cache_path(sid, v).unlink(missing_ok=True)
        except OSError as err:
            log.warning(f"state dir: after saving {sid} version {new}: {err}")
        return new

    def remove(self, sid: str, version: int) -> None:
        """Delete ``sid``'s files: the metadata first, so that a crash leaves only orphan caches."""
        chain = chain_of(self.read_meta(sid) or {"version": version})
        for path in (self.meta_path(sid), *(self.cache_path(sid, v) for v in chain)):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                log.warning(f"state dir: cannot remove {path}: {err}")


def chain_of(meta: dict) -> list[int]:
    """The versions of the files that make up the stored state ``meta`` names, whole state
    first: its ``chain``, or its version alone (none before the first turn)."""
    version = meta.get("version") or 0
    return list(meta.get("chain") or ([version] if version else []))


def _write_private(path: Path, write) -> None:
    """``write(tmp)`` to a temporary owner-only file, fsync it, and rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # in case a stale temporary file had another mode
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    """Make the renames in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the directory as a session store ------------------------------------------------------------

_DIR_LOCKS: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [fd, users in this process]
_DIR_LOCKS_GUARD = threading.Lock()


def _lock_dir(path: Path) -> tuple[int, int]:
    """Lock directory ``path`` for this process (its key in :data:`_DIR_LOCKS`); several
    backends of one process share the lock, another process gets StateDirInUseError."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    with _DIR_LOCKS_GUARD:
        if key in _DIR_LOCKS:
            _DIR_LOCKS[key][1] += 1
            return key
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the directory itself: no lock file among the sessions'
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUseError(f"the state dir {path} is in use by another server process; give each server "
                                     "its own directory, or share sessions with --session-store redis://...") from None
        _DIR_LOCKS[key] = [fd, 1]
        return key


def _unlock_dir(key: tuple[int, int]) -> None:
    """Drop one of this process's uses of the lock :func:`_lock_dir` returned ``key`` for."""
    with _DIR_LOCKS_GUARD:
        held = _DIR_LOCKS.get(key)
        if held is not None:
            held[1] -= 1
            if held[1] == 0:
                os.close(_DIR_LOCKS.pop(key)[0])  # closing the last descriptor releases the flock


class DirBackend(StateDir):
    """The state directory as a session store (:class:`~.backends.SessionBackend`): whole states,
    or chains of deltas for states that grow with the conversation (see the module). This process
    holds every session (the directory's lock is its one lease, so acquire, renew and release do
    nothing). ``scan``, ``read_meta``, ``remove`` and ``quarantined`` are :class:`StateDir`'s.

    Args:
        path: the directory (created owner-only).
        compact_ratio: a chain's deltas are followed by a whole state when their bytes would
            exceed this many times the whole state's (> 0).
    """

    shared = False

    def __init__(self, path: str | os.PathLike, compact_ratio: float = 1.0):
        from ..checks import check_float

        check_float("compact_ratio", compact_ratio, 0, open_min=True)
        super().__init__(path)
        self._lock = _lock_dir(self.path)
        self.compact_ratio = compact_ratio
        self.bytes_written = self.last_bytes = 0
        self._held: dict[str, Held] = {}  # chained sessions' last stored states, to diff the next turn against

    def lookup(self, sid: str) -> Record | None:
        meta = self.read_meta(sid)
        return None if meta is None else Record(sid, meta, self.cache_path(sid, meta.get("version", 0)).exists())

    def create(self, sid: str, meta: dict) -> None:
        if self.meta_path(sid).exists():
            raise ValueError("the session id given exists already")
        self.write_meta(sid, meta)

    def load(self, sid: str, version: int, session) -> None:
        meta = self.read_meta(sid) or {}
        chain = chain_of(meta) if meta.get("version") == version else [version]
        self._held.pop(sid, None)
        if len(chain) == 1:
            session.load(self.cache_path(sid, version))
            return
        from ..session import read_state
        from .delta import apply_delta, decode

        state, logged = read_state(self.cache_path(sid, chain[0])), 0
        for v in chain[1:]:
            try:
                data = self.cache_path(sid, v).read_bytes()
            except OSError as err:
                raise ValueError(f"cannot read {sid}'s delta of version {v}: {err}") from None
            state, logged = apply_delta(state, decode(data)), logged + len(data)
        session.restore(state, source=str(self.cache_path(sid, version)))
        self._held[sid] = Held(version, state, self.cache_path(sid, chain[0]).stat().st_size, logged, chain)

    def save(self, sid: str, version: int, meta: dict, session) -> int:
        """As :class:`~.backends.SessionBackend` says; a session with no ``state()`` (only ``save`` and
        ``load``) is written whole by its ``save``."""
        from .delta import diff_state, encode, shares_history

        state = session.state() if callable(getattr(session, "state", None)) else None
        chained = state is not None and shares_history(state)
        held = self._held.pop(sid, None)
        blob = None
        if chained and held is not None and held.version == version:
            delta = diff_state(held.state, state)
            blob = None if "whole" in delta else encode(delta)
            if blob is not None and held.log_bytes + len(blob) > self.compact_ratio * held.base_bytes:
                blob = None  # the chain has outgrown its whole state: a new one
        if blob is not None:
            new = super().save(sid, version, meta, lambda tmp: tmp.write_bytes(blob), held.chain)
        elif state is not None:
            import torch

            new = super().save(sid, version, meta, lambda tmp: torch.save(state, tmp))  # as Session.save writes it
        else:
            new = super().save(sid, version, meta, session.save)
        try:
            size = self.cache_path(sid, new).stat().st_size
            written = size + self.meta_path(sid).stat().st_size
        except OSError:  # committed; only the count is lost
            size = written = 0
        if chained:
            self._held[sid] = (Held(new, state, size, 0, [new]) if blob is None else
                               Held(new, state, held.base_bytes, held.log_bytes + size, [*held.chain, new]))
        self.last_bytes = written
        self.bytes_written += written
        return new

    def remove(self, sid: str, version: int) -> None:
        self._held.pop(sid, None)
        super().remove(sid, version)

    def acquire(self, sid: str) -> None:
        pass

    def renew(self) -> None:
        pass

    def release(self, sid: str) -> None:
        self._held.pop(sid, None)

    def close(self) -> None:
        if self._lock is not None:
            _unlock_dir(self._lock)
            self._lock = None
