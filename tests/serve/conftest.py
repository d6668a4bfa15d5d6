"""The server the tests in this folder share (see tests/serving.py)."""

from __future__ import annotations

import pytest

from serving import running_server


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    """The default model on a 4 + 124 token cache per session; small limits so errors are reachable."""
    pytest.importorskip("openai")
    yield from running_server(tmp_path_factory.mktemp("state"), "--window-size", "124", "--max-prompt-tokens", "3000",
                              "--max-body-mib", "1", "--max-batch", "4", "--max-queue", "2", "--max-tokens", "64")
