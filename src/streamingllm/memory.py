"""Memory probes, in bytes: resident memory, CUDA memory, peaks, and what a cache holds.

* :func:`rss_bytes` -- resident memory of this process now (Linux ``/proc``; peak RSS elsewhere;
  None where neither can be read).
* :func:`available_bytes` -- memory a new allocation can still get on a device.
* :class:`PeakMemory` -- current and peak memory of one device, with a resettable peak.
* :func:`storage_layout` / :func:`storage_bytes` -- the distinct storages behind a cache.
* :func:`release_freed_memory` -- collect garbage and give freed memory back, so RSS shows live data.
"""

from __future__ import annotations

import ctypes
import gc
import mmap

import torch

MIB = 2**20
STATM = "/proc/self/statm"  # Linux: sizes in pages, the second one resident


def rss_bytes() -> int | None:
    """Resident memory of this process now, in bytes: Linux's /proc/self/statm; elsewhere the peak
    resident memory (``getrusage``, where the ``resource`` module exists); None where neither can be
    read (Windows)."""
    try:
        with open(STATM) as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # POSIX only: importing it at the top would make the package Unix-only
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux (bytes on macOS)


def _proc_kib(path: str, field: str) -> int | None:
    """``field`` of a ``/proc`` status-style file, in bytes (its value is in KiB), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device) -> int | None:
    """Bytes a new allocation can still get on ``device``: free CUDA memory plus what PyTorch's
    allocator holds unused, or the system's MemAvailable on CPU; None where that cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        return _proc_kib("/proc/meminfo", "MemAvailable")
    return None


def cuda_allocated_bytes(device) -> int | None:
    """CUDA memory allocated by tensors on ``device`` (bytes), or None for other devices."""
    device = torch.device(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS reflects live data."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Current and peak memory of one device, in bytes.

    On CUDA: ``torch.cuda.memory_allocated`` / ``max_memory_allocated`` (exact; the peak is reset
    with ``reset_peak_memory_stats``). On CPU: resident memory; the peak is VmHWM, reset by
    writing ``5`` to ``/proc/self/clear_refs`` (Linux). Where that is not possible the "peak" is
    the RSS when read (``source == "rss"``); where resident memory cannot be read at all
    (:func:`rss_bytes` is None), ``source == "none"`` and every reading is 0.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.source = "cuda"
        elif self._clear_refs() and self._hwm() is not None:
            self.source = "rss_hwm"
        else:
            self.source = "rss" if rss_bytes() is not None else "none"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _hwm() -> int | None:
        return _proc_kib("/proc/self/status", "VmHWM")

    def current(self) -> int:
        if self.source == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes() or 0

    def reset_peak(self) -> None:
        if self.source == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.source == "rss_hwm":
            self._clear_refs()

    def peak(self) -> int:
        if self.source == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.source == "rss_hwm":
            return max(self._hwm() or 0, rss_bytes() or 0)
        return rss_bytes() or 0


def _cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor held by a transformers cache: its ``tensors()`` where it lists them, else the
    tensor attributes of the cache and of its layers."""
    if callable(getattr(cache, "tensors", None)):
        return list(cache.tensors())
    out = []
    for obj in [cache, *getattr(cache, "layers", [])]:
        out += [v for v in vars(obj).values() if torch.is_tensor(v)]
    return out


def storage_layout(cache) -> list[tuple[int, int]]:
    """``(data_ptr, nbytes)`` of every distinct storage behind ``cache``'s tensors, sorted.

    Two layouts compare equal exactly when no storage was reallocated, grown or added.
    """
    seen = {}
    for t in _cache_tensors(cache):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sorted(seen.items())


def storage_bytes(cache) -> int:
    """Bytes of all distinct storages behind ``cache``'s tensors (views counted once)."""
    return sum(n for _, n in storage_layout(cache))
