"""One step's model inputs: built on rank 0 from a schedule as plain lists (what tensor-parallel
ranks receive), then copied into buffers that persist across steps on every rank.

Persistent buffers keep the step's tensors at fixed addresses (what a captured CUDA graph
replays from) and cost one copy per input instead of a fresh allocation each step; numpy views
of the host buffers take a Python list without building an intermediate tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.forward_context import AttentionMetadata


@dataclass
class StepInputs:
    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[int]  # num_seqs rows of max_blocks, flattened, padded with block 0
    max_blocks: int
    context_lens: list[int]
    cu_query_lens: list[int]
    logits_indices: list[int]
    max_query_len: int
    all_decode: bool


class _Buffer:
    """A host buffer (numpy view for filling) and, on an accelerator, its device twin; grows
    when a step needs more than it holds."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        self.host = torch.zeros(size, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        self.array = self.host.numpy()
        self.on_device = self.host if self.device.type == "cpu" else torch.zeros(size, dtype=self.dtype, device=self.device)

    def fill(self, values: list[int]) -> torch.Tensor:
        n = len(values)
        if n > self.array.shape[0]:
            self._allocate(max(n, 2 * self.array.shape[0]))
        self.array[:n] = values
        if self.on_device is self.host:
            return self.host[:n]
        return self.on_device[:n].copy_(self.host[:n], non_blocking=True)


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, device: torch.device):
        i64, i32 = torch.int64, torch.int32
        self.token_ids = _Buffer(max_tokens, i64, device)
        self.positions = _Buffer(max_tokens, i64, device)
        self.slot_mapping = _Buffer(max_tokens, i64, device)
        self.logits_indices = _Buffer(max_tokens + max_seqs, i64, device)
        self.block_tables = _Buffer(max_seqs * max_blocks_per_seq, i32, device)
        self.context_lens = _Buffer(max_seqs, i32, device)
        self.cu_query_lens = _Buffer(max_seqs + 1, i32, device)

    def nbytes(self) -> int:
        buffers = vars(self).values()
        return sum(b.host.nbytes + (b.on_device.nbytes if b.on_device is not b.host else 0) for b in buffers)

    def fill(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(token ids, positions, logits indices, attention metadata) of this step, in the buffers."""
        num_seqs = len(step.context_lens)
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping.fill(step.slot_mapping),
            block_tables=self.block_tables.fill(step.block_tables).view(num_seqs, step.max_blocks),
            context_lens=self.context_lens.fill(step.context_lens),
            cu_query_lens=self.cu_query_lens.fill(step.cu_query_lens),
            max_query_len=step.max_query_len,
            all_decode=step.all_decode,
            max_context_len=max(step.context_lens),
        )
        ids = self.token_ids.fill(step.token_ids)
        return ids, self.positions.fill(step.positions), self.logits_indices.fill(step.logits_indices), meta
