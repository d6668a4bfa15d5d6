"""The attention-sink KV cache: which tokens to keep, and at which positions.

StreamingLLM semantics (Xiao et al., 2024): after every step the cache holds the KV of the
first ``sink_size`` tokens of the stream (the attention sinks) and of the last
``window_size`` tokens. The next token attends to those and to itself, at positions
``0 .. sink_size + window_size`` *inside the cache*, whatever positions the caller used.

One module per job (details and a walk through a decode step in docs/design.md):

* :mod:`.sink_cache` -- :class:`SinkCache`, the transformers ``Cache``: builds the groups, plans
  each forward at layer 0 and dispatches the layers' updates, positions, saved state.
* :mod:`~streamingllm.timeline` (beside this package) -- **which tokens are kept, and where they
  sit**: every forward planned as counts and offsets (one ``Step`` per layout); no tensors.
* :mod:`.groups` -- **hybrid models** (Gemma 2/3, gpt-oss): each layer follows the policy of its
  attention type. Global layers keep sinks + window at in-cache positions; sliding layers keep
  exactly the model's own window, no sinks. Each policy is a :class:`LayerGroup`: its own timeline,
  sink store, buffers and rotator (its own RoPE base).
* :mod:`.layers` -- **where a token is stored and evicted**: one layer's preallocated buffer carries
  out its group's step. :class:`RopeSinkLayer` adds rotation and the ring used for single tokens.
* :mod:`.store` -- **where a key is rotated**: RoPE keys carry their position in their rotation. The
  window is contiguous in the stream, so a window key's distance to the query never changes and it
  keeps the model's rotation; only the sinks' distance changes, so only the sink keys are rotated,
  once per step, from a stored copy (:class:`SinkStore`, never rotated twice, angles in float64 from
  integer differences). When the caller rebases its positions the stored window is rotated once.
* :mod:`.prepared` -- the prepared (compilable) decode step, which can be undone.
* :mod:`.rows` -- left-padded batches and stacked streams: every row streams as it would alone.
* :mod:`.masks` -- the exact bands and the rows' masks, as pure functions.
* :mod:`.checks` -- construction checks, and the cache's errors and warnings.

**What the model is told**: ``get_seq_length()`` is the number of tokens consumed, as transformers
expects (``generate()`` slices the new tokens of a conversation with it, and models without
position ids put the next token there).
"""

from .checks import CacheTooLargeError, NativeWindowWarning, TrainedLengthWarning, check_cache_sizes
from .groups import GLOBAL, SLIDING_POLICY, LayerGroup, Policy, layer_policies
from .blocks import BlockMemory, BlockStore
from .memory_cache import MemoryCache
from .layers import AlibiSinkLayer, RopeSinkLayer, SinkLayer
from .prepared import PreparedStep
from .rows import PaddedRows, StackedRows
from .sink_cache import SinkCache
from .store import LayerBuffers, SinkKeys, SinkStore, layer_devices

__all__ = [
    "SinkCache",
    "MemoryCache",
    "BlockMemory",
    "BlockStore",
    "CacheTooLargeError",
    "TrainedLengthWarning",
    "NativeWindowWarning",
    "check_cache_sizes",
    "layer_policies",
    "Policy",
    "GLOBAL",
    "SLIDING_POLICY",
    "LayerGroup",
    "SinkLayer",
    "RopeSinkLayer",
    "AlibiSinkLayer",
    "PreparedStep",
    "PaddedRows",
    "StackedRows",
    "SinkStore",
    "SinkKeys",
    "LayerBuffers",
    "layer_devices",
]
