"""``streamingllm serve --replicas N``: engine replicas on Ray Serve behind one OpenAI endpoint.

The application has three parts, all Ray:

* :class:`EngineReplica` (a deployment, ``N`` replicas): each loads the model and runs the
  single-process server's whole application (:func:`~.server.build_app`: engine, session table,
  session store, routes) in-process. The ingress hands it each HTTP request as an ASGI call
  (:func:`call_asgi`), and streams the response back. Every response names the replica
  (``X-Streamingllm-Replica``).
* :class:`Ingress` (a deployment with FastAPI, one replica, no model): the outermost checks
  (:class:`~.guard.Guard`: Host, API key, body size), then it finds the request's session
  (``session_id`` in the body, ``X-Session-Id``, or ``/v1/sessions/{id}``; a new session's id is
  chosen here) and calls a replica with the session's :func:`~.routing.routing_key` as the
  multiplexed model id: :class:`~.routing.SessionAffinityRouter` sends it to the replica that
  holds the session. A replica that dies under a request is answered ``503`` with ``Retry-After``
  (in a stream already begun: an error event), never a reply cut short that looks whole.
* :class:`ReplicaBoard` (a Ray actor): each replica posts its numbers and metrics there every
  second; the ingress's ``/metrics`` shows every live replica's, labelled ``replica``, and its
  ``/health`` lists them.

The sessions live in the session store every replica shares (``--session-store redis://...``):
each turn is committed there before it is acknowledged, under the session's lease
(:mod:`.backends`), so when a replica dies, another one takes its sessions over once their leases
expire and continues them exactly. Without a shared store, a session lives in its replica's
memory only (as without ``--state-dir`` in one process).
"""

# no "from __future__ import annotations": FastAPI reads the ingress routes' annotations as Ray Serve rewrites them
import asyncio
import json
import logging
import os
import re
import secrets
import threading
import time
from argparse import Namespace
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

from .guard import SECURITY_HEADERS, Guard
from .routing import routing_key
from .server import ServerSettings

log = logging.getLogger(__name__)

BOARD_NAME = "streamingllm-board"
NAMESPACE = "streamingllm"
REPORT_EVERY_S = 1.0  # how often a replica posts its numbers to the board
REPORT_MAX_AGE_S = 15.0  # a replica silent for longer is not shown (dead; or starved of CPU that long)
INGRESS_MAX_ONGOING = 10_000  # requests the ingress holds at once (each an open connection, no model)
REPLICA_HEADER = "x-streamingllm-replica"
SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)$")
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # a local cluster's object store: requests and replies only, no tensors
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}
INGRESS_ADDS = {name.decode() for name, _ in SECURITY_HEADERS}  # the ingress's guard adds these itself


@ray.remote(num_cpus=0)
class ReplicaBoard:
    """What each replica last reported: ``{replica: report}`` (a report: ``pid``, ``health``,
    ``metrics`` (Prometheus text), ``at`` (Unix seconds))."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def put(self, replica: str, report: dict) -> None:
        self.reports[replica] = {**report, "at": time.time()}

    def live(self, max_age_s: float) -> dict[str, dict]:
        """The reports younger than ``max_age_s`` (a dead replica's stop being shown)."""
        now = time.time()
        return {r: v for r, v in self.reports.items() if now - v["at"] <= max_age_s}


def board():
    """The cluster's :class:`ReplicaBoard`, made by whichever part of the application starts first
    (detached: it does not die with the process that made it; ``streamingllm serve`` kills it)."""
    return ReplicaBoard.options(name=BOARD_NAME, namespace=NAMESPACE, get_if_exists=True,
                                lifetime="detached").remote()


async def call_asgi(app, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                    state: dict | None = None) -> AsyncIterator[dict]:
    """Run one HTTP request through the ASGI application ``app`` in this process, yielding the
    messages it sends (``http.response.start``, then ``http.response.body`` ones). When the caller
    stops iterating (its client went away), the application sees ``http.disconnect``.

    Args:
        headers: ``(name, value)`` pairs as received.
        state: the request's ``request.state`` (set by this server only, never by a client).
    """
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": dict(state or {})}
    sent: asyncio.Queue[dict] = asyncio.Queue()
    gone = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(app(scope, receive, sent.put))
    try:
        while True:
            getter = asyncio.create_task(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():  # the application returned without sending more
                getter.cancel()
                task.result()
                return
            message = getter.result()
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                return
    finally:
        gone.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=30)
        except Exception:  # noqa: BLE001 (already answered, or the caller is gone: nothing to tell)
            pass


class EngineReplica:
    """One engine replica: the model, its engine and session table, the whole single-process
    application (as a Ray Serve deployment: see :func:`deployments`).

    Args:
        cli_args: ``streamingllm serve``'s parsed options (loading the model from them).
        settings: the server's settings; each replica gets its own lease owner id.
        threads: torch threads for this replica (its CPUs).
    """

    def __init__(self, cli_args: dict, settings: ServerSettings, threads: int):
        import torch

        from ..cli.options import load_model
        from .server import build_app

        torch.set_num_threads(max(1, threads))
        context = serve.get_replica_context()
        self.replica = f"{context.replica_id.unique_id}"
        args = Namespace(**cli_args)
        model, tokenizer = load_model(args, chat=True)
        name = args.served_model_name or args.model
        owner = f"{self.replica}@{os.uname().nodename}:{os.getpid()}"
        self.app, self.engine = build_app(model, tokenizer, name, replace(settings, api_key=None, allowed_hosts=None,
                                                                            owner=owner))
        self._stop = threading.Event()
        self.board = board()
        threading.Thread(target=self._report_loop, name="streamingllm-report", daemon=True).start()

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                self.board.put.remote(self.replica, self.report())
            except Exception as err:  # noqa: BLE001 (the board is gone: the server is stopping)
                log.debug(f"replica {self.replica}: cannot report: {err}")

    def report(self) -> dict:
        """This replica's numbers for the ingress's ``/health`` and ``/metrics``."""
        app = self.app
        health = {"pid": os.getpid(), **app.state.store.counts(), **self.engine.load}
        return {"pid": os.getpid(), "health": health, "metrics": app.state.metrics.render().decode()}

    async def hold(self, key: str) -> str:
        """Registered with Ray Serve's multiplexing (in :func:`deployments`): this replica holds the
        session of routing ``key``, so the routers send its requests here."""
        return key

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                      session_id: str | None) -> AsyncIterator[tuple]:
        """Serve one HTTP request: yields ``("start", status, headers)``, then ``("body", bytes)``
        parts. ``session_id``: the session the ingress routed it by (a new one's, for
        ``POST /v1/sessions``)."""
        state = {"assigned_session_id": session_id} if method == "POST" and path == "/v1/sessions" else {}
        async for message in call_asgi(self.app, method, path, query, headers, body, state):
            if message["type"] == "http.response.start":
                status = message["status"]
                if session_id is not None and status < 400:
                    await self.hold(routing_key(session_id))
                out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                yield ("start", status, [*out, (REPLICA_HEADER, self.replica)])
            elif message["type"] == "http.response.body" and message.get("body"):
                yield ("body", message["body"])

    def __del__(self):
        self._stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def request_session(method: str, path: str, headers, body: bytes) -> tuple[str | None, bool]:
    """``(session id, new)``: the session a request is for (``None``: none), and whether it is a
    new one (``POST /v1/sessions``: its id is chosen here, as the session table would)."""
    if method == "POST" and path == "/v1/sessions":
        return f"sess-{secrets.token_urlsafe(18)}", True
    match = SESSION_PATH.match(path)
    if match:
        return match.group(1), False
    sid = headers.get("x-session-id")
    if method == "POST" and path in ("/v1/chat/completions", "/v1/completions") and body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("session_id"), str):
            sid = data["session_id"]
    return sid, False


REPLICA_GONE = ("the replica serving this request stopped before it finished; the turn was not "
                "acknowledged; retry it")


def ingress_app(settings: ServerSettings) -> FastAPI:
    """The ingress's FastAPI application (its routes are methods of :class:`Ingress`)."""
    from .app import error_response

    app = FastAPI(title="streamingllm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.refused = refused = Counter()  # status -> requests the guard refused

    def on_error(status: int) -> None:
        refused[status] += 1

    app.add_middleware(Guard, error_response=error_response, on_error=on_error,
                       max_body_bytes=int(settings.max_body_mib * 2**20), api_key=settings.api_key,
                       allowed_hosts=settings.allowed_hosts)
    return app


def deployments(cli_args: dict, settings: ServerSettings, replicas: int, replica_cpus: float,
                retry_after: int = 2):
    """The Ray Serve application: ``Ingress.bind(EngineReplica.bind(...))``.

    Args:
        cli_args: ``streamingllm serve``'s options, for the replicas to load the model.
        settings: the server's settings (checked).
        replicas: engine replicas (>= 1).
        replica_cpus: CPUs Ray reserves for each replica (its torch threads too).
        retry_after: seconds a client is told to wait before retrying (503).
    """
    app = ingress_app(settings)
    engine_cls = serve.multiplexed(max_num_models_per_replica=settings.max_sessions_known)(EngineReplica.hold)
    replica_cls = type("EngineReplica", (EngineReplica,), {"hold": engine_cls})
    engine = serve.deployment(
        replica_cls, name="EngineReplica", num_replicas=replicas,
        # a replica is sent what its engine admits (running + queued); the router queues at most
        # max_queue more per caller, and answers beyond that BackPressureError (503 + Retry-After)
        max_ongoing_requests=settings.max_batch + settings.max_queue, max_queued_requests=max(1, settings.max_queue),
        ray_actor_options={"num_cpus": replica_cpus,
                           "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(replica_cpus)))}}},
        request_router_config=RequestRouterConfig(
            request_router_class="streamingllm.serve.routing.SessionAffinityRouter"),
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    # The ingress only waits on replicas: it takes every request at once (Ray Serve's default of 5 at a
    # time would queue the rest in the proxy, unbounded and unseen by the replicas' admission).
    ingress = serve.deployment(ingress_class(app, retry_after), name="Ingress", num_replicas=1,
                               max_ongoing_requests=INGRESS_MAX_ONGOING,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(cli_args, settings, max(1, int(replica_cpus))))


def ingress_class(app: FastAPI, retry_after: int):
    """:class:`Ingress` with its routes on ``app`` (Ray Serve's FastAPI integration takes routes
    declared in the class body)."""

    @serve.ingress(app)
    class Ingress:
        """The one HTTP entry: checks, finds the session, calls its replica, streams the answer back.

        Args:
            engine: the handle of the :class:`EngineReplica` deployment.
        """

        def __init__(self, engine):
            self.engine = engine
            self.board = board()
            self.failures = {"replica_gone": 0, "overloaded": 0}  # 503s the ingress answered itself

        @app.get("/health")
        async def health(self) -> Response:
            """A replica's ``/health`` (the model, cache sizes, defaults), with every live replica's
            numbers under ``replicas`` and the whole cluster's ``running`` and ``waiting``."""
            answer = await self.proxy_call("GET", "/health", "", [], b"", None)
            if answer.status_code != 200:
                return answer
            reports = {r: v["health"] for r, v in (await self._reports()).items()}
            body = {**json.loads(answer.body), "replicas": reports,
                    **{k: sum(v[k] for v in reports.values()) for k in ("running", "waiting")}}
            return JSONResponse(body, headers={REPLICA_HEADER: answer.headers.get(REPLICA_HEADER, "")})

        @app.get("/metrics", include_in_schema=False)
        async def metrics(self) -> Response:
            from .metrics import label_samples

            text = label_samples({r: v["metrics"] for r, v in (await self._reports()).items()}, "replica")
            text += ("# HELP streamingllm_ingress_failures_total Requests the ingress answered 503 itself\n"
                     "# TYPE streamingllm_ingress_failures_total counter\n")
            text += "".join(f'streamingllm_ingress_failures_total{{reason="{k}"}} {v}\n'
                            for k, v in self.failures.items())
            text += ("# HELP streamingllm_ingress_refused_total Requests the ingress's checks refused, by status\n"
                     "# TYPE streamingllm_ingress_refused_total counter\n")
            text += "".join(f'streamingllm_ingress_refused_total{{status="{k}"}} {v}\n'
                            for k, v in sorted(app.state.refused.items()))
            return Response(text, media_type="text/plain; version=0.0.4")

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"], include_in_schema=False)
        async def proxy(self, request: Request, path: str) -> Response:
            body = await request.body()
            method, path = request.method, request.url.path
            sid, _ = request_session(method, path, request.headers, body)
            headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
            return await self.proxy_call(method, path, request.url.query, headers, body, sid)

        async def proxy_call(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes,
                             sid: str | None) -> Response:
            """Call the replica holding session ``sid`` (any, for None) with one HTTP request."""
            from ray.exceptions import RayActorError
            from ray.serve.exceptions import BackPressureError

            handle = self.engine.options(stream=True, multiplexed_model_id=routing_key(sid) if sid else "")
            parts = handle.forward.remote(method, path, query, headers, body, sid)
            try:
                _, status, out = await parts.__anext__()
            except BackPressureError:
                return self._unavailable("overloaded", "every replica is at capacity; retry later")
            except (RayActorError, StopAsyncIteration) as err:
                log.warning(f"ingress: a replica failed under a request: {type(err).__name__}")
                return self._unavailable("replica_gone", REPLICA_GONE)
            out = {k: v for k, v in out if k.lower() not in HOP_HEADERS | INGRESS_ADDS}
            if out.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(self._stream(parts), status_code=status, headers=out)
            chunks = []
            try:
                async for _, data in parts:
                    chunks.append(data)
            except RayActorError:
                return self._unavailable("replica_gone", REPLICA_GONE)
            return Response(b"".join(chunks), status_code=status, headers=out)

        async def _reports(self) -> dict[str, dict]:
            return await self.board.live.remote(REPORT_MAX_AGE_S)

        def _unavailable(self, reason: str, message: str) -> JSONResponse:
            from .app import error_response

            self.failures[reason] += 1
            return error_response(503, message, "overloaded_error", headers={"Retry-After": str(retry_after)})

        async def _stream(self, parts) -> AsyncIterator[bytes]:
            """A streamed answer's parts; if its replica dies part-way, an error event ends it."""
            from ray.exceptions import RayActorError

            from .protocol import error_body

            try:
                async for _, data in parts:
                    yield data
            except RayActorError:
                self.failures["replica_gone"] += 1
                yield f"data: {json.dumps(error_body(REPLICA_GONE, 'overloaded_error', 503))}\n\n".encode()
                yield b"data: [DONE]\n\n"

    return Ingress


def run(cli_args: dict, settings: ServerSettings, *, host: str, port: int, replicas: int, replica_cpus: float,
        ray_address: str | None) -> int:
    """Start (or join, with ``ray_address``) a Ray cluster, deploy the application on it, and serve
    until interrupted (SIGINT or SIGTERM); then take the application down."""
    import signal

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports to the internet
    local = {} if ray_address else {"object_store_memory": LOCAL_OBJECT_STORE_BYTES}
    ray.init(address=ray_address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, **local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployments(cli_args, settings, replicas, replica_cpus), name="streamingllm", route_prefix="/",
                  blocking=False)
        print(f"streamingllm serve: {replicas} replicas on Ray, http://{host}:{port}/", flush=True)
        stop.wait()
    finally:
        try:
            serve.delete("streamingllm")
            ray.kill(board())
            if ray_address is None:  # our own cluster: Serve goes with it
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def application(args: dict):
    """A Ray Serve application builder, for ``serve run`` and KubeRay's RayService:
    ``serve run streamingllm.serve.replicas:application replicas=2 session_store=redis://redis:6379/0``.

    Args:
        args: ``streamingllm serve``'s options by their long names (``window_size=1020``;
            ``True`` for a flag); ``replicas`` defaults to 1. HTTP's host and port are Serve's
            (its config's ``http_options``), not these.
    """
    from ..cli import build_parser
    from ..cli.serve import check_replicas, settings_from_args

    argv = ["serve"]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    options = build_parser().parse_args(argv)
    options.replicas = options.replicas or 1
    settings = settings_from_args(options)
    check_replicas(options, settings)
    return deployments({k: v for k, v in vars(options).items() if k != "run"}, settings, options.replicas,
                       options.replica_cpus)
