"""One step's model inputs: built on rank 0 from a schedule as plain lists (what tensor-parallel
ranks receive), then copied into buffers that persist across steps on every rank; and the step's
sampling parameters, copied on rank 0 into buffers of the same kind.

Persistent buffers keep the step's tensors at fixed addresses (what a captured CUDA graph
replays from) and cost one copy per input instead of a fresh allocation each step; numpy views
of the host buffers take a Python list without building an intermediate tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.forward_context import AttentionMetadata

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


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


def samples_every_row(step: StepInputs) -> bool:
    """Whether the step's logits are every token's row, in order (a decode step where each
    sequence samples): the model then takes its final hidden states without a gather."""
    n = len(step.token_ids)
    return len(step.logits_indices) == n and step.logits_indices == list(range(n))


# Lengths whose views a _Buffer keeps at once.
_MAX_KEPT_VIEWS = 64


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
        # n -> (host[:n], on_device[:n]), made once per length: a slice from Python cost ~1 us (more
        # right after a step's weight read), and a steady decode batch fills the same lengths each step.
        self.views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def fill(self, values: list) -> torch.Tensor:
        n = len(values)
        if n > self.array.shape[0]:
            self._allocate(max(n, 2 * self.array.shape[0]))
        self.array[:n] = values
        views = self.views.get(n)
        if views is None:
            if len(self.views) >= _MAX_KEPT_VIEWS:  # prefill chunks of every length: keep a bounded few
                self.views.clear()
            # Made (and later written: copy_ on a device) in the step's inference mode: execute_model
            # is fill's only caller, and a view made in inference mode cannot be written outside it.
            host = self.host[:n]
            views = self.views[n] = (host, host if self.on_device is self.host else self.on_device[:n])
        host, on_device = views
        if on_device is host:
            return host
        return on_device.copy_(host, non_blocking=True)


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
        return _nbytes(vars(self).values())

    def fill(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionMetadata]:
        """(token ids, positions, logits indices, attention metadata) of this step, in the buffers.
        Logits indices None: every token's row, in order (a decode step where each sequence
        samples), which the model takes without gathering its final hidden states."""
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
        logits_indices = None if samples_every_row(step) else self.logits_indices.fill(step.logits_indices)
        return ids, self.positions.fill(step.positions), logits_indices, meta


@dataclass
class SamplingTensors:
    """One step's per-row sampling parameters, views of persistent buffers. A processor no row
    needs is None (decided on the host from the parameters, so the sampler never reads the
    device to skip it); greedy rows hold neutral values (their argmax survives every filter)."""

    greedy: torch.Tensor | None = None  # bool [rows]; None: every row is greedy (or beam search)
    temperature: torch.Tensor | None = None  # float32 [rows]; None: 1 for every row
    top_k: torch.Tensor | None = None  # int64 [rows], top_p float32 [rows]; None: no row filters
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None  # float32 [rows]; None: no row filters
    # Penalties: one row per penalized row, in batch order; penalized lists those rows on the
    # host (empty: none), penalized_rows on the device, to index the logits with.
    penalized: list[int] = field(default_factory=list)
    penalized_rows: torch.Tensor | None = None  # int64 [penalized]
    repetition: torch.Tensor | None = None  # float32 [penalized, 1] each
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None


class SamplingBuffers:
    """Rank 0's sampling parameters at fixed addresses: a sampled batch costs one copy per
    parameter a row uses, never a fresh tensor; an all-greedy batch without penalties fills none."""

    def __init__(self, max_rows: int, device: torch.device):
        f32, i64 = torch.float32, torch.int64
        self.greedy = _Buffer(max_rows, torch.bool, device)
        self.temperature = _Buffer(max_rows, f32, device)
        self.top_k = _Buffer(max_rows, i64, device)
        self.top_p = _Buffer(max_rows, f32, device)
        self.min_p = _Buffer(max_rows, f32, device)
        self.penalized_rows = _Buffer(max_rows, i64, device)
        self.repetition = _Buffer(max_rows, f32, device)
        self.frequency = _Buffer(max_rows, f32, device)
        self.presence = _Buffer(max_rows, f32, device)

    def nbytes(self) -> int:
        return _nbytes(vars(self).values())

    def fill(self, params: list[SamplingParams], vocab_size: int) -> SamplingTensors:
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        out = SamplingTensors(penalized=penalized)
        if penalized:
            out.penalized_rows = self.penalized_rows.fill(penalized)
            out.repetition = self.repetition.fill([params[i].repetition_penalty for i in penalized])[:, None]
            out.frequency = self.frequency.fill([params[i].frequency_penalty for i in penalized])[:, None]
            out.presence = self.presence.fill([params[i].presence_penalty for i in penalized])[:, None]
        sampled = [not p.greedy for p in params]
        if not any(sampled):  # beam rows are greedy too: temperature 0, no filters
            return out
        out.greedy = self.greedy.fill([not s for s in sampled])
        temperatures = [p.temperature if s else 1.0 for p, s in zip(params, sampled)]
        if any(t != 1.0 for t in temperatures):  # a full pass over the vocabulary otherwise wasted
            out.temperature = self.temperature.fill(temperatures)
        top_k = [min(p.top_k, vocab_size) if s and p.top_k > 0 else vocab_size for p, s in zip(params, sampled)]
        top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
        if any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p):
            out.top_k, out.top_p = self.top_k.fill(top_k), self.top_p.fill(top_p)
        min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
        if any(m > 0.0 for m in min_p):
            out.min_p = self.min_p.fill(min_p)
        return out


def _nbytes(buffers) -> int:
    return sum(b.host.nbytes + (b.on_device.nbytes if b.on_device is not b.host else 0) for b in buffers)
