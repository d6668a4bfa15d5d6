"""``streamingllm serve --replicas 2`` on a real local Ray cluster, with every session in a real
Redis server: routing, isolation, a replica killed mid-conversation, Redis stopped and restarted;
and the single-process server's API tests, chat page and ``chat --server`` against the cluster.

One cluster for the module (starting Ray and loading the model twice takes about a minute), with
the flags of the single-process tests' server; the tests run in order, the replica kill last, so
the ones before see both replicas.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from redis_server import redis_fixture  # noqa: E402
from serving import API_KEY, MODEL, assert_overload_refused, running_server  # noqa: E402

# The single-process server's tests, run here against the cluster (this module's ``server``):
# the API (whole and streamed, logprobs, sampling defaults, sessions apart across replicas, an
# edited history, errors) and the chat page in a real browser.
from serve.test_api import (test_an_edited_history_rebuilds_the_session, test_chat_whole_and_streamed_agree,  # noqa: E402,F401
                      test_errors_are_json_with_their_status_and_the_server_keeps_serving,
                      test_models_health_metrics_and_page, test_text_completions_with_logprobs,
                      test_two_sessions_stay_apart, test_unset_sampling_takes_the_servers_defaults_and_set_values_are_exact)
from serve.test_page import page, test_type_a_message_and_see_it_streamed  # noqa: E402,F401

pytestmark = pytest.mark.slow

REPLICA = "x-streamingllm-replica"
LEASE_TTL_S = 3


redis_server = redis_fixture("module")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server):
    """Two replicas, sessions in Redis, leases of LEASE_TTL_S; otherwise tests/serve/conftest.py's flags."""
    yield from running_server(tmp_path_factory.mktemp("replicas"), "--replicas", "2", "--lease-ttl", str(LEASE_TTL_S),
                              "--window-size", "124", "--max-prompt-tokens", "3000", "--max-body-mib", "1",
                              "--max-batch", "4", "--max-queue", "2", "--max-tokens", "64",
                              store=redis_server.url, start_s=420)


@pytest.fixture(scope="module")
def server(cluster):
    return cluster


GREEDY = {"max_tokens": 12, "temperature": 0}


def chat(cluster, sid: str, messages: list[dict], **extra):
    """One greedy chat request in session ``sid``: ``(status, body, replica)``."""
    body = {"model": MODEL, "session_id": sid, "messages": messages, **GREEDY, **extra}
    r = cluster.http("POST", "/v1/chat/completions", json=body)
    return r.status_code, r.json(), r.headers.get(REPLICA)


def chat_until_served(cluster, sid: str, messages: list[dict], deadline_s: float = 120, **extra):
    """:func:`chat`, retried while the answer is 503 (after its Retry-After): a session whose
    replica died waits for its lease to expire."""
    deadline = time.monotonic() + deadline_s
    while True:
        r = cluster.http("POST", "/v1/chat/completions",
                         json={"model": MODEL, "session_id": sid, "messages": messages, **GREEDY, **extra})
        if r.status_code != 503 or time.monotonic() > deadline:
            return r.status_code, r.json(), r.headers.get(REPLICA)
        assert "retry-after" in r.headers, r.headers
        time.sleep(float(r.headers["retry-after"]))


def new_session(cluster) -> tuple[str, str]:
    r = cluster.http("POST", "/v1/sessions", json={})
    assert r.status_code == 200, r.text
    return r.json()["id"], r.headers[REPLICA]


def one_session_per_replica(cluster) -> dict[str, str]:
    """``{replica: session}``: new sessions until each replica holds one of them (new sessions go to
    the replica holding the fewest, so a few are enough)."""
    found = {}
    for _ in range(8):
        sid, replica = new_session(cluster)
        found.setdefault(replica, sid)
        if len(found) == 2:
            return found
    raise AssertionError(f"8 new sessions all went to {set(found)}: they are not spread over the replicas")


def replicas(cluster) -> dict:
    deadline = time.monotonic() + 30
    while True:
        health = cluster.http("GET", "/health").json()
        if len(health["replicas"]) == 2 or time.monotonic() > deadline:
            return health["replicas"]
        time.sleep(1)


def test_sessions_spread_over_the_replicas_and_stay_isolated(cluster):
    (ra, a), (rb, b) = one_session_per_replica(cluster).items()
    assert set(replicas(cluster)) == {ra, rb}
    status, body, replica = chat(cluster, a, [{"role": "user", "content": "My cat is called Lemon."}])
    assert (status, replica) == (200, ra), body
    status, body, replica = chat(cluster, b, [{"role": "user", "content": "My dog is called Pepper."}])
    assert (status, replica) == (200, rb), body
    seen_a = cluster.http("GET", f"/v1/sessions/{a}").json()
    seen_b = cluster.http("GET", f"/v1/sessions/{b}").json()
    assert "Lemon" in str(seen_a["messages"]) and "Pepper" not in str(seen_a["messages"])
    assert "Pepper" in str(seen_b["messages"]) and "Lemon" not in str(seen_b["messages"])


def test_a_sessions_turns_stay_on_its_replica(cluster):
    sid, home = new_session(cluster)
    messages = []
    for text in ("Hello.", "Tell me a colour.", "And a number."):
        messages.append({"role": "user", "content": text})
        status, body, replica = chat(cluster, sid, messages)
        assert (status, replica) == (200, home), body
        assert body["session"]["status"] in ("new", "continued")
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    assert body["session"]["status"] == "continued"


def test_metrics_show_every_replica(cluster):
    expected, deadline = set(replicas(cluster)), time.monotonic() + 30
    while True:  # each replica reports every second; on a loaded machine one may be a few seconds late
        text = cluster.http("GET", "/metrics").text
        labelled = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("streamingllm_sessions_known{")}
        if labelled == expected or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert labelled == expected
    assert "streamingllm_kv_cache_bytes{" in text and "streamingllm_requests_waiting{" in text


def test_chat_with_server_continues_a_session_on_the_cluster(cluster):
    import subprocess
    import sys

    def chat_cli(*flags: str, text: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "streamingllm.cli", "chat", "--server", cluster.url, "--api-key",
                               API_KEY, "--max-new-tokens", "12", *flags], input=text, capture_output=True, text=True,
                              timeout=300)

    first = chat_cli(text="What is the capital of France?\n")
    assert first.returncode == 0 and "Paris" in first.stdout, first.stderr
    sid = first.stderr.split("--session ")[-1].split("]")[0].strip()
    again = chat_cli("--session", sid, text="And of Italy?\n")
    assert again.returncode == 0 and f"continuing session {sid} (1 turn so far)" in again.stderr, again.stderr
    assert cluster.http("GET", f"/v1/sessions/{sid}").json()["turns"] == 2


def test_overload_past_every_replicas_bound_is_503_with_retry_after(cluster):
    """--max-batch 4 --max-queue 2: each replica is sent at most 6 requests, the router queues 2
    more; beyond that a request is refused at once, and the others are served."""
    assert_overload_refused(cluster, requests=20, served_at_least=12, tokens=30)


def test_redis_stopped_then_restarted(cluster, redis_server):
    sid, _ = new_session(cluster)
    messages = [{"role": "user", "content": "Remember the word tangerine."}]
    status, body, _ = chat(cluster, sid, messages)
    assert status == 200, body
    messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    redis_server.stop()
    try:
        status, body, _ = chat(cluster, sid, [*messages, {"role": "user", "content": "Which word?"}])
        assert status == 503 and "store" in body["error"]["message"], body
        r = cluster.http("POST", "/v1/completions", json={"model": MODEL, "prompt": "One, two,", "max_tokens": 3})
        assert r.status_code == 200, r.text  # what needs no session store is still served
    finally:
        redis_server.restart()
    status, body, _ = chat_until_served(cluster, sid, [*messages, {"role": "user", "content": "Which word?"}])
    assert status == 200, body
    assert body["session"]["status"] in ("continued", "restored"), body["session"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the first turn was kept


def test_a_killed_replica_loses_no_acknowledged_turn_and_its_sessions_continue_exactly(cluster):
    """Session ``moved`` lives on one replica, ``stay`` on the other; both have had the same two
    turns. ``moved``'s replica is killed (SIGKILL) during its third turn, streamed: the client gets
    an error, not a reply that looks whole. Retried, the third turn is served by the other replica
    (or the killed one's restart), from Redis, with the log-probabilities of ``stay``'s third turn."""
    import os
    import signal

    (home, moved), (_, stay) = one_session_per_replica(cluster).items()
    messages = []
    for text in ("Name three rivers.", "Which is the longest?"):
        messages.append({"role": "user", "content": text})
        replies = []
        for sid in (moved, stay):
            status, body, _ = chat(cluster, sid, messages)
            assert status == 200, body
            replies.append(body["choices"][0]["message"]["content"])
        assert replies[0] == replies[1]  # greedy, same model: the same conversation
        messages.append({"role": "assistant", "content": replies[0]})
    third = [*messages, {"role": "user", "content": "Write a long poem about it."}]
    turns_before = cluster.http("GET", f"/v1/sessions/{moved}").json()["turns"]

    client = cluster.client()
    stream = client.chat.completions.create(model=MODEL, messages=third, max_tokens=200, stream=True,
                                            extra_body={"session_id": moved, "min_tokens": 150})
    pid = replicas(cluster)[home]["pid"]
    got, failed = [], None
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
                if len(got) == 3:
                    os.kill(pid, signal.SIGKILL)
            if chunk.choices and chunk.choices[0].finish_reason is not None:
                failed = False
    except openai.APIError as err:
        failed = err
    assert failed, "the stream ended as if whole although its replica died"

    options = {"logprobs": True, "top_logprobs": 5}
    status, ref, _ = chat(cluster, stay, third, **options)
    assert status == 200, ref
    status, body, replica = chat_until_served(cluster, moved, third, **options)
    assert status == 200, body
    assert body["session"]["status"] == "restored", body["session"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == ref["usage"]["prompt_tokens_details"][
        "cached_tokens"]  # both continued from their second turn: no acknowledged turn lost, none doubled
    assert cluster.http("GET", f"/v1/sessions/{moved}").json()["turns"] == turns_before + 1
    mine, theirs = body["choices"][0]["logprobs"]["content"], ref["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in mine] == [t["token"] for t in theirs]
    for a, b in zip(mine, theirs):
        assert abs(a["logprob"] - b["logprob"]) <= 1e-5
        assert [t["token"] for t in a["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]
        for x, y in zip(a["top_logprobs"], b["top_logprobs"]):
            assert abs(x["logprob"] - y["logprob"]) <= 1e-5
    text = cluster.http("GET", "/metrics").text
    assert 'streamingllm_ingress_failures_total{reason="replica_gone"} 0' not in text
