"""Prometheus metrics of the server (``GET /metrics``), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Counters, gauges and latency histograms; the gauges are read from ``state()`` at scrape time.

    Args:
        state: ``state() -> dict`` with ``known``, ``resident``, ``kv_bytes`` (bytes),
            ``cache_fill``, ``expired``, ``quarantined``, ``store_bytes_written`` (bytes),
            ``running``, ``waiting`` (the session store's and the engine's counts).
    """

    def __init__(self, state):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        self.prompt_tokens = Counter("streamingllm_prompt_tokens", "Prompt tokens fed (not counting cached ones)",
                                     registry=r)
        self.cached_tokens = Counter("streamingllm_cached_prompt_tokens",
                                     "Prompt tokens of conversations not fed again (held by a session)", registry=r)
        self.generated_tokens = Counter("streamingllm_generated_tokens", "Tokens generated", registry=r)
        self.requests = Counter("streamingllm_requests", "Requests finished, by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("streamingllm_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("streamingllm_inter_token_latency_seconds", "Between a reply's tokens",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("streamingllm_request_duration_seconds", "Whole requests", buckets=LATENCY_BUCKETS,
                                  registry=r)
        self._state = state
        gauges = {"sessions_known": ("known", "Sessions the server knows (in memory or saved)"),
                  "sessions_resident": ("resident", "Sessions whose cache is in memory"),
                  "kv_cache_bytes": ("kv_bytes", "Bytes of cache held by resident sessions"),
                  "cache_fill_ratio": ("cache_fill", "Cached tokens / cache capacity over resident sessions"),
                  "requests_running": ("running", "Requests being served"),
                  "requests_waiting": ("waiting", "Requests queued")}
        for name, (key, doc) in gauges.items():
            Gauge(f"streamingllm_{name}", doc, registry=r).set_function(lambda key=key: self._state()[key])
        r.register(_StoreCounters(state))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.token_latency.observe(seconds)

    def finished(self, fed: int, cached: int, generated: int, outcome: str, seconds: float) -> None:
        self.prompt_tokens.inc(fed)
        self.cached_tokens.inc(cached)
        self.generated_tokens.inc(generated)
        self.requests.labels(outcome).inc()
        self.duration.observe(seconds)

    def error(self, status: int) -> None:
        self.requests.labels(f"error_{status}").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCounters:
    """The session store's running totals, read at scrape time (Prometheus counters)."""

    def __init__(self, state):
        self._state = state

    def collect(self):
        s = self._state()
        yield CounterMetricFamily("streamingllm_sessions_expired", "Sessions expired (idle beyond --session-ttl)",
                                  value=s["expired"])
        yield CounterMetricFamily("streamingllm_state_files_quarantined",
                                  "State-dir files that could not be read, renamed *.corrupt", value=s["quarantined"])
        yield CounterMetricFamily("streamingllm_store_bytes_written",
                                  "Bytes this process wrote to the session store (turn commits)",
                                  value=s["store_bytes_written"])


def label_samples(texts: dict[str, str], label: str) -> str:
    """Prometheus text expositions of several processes as one: every sample of ``texts[value]``
    gets ``label="value"``; each metric's ``# HELP``/``# TYPE`` lines are kept once, and its samples
    stay together (as the format requires)."""
    families: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for value, text in texts.items():
        name = None
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    name = parts[2]
                    headers.setdefault(name, [])
                    if len(headers[name]) < 2 and line not in headers[name]:
                        headers[name].append(line)
                    families.setdefault(name, [])
                continue
            if not line.strip() or name is None:
                continue
            metric, _, rest = line.partition(" ")
            labelled = (metric[:-1] + f',{label}="{value}"}}' if metric.endswith("}")
                        else f'{metric}{{{label}="{value}"}}')
            families[name].append(f"{labelled} {rest}")
    return "".join("\n".join([*headers[n], *families[n]]) + "\n" for n in families)
