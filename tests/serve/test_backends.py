"""The session store's backends (streamingllm.serve.backends): the state directory and Redis (a
real redis-server, tests/redis_server.py) behind one interface, on sessions of tiny random
models. What both promise is tested on both: every saved turn comes back with the live
logits, versions, removal, bounded storage. Then Redis's own: leases between two owners,
a commit refused after a takeover, Redis stopped and back, TTL, compaction, bytes per turn."""

from __future__ import annotations

import random
import statistics
import string
import subprocess
import sys
import time

import pytest
import torch
from redis_server import redis_fixture
from serving import free_port
from tiny import chat_tokenizer, tiny_model

from streamingllm.cache import BlockMemory, SinkCache
from streamingllm.checks import ArgumentError
from streamingllm.extras import MissingExtraError
from streamingllm.feed import prefill
from streamingllm.serve.backends import (DirBackend, LeaseLostError, RedisBackend, SessionOwnedError,
                                         StoreUnavailableError, connect, keys_of)
from streamingllm.serve.delta import encode
from streamingllm.serve.server import ServerSettings
from streamingllm.serve.sessions import SessionStore
from streamingllm.serve.state_dir import _DIR_LOCKS
from streamingllm.session import Session

redis = redis_fixture("module")
REBASE_EVERY = 40  # tokens: rebases (whole-window deltas) happen within a test's conversation


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = chat_tokenizer()
    return tiny_model("llama", vocab_size=len(tokenizer)), tokenizer


@pytest.fixture
def new_session(model_and_tokenizer):
    """``new_session(window_size=28, rebases=True)``: an empty session on the tiny model
    (``rebases``: its position frame is rebased every :data:`REBASE_EVERY` tokens)."""
    model, tokenizer = model_and_tokenizer

    def make(window_size: int = 28, rebases: bool = True) -> Session:
        session = Session(model, tokenizer, 4, window_size, system="Be brief.", max_new_tokens=6, chunk_size=8,
                          compile=False)
        if rebases:
            session.cache = SinkCache(model, 4, window_size, rebase_every=REBASE_EVERY)
        return session

    return make


@pytest.fixture(params=["dir", "redis"])
def make_backend(request, tmp_path):
    """``make_backend(owner="A", **redis_options)``: a backend of the parameter's kind (each
    Redis one with its own owner; the directory one is the same directory every time)."""
    made = []

    def make(owner: str = "A", **kw):
        if request.param == "dir":
            backend = DirBackend(tmp_path / "state")
        else:
            backend = RedisBackend(request.getfixturevalue("redis").url, owner=owner, **kw)
        made.append(backend)
        return backend

    make.kind = request.param
    yield make
    for backend in made:
        backend.close()


def _messages(n: int, seed: int = 0) -> list[str]:
    """User messages of 1 to 10 characters, and one of 45 (longer than a 28-token window) every 7th."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters, k=45 if i % 7 == 6 else rng.randint(1, 10))) for i in range(n)]


def _meta(session: Session, version: int = 0) -> dict:
    return {"pin_system": False, "system": session.system, "version": version, "last_used": time.time(),
            "messages": list(session.messages), "stats": session.stats()}


def _sid() -> str:
    return "sess-" + "".join(random.choices(string.ascii_letters, k=24))


def _next_logits(model, session: Session) -> torch.Tensor:
    """The logits after one more token (which joins the session's stream)."""
    return prefill(model, session.cache, torch.tensor([[7]]), chunk_size=1)


def _redis_keys(backend: RedisBackend, sid: str) -> list[str]:
    return sorted(k.decode() for k in backend.client.keys(f"streamingllm:{{{sid}}}:*"))


# --- both backends --------------------------------------------------------------------------------


def test_every_saved_turn_comes_back_exactly(make_backend, new_session, model_and_tokenizer):
    """A long evicting conversation (rebases included), saved after every turn: each turn loaded
    into a fresh session continues with the live session's logits; every few turns the loaded
    session becomes the live one (the session moved), and its turns are saved as deltas of it."""
    model, _ = model_and_tokenizer
    backend, sid = make_backend(), _sid()
    live = new_session()
    backend.create(sid, _meta(live))
    backend.acquire(sid)
    version = 0
    for i, text in enumerate(_messages(30)):
        "".join(live.reply(text))
        before, version = version, backend.save(sid, version, _meta(live, version), live)
        assert version == before + 1 and backend.lookup(sid).meta["version"] == version
        fresh = new_session()
        backend.load(sid, version, fresh)
        assert fresh.messages == live.messages
        torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, live), atol=1e-5, rtol=0)
        if i % 5 == 4:
            live = fresh  # continued from the store, as another replica would
            version = backend.save(sid, version, _meta(live, version), live)  # the probe token, saved
    assert live.cache.seen_tokens > 10 * live.cache.max_cached_tokens
    other = new_session()  # a negative control: another conversation's logits differ
    "".join(other.reply("something else entirely"))
    assert not torch.allclose(_next_logits(model, other), _next_logits(model, live), atol=1e-5, rtol=0)


def test_a_memory_session_is_saved_per_turn_and_comes_back_exactly(make_backend, model_and_tokenizer):
    """A session with a memory of blocks evicting whole turns, whose state grows with the
    conversation: each turn stores a delta (its new blocks, references to the old ones and to the
    window's slots): a log entry in Redis, a file of the chain the metadata names in the state
    dir, and a whole state again when the deltas outgrow it. Every few turns it is loaded
    into a fresh session (the state dir by a new backend, as after a restart) which comes back
    with the live logits and goes on. What is written stays well under a whole state per turn."""
    model, tokenizer = model_and_tokenizer
    memory = BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8)

    def session() -> Session:
        return Session(model, tokenizer, 4, 40, system="Be brief.", max_new_tokens=6, chunk_size=8, compile=False,
                       memory=memory, evict="turns")

    backend, sid, live = make_backend(), _sid(), session()
    backend.create(sid, _meta(live))
    backend.acquire(sid)
    version, logged, whole, stored = 0, [], 0, 0
    for i, text in enumerate(_messages(24, seed=3)):
        "".join(live.reply(text[:20]))
        version = backend.save(sid, version, _meta(live, version), live)
        whole, stored = whole + len(encode(live.state())), stored + backend.last_bytes
        if make_backend.kind == "redis":
            logged.append(backend.client.llen(keys_of(sid)["log"]))
        else:
            chain = backend.read_meta(sid).get("chain", [version])
            logged.append(len(chain) - 1)
            assert sorted(p.name for p in backend.path.glob(f"{sid}*")) == sorted(
                [f"{sid}.json"] + [f"{sid}.{v}.pt" for v in chain])
        if i % 8 == 7:
            if make_backend.kind == "dir":
                backend.close()
                backend = make_backend()
            fresh = session()
            backend.load(sid, version, fresh)
            assert fresh.held.units == live.held.units and fresh.messages == live.messages
            torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, live), atol=1e-5, rtol=0)
            live = fresh
            version = backend.save(sid, version, _meta(live, version), live)  # the probe token, saved
    assert live.cache.memory_blocks >= 20
    assert max(logged) >= 3 and logged.count(0) <= len(logged) / 3, logged  # deltas, and compactions
    assert stored < whole / 2, (stored, whole)


def test_versions_metadata_and_removal(make_backend, new_session):
    backend, sid = make_backend(), _sid()
    live = new_session()
    assert backend.lookup(sid) is None and backend.read_meta(sid) is None
    backend.create(sid, _meta(live))
    with pytest.raises(ValueError, match="exists"):
        backend.create(sid, _meta(live))
    record = backend.lookup(sid)
    assert record.meta["version"] == 0 and not record.has_cache
    backend.acquire(sid)
    for version in (0, 1):
        "".join(live.reply(f"turn {version}"))
        assert backend.save(sid, version, _meta(live, version), live) == version + 1
    meta = backend.read_meta(sid)
    assert meta["version"] == 2 and backend.lookup(sid).has_cache
    assert meta["messages"] == live.messages and meta["stats"] == live.stats()
    assert backend.last_bytes > 0 and backend.bytes_written > backend.last_bytes
    backend.remove(sid, 2)
    assert backend.lookup(sid) is None and backend.read_meta(sid) is None
    if make_backend.kind == "redis":
        assert _redis_keys(backend, sid) == []
    else:
        assert not list(backend.path.glob(f"{sid}*"))


def test_what_is_stored_stays_bounded(make_backend, new_session):
    """Over many turns a session stays a fixed set of files or keys, and its bytes stay within
    the compaction bound (the log of deltas never outgrows the base; the transcript aside)."""
    backend, sid = make_backend(), _sid()
    live = new_session(window_size=124)
    backend.create(sid, _meta(live))
    backend.acquire(sid)
    version, logs = 0, []
    for text in _messages(40, seed=3):
        "".join(live.reply(text))
        version = backend.save(sid, version, _meta(live, version), live)
        if make_backend.kind == "dir":
            assert sorted(p.name for p in backend.path.glob(f"{sid}*")) == [f"{sid}.{version}.pt", f"{sid}.json"]
            continue
        k = keys_of(sid)
        assert set(_redis_keys(backend, sid)) <= {k["meta"], k["base"], k["log"], k["lease"], k["messages"]}
        base = backend.client.strlen(k["base"])
        log_bytes = sum(map(len, backend.client.lrange(k["log"], 0, -1)))
        assert log_bytes <= backend.compact_ratio * base
        logs.append(backend.client.llen(k["log"]))
    if logs:
        assert 0 in logs[1:] and max(logs) >= 2  # compacted now and then, deltas in between


# --- the state directory ---------------------------------------------------------------------------


def test_a_state_dir_chain_survives_a_crash_and_a_lost_file_is_seen(tmp_path, model_and_tokenizer, caplog):
    """A memory session's chain in the state dir: a delta written but never committed (a kill
    before the metadata's rename) is removed at the next start and the chain loads exactly; a
    chain with a file missing is reported (the session starts anew), and metadata whose chain
    is not its versions is quarantined."""
    import json
    import logging

    model, tokenizer = model_and_tokenizer
    memory = BlockMemory(block_size=8, top_k=2, repr_keys=2, chunk_size=8)

    def session() -> Session:
        return Session(model, tokenizer, 4, 40, system="Be brief.", max_new_tokens=6, chunk_size=8, compile=False,
                       memory=memory, evict="turns")

    backend, sid, live = DirBackend(tmp_path), _sid(), session()
    backend.create(sid, _meta(live))
    version = 0
    for text in _messages(12, seed=4):
        "".join(live.reply(text[:20]))
        version = backend.save(sid, version, _meta(live, version), live)
        if len(backend.read_meta(sid).get("chain", [])) >= 3:
            break
    chain = backend.read_meta(sid)["chain"]
    assert len(chain) >= 3 and chain[-1] == version
    (tmp_path / f"{sid}.{version + 1}.pt").write_bytes(b"a delta never acknowledged")
    backend.close()
    again = DirBackend(tmp_path)
    (record,) = [r for r in again.scan() if r.id == sid]
    assert record.has_cache and not (tmp_path / f"{sid}.{version + 1}.pt").exists()
    fresh = session()
    again.load(sid, version, fresh)
    torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, live), atol=1e-5, rtol=0)
    (tmp_path / f"{sid}.{chain[1]}.pt").unlink()
    with caplog.at_level(logging.WARNING):
        (record,) = [r for r in again.scan() if r.id == sid]
    assert not record.has_cache and f".{chain[1]}.pt, which is missing" in caplog.text  # (ids may be redacted)
    meta = json.loads((tmp_path / f"{sid}.json").read_text())
    (tmp_path / f"{sid}.json").write_text(json.dumps({**meta, "chain": [version, 1]}))
    assert sid not in [r.id for r in again.scan()] and again.quarantined >= 1
    again.close()



def test_one_process_per_state_dir(tmp_path):
    """A second process on the same directory fails at once, naming it; this process's own
    backends share the lock, which goes with the last of them."""
    path = tmp_path / "state"
    first, second = DirBackend(path), DirBackend(path)
    probe = [sys.executable, "-c", "import sys; from streamingllm.serve.backends import DirBackend; DirBackend(sys.argv[1])",
             str(path)]
    other = subprocess.run(probe, capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "in use by another server" in other.stderr and str(path) in other.stderr
    first.close()  # the second still holds it
    assert second._lock in _DIR_LOCKS
    second.close()
    assert subprocess.run(probe, capture_output=True, text=True, timeout=120).returncode == 0


# --- Redis ---------------------------------------------------------------------------------------


def test_a_lease_keeps_other_owners_out_until_it_expires(redis, new_session):
    a = RedisBackend(redis.url, owner="A", lease_ttl=0.6)
    b = RedisBackend(redis.url, owner="B", lease_ttl=0.6)
    try:
        sid, live = _sid(), new_session()
        a.create(sid, _meta(live))
        a.acquire(sid)
        a.acquire(sid)  # ours: renewed
        with pytest.raises(SessionOwnedError) as refused:
            b.acquire(sid)
        assert refused.value.retry_after == 1
        time.sleep(1.5)  # A's thread renews it meanwhile
        with pytest.raises(SessionOwnedError):
            b.acquire(sid)
        a.release(sid)
        b.acquire(sid)
        with pytest.raises(SessionOwnedError):
            a.acquire(sid)
    finally:
        a.close()
        b.close()


def test_a_dead_owner_is_taken_over_and_its_late_commit_refused(redis, new_session, model_and_tokenizer):
    """Two session tables on one Redis: A serves a session and stops renewing (it hangs); once
    its lease expires B takes the session over with A's last turn exactly, and answers a turn;
    A's commit is then refused (LeaseLostError) and the stored state is B's. When B lets the
    session go, A's stale copy is dropped and the store's restored."""
    model, _ = model_and_tokenizer
    stores = [SessionStore(lambda system, pin: new_session(), backend=RedisBackend(redis.url, owner=o, lease_ttl=0.6))
              for o in "AB"]
    a, b = stores
    try:
        sid = a.create()
        _turn(a, sid, "hello")
        with pytest.raises(SessionOwnedError):
            b.claim(sid)
        a.backend._stop.set()  # A hangs: its lease is not renewed
        entry_a = a.claim(sid)  # A's request begins while it still holds the lease...
        time.sleep(0.9)
        entry_b = b.claim(sid)  # ...which expires: B takes the session over
        session_b, restored = b.session(entry_b, None)
        assert restored and session_b.messages == entry_a.session.messages
        torch.testing.assert_close(_next_logits(model, session_b), _next_logits(model, entry_a.session), atol=1e-5,
                                   rtol=0)
        b.adopt(entry_b, session_b)
        "".join(session_b.reply("B's turn"))
        b.save(entry_b)
        b.release(entry_b)
        "".join(entry_a.session.reply("A's late turn"))
        with pytest.raises(LeaseLostError, match="not acknowledged"):
            a.save(entry_a)
        a.forget_state(entry_a)  # what the engine does when the commit fails
        a.release(entry_a)
        stored = new_session()
        b.backend.load(sid, entry_b.version, stored)
        assert stored.messages == session_b.messages and stored.messages[-2]["content"] == "B's turn"
        b.max_sessions = 0  # evict it: B gives the lease back
        b.enforce_budget()
        a.backend._stop.clear()
        entry = a.claim(sid)
        session_a, restored = a.session(entry, None)
        assert restored and session_a.messages == session_b.messages
        a.release(entry)
    finally:
        for s in stores:
            s.backend.close()


def _turn(store: SessionStore, sid: str, text: str) -> None:
    """One acknowledged turn on ``sid``: claim, answer, save, release."""
    entry = store.claim(sid)
    session, _ = store.session(entry, None)
    store.adopt(entry, session)
    "".join(session.reply(text))
    store.save(entry)
    store.release(entry)


def test_a_clean_stop_hands_the_leases_over_at_once(redis, new_session, model_and_tokenizer):
    """A stopped engine closes its store: its leases (30 s long) are released, and another owner
    takes the session over at once, with its last turn. Before the stop the other is refused."""
    from streamingllm.serve.engine import Engine

    model, tokenizer = model_and_tokenizer
    stores = [SessionStore(lambda system, pin: new_session(), backend=RedisBackend(redis.url, owner=o, lease_ttl=30))
              for o in "AB"]
    a, b = stores
    try:
        sid = a.create()
        _turn(a, sid, "hello")  # the session stays in A's memory, under A's lease
        with pytest.raises(SessionOwnedError):
            b.claim(sid)
        engine = Engine(model, tokenizer, 4, 28, a, compile="off")
        engine.start()
        engine.stop()
        assert not a.backend._renewer.is_alive()
        start = time.monotonic()
        entry = b.claim(sid)
        session, restored = b.session(entry, None)
        assert time.monotonic() - start < 5 and restored and session.messages[-2]["content"] == "hello"
        b.release(entry)
    finally:
        for s in stores:
            s.close()

def test_redis_down_then_back(tmp_path, new_session, model_and_tokenizer):
    """Redis killed (SIGKILL): the backend fails fast with StoreUnavailableError (a 503 with
    Retry-After in the API); restarted, the same backend works again and every acknowledged turn
    is there."""
    from redis_server import RedisServer

    from streamingllm.serve.protocol import RequestDefaults
    from streamingllm.serve.serving import APIError, OpenAIServing

    model, _ = model_and_tokenizer
    server = RedisServer(tmp_path / "redis")
    server.start()
    backend = RedisBackend(server.url, owner="A", lease_ttl=5)
    store = SessionStore(lambda system, pin: new_session(), backend=backend)
    try:
        sid = store.create()
        _turn(store, sid, "before")
        _turn(store, sid, "acknowledged")
        entry = store.claim(sid)
        server.kill()
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="not saved"):
            "".join(entry.session.reply("lost"))
            store.save(entry)
        store.forget_state(entry)
        store.release(entry)
        with pytest.raises(StoreUnavailableError, match=str(server.port)):
            store.claim(sid)
        api = OpenAIServing(None, store, "m", defaults=RequestDefaults())
        with pytest.raises(APIError) as answered:
            api._claim(sid)
        assert answered.value.status == 503 and int(answered.value.headers["Retry-After"]) >= 1
        assert time.monotonic() - start < 20
        server.start()
        entry = store.claim(sid)
        session, restored = store.session(entry, None)
        assert restored and [m["content"] for m in session.messages if m["role"] == "user"] == ["before",
                                                                                                  "acknowledged"]
        store.adopt(entry, session)
        "".join(session.reply("after"))
        store.save(entry)
        store.release(entry)
        fresh = new_session()
        backend.load(sid, entry.version, fresh)
        torch.testing.assert_close(_next_logits(model, fresh), _next_logits(model, session), atol=1e-5, rtol=0)
    finally:
        backend.close()
        server.stop()


def test_keys_expire_after_the_session_ttl(redis, new_session):
    backend = RedisBackend(redis.url, owner="A", session_ttl=0.5)
    try:
        sid, live = _sid(), new_session()
        backend.create(sid, _meta(live))
        backend.acquire(sid)
        "".join(live.reply("hi"))
        backend.save(sid, 0, _meta(live), live)
        k = keys_of(sid)
        assert all(0 < backend.client.pttl(k[p]) <= 500 for p in ("meta", "base", "messages"))
        backend.release(sid)
        time.sleep(0.7)
        assert _redis_keys(backend, sid) == [] and backend.lookup(sid) is None
    finally:
        backend.close()


def test_a_turn_writes_its_delta_not_the_whole_state(redis, new_session):
    """Once the window is full, the median turn writes well under a quarter of the whole state
    (what the state dir writes); compactions write it whole now and then."""
    backend = RedisBackend(redis.url, owner="A")
    try:
        sid, live = _sid(), new_session(window_size=124, rebases=False)
        backend.create(sid, _meta(live))
        backend.acquire(sid)
        version, ratios = 0, []
        for text in _messages(40, seed=5):
            "".join(live.reply(text))
            version = backend.save(sid, version, _meta(live, version), live)
            if live.cache.seen_tokens > live.cache.max_cached_tokens:
                ratios.append(backend.last_bytes / len(encode(live.state())))
        assert len(ratios) >= 10 and statistics.median(ratios) < 0.25 and max(ratios) > 0.5, ratios
    finally:
        backend.close()


def test_settings_and_start_up_errors(monkeypatch):
    with pytest.raises(ArgumentError, match="state_dir") as both:
        ServerSettings(state_dir="x", session_store="redis://127.0.0.1/0").check()
    assert "--session-store" in both.value.as_flag() and "--state-dir" in both.value.as_flag()
    with pytest.raises(ArgumentError, match="lease_ttl"):
        ServerSettings(lease_ttl=0).check()
    url = f"redis://127.0.0.1:{free_port()}/0"
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=url):
        connect(url)
    assert time.monotonic() - start < 10
    with pytest.raises(ArgumentError, match="redis://"):
        connect("http://127.0.0.1/0")
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingExtraError, match="replicas"):
        connect(url)


def test_the_cli_names_an_unreachable_store_before_loading_a_model(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run([sys.executable, "-m", "streamingllm.cli", "serve", "--session-store", url, "--model",
                           str(tmp_path / "no-model")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and url in done.stderr and "Traceback" not in done.stderr, done.stderr
    both = subprocess.run([sys.executable, "-m", "streamingllm.cli", "serve", "--session-store", url, "--state-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "--state-dir" in both.stderr and "--session-store" in both.stderr
