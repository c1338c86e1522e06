"""What a rank holds resident, by part: weights, KV cache, step buffers, the shared libraries'
code, and the rest of the process (Python and torch's runtime, the tokenizer, activations and
the allocator's free pages), from /proc and glibc's allocator statistics."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of storage that `tensors` span, each byte once: a tied weight counts once, and
    weights sharing one storage (engine/host_arena.py's arena) count their own bytes, not the
    whole storage each."""
    spans: dict[tuple[str, int], list[tuple[int, int]]] = {}
    opaque: dict[int, int] = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except NotImplementedError:  # oneDNN's packed weight hides its storage: its logical size
            opaque[id(t)] = t.numel() * t.element_size()
            continue
        size = t.element_size()
        start = t.storage_offset() * size
        extent = (1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))) * size if t.numel() else 0
        spans.setdefault((str(t.device), storage.data_ptr()), []).append((start, start + extent))
    total = sum(opaque.values())
    for ranges in spans.values():
        covered = 0  # the union of the ranges, in order
        for low, high in sorted(ranges):
            if high > covered:
                total += high - max(low, covered)
                covered = high
    return total


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer that is a weight (the rotary tables are not)."""
    return [t for name, t in [*model.named_parameters(), *model.named_buffers()] if not name.startswith("rotary.")]


def process_memory() -> dict[str, int]:
    """This process's resident memory from /proc, bytes: now (VmRSS; RssAnon its private
    memory, RssFile mapped files: the libraries' code), and the peak so far (VmHWM). Empty
    where /proc is missing."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in _STATUS_FIELDS:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def resident_set_bytes() -> int:
    """VmRSS of this process (0 where /proc is missing)."""
    return process_memory().get("VmRSS", 0)


@functools.cache
def _glibc():
    """glibc, for malloc_trim; None under another C library (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> int:
    """Give the allocator's free pages back to the system; returns the bytes RSS fell by.

    glibc serves allocations below its mmap threshold (which rises to 32 MiB once a large block
    is freed) from its heap and keeps freed pages there: a load that quantizes each weight
    through float temporaries leaves ~100 MB of them behind (a 3B model in int4). malloc_trim(0)
    returns every free page, not only the heap's top."""
    libc = _glibc()
    if libc is None:
        return 0
    before = resident_set_bytes()
    libc.malloc_trim(0)
    return max(0, before - resident_set_bytes())


class HeapTrimmer:
    """Calls release_free_heap when the process has grown `slack` bytes past its RSS after the
    last call: a prefill's activations (tens of MB) stay in glibc's heap after it, and decoding
    never reuses them. Each call costs about 1 ms per MiB given back, so it runs once the heap
    has really grown, not after every prefill (that cost 5% of a 64-prompt prefill of the
    default model, for 41 MiB)."""

    def __init__(self, slack: int = 64 << 20):
        self.slack = slack
        self.released = self.trim()

    def trim(self) -> int:
        released = release_free_heap()
        self.baseline = resident_set_bytes()
        return released

    def maybe_trim(self) -> int:
        return self.trim() if resident_set_bytes() > self.baseline + self.slack else 0


def resident_report(model: nn.Module, kv_caches: Iterable[torch.Tensor], step_buffers: int) -> dict[str, int]:
    """Bytes by part, after load: weights, KV cache and step buffers (their storages), libraries
    (mapped files' resident pages: torch's, Python's code), other (the rest of RSS: Python
    objects, the tokenizer, torch's runtime, allocator slack), and rss / peak_rss (VmHWM) of the
    process."""
    proc = process_memory()
    weights, kv_caches = weight_tensors(model), list(kv_caches)
    report = {
        "weights": storage_bytes(weights),
        "kv_cache": storage_bytes(kv_caches),
        "step_buffers": step_buffers,
        "libraries": proc.get("RssFile", 0),
        "rss": proc.get("VmRSS", 0),
        "peak_rss": proc.get("VmHWM", 0),
    }
    in_host_memory = storage_bytes(t for t in [*weights, *kv_caches] if t.device.type == "cpu")
    known = in_host_memory + step_buffers + report["libraries"]
    report["other"] = max(0, report["rss"] - known)
    mib = {k: v / 2**20 for k, v in report.items()}
    logger.info("resident: weights %.1f MiB, KV cache %.1f MiB, step buffers %.2f MiB, libraries %.1f MiB, "
                "other %.1f MiB; process RSS %.1f MiB (peak %.1f MiB)", mib["weights"], mib["kv_cache"],
                mib["step_buffers"], mib["libraries"], mib["other"], mib["rss"], mib["peak_rss"])
    return report
