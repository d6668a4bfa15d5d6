"""The core needs torch and transformers only: it imports and streams while the evaluation and
plotting dependencies cannot be imported, and those say which extra brings them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "rdata", "datasets", "fastapi", "uvicorn", "prometheus_client"):
            raise ImportError(f"{name} is blocked by the test")
sys.meta_path.insert(0, Blocker())
"""

CORE = BLOCK + """
import torch
import streamingllm
from streamingllm import SinkCache, generate_tokens, Sampling
from streamingllm.session import Session
from tiny import tiny_model
model = tiny_model("llama")
cache = SinkCache(model, 4, 16)
tokens = list(generate_tokens(model, cache, torch.arange(30), 50, Sampling(temperature=0.8, seed=0)))
assert len(tokens) == 50 and cache.cached_tokens == 20 and cache.seen_tokens == 79, cache.seen_tokens
from streamingllm.cli import build_parser
build_parser()  # the command line is importable too: extras are imported only when used
print("ok")
"""

UNBLOCKED = """
import sys
import streamingllm, streamingllm.session, streamingllm.feed, streamingllm.models
from streamingllm.cli import build_parser
build_parser()
print(sorted({m.split(".")[0] for m in sys.modules} & {"matplotlib", "rdata", "datasets", "fastapi", "uvicorn",
                                                      "prometheus_client", "openai"}))
"""

EXTRA = BLOCK + """
from streamingllm.extras import MissingExtraError
from streamingllm.report import pyplot
from streamingllm.serve.server import ServerSettings, build_app
try:
    pyplot()
except MissingExtraError as err:
    print(err)
try:
    build_app(None, None, "m", ServerSettings())
except MissingExtraError as err:
    print(err)
"""


NO_RESOURCE = """
import sys
try:
    import psutil  # transformers imports it, and on Linux (not on Windows) psutil needs resource
except ImportError:
    pass
sys.modules["resource"] = None  # as on Windows: importing it fails
import streamingllm
from streamingllm import memory
from streamingllm.cli import build_parser
build_parser()
here = memory.rss_bytes()  # Linux's /proc still answers without the resource module
memory.STATM = "/nonexistent/statm"  # and now nothing does
memory.PeakMemory._clear_refs = staticmethod(lambda: False)
peak = memory.PeakMemory("cpu")
print(here > 0, memory.rss_bytes(), peak.source, peak.current(), peak.peak())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    tests = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tests), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_core_streams_without_plotting_or_corpus_packages():
    run = _run(CORE)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_nothing_imports_the_extras_until_they_are_used():
    """With every package installed, importing the library and building the command line loads none
    of the optional packages (so they can be missing)."""
    run = _run(UNBLOCKED)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stdout + run.stderr[-3000:]


def test_a_missing_extra_is_named():
    run = _run(EXTRA)
    assert "pip install 'streamingllm[plots]'" in run.stdout, run.stderr[-3000:]
    assert "pip install 'streamingllm[serve]'" in run.stdout, run.stderr[-3000:]


def test_the_package_imports_where_the_resource_module_is_missing():
    """``resource`` is POSIX-only: without it the package and the command line import, and resident
    memory is read from /proc, or is None where nothing can read it (PeakMemory then says "none")."""
    run = _run(NO_RESOURCE)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["True", "None", "none", "0", "0"]


def test_resident_memory_falls_back_to_the_peak_without_proc(monkeypatch):
    import resource

    from streamingllm import memory

    now = memory.rss_bytes()
    assert now == int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    monkeypatch.setattr(memory, "STATM", "/nonexistent/statm")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert memory.rss_bytes() >= peak >= now // 2 and memory.PeakMemory("cpu").source in ("rss", "rss_hwm")
