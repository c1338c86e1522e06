"""The synchronous engine: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import logging
import time

from engine.beam_search import beam_search_step
from engine.block_manager import BlockManager, KVCacheUsage
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.errors import EngineDeadError, EngineStepError
from engine.executor import Executor
from engine.grammar import CompilingRequests, GrammarCompiler
from engine.input_processor import InputProcessor, Prompt, model_max_len
from engine.loader import load_model_source
from engine.models.config import ModelConfig
from engine.output_processor import build_output, check_stop
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.sequence_group import GroupStatus, SequenceGroup

logger = logging.getLogger(__name__)

__all__ = ["EngineDeadError", "EngineStats", "EngineStepError", "LLMEngine", "Prompt"]

# Forward passes failing one after another, each over different requests: the model cannot
# run at all (a broken device, weights, or kernel), not one request's bad luck. Past this many
# the engine reports itself dead rather than failing every request it is sent.
MAX_CONSECUTIVE_FORWARD_FAILURES = 3


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **kwargs):
        self.config = config if config is not None else EngineConfig(**kwargs)
        source = load_model_source(self.config.model)
        self.model_name = source.name
        self.tokenizer = source.tokenizer
        self.model_config = ModelConfig.from_hf(source.hf_config, source.path)
        max_model_len = model_max_len(self.model_config, self.config.max_model_len, source.path)
        self.runner = Executor(self.config, source, self.model_config, max_model_len)
        capacity = self.runner.num_blocks * self.config.block_size
        if capacity < max_model_len:
            logger.warning(
                "KV cache holds %d tokens, fewer than max_model_len %d: limiting max_model_len to %d",
                capacity, max_model_len, capacity,
            )
            max_model_len = capacity
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        num_cpu_blocks = int(self.config.swap_space * 2**30) // self.runner.bytes_per_block
        self.cpu_block_manager = BlockManager(num_cpu_blocks, self.config.block_size)
        self.swap_space = self.runner.make_swap_space(num_cpu_blocks)
        self.scheduler = Scheduler(self.config, self.block_manager, self.cpu_block_manager)
        self.detokenizer = Detokenizer(self.tokenizer)
        eos = set(self.model_config.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self.runner.sampler.eos_token_ids = self.eos_token_ids
        self.inputs = InputProcessor(
            self.config, self.model_config, self.model_name, self.tokenizer, self.detokenizer, max_model_len,
            self.runner.num_blocks,
        )
        self.requests: dict[str, SequenceGroup] = {}
        self.consecutive_forward_failures = 0
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.compiling = CompilingRequests()  # added, waiting for their grammar
        self.prompt_tokens = 0
        self.generation_tokens = 0

    # ---- requests -------------------------------------------------------------------------
    def make_sequence(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, arrival_time: float | None = None,
    ) -> SequenceGroup:
        """Validate and tokenize a request without touching engine state (any thread may call)."""
        group = self.inputs.make_sequence(request_id, prompt, params, arrival_time)
        spec = group.seqs[0].params.structured_outputs
        if spec is not None:
            group.grammar_future = self.grammars.submit(spec)
        return group

    def add_sequence(self, group: SequenceGroup) -> None:
        """Queue a request made by make_sequence."""
        if group.request_id in self.requests:
            raise ValueError(f"request id {group.request_id!r} is already in use; use a unique id")
        self.requests[group.request_id] = group
        if group.grammar_future is not None:
            self.compiling[group.request_id] = group  # scheduled by step() once compiled
        else:
            self.scheduler.add(group)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> SequenceGroup:
        group = self.make_sequence(request_id, prompt, params, arrival_time)
        self.add_sequence(group)
        return group

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self.discard_request(request_id)
        return build_output(group, self.tokenizer) if group is not None else None

    def discard_request(self, request_id: str, reason: str = "abort") -> SequenceGroup | None:
        """abort_request without its last output: frees the blocks and computes nothing of the
        request's own that could fail. Its live sequences finish with `reason` ("error" for a
        request that failed)."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        self.compiling.pop(request_id, None)
        self.scheduler.finish(group)
        for seq in group.seqs:
            seq.finish(reason)
        group.metrics.finished_time = time.time()
        logger.debug("aborted %s; %d blocks free", request_id, self.block_manager.num_free_blocks)
        return group

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.compiling)

    def _start_compiled(self) -> dict[str, BaseException]:
        """Requests whose grammar has compiled join the scheduler; a request whose grammar
        failed ends with that error."""
        ready, failed = self.compiling.take_done(idle=not self.scheduler.has_unfinished())
        for group in ready:
            self.scheduler.add(group)
        for group, _ in failed:
            self.discard_request(group.request_id)
        return {group.request_id: e for group, e in failed}

    def _fail_unresumable(self, group: SequenceGroup) -> dict[str, BaseException]:
        """Nothing runs and the first swapped-out request still does not fit in the free blocks:
        it never will, and it blocks every request behind it. It fails alone."""
        blocks = self.block_manager.num_free_blocks
        self.discard_request(group.request_id, "error")
        error = ValueError(
            f"request {group.request_id!r} grew beyond the KV cache ({blocks} blocks of {self.config.block_size} "
            "tokens) while its sequences were swapped out; lower SamplingParams.n / best_of or max_tokens"
        )
        logger.error("%s", error)
        return {group.request_id: error}

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        failures = self._start_compiled()
        schedule = self.scheduler.schedule()
        # Before the forward pass: swapped-out blocks may be handed to this step's writes.
        self.swap_space.swap_out(schedule.blocks_to_swap_out)
        self.swap_space.swap_in(schedule.blocks_to_swap_in)
        if schedule.is_empty and not schedule.num_preempted and not self.scheduler.running and self.scheduler.swapped:
            failures.update(self._fail_unresumable(self.scheduler.swapped[0]))
        if schedule.is_empty:
            if failures:
                raise EngineStepError(list(failures), next(iter(failures.values())), [], failures)
            return []
        if logger.isEnabledFor(logging.DEBUG):  # its arguments are sums and properties, computed every step else
            logger.debug(
                "step: %d seqs, %d tokens, %d preempted, %d blocks free",
                len(schedule.scheduled), schedule.num_batched_tokens, schedule.num_preempted,
                self.block_manager.num_free_blocks,
            )
        try:
            result = self.runner.execute(schedule)
        except Exception as e:
            ids = list(dict.fromkeys(item.seq.request_id for item in schedule.scheduled))
            for rid in ids:
                self.discard_request(rid, "error")
            self.consecutive_forward_failures += 1
            if isinstance(e, EngineDeadError):  # e.g. a tensor-parallel rank is gone
                raise
            if self.consecutive_forward_failures >= MAX_CONSECUTIVE_FORWARD_FAILURES:
                raise EngineDeadError(
                    f"the forward pass failed {self.consecutive_forward_failures} times in a row, over different "
                    f"requests; the model cannot run: {e!r}"
                ) from e
            logger.exception("step failed; aborted %s", ids)
            raise EngineStepError(ids + list(failures), e, [], {**{rid: e for rid in ids}, **failures}) from e
        self.consecutive_forward_failures = 0

        # Engine-wide bookkeeping: a failure here cannot be pinned to a request and propagates
        # (the AsyncEngine then reports itself dead).
        now = time.time()
        window = self.model_config.kv_window
        for item in schedule.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(item.seq)
            if window is not None:
                self.block_manager.free_out_of_window(item.seq, window)
            if item.seq.num_output_tokens == 0:
                self.prompt_tokens += item.num_new_tokens
        # Each sampled row, grouped by request.
        sampled: dict[str, list[tuple[Sequence, int]]] = {}
        row = 0
        for index in result.sampled_indices:
            for seq in schedule.scheduled[index].sample_seqs:
                sampled.setdefault(seq.request_id, []).append((seq, row))
                row += 1

        # Per-request work: whatever one request's rows raise (in the sampler, or here) fails
        # that request alone; its blocks are freed and every other request goes on.
        outputs: list[RequestOutput] = []
        failed = result.sampled.failed
        for request_id, rows in sampled.items():
            try:
                group = self.requests[request_id]
                failed_row = next((failed[r] for _, r in rows if r in failed), None) if failed else None
                if failed_row is not None:
                    raise failed_row
                output = self._advance(group, rows, result.sampled, now)
            except Exception as e:  # noqa: BLE001 - pinned to this request
                logger.exception("request %s failed in the step; aborting it alone", request_id)
                self.discard_request(request_id, "error")
                failures[request_id] = e
                continue
            if output is not None:
                outputs.append(output)
        if failures:
            raise EngineStepError(list(failures), next(iter(failures.values())), outputs, failures)
        return outputs

    def _advance(self, group: SequenceGroup, rows: list[tuple[Sequence, int]], sampled, now: float) -> RequestOutput | None:
        """One request takes its sampled tokens: stops, detokenization, the output to stream."""
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        group.metrics.last_token_time = now
        self.generation_tokens += len(rows)
        if group.params.use_beam_search:
            self._beam_step(group, rows, sampled)
        else:
            for seq, r in rows:
                seq.append_token(sampled.token_ids[r], sampled.logprobs[r], sampled.top_logprobs[r])
                if seq.grammar is not None:
                    seq.grammar.accept(sampled.token_ids[r])
                check_stop(seq, len(self.detokenizer.step(seq)), self.eos_token_ids, self.max_model_len)
                if not seq.is_finished and seq.grammar is not None and seq.grammar.is_terminated:
                    seq.finish("stop")  # ignore_eos: the grammar still allows nothing after its end
                if seq.is_finished:
                    self.scheduler.free_seq(seq)
                    group.retire(seq)
            if not group.seqs:
                group.status = GroupStatus.FINISHED
        if group.is_finished:
            group.metrics.finished_time = now
            self.scheduler.finish(group)
            del self.requests[group.request_id]
        if group.is_finished or not group.params.use_beam_search:
            return build_output(group, self.tokenizer)
        return None

    def _beam_step(self, group: SequenceGroup, rows: list[tuple[Sequence, int]], sampled) -> None:
        if len(rows) != len(group.seqs):
            raise RuntimeError(f"{group.request_id}: {len(rows)} of {len(group.seqs)} beams sampled in one step")
        samples = [(seq, *sampled.beam_candidates[r]) for seq, r in rows]
        beam_search_step(group, samples, self.block_manager, self.eos_token_ids, self.max_model_len)

    # ---- reports ----------------------------------------------------------------------------
    def kv_cache_usage(self) -> KVCacheUsage:
        return self.block_manager.usage()

    def swap_usage(self) -> KVCacheUsage:
        """The CPU pool that swapped-out requests' blocks live in."""
        return self.cpu_block_manager.usage()

    def stats(self) -> EngineStats:
        usage = self.block_manager.usage()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=len(self.scheduler.swapped),
            num_kv_blocks=usage.num_blocks,
            num_kv_blocks_used=usage.num_used_blocks,
            kv_cache_usage=usage.usage,
            prefix_cache_queries=self.block_manager.prefix_queried_tokens,
            prefix_cache_hits=self.block_manager.prefix_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            resident_bytes=dict(self.runner.model_runner.memory),
        )

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.inputs.apply_chat_template(messages)
