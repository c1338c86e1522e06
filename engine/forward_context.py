"""What every layer of one forward pass shares: the step's attention metadata and the backend.

The model runner fills its persistent step buffers, then runs the model inside
`forward_context(...)`; attention layers read the context instead of having the metadata
threaded through every call, so a new attention input (or a captured CUDA graph reading the
same buffers) needs no change to any model. A leaf module: it imports only torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    context_lens: torch.Tensor  # int32 [num_seqs]
    cu_query_lens: torch.Tensor  # int32 [num_seqs + 1]
    max_query_len: int
    all_decode: bool  # every sequence has exactly one query token
    max_context_len: int | None = None  # the longest sequence's context, on the host; None: unknown


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    backend: Any  # engine.attention.AttentionBackend: its ops and the paged KV cache
    positions: torch.Tensor  # int64 [num_tokens]


_current: ForwardContext | None = None


class forward_context:  # noqa: N801 - used as torch's context managers are: `with forward_context(...)`
    """The step's context while the `with` block runs (the previous one again after). A class,
    not a contextlib generator: entering and leaving one cost ~1.9 us a step against ~0.7."""

    __slots__ = ("context", "previous")

    def __init__(self, meta: AttentionMetadata, backend, positions: torch.Tensor):
        self.context = ForwardContext(meta, backend, positions)

    def __enter__(self) -> ForwardContext:
        global _current
        self.previous, _current = _current, self.context
        return self.context

    def __exit__(self, *exc) -> None:
        global _current
        _current = self.previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("a model layer ran outside a forward pass (no forward_context is set)")
    return _current


def inference_mode(fn: Callable) -> Callable:
    """fn under torch.inference_mode, entered only where it is not on already: the engine's step
    runs the forward pass inside the executor's, where the decorator's second entry cost ~2 us
    (more right after the step's weight read has cycled the caches)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run
