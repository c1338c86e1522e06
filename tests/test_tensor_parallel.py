"""Tensor parallelism over torch.distributed (gloo on CPU): the same greedy tokens as one process,
split KV heads and replicated ones, a clear and quick failure when a rank dies, no process left."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine import DEFAULT_MODEL, LLM, EngineConfig, SamplingParams
from engine.llm_engine import EngineDeadError, LLMEngine
from engine.loader import load_model_source
from engine.settings import engine_config_from_env
from tests.greedy_reference import NEAR_TIE_RTOL, hf_greedy
from tests.helpers import load_hf_reference, make_tiny_llama
from tests.model_factories import make_tiny_checkpoint
from tests.test_correctness import run_staggered

MAX_TOKENS = 16
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "1, 2, 3, 4,",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def engine_children() -> list[psutil.Process]:
    """Processes this test process started, but for multiprocessing's shared resource tracker
    (one per interpreter, it exits with it)."""
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


class OneTensorParallelEngine:
    """The tensor-parallel engine the tests share, one at a time: a spawned rank's start-up is
    ~8-15 s, so the engine a test asked for stays up for the next test that asks for the same key
    (each such test states, at its key, which checks the engine serves). torch.distributed holds
    one process group per process, so asking for another key shuts the held engine down first; a
    test that breaks its engine (kills a rank, shuts it down itself) takes it, and whoever asks
    next gets a fresh one, whatever order the tests run in."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.held = None  # what start() returned: an LLM, or (LLM, the rank started by hand)
        self._close = None

    def get(self, key: str, start, close=lambda llm: llm.shutdown()):
        if key != self.key or self._dead():  # a test that failed half way may leave it dead
            self.close()
            self.held, self._close, self.key = start(), close, key
        return self.held

    def take(self, key: str, start, close=lambda llm: llm.shutdown()):
        held = self.get(key, start, close)
        self.key, self.held, self._close = None, None, None
        return held

    def _dead(self) -> bool:
        driver = self._llm().engine.runner.driver
        return driver.closed or driver.failure is not None

    def _llm(self) -> LLM:
        return self.held[0] if isinstance(self.held, tuple) else self.held

    def pids(self) -> set[int]:
        """The processes the held engine owns: its spawned ranks, a rank started by hand."""
        if self.held is None:
            return set()
        by_hand = self.held[1:] if isinstance(self.held, tuple) else ()
        return {proc.pid for proc in [*self._llm().engine.runner.driver.procs.values(), *by_hand]}

    def close(self) -> None:
        if self.held is not None:
            held, close = self.held, self._close
            self.key, self.held, self._close = None, None, None
            close(held)


def processes_left(allowed: set[int]) -> list[psutil.Process]:
    """This process's children that are not (under) the allowed ones, waited for up to 10 s."""
    deadline = time.monotonic() + 10
    while True:
        left = []
        for child in engine_children():
            try:
                if child.pid not in allowed and not {p.pid for p in child.parents()} & allowed:
                    left.append(child)
            except psutil.NoSuchProcess:
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tp_engines():
    engines = OneTensorParallelEngine()
    yield engines
    engines.close()
    assert processes_left(set()) == [], "a tensor-parallel rank outlived its engine"


@pytest.fixture(autouse=True)
def no_process_left_behind(tp_engines):
    """After every test, no process is left but the ranks of the engine still shared."""
    yield
    assert processes_left(tp_engines.pids()) == [], "a tensor-parallel rank outlived its engine"


def assert_same_greedy(tp_outs, single_outs, reference) -> None:
    """TP=N picks TP=1's tokens; where they part, it must be a near-tie of the reference logits,
    and at most one sequence may part (near-ties within 1e-4 are rare at these weights: a TP
    engine whose every sequence parts at a "near-tie" is not breaking ties, it is wrong)."""
    parted = 0
    for tp, one in zip(tp_outs, single_outs):
        a, b = tp.outputs[0].token_ids, one.outputs[0].token_ids
        assert len(a) == len(b) == MAX_TOKENS
        if a == b:
            continue
        parted += 1
        assert parted <= 1, "more than one sequence parted from one process's tokens"
        pos = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        ref_tokens, ref_logits = reference(tp.prompt_token_ids)
        assert ref_tokens[:pos] == a[:pos], "diverged after the reference did: cannot judge the tie"
        x, y = float(ref_logits[pos][a[pos]]), float(ref_logits[pos][b[pos]])
        assert abs(x - y) <= NEAR_TIE_RTOL * max(abs(x), abs(y)), f"token {pos}: {a[pos]} vs {b[pos]}, not a near-tie"


def hf_reference(path: str):
    """Prompt ids -> transformers' greedy tokens and logits. The model is loaded on the first
    call only: assert_same_greedy asks only where a sequence parted from one process's tokens
    (the default model's float32 load is seconds, for nothing when all agree)."""
    model = functools.cache(lambda: load_hf_reference(path))
    return lambda ids: hf_greedy(model(), ids, MAX_TOKENS)


def check_against_one_process(tp_engines, key: str | None, path: str, tp: int, **engine_args) -> LLM:
    """The TP engine for key (started with engine_args, or the one held for key), checked on
    PROMPTS against one process with the same settings. Without a holder (tp_engines None: a
    test outside this module) a fresh engine is started, and its caller shuts it down."""
    single = LLM(path, **engine_args).generate(PROMPTS, GREEDY, use_tqdm=False)
    start = lambda: LLM(path, tensor_parallel_size=tp, **engine_args)  # noqa: E731
    llm = tp_engines.get(key, start) if tp_engines is not None else start()
    assert_same_greedy(llm.generate(PROMPTS, GREEDY, use_tqdm=False), single, hf_reference(path))
    return llm


# Four KV heads split two per rank; the engine then serves the killed-worker check (which takes it).
FOUR_KV_HEADS = dict(num_attention_heads=4, num_key_value_heads=4)


def test_tp2_splits_four_kv_heads_and_matches_one_process(tmp_path, tp_engines):
    path = make_tiny_llama(tmp_path, **FOUR_KV_HEADS)
    llm = check_against_one_process(tp_engines, "four-kv-heads", path, 2, num_kv_blocks=256)
    runner = llm.engine.runner.model_runner
    assert runner.num_local_kv_heads == 2 and runner.k_caches[0].shape[2] == 2
    assert len(llm.engine.runner.driver.procs) == 1


def test_a_killed_worker_fails_generate_within_30_s_and_leaves_no_process(tmp_path, tp_engines):
    # The four-KV-head engine above, taken: this test kills it (or a fresh one, run alone).
    path = make_tiny_llama(tmp_path, **FOUR_KV_HEADS)
    llm = tp_engines.take("four-kv-heads", lambda: LLM(path, num_kv_blocks=256, tensor_parallel_size=2))
    worker = llm.engine.runner.driver.procs[1]
    killed_at = []
    tokens_before = llm.engine.generation_tokens

    def kill_mid_run():
        while llm.engine.generation_tokens < tokens_before + 8:  # decoding is under way
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        os.kill(worker.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_run, daemon=True)
    killer.start()
    long_run = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    # A dead rank is a dead engine (TensorParallelError is an EngineDeadError): the call raises.
    with pytest.raises(EngineDeadError, match=rf"rank 1 \(pid {worker.pid}\) was killed by SIGKILL"):
        llm.generate(PROMPTS, long_run, use_tqdm=False)
    assert killed_at and time.monotonic() - killed_at[0] < 30
    killer.join()
    assert not worker.is_alive()
    # The engine stays down, saying so at once, rather than hanging on the next request.
    with pytest.raises(EngineDeadError, match="start a new one"):
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    llm.shutdown()


def test_tp2_replicates_a_single_kv_head_and_matches_one_process(tmp_path, tp_engines):
    path = make_tiny_llama(tmp_path, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)
    llm = check_against_one_process(tp_engines, "one-kv-head", path, 2, num_kv_blocks=64)
    assert llm.engine.runner.model_runner.num_local_kv_heads == 1


def test_tp2_phi3_fused_qkv_and_gate_up_checkpoint_matches_one_process(tmp_path, tp_engines):
    # Phi-3 ships q/k/v and gate/up already fused: each rank cuts its heads and columns out of
    # every block of the fused tensor.
    path = make_tiny_checkpoint(tmp_path, "Phi3Config", num_attention_heads=4, num_key_value_heads=2)
    check_against_one_process(tp_engines, "phi3", path, 2, num_kv_blocks=64)


def test_tp2_gemma2_sliding_window_and_soft_caps_match_one_process(tmp_path, tp_engines):
    # Gemma 2: an 8-token sliding layer beside a global one, under prompts and decodes longer than
    # the window; each rank soft-caps its own heads' scores, and the final logit cap applies to
    # the gathered vocabulary. GELU-tanh MLP, (1 + weight) norms and the embedding scale split too.
    path = make_tiny_checkpoint(tmp_path, "Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"])
    llm = check_against_one_process(tp_engines, "gemma2", path, 2, num_kv_blocks=64)
    runner = llm.engine.runner.model_runner
    assert runner.num_local_kv_heads == 1
    attns = [layer.self_attn.attn for layer in runner.model.layers]
    assert [(a.num_heads, a.sliding_window, a.soft_cap) for a in attns] == [(2, 8, 5.0), (2, None, 5.0)]


def test_tp2_moe_with_a_shared_expert_matches_one_process(tmp_path, tp_engines):
    # Qwen2-MoE: every expert's intermediate columns split across ranks, the shared expert like a
    # dense MLP, one dense layer (mlp_only_layers) beside a sparse one.
    path = make_tiny_checkpoint(tmp_path, "Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, shared_expert_intermediate_size=64, mlp_only_layers=[1])
    check_against_one_process(tp_engines, "qwen2-moe", path, 2, num_kv_blocks=64)


# Qwen2 (q/k/v biases, split with their heads) on 6 blocks, its rank 1 started by hand: the
# staggered-arrivals check runs on it, then the rendezvous check takes it.
QWEN2 = dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2)
QWEN2_BLOCKS = 6


def start_with_a_rank_by_hand(path: str, **engine_args):
    """What a second machine runs: `python -m engine.distributed` with MASTER_ADDR, MASTER_PORT,
    WORLD_SIZE and RANK; the engine starts only its own ranks (tp_local_ranks). -> (LLM, rank 1)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK="1")
    remote = subprocess.Popen([sys.executable, "-m", "engine.distributed"], env=env, cwd=Path(__file__).parents[1])
    try:
        return LLM(path, tensor_parallel_size=2, tp_local_ranks=1, tp_master_port=port, **engine_args), remote
    except BaseException:
        stop_rank_by_hand(None, remote)
        raise


def stop_rank_by_hand(llm, remote) -> None:
    try:
        if llm is not None:
            llm.shutdown()
    finally:
        remote.kill()
        remote.wait()


def qwen2_with_a_rank_by_hand(tp_engines, path: str, take: bool = False):
    fetch = tp_engines.take if take else tp_engines.get
    return fetch("qwen2-by-hand", lambda: start_with_a_rank_by_hand(path, num_kv_blocks=QWEN2_BLOCKS),
                 lambda held: stop_rank_by_hand(*held))


def test_tp2_qkv_bias_staggered_arrivals_and_preemption_match_one_process(tmp_path, tp_engines):
    # 6 blocks force recompute preemption while requests arrive mid-decode, so chunks, decodes and
    # re-prefills all cross the broadcast.
    path = make_tiny_llama(tmp_path, **QWEN2)
    single = run_staggered(LLMEngine(model=path, num_kv_blocks=QWEN2_BLOCKS), PROMPTS, every=1, params=GREEDY)
    engine = qwen2_with_a_rank_by_hand(tp_engines, path)[0].engine
    preemptions = engine.scheduler.num_preemptions
    outs = run_staggered(engine, PROMPTS, every=1, params=GREEDY)
    assert engine.scheduler.num_preemptions > preemptions
    assert_same_greedy(outs, single, hf_reference(path))


def test_a_rank_started_by_hand_joins_through_the_rendezvous_variables(tmp_path, tp_engines):
    """The engine above, taken (this test shuts it down): rank 1 is `python -m engine.distributed`
    started with the rendezvous variables, and exits cleanly when told to stop."""
    path = make_tiny_llama(tmp_path, **QWEN2)
    single = LLM(path, num_kv_blocks=64).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm, remote = qwen2_with_a_rank_by_hand(tp_engines, path, take=True)
    try:
        assert llm.engine.runner.driver.procs == {}  # nothing started here
        assert_same_greedy(llm.generate(PROMPTS, GREEDY, use_tqdm=False), single, hf_reference(path))
        llm.shutdown()
        assert remote.wait(timeout=30) == 0  # told to stop, it exits cleanly
    finally:
        stop_rank_by_hand(None, remote)


# int4 on four KV heads, 4 blocks, swap preemption: the int4 check runs on it, then the swap check
# takes it (both against one process with the same int4 settings).
INT4_SWAP = dict(num_kv_blocks=4, max_num_batched_tokens=64, preemption_mode="swap", quantization="int4",
                 dtype="float32")


def test_tp2_int4_ranks_quantize_their_own_shards_and_match_one_process(tmp_path, tp_engines):
    """Each rank quantizes its shard at load: column-parallel rows and row-parallel column halves
    (split on group boundaries) hold the same groups as one process, so the tokens match."""
    path = make_tiny_llama(tmp_path, **FOUR_KV_HEADS)
    llm = check_against_one_process(tp_engines, "int4-swap", path, 2, **INT4_SWAP)
    model = llm.engine.runner.model
    assert model.layers[0].mlp.down_proj.quantized is not None


def test_tp2_swapped_out_and_back_in_blocks_match_one_process(tmp_path, tp_engines):
    # 4 blocks for four 36-token sequences: requests are swapped to each rank's CPU pool and back.
    path = make_tiny_llama(tmp_path, **FOUR_KV_HEADS)

    def run(engine: LLMEngine) -> list:
        for i in range(4):
            engine.add_request(f"r{i}", list(range(10 + i, 30 + i)), GREEDY)
        done = {}
        while engine.has_unfinished_requests():
            done.update((out.request_id, out) for out in engine.step() if out.finished)
        return [done[f"r{i}"] for i in range(4)]

    single = run(LLMEngine(model=path, **{**INT4_SWAP, "num_kv_blocks": 64}))
    engine = tp_engines.take("int4-swap", lambda: LLM(path, tensor_parallel_size=2, **INT4_SWAP)).engine
    try:
        swap_outs = engine.scheduler.num_swap_outs
        outs = run(engine)
        assert engine.scheduler.num_swap_outs > swap_outs
        assert_same_greedy(outs, single, hf_reference(path))
    finally:
        engine.runner.shutdown()


@pytest.mark.slow
def test_tp3_default_model_matches_one_process_and_each_rank_holds_a_third(default_float32_llm, tp_engines):
    # SmolLM2-135M: 9 query heads, 3 KV heads -> 3 and 1 per rank. In float32, the mode where the
    # near-tie rule (1e-4 of the reference logits) holds: in bfloat16 (dtype auto on AMX CPUs) the
    # ranks' partial sums round differently from one process's whole sums by more than that.
    prompts = PROMPTS[:2]
    single = default_float32_llm.generate(prompts, GREEDY, use_tqdm=False)
    llm = tp_engines.take("default-tp3", lambda: LLM(DEFAULT_MODEL, num_kv_blocks=32, dtype="float32",
                                                     tensor_parallel_size=3))
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        source = load_model_source(DEFAULT_MODEL)
        assert_same_greedy(outs, single, hf_reference(str(Path(source.weight_files[0]).parent)))

        model = llm.engine.runner.model_runner.model
        shard_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        total = sum(
            torch.Size(shape).numel() * 4 for header in source.weight_headers.values() for _, shape in header.values()
        )
        # Norms are the only replicated weights; padding-free vocab 49152 splits evenly.
        assert shard_bytes < total / 3 * 1.01, (shard_bytes, total)
        print(f"\nweights: {total / 2**20:.0f} MiB float32 in all, {shard_bytes / 2**20:.0f} MiB on rank 0")
        for rank, mem in sorted(llm.engine.runner.driver.memory_report().items()):
            print(f"rank {rank}: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()))
    finally:
        llm.shutdown()


def test_indivisible_head_counts_fail_before_any_process_or_weight(tmp_path, monkeypatch, tp_engines):
    path = make_tiny_llama(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    from engine.models.llama import LlamaForCausalLM

    def never(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(LlamaForCausalLM, "load_weights", never)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 cannot split.*num_attention_heads=4.*Sizes that work: \[1, 2, 4\]"):
        LLM(path, tensor_parallel_size=3)
    assert processes_left(tp_engines.pids()) == []


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(tensor_parallel_size=0), "at least 1"),
        (dict(tensor_parallel_size=2, tp_local_ranks=3), "tp_local_ranks"),
        (dict(tensor_parallel_size=2, tp_local_ranks=1), "tp_master_port must be set"),
        (dict(tensor_parallel_size=2, tp_timeout_s=0), "tp_timeout_s"),
        (dict(tensor_parallel_size=2, device="cuda:1"), "'cpu' or 'cuda'"),
    ],
)
def test_bad_tensor_parallel_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**settings)


def test_tensor_parallel_size_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("BENTO_LLM_TENSOR_PARALLEL_SIZE", "2")
    monkeypatch.setenv("BENTO_LLM_TP_MASTER_PORT", "29555")
    config = engine_config_from_env()
    assert (config.tensor_parallel_size, config.tp_master_port) == (2, 29555)
