"""Decode steps replayed from captured CUDA graphs (vLLM's idea, in our step's shape).

On a GPU a small model's decode step is host-bound: the card finishes each of the ~430 kernels
a 22-layer step launches before Python has issued the next (bench/RESULTS.md, 2026-12-04: an
H200 busy ~2 ms of an 11.6 ms step). A CUDA graph records the launches once and replays them in
one call. A graph replays fixed shapes and addresses, so:
- one graph per batch size in capture_sizes; a decode batch of n sequences runs the smallest
  that holds it, its rows past n padding (token 0 at position 0, KV slot -1: nothing written;
  context length 0: attention reads nothing and returns zeros);
- the graphs read inputs from static buffers of their own, filled each step by one host->device
  copy per input; block tables are rows of the longest context the engine allows, so a graph
  serves any context. Two costs follow that width, not the batch's (vLLM's persistent block table
  pays the first too): each step copies its rows whole (128 rows of a 128k-token context: 4 MB),
  and the attention kernel's split-K cuts that width, so a short context at a small batch runs in
  fewer, longer segments than eagerly (a few microseconds at the sizes measured);
- a graph covers the model up to the final norm: the LM head runs after replay on the n real
  rows (logits of padding would cost compute and, kept per graph, vocabulary-sized memory).
Prefill and mixed steps, and steps that do not sample every row, run eagerly. The graphs' memory
pool is reserved when the KV cache is sized (pool_bytes): the engine stays within
gpu_memory_utilization.

The Triton kernels never read a device value on the host (kernels/triton_ops.py), which is what
capture requires; the engine captures only on that backend, in one process (a tensor-parallel
all-reduce inside a graph is not built).
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from engine.forward_context import AttentionMetadata, forward_context
from engine.step_inputs import StepInputs, samples_every_row

logger = logging.getLogger(__name__)

# A step of no sequences: loaded into a size, every row is padding.
_PADDING = StepInputs(token_ids=[], positions=[], slot_mapping=[], block_tables=[], max_blocks=0, context_lens=[],
                      cu_query_lens=[0], logits_indices=[], max_query_len=1, all_decode=True)

# vLLM's default ladder: 1, 2, 4, then every multiple of 8 (padding wastes at most 7 rows), up to
# vLLM's default largest size; larger decode batches run eagerly (their step is less host-bound).
_LADDER_STEP = 8
MAX_CAPTURE_SIZE = 512
_SEGMENT = 20 << 20


def capture_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """The batch sizes to capture: the ladder up to the largest decode batch the scheduler can
    form (max_num_seqs sequences of one token each, within the token budget) or MAX_CAPTURE_SIZE,
    and that size itself."""
    top = min(max_num_seqs, max_num_batched_tokens, MAX_CAPTURE_SIZE)
    ladder = [1, 2, 4, *range(_LADDER_STEP, top + 1, _LADDER_STEP)]
    return sorted({s for s in ladder if s < top} | {top})


def eager_reason(config, backend_name: str, parallel) -> str | None:
    """Why a CUDA engine with these settings runs its decode steps eagerly, or None: it captures."""
    if config.enforce_eager:
        return "enforce_eager=true"
    if backend_name != "triton":
        return f"the {backend_name} attention backend (graphs capture the triton backend's kernels only)"
    if parallel is not None:
        return "tensor parallel (an all-reduce inside a graph is not built)"
    return None


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend, sizes: list[int], max_blocks_per_seq: int,
                 device: torch.device):
        self.model, self.backend, self.device = model, backend, device
        self.sizes = sizes
        rows = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        pinned = device.type == "cuda"
        # Host staging (pinned, so the copies are asynchronous) and the device tensors the graphs read.
        self.host = {
            "token_ids": torch.zeros(rows, dtype=i64, pin_memory=pinned),
            "positions": torch.zeros(rows, dtype=i64, pin_memory=pinned),
            "slot_mapping": torch.full((rows,), -1, dtype=i64, pin_memory=pinned),
            "context_lens": torch.zeros(rows, dtype=i32, pin_memory=pinned),
            "block_tables": torch.zeros(rows, max_blocks_per_seq, dtype=i32, pin_memory=pinned),
        }
        self.arrays = {name: t.numpy() for name, t in self.host.items()}
        self.static = {name: t.to(device) for name, t in self.host.items()}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # steps served by a graph

    @classmethod
    def for_runner(cls, runner, backend=None) -> DecodeGraphs:
        """Uncaptured, over the runner's model and backend (or another backend: the profiling one)."""
        sizes = capture_sizes(runner.config.max_num_seqs, runner.config.max_num_batched_tokens)
        return cls(runner.model, backend or runner.backend, sizes, runner.max_blocks_per_seq, runner.device)

    @classmethod
    def captured_for(cls, runner) -> DecodeGraphs | None:
        """A model runner's decode graphs, captured, where they apply; else None (logged why)."""
        if runner.device.type != "cuda":
            return None
        why_not = eager_reason(runner.config, runner.backend.name, runner.parallel)
        if why_not:
            logger.info("decode steps run eagerly: %s", why_not)
            return None
        graphs = cls.for_runner(runner)
        try:
            graphs.capture()
        except RuntimeError as e:  # e.g. an op that reads a device value on the host while capturing
            raise RuntimeError(f"capturing the decode step as CUDA graphs failed ({e}); enforce_eager=true "
                               "runs every step eagerly") from e
        return graphs

    @classmethod
    @torch.inference_mode()
    def pool_bytes(cls, runner, backend) -> int:
        """The memory the graphs' pool will hold, measured as the eager peak of the largest size's
        forward over the padding state (a smaller size reuses what the largest freed): what the KV
        cache must leave free. backend: the profiling run's, on its own small caches."""
        graphs = cls.for_runner(runner, backend)
        size = graphs.sizes[-1]
        graphs.load(_PADDING, size)
        torch.cuda.synchronize(runner.device)
        torch.cuda.reset_peak_memory_stats(runner.device)
        base = torch.cuda.memory_allocated(runner.device)
        graphs.forward(size)
        torch.cuda.synchronize(runner.device)
        # Rounded up to the caching allocator's large segment (20 MiB): the pool reserves whole segments.
        return -(-(torch.cuda.max_memory_allocated(runner.device) - base) // _SEGMENT) * _SEGMENT

    def padded_size(self, inputs: StepInputs) -> int | None:
        """The batch size whose graph runs this step, or None: the step runs eagerly."""
        n = len(inputs.token_ids)
        if not inputs.all_decode or n > self.sizes[-1] or not samples_every_row(inputs):
            return None
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def load(self, inputs: StepInputs, size: int) -> None:
        """The step's inputs into the static buffers' first `size` rows, rows past the batch padding."""
        n, width = len(inputs.token_ids), inputs.max_blocks
        a = self.arrays
        a["token_ids"][:n] = inputs.token_ids
        a["positions"][:n] = inputs.positions
        a["slot_mapping"][:n] = inputs.slot_mapping
        a["context_lens"][:n] = inputs.context_lens
        a["block_tables"][:n, :width] = np.asarray(inputs.block_tables, dtype=np.int32).reshape(n, width)
        # Padding: nothing written, nothing read (a pad row's block table is never read, and a real
        # row's columns past its width lie beyond its context).
        a["token_ids"][n:size] = 0
        a["positions"][n:size] = 0
        a["slot_mapping"][n:size] = -1
        a["context_lens"][n:size] = 0
        # Asynchronous copies out of buffers the next step rewrites: safe, since every step reads
        # its sampled tokens back to the host (the sampler's .tolist()) before the next one loads.
        for name, host in self.host.items():
            if self.static[name] is not host:
                self.static[name][:size].copy_(host[:size], non_blocking=True)

    def forward(self, size: int) -> torch.Tensor:
        """The model up to its final norm over the static buffers' first `size` rows: what a graph
        records, and what runs eagerly to warm up (compiling the Triton kernels for these shapes)."""
        s = self.static
        meta = AttentionMetadata(
            slot_mapping=s["slot_mapping"][:size], block_tables=s["block_tables"][:size],
            context_lens=s["context_lens"][:size], cu_query_lens=None, max_query_len=1, all_decode=True,
        )
        positions = s["positions"][:size]
        with forward_context(meta, self.backend, positions):
            return self.model.hidden_states(s["token_ids"][:size], positions, None)

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per size, largest first, all in one memory pool (a smaller graph's
        activations fit in what the larger ones left), from the padding state of every row."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self.load(_PADDING, size)
            self.forward(size)  # outside the capture: kernels compile, lazily built tables are made
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(size)
            self.graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs of the decode step (batch sizes %d..%d) in %.1f s, %.0f MiB",
                    len(self.graphs), self.sizes[0], self.sizes[-1], time.perf_counter() - start,
                    (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20)

    def run(self, inputs: StepInputs) -> torch.Tensor | None:
        """The final hidden states of the step's rows from its graph's replay, or None where the
        step is not a decode step a graph holds (it runs eagerly). A size without a graph (never
        captured: the CPU tests of this padded path) runs the same padded forward eagerly."""
        size = self.padded_size(inputs)
        if size is None:
            return None
        self.load(inputs, size)
        captured = self.graphs.get(size)
        if captured is None:
            hidden = self.forward(size)
        else:
            captured[0].replay()
            hidden = captured[1]
            self.replays += 1
        return hidden[: len(inputs.token_ids)]
