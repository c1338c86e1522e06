"""Host memory on 2 MiB transparent huge pages, and a model's weights moved into one such arena.

Why: a batch-1 decode step streams every weight from memory once (257 MiB in bfloat16 for the
default model), and on 4 KiB pages that stream pays a TLB miss every 64 cache lines, while the
CPU's stream prefetchers stop at each 4 KiB page's end. On the 2-vCPU EPYC Zen 4 (THP
"madvise"), a 226 MB bfloat16 matrix-vector product (a C++ microbenchmark, row by row with an L2
prefetch, median of 9 rounds) read 14.2 GB/s on 4 KiB pages against 21.7 on 2 MiB pages on one
thread, 18.9 against 26.4 on two; torch's float32 sum 19.4 -> 28.3 GB/s on one thread; the
default model's batch-1 step took 0.89-0.99x the time (bench/RESULTS.md, 2026-12-03 13:20 UTC).
glibc's malloc hands large blocks 4 KiB pages unless THP is "always" (torch's CPU allocator asks
for huge pages only under an environment variable, for every allocation of the process).

`huge_page_buffer` maps anonymous private memory aligned to 2 MiB and asks the kernel for huge
pages on it (madvise MADV_HUGEPAGE); where the kernel gives none (THP "never", another OS) it is
ordinary memory, and everything still works.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.memory import release_free_heap, weight_tensors

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each weight's storage starts on a cache line (and any element size divides it)
_TRIM_EVERY = 16 << 20


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes`, 2 MiB-aligned, on transparent huge pages where
    the kernel allows them. Its pages are faulted in on first write (copy into it, or zero_())."""
    if nbytes <= 0 or not hasattr(mmap, "MAP_PRIVATE"):  # Windows: no private anonymous mapping
        return plain_buffer(max(nbytes, 0))
    # Private and anonymous: a shared anonymous mapping is shmem, whose huge pages are a separate
    # switch (shmem_enabled, "never" on most hosts).
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
    start = -address % HUGE_PAGE
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mapping.madvise(advice, start, nbytes)
        except OSError:  # a kernel without THP: 4 KiB pages
            pass
    # The tensor keeps the mapping alive through the memoryview's export; unmapped when it dies.
    return torch.frombuffer(memoryview(mapping)[start:start + nbytes], dtype=torch.uint8)


def plain_buffer(nbytes: int) -> torch.Tensor:
    """The same from torch's allocator (4 KiB pages unless THP is "always"): benchmarks' baseline.
    Above glibc's largest mmap threshold (32 MiB) it is a fresh mapping; a smaller one can reuse
    heap memory another library (numpy) advised for huge pages."""
    return torch.zeros(nbytes, dtype=torch.uint8)


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of the mapping behind `t`'s storage that sit on huge pages (AnonHugePages of its
    /proc/self/smaps entry); 0 where /proc is missing."""
    address = t.untyped_storage().data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    low, high = (int(a, 16) for a in head.split("-"))
                    inside = low <= address < high
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def move_weights(model: nn.Module, allocate: Callable[[int], torch.Tensor] = huge_page_buffer) -> torch.Tensor | None:
    """move_storages of every weight of `model` (weight_tensors: parameters and buffers, the rotary
    tables excluded), in model order: the order a step reads them. Call it before anything takes
    a view of a weight (the decoder layers' plans are built on the first forward)."""
    return move_storages(weight_tensors(model), allocate)


@torch.no_grad()
def move_storages(tensors: Iterable[torch.Tensor], allocate: Callable[[int], torch.Tensor] = huge_page_buffer
                  ) -> torch.Tensor | None:
    """Copy the CPU storages behind `tensors` into one buffer from `allocate`, in the order given,
    and point each tensor at its copy in place (Tensor.set_), so every holder of the tensor
    (modules, a tied head, a DecoderStack) sees the move; a view's base is moved with it, so the
    old storages are freed. Storages torch hides (oneDNN's packed weights) stay where they are.
    Returns the buffer (None: nothing to move)."""
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in tensors:
        if t.device.type != "cpu":
            continue
        try:
            storage = t.untyped_storage()
        except NotImplementedError:  # opaque (oneDNN's packed layout)
            continue
        holders = groups.setdefault(storage.data_ptr(), (storage, []))[1]
        while t is not None:  # a view's base holds the storage too (the strips are views)
            holders.append(t)
            t = t._base
    offsets, total = {}, 0
    for key, (storage, _) in groups.items():
        offsets[key] = total
        total += -(-storage.nbytes() // _ALIGN) * _ALIGN
    if total == 0:
        return None
    arena = allocate(total)
    arena_storage = arena.untyped_storage()
    base = arena.storage_offset()
    # Each old storage is freed once its tensors point at the copy, and the heap is given back
    # every _TRIM_EVERY bytes freed: the move peaks that far above the model, not at twice it
    # (and a small model's move makes no malloc_trim call, which walks the whole heap).
    freed = 0
    for key, at in offsets.items():
        storage, holders = groups.pop(key)
        arena[at:at + storage.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(storage))
        for t in holders:
            t.set_(arena_storage, (base + at) // t.element_size() + t.storage_offset(), t.size(), t.stride())
        freed += storage.nbytes()
        del storage, holders
        if freed >= _TRIM_EVERY:
            release_free_heap()
            freed = 0
    return arena


def place_weights_on_huge_pages(model: nn.Module) -> None:
    """move_weights into a huge-page arena, and say what the kernel gave."""
    arena = move_weights(model)
    if arena is not None:
        logger.info("weights: %.1f MiB moved into one arena, %.1f MiB of it on 2 MiB pages",
                    arena.numel() / 2**20, huge_page_bytes(arena) / 2**20)
