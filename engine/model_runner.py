"""One rank's model and paged KV cache: builds the model its registry entry names, loads this
rank's shard, turns a schedule into step inputs (rank 0), runs a step from them (every rank)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from engine.attention import AttentionBackend
from engine.config import EngineConfig, warn_if_openmp_spins
from engine.cuda_graphs import DecodeGraphs, eager_reason
from engine.forward_context import AttentionMetadata, forward_context, inference_mode
from engine.gguf_weights import auto_quantization, weights_keeping_gguf_blocks
from engine.host_arena import place_weights_on_huge_pages
from engine.layers.linear_kernels import can_pack_for_cpu
from engine.loader import ModelSource
from engine.memory import HeapTrimmer, resident_report
from engine.models.config import ModelConfig
from engine.models.registry import model_class
from engine.parallel_state import ParallelState
from engine.sampler import SampleResult, Sampler
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.step_inputs import StepBuffers, StepInputs
from kernels.reference import kv_row_width

logger = logging.getLogger(__name__)

# Freed load temporaries the heap may hold before they are given back (memory.HeapTrimmer).
_LOAD_HEAP_SLACK = 16 << 20
# A checkpoint tensor this large is read by its loader in parts: the embedding table (788 MB
# for a 3B model in bfloat16) is never held twice, as its parameter and a whole read copy.
_READ_IN_PARTS_ABOVE = 32 << 20

# KV memory on CPU when neither a block count nor a byte size is given.
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass
class StepResult:
    sampled: SampleResult
    # Indices into SchedulerOutput.scheduled that sampled; sampled's rows follow their sample_seqs.
    sampled_indices: list[int]


@dataclass
class PreparedStep:
    """Rank 0's bookkeeping for a step: its inputs and which logits rows go where."""

    inputs: StepInputs
    sampled_indices: list[int]
    prompt_rows: list[tuple[Sequence, int]]  # (sequence, position) whose logits score the prompt


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource,
        model_config: ModelConfig,
        max_model_len: int,
        parallel: ParallelState | None = None,
    ):
        """parallel None: the whole model in this process; else this rank's shard of it."""
        self.config = config
        if config.quantization == "auto":  # resolved here, where the file and the machine are known
            config.quantization, why = auto_quantization(config, source)
            logger.info("quantization=auto: %s, since %s", config.quantization or "none", why)
        self.dtype = config.torch_dtype(source.checkpoint_dtype)
        self.kv_dtype = config.kv_cache_torch_dtype(self.dtype)
        self.model_config = model_config
        self.block_size = config.block_size
        self.parallel = parallel
        self.device = config.torch_device
        if parallel is not None and self.device.type == "cuda":
            self.device = torch.device("cuda", parallel.local_rank)
        if self.device.type == "cpu":
            if config.num_threads is not None:
                torch.set_num_threads(config.num_threads)
            elif parallel is not None:
                # Ranks on one machine share its cores; oversubscribed ranks wait on each other.
                local = config.tp_local_ranks or config.tensor_parallel_size
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
            warn_if_openmp_spins()
        torch.manual_seed(config.seed)

        # Built in the target dtype on "meta", then materialized without a random init: a float32
        # build cast afterwards held 6 bytes per parameter at once (19 GB for a 3B model).
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device("meta"):
                model = model_class(model_config.architecture)(model_config, max_model_len, parallel)
        finally:
            torch.set_default_dtype(default_dtype)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.lm_head.retie()
        model.keep_norms_in_float32()
        model.init_buffers(self.device)
        model.quantize_experts_at_load(config.quantization, config.quantization_group_size, config.attention_backend)
        if config.quantization is not None and source.path.lower().endswith(".gguf"):
            # Q4_0/Q4_1/Q4_K projections go from the file's blocks to int4 codes, never through float.
            weights = weights_keeping_gguf_blocks(source, model_config)
        elif parallel is None:  # the embedding table comes unread, read in parts into its parameter
            weights = source.iter_weights(lazy_above=_READ_IN_PARTS_ABOVE)
        else:  # a rank reads only its slices of each tensor
            weights = source.iter_weight_slices()
        layout = (config.quantization, config.quantization_group_size, can_pack_for_cpu(self.device, self.dtype),
                  config.embedding_quantization_method)
        # Each module takes its layout as soon as its weights are in: a quantized load never
        # holds the whole float model (a 3B model in int4 peaked at 6.9 GB doing that). The float
        # temporaries freed on the way go back to the system once they add up (with transparent
        # huge pages in malloc they raised the peak of a 264 MB float model's int4 load by ~50 MB).
        load_heap = HeapTrimmer(slack=_LOAD_HEAP_SLACK)

        def finalize(module):
            model.finalize_module(module, *layout)
            load_heap.maybe_trim()

        model.load_weights(weights, source.path, finalize)
        layouts = model.finalize_weights(*layout)
        logger.info("%s: %d torch threads, %s activations, projections: %s", self.device, torch.get_num_threads(),
                    self.dtype, ", ".join(f"{n} {layout}" for layout, n in sorted(layouts.items())))
        if self.device.type == "cpu":  # a step streams them in this order: one arena on 2 MiB pages
            place_weights_on_huge_pages(model)
        self.model = model.eval()
        # The load's float temporaries are freed but still resident in the allocator's heap: given
        # back before the KV cache is allocated, so the load peaks at its resident size.
        self.heap = HeapTrimmer()
        self.num_local_kv_heads = model.num_local_kv_heads

        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        if parallel is not None:
            parallel.min_over_ranks(0)  # every rank loaded: profiling's collectives start together
        self.num_blocks = self._decide_num_blocks()
        if parallel is not None:
            # Rank 0's block manager hands out block ids for every rank's cache.
            self.num_blocks = parallel.min_over_ranks(self.num_blocks)
        self.k_caches, self.v_caches = self._allocate_caches(self.num_blocks)
        self.backend = AttentionBackend(config.attention_backend, self.k_caches, self.v_caches)
        self.sampler = Sampler(model_config.vocab_size, model_config.eos_token_ids, config.max_num_seqs, self.device,
                               self.backend.ops.argmax_rows, self.backend.ops.sample_rows)
        self.buffers = StepBuffers(
            max(config.max_num_batched_tokens, config.max_num_seqs), config.max_num_seqs, self.max_blocks_per_seq,
            self.device,
        )
        self.decoding = True  # whether the last step was decode only (execute_model)
        self.decode_graphs = DecodeGraphs.captured_for(self)
        self.heap.trim()
        self.memory = resident_report(model, [*self.k_caches, *self.v_caches],
                                      self.buffers.nbytes() + self.sampler.buffers.nbytes())
        logger.info("gave %.1f MiB of freed load temporaries back to the system", self.heap.released / 2**20)
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f KiB per block, %d tokens capacity, %.1f MiB (%s, %s backend)",
            self.num_blocks, self.block_size, self.bytes_per_block / 1024, self.num_blocks * self.block_size,
            self.num_blocks * self.bytes_per_block / 2**20, self.kv_dtype, self.backend.name,
        )

    @property
    def cache_row(self) -> int:
        """Elements of one (token, KV head) row of the cache: an 8-bit row carries its scale (padded on CUDA)."""
        return kv_row_width(self.model_config.head_dim, self.kv_dtype, self.device)

    def _allocate_caches(self, num_blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape = (num_blocks, self.block_size, self.num_local_kv_heads, self.cache_row)
        layers = range(self.model_config.num_layers)
        return (
            [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in layers],
            [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in layers],
        )

    @property
    def bytes_per_block(self) -> int:
        """Of this rank's cache (its KV heads): memory settings are per device."""
        per_layer = self.block_size * self.num_local_kv_heads * self.cache_row * self.kv_dtype.itemsize
        return 2 * self.model_config.num_layers * per_layer

    def _decide_num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if cfg.kv_cache_memory_bytes is not None:
            num = cfg.kv_cache_memory_bytes // self.bytes_per_block
        elif self.device.type == "cuda":
            num = self._profile_cuda_blocks()
        else:
            num = DEFAULT_CPU_KV_BYTES // self.bytes_per_block
        if num < 1:
            raise ValueError(
                f"KV cache memory leaves no room for one block of {self.bytes_per_block} bytes; "
                "raise kv_cache_memory_bytes or gpu_memory_utilization"
            )
        return int(num)

    @torch.inference_mode()
    def _profile_cuda_blocks(self) -> int:
        """Blocks that fit in gpu_memory_utilization of the card after a dummy forward at the
        token budget (its activations are the peak the engine will need)."""
        num_tokens = min(self.config.max_num_batched_tokens, self.model.rotary.cos.shape[0])
        num_blocks = (num_tokens + self.block_size - 1) // self.block_size
        dev = self.device
        k_caches, v_caches = self._allocate_caches(num_blocks)
        backend = AttentionBackend(self.config.attention_backend, k_caches, v_caches)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=dev),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None, :],
            context_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            cu_query_lens=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            max_query_len=num_tokens,
            all_decode=False,
            max_context_len=num_tokens,
        )
        torch.cuda.reset_peak_memory_stats(dev)
        positions = torch.arange(num_tokens, device=dev)
        with forward_context(meta, backend, positions):
            self.model(torch.zeros(num_tokens, dtype=torch.long, device=dev), positions, positions)
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        # The decode graphs' pool, captured after the KV cache is allocated, is memory of its own.
        graphs = 0 if eager_reason(self.config, backend.name, self.parallel) else DecodeGraphs.pool_bytes(self, backend)
        del k_caches, v_caches, backend
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        used_by_others = total - free - torch.cuda.memory_reserved(dev)
        budget = total * self.config.gpu_memory_utilization - peak - graphs - used_by_others
        logger.info("profiled peak %.2f GiB at %d tokens, %.2f GiB for decode graphs; %.2f GiB left for the KV cache",
                    peak / 2**30, num_tokens, graphs / 2**30, budget / 2**30)
        return int(budget // self.bytes_per_block)

    # ---- a step -------------------------------------------------------------------------------
    def prepare(self, schedule: SchedulerOutput) -> PreparedStep:
        """Rank 0: the flat inputs of a schedule, and where its logits rows go."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampled_indices: list[int] = []
        prompt_rows: list[tuple[Sequence, int]] = []
        prompt_indices: list[int] = []
        bs = self.block_size
        for i, item in enumerate(schedule.scheduled):
            seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            token_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            cu.append(cu[-1] + n)
            context_lens.append(start + n)
            if item.samples:
                logits_indices.append(cu[-1] - 1)
                sampled_indices.append(i)
            if seq.prompt_logprobs is not None:
                # Position p's logits predict prompt token p + 1; recomputed positions (after a
                # preemption) already have their entry.
                for p in range(max(start, len(seq.prompt_logprobs) - 1), min(start + n, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((seq, p))
                    prompt_indices.append(cu[-2] + p - start)
        max_blocks = max(len(item.seq.block_table) for item in schedule.scheduled)
        tables: list[int] = []
        for item in schedule.scheduled:
            row = item.seq.block_table
            # Freed entries (NO_BLOCK, out of every window: a prefix of the table, BlockManager.
            # free_out_of_window) read block 0, which the window masks. The first entry tells: a
            # min() over the row cost O(context) a sequence a step (~4 us each at 4k tokens).
            if row and row[0] < 0:
                row = [max(b, 0) for b in row]
            tables += row
            tables += [0] * (max_blocks - len(row))
        inputs = StepInputs(
            token_ids=token_ids, positions=positions, slot_mapping=slots, block_tables=tables, max_blocks=max_blocks,
            context_lens=context_lens, cu_query_lens=cu, logits_indices=logits_indices + prompt_indices,
            max_query_len=max(item.num_new_tokens for item in schedule.scheduled),
            all_decode=all(item.num_new_tokens == 1 for item in schedule.scheduled),
        )
        return PreparedStep(inputs, sampled_indices, prompt_rows)

    @inference_mode
    def execute_model(self, inputs: StepInputs) -> torch.Tensor | None:
        """Every rank: the step's forward pass; rank 0 gets the logits, other ranks None."""
        if self.decode_graphs is not None:
            hidden = self.decode_graphs.run(inputs)
            if hidden is not None:
                return self.model.compute_logits(hidden)
        ids, positions, logits_indices, meta = self.buffers.fill(inputs)
        if self.device.type == "cpu" and meta.all_decode != self.decoding:
            self.decoding = meta.all_decode
            if self.decoding:  # what a prefill left in the heap, given back as decoding resumes
                self.heap.maybe_trim()
        with forward_context(meta, self.backend, positions):
            return self.model(ids, positions, logits_indices)

    def sample(self, logits: torch.Tensor, schedule: SchedulerOutput, step: PreparedStep) -> StepResult:
        """Rank 0: prompt logprobs, then the next token of every sequence that samples."""
        sampled_indices = step.sampled_indices
        if step.prompt_rows:
            rows, n = step.prompt_rows, len(sampled_indices)
            entries = self.sampler.prompt_logprobs(
                logits[n:], [seq.token_ids[p + 1] for seq, p in rows], [seq.params.prompt_logprobs for seq, _ in rows]
            )
            for (seq, p), entry in zip(rows, entries):
                if len(seq.prompt_logprobs) == p + 1:
                    seq.prompt_logprobs.append(entry)
            logits = logits[:n]
        # A request's first sample may fan out: each of its sample_seqs draws from the same row.
        rows = [row for row, i in enumerate(sampled_indices) for _ in schedule.scheduled[i].sample_seqs]
        if len(rows) != len(sampled_indices):
            logits = logits[torch.tensor(rows, device=logits.device)]
        seqs = [seq for i in sampled_indices for seq in schedule.scheduled[i].sample_seqs]
        if not seqs:
            return StepResult(SampleResult([], [], []), [])
        return StepResult(self.sampler(logits, seqs), sampled_indices)

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        self.backend.copy_blocks(mapping)
