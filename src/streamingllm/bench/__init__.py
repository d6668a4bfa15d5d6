"""Speed and memory benchmarks: the paper's Figure 10, batched decode, and endless streams.

:func:`bench_decode` (:mod:`.decode`, over the arms of :mod:`.arms`) times single-token decode
steps against cache size; :func:`bench_batch` (:mod:`.batch`) times one decode step of B streams
at once; :func:`bench_stream` (:mod:`.stream`) streams many tokens through the streaming cache and
dense attention. :func:`interleave` (:mod:`.schedule`) is the scheduler all of them (and the
scripts in ``benchmarks/``) time their arms with: arms alternate in blocks in one process.
:mod:`.stats` summarises latencies and the ratios between arms, :mod:`.report` draws and
tabulates; ``streamingllm bench`` is :mod:`streamingllm.cli.bench`. Latencies are wall-clock
(``time.perf_counter``, the device synchronised around each timed step), reported in
milliseconds per token (per step of all the streams for :func:`bench_batch`).
"""

from .batch import BATCH_COLUMNS, bench_batch, check_batch_args
from .decode import DECODE_COLUMNS, METHODS, RECOMPUTE_LOGITS, bench_decode, check_decode_args
from .report import batch_table, decode_table, machine_info, plot_decode, plot_stream, stream_summary, stream_table
from .schedule import interleave, timed
from .stats import add_ratios, arm_stats, latency_stats, speedups
from .stream import MODES, STREAM_COLUMNS, STREAM_METHODS, Snapshot, StreamResult, bench_stream, check_stream_args

__all__ = [
    "bench_decode", "check_decode_args", "METHODS", "RECOMPUTE_LOGITS", "DECODE_COLUMNS",
    "bench_stream", "check_stream_args", "StreamResult", "Snapshot", "STREAM_METHODS", "MODES", "STREAM_COLUMNS",
    "bench_batch", "check_batch_args", "BATCH_COLUMNS",
    "interleave", "timed", "latency_stats", "arm_stats", "speedups", "add_ratios",
    "plot_decode", "plot_stream", "decode_table", "batch_table", "stream_table", "stream_summary", "machine_info",
]
