"""Speed and memory benchmarks: the paper's Figure 10, and endless streams.

:func:`bench_decode` (:mod:`.decode`, over the arms of :mod:`.arms`) times single-token decode
steps against cache size; :func:`bench_stream` (:mod:`.stream`) streams many tokens through the
streaming cache and dense attention. :mod:`.stats` summarises latencies, :mod:`.report` draws and
tabulates, :mod:`.cli` is ``streamingllm bench``. Latencies are wall-clock (``time.perf_counter``,
the device synchronised around each timed step), reported in milliseconds per token.
"""

from .decode import DECODE_COLUMNS, METHODS, RECOMPUTE_LOGITS, bench_decode, check_decode_args
from .report import decode_table, machine_info, plot_decode, plot_stream, stream_summary, stream_table
from .stats import add_ratios, latency_stats, speedups
from .stream import MODES, STREAM_COLUMNS, STREAM_METHODS, Snapshot, StreamResult, bench_stream, check_stream_args

__all__ = [
    "bench_decode", "check_decode_args", "METHODS", "RECOMPUTE_LOGITS", "DECODE_COLUMNS",
    "bench_stream", "check_stream_args", "StreamResult", "Snapshot", "STREAM_METHODS", "MODES", "STREAM_COLUMNS",
    "latency_stats", "speedups", "add_ratios",
    "plot_decode", "plot_stream", "decode_table", "stream_table", "stream_summary", "machine_info",
]
