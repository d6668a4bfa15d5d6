"""Fixtures of the benchmark tests: a tiny model, one thread."""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")
