"""Moved to :mod:`streamingllm.cache.rows`; the names stay importable from here."""

from .cache.rows import PaddedRows, RowStreams, StackedRows

__all__ = ["PaddedRows", "RowStreams", "StackedRows"]
