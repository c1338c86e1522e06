"""What a rank holds resident, by part: weights, KV cache, step buffers, and the process's RSS
(the rest of which is torch's runtime, activations and the tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a tied weight counts once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        try:
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
        except NotImplementedError:  # oneDNN's packed weight hides its storage: its logical size
            seen[("opaque", id(t))] = t.numel() * t.element_size()
    return sum(seen.values())


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer that is a weight (the rotary tables are not)."""
    return [t for name, t in [*model.named_parameters(), *model.named_buffers()] if not name.startswith("rotary.")]


def resident_set_bytes() -> int:
    """VmRSS of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
