"""The session store and its state directory without a model (a stand-in session that saves its
transcript): what is on disk after a turn, a failed save and a crash, quarantine, permissions,
expiry and the bound on sessions known (issue 23, points 8, 15, 16)."""

from __future__ import annotations

import json
import logging
import stat

import pytest

from streamingllm.serve.logs import redact
from streamingllm.serve.sessions import SessionLimitError, SessionStore, UnknownSessionError


class FakeCache:
    seen_tokens, cached_tokens, max_cached_tokens = 10, 10, 64


class FakeSession:
    """Saves and loads its transcript, as a Session saves cache and transcript together."""

    def __init__(self, system=None, pin=False):
        self.system, self.pinned_tokens, self.cache = system, 0, FakeCache()
        self.messages = [] if system is None else [{"role": "system", "content": system}]

    def stats(self):
        return {"seen_tokens": 10, "cached_tokens": 10, "max_cached_tokens": 64, "pinned_tokens": 0,
                "turns": sum(m["role"] == "user" for m in self.messages)}

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.messages, f)

    def load(self, path):
        with open(path) as f:
            self.messages = json.load(f)


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def _store(path, **kw) -> SessionStore:
    return SessionStore(FakeSession, state_dir=path, **kw)


def _turn(store: SessionStore, sid: str, text: str) -> None:
    """One acknowledged turn on ``sid``: claim, answer, save, release."""
    entry = store.claim(sid)
    session, _ = store.session(entry, None)
    store.adopt(entry, session)
    session.messages = session.messages + [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]
    store.save(entry)
    store.release(entry)


def _restored_messages(store: SessionStore, sid: str) -> list:
    entry = store.claim(sid)
    session, restored = store.session(entry, None)
    store.release(entry)
    assert restored
    return session.messages


def test_a_turn_is_committed_by_its_metadata(tmp_path):
    """Each turn writes the next cache version, then the metadata naming it; the old version goes."""
    store = _store(tmp_path)
    sid = store.create()
    _turn(store, sid, "one")
    _turn(store, sid, "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sid}.2.pt", f"{sid}.json"]
    meta = json.loads((tmp_path / f"{sid}.json").read_text())
    assert meta["version"] == 2 and [m["content"] for m in meta["messages"]] == ["one", "ok", "two", "ok"]


def test_a_crash_between_the_cache_and_the_metadata_keeps_the_last_acknowledged_turn(tmp_path):
    """The state a kill -9 leaves between the cache's rename and the metadata's: the newer cache
    without its metadata (plus temporary files). A restart continues from the previous pair."""
    store = _store(tmp_path)
    sid = store.create()
    _turn(store, sid, "acknowledged")
    before = (tmp_path / f"{sid}.json").read_text()
    (tmp_path / f"{sid}.2.pt").write_text(json.dumps([{"role": "user", "content": "never acknowledged"}]))
    (tmp_path / f"{sid}.json.tmp").write_text("{")
    again = _store(tmp_path)
    assert [m["content"] for m in _restored_messages(again, sid)] == ["acknowledged", "ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sid}.1.pt", f"{sid}.json"]
    assert (tmp_path / f"{sid}.json").read_text() == before
    assert [m["content"] for m in again.describe(sid)["messages"]] == ["acknowledged", "ok"]


def test_a_failed_save_leaves_the_previous_turn(tmp_path, monkeypatch):
    """Writing the metadata fails: the new cache is removed, the previous pair stays and loads."""
    store = _store(tmp_path)
    sid = store.create()
    _turn(store, sid, "one")
    import streamingllm.serve.state_dir as state_dir

    real = state_dir._write_private

    def failing(path, write):
        if path.suffix == ".json":
            raise OSError("disk full")
        real(path, write)

    monkeypatch.setattr(state_dir, "_write_private", failing)
    entry = store.claim(sid)
    with pytest.raises(OSError):
        entry.session.messages = entry.session.messages + [{"role": "user", "content": "two"}]
        store.save(entry)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{sid}.1.pt", f"{sid}.json"]
    store.forget_state(entry)  # what the engine does when a turn fails
    store.release(entry)
    assert [m["content"] for m in _restored_messages(store, sid)] == ["one", "ok"]


def test_unreadable_metadata_is_quarantined_and_named(tmp_path, caplog):
    good = _store(tmp_path).create()
    bad = "sess-" + "b" * 24
    (tmp_path / f"{bad}.json").write_text("")
    (tmp_path / f"{bad}.3.pt").write_text("x")
    (tmp_path / ("sess-" + "c" * 24 + ".json")).write_text('{"format": 2, "version": "x"}')
    with caplog.at_level(logging.WARNING):
        store = _store(tmp_path)
    assert store.counts()["known"] == 1 and store.counts()["quarantined"] == 3  # two metadata files, one cache
    assert store.describe(good)["id"] == good
    assert (tmp_path / f"{bad}.json.corrupt").exists() and (tmp_path / f"{bad}.3.pt.corrupt").exists()
    assert redact(str(tmp_path / f"{bad}.json")) in redact(caplog.text)  # named (ids are redacted in a server)
    with pytest.raises(UnknownSessionError):
        store.claim(bad)


def test_the_state_dir_is_owner_only(tmp_path):
    path = tmp_path / "new" / "state"
    store = _store(path)
    _turn(store, store.create(), "hi")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o600}
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o755)
    _store(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


def test_idle_sessions_expire_in_memory_and_on_disk(tmp_path):
    clock = Clock()
    store = _store(tmp_path, ttl=60, clock=clock)
    old, busy = store.create(), store.create()
    _turn(store, old, "hi")
    clock.now += 50
    fresh = store.create()
    entry = store.claim(busy)
    clock.now += 20  # old is idle for 70 s; busy is serving; fresh is idle for 20 s
    assert store.counts()["expired"] == 1
    with pytest.raises(UnknownSessionError):
        store.describe(old)
    assert not list(tmp_path.glob(f"{old}*"))
    store.release(entry)
    assert store.describe(busy)["id"] == busy and store.describe(fresh)["id"] == fresh
    clock.now += 3600
    restarted = _store(tmp_path, ttl=60, clock=clock)  # what a restart after an hour finds: nothing
    assert restarted.counts()["known"] == 0 and not list(tmp_path.glob("sess-*"))


def test_never_expire_with_ttl_0(tmp_path):
    clock = Clock()
    store = _store(tmp_path, ttl=0, clock=clock)
    sid = store.create()
    clock.now += 10**9
    assert store.describe(sid)["id"] == sid


def test_the_bytes_written_to_the_store_are_a_metric(tmp_path):
    """/metrics' streamingllm_store_bytes_written_total: the bytes of each committed turn's files
    (0 before the first; the session's creation is not a turn)."""
    pytest.importorskip("prometheus_client")
    from streamingllm.serve.metrics import Metrics

    store = _store(tmp_path)
    metrics = Metrics(lambda: {**store.counts(), "running": 0, "waiting": 0})

    def written() -> float:
        lines = metrics.render().decode().splitlines()
        return float(next(x for x in lines if x.startswith("streamingllm_store_bytes_written_total ")).split()[1])

    sid = store.create()
    assert written() == 0
    _turn(store, sid, "one")
    on_disk = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert written() == store.counts()["store_bytes_written"] == on_disk > 0
    _turn(store, sid, "two")
    assert written() == on_disk + sum(p.stat().st_size for p in tmp_path.iterdir())
    store.close()

def test_the_sessions_known_are_bounded(tmp_path):
    clock = Clock()
    store = _store(tmp_path, ttl=100, max_known=2, clock=clock)
    a = store.create()
    store.create()
    with pytest.raises(SessionLimitError):
        store.create()
    assert len(list(tmp_path.glob("sess-*.json"))) == 2
    store.delete(a)
    b = store.create()
    with pytest.raises(SessionLimitError):
        store.create()
    clock.now += 101  # both expire: room again
    assert store.create() != b and store.counts()["known"] == 1


def test_a_state_dir_of_the_previous_format_is_upgraded(tmp_path):
    """Format 1: ``{"pin_system", "system"}`` beside ``sess-X.pt``; read, and rewritten as format 2."""
    sid = "sess-" + "L" * 24
    (tmp_path / f"{sid}.json").write_text(json.dumps({"pin_system": False, "system": None}))
    FakeSession().save(tmp_path / f"{sid}.pt")
    store = _store(tmp_path)
    assert store.describe(sid)["saved"] and _restored_messages(store, sid) == []
    assert json.loads((tmp_path / f"{sid}.json").read_text())["version"] == 1 and (tmp_path / f"{sid}.1.pt").exists()
