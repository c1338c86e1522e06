"""Tensor parallelism over torch.distributed: one process per rank, rank 0 is the engine.

Rank 0 (the engine process, which holds the scheduler) starts ranks 1..L-1 on this machine as
spawned processes; ranks L..N-1, if any, join from other machines by running this module:

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 LOCAL_RANK=0 python -m engine.distributed

(the engine on 10.0.0.1 runs with tensor_parallel_size=4, tp_local_ranks=2, tp_master_port=29500;
every machine needs the model files at the same path, or `--model PATH`).

The rendezvous is a TCPStore served by rank 0; it also hands the engine settings to the other
ranks, so a remote rank needs nothing but the four variables above. Two process groups:
  device group  gloo on CPU, NCCL on CUDA: the all-reduces and the logits gather of the forward.
                Its timeout (tp_timeout_s) bounds how long a stuck rank can stall a step.
  control group always gloo, no practical timeout: rank 0 broadcasts each step's inputs on it,
                and idle workers wait on it between steps for as long as the engine idles.
A rank that dies closes its sockets, so every pending gloo operation with it fails at once; rank 0
also watches its local workers' process sentinels and kills the rest when one dies, so the
failure reaches whatever collective rank 0 is blocked in and it raises a clear error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attention import AttentionMetadata
from engine.config import EngineConfig

logger = logging.getLogger(__name__)

# How long rank 0 waits for every rank to reach the store (spawn + imports, or a person starting
# remote ranks), and how long a rank waits for the store itself.
JOIN_TIMEOUT_S = 600.0
# Idle workers wait for the next step on the control group; a year is "forever" to gloo.
CONTROL_TIMEOUT = datetime.timedelta(days=365)

_KEY_SETTINGS = "bento_llm/settings"
_CMD_STEP, _CMD_COPY, _CMD_SHUTDOWN, _CMD_SWAP_OUT, _CMD_SWAP_IN = 1, 2, 3, 4, 5
_HEADER_LEN = 8


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung or failed; the engine cannot go on and must be restarted."""


# ---- how a model is split ----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """What one rank holds: its query heads, KV heads (replicated when fewer than ranks), MLP
    columns and vocabulary rows. size 1 is the whole model."""

    rank: int
    size: int
    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    intermediate_size: int
    vocab_rows: int  # per rank, vocab_size rounded up to a multiple of size
    vocab_start: int
    vocab_size: int

    @classmethod
    def of(cls, config, rank: int = 0, size: int = 1) -> "ShardLayout":
        check_tensor_parallel(config, size)
        kv = config.num_kv_heads
        if kv >= size:
            num_kv, kv_start = kv // size, rank * (kv // size)
        else:  # size ranks share kv heads: ranks r*size/kv .. hold copies of head r
            num_kv, kv_start = 1, rank // (size // kv)
        rows = -(-config.vocab_size // size)
        return cls(
            rank=rank,
            size=size,
            num_heads=config.num_heads // size,
            num_kv_heads=num_kv,
            kv_head_start=kv_start,
            intermediate_size=config.intermediate_size // size,
            vocab_rows=rows,
            vocab_start=rank * rows,
            vocab_size=config.vocab_size,
        )


def check_tensor_parallel(config, size: int) -> None:
    """Refuse a split the model's shapes do not allow, before any process starts or weight loads."""
    if size == 1:
        return
    problems = []
    if config.num_heads % size:
        problems.append(f"num_attention_heads={config.num_heads} is not divisible by it")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"num_key_value_heads={kv} neither divides it nor is divisible by it")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size={config.intermediate_size} is not divisible by it")
    if problems:
        divisors = [n for n in range(1, config.num_heads + 1) if config.num_heads % n == 0
                    and (kv % n == 0 or n % kv == 0) and config.intermediate_size % n == 0]
        raise ValueError(
            f"tensor_parallel_size={size} cannot split this model: {'; '.join(problems)}. "
            f"Sizes that work: {divisors}"
        )


# ---- one rank's view of the groups ---------------------------------------------------------------
@dataclass
class ParallelState:
    rank: int
    world_size: int
    local_rank: int
    device_group: dist.ProcessGroup
    control_group: dist.ProcessGroup

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.device_group)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets every rank's x concatenated along the last dim; the others get None."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.device_group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control_group)
        return int(t.item())


def _init_groups(config: EngineConfig, store: dist.Store, rank: int, local_rank: int) -> ParallelState:
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process: one tensor-parallel engine per "
            "process (shut the other down first)"
        )
    cuda = config.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend="nccl" if cuda else "gloo",
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=config.tensor_parallel_size,
        timeout=datetime.timedelta(seconds=config.tp_timeout_s),
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelState(rank, config.tensor_parallel_size, local_rank, dist.group.WORLD, control)


def _peak_rss() -> dict[str, int]:
    """This process's resident memory from /proc: peak (VmHWM) and now (VmRSS, RssAnon), bytes."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


# ---- step inputs on the wire ------------------------------------------------------------------
def _pack_step(token_ids, positions, meta: AttentionMetadata, logits_indices) -> tuple[torch.Tensor, torch.Tensor]:
    num_seqs, max_blocks = meta.block_tables.shape
    header = torch.tensor(
        [_CMD_STEP, token_ids.numel(), num_seqs, max_blocks, logits_indices.numel(),
         meta.max_query_len, int(meta.all_decode), 0],
        dtype=torch.int64,
    )
    parts = [token_ids, positions, meta.slot_mapping, meta.block_tables.flatten(), meta.context_lens,
             meta.cu_query_lens, logits_indices]
    return header, torch.cat([p.to("cpu", torch.int64) for p in parts])


def _unpack_step(header: list[int], payload: torch.Tensor, device: torch.device):
    _, n_tok, n_seq, max_blocks, n_logits, max_query_len, all_decode, _ = header
    sizes = [n_tok, n_tok, n_tok, n_seq * max_blocks, n_seq, n_seq + 1, n_logits]
    ids, pos, slots, tables, ctx, cu, logits_idx = (p.to(device) for p in payload.split(sizes))
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables.view(n_seq, max_blocks).to(torch.int32),
        context_lens=ctx.to(torch.int32),
        cu_query_lens=cu.to(torch.int32),
        max_query_len=max_query_len,
        all_decode=bool(all_decode),
    )
    return ids, pos, meta, logits_idx


def _payload_len(header: list[int]) -> int:
    cmd, n_tok, n_seq, max_blocks, n_logits, _, _, n_copies = header
    if cmd == _CMD_STEP:
        return 3 * n_tok + n_seq * max_blocks + 2 * n_seq + 1 + n_logits
    if cmd in (_CMD_COPY, _CMD_SWAP_OUT, _CMD_SWAP_IN):
        return 2 * n_copies
    return 0


# ---- rank 0 ------------------------------------------------------------------------------------
class TensorParallelDriver:
    """Rank 0's side: starts and watches the workers, broadcasts each step, shuts them down."""

    def __init__(self, config: EngineConfig, max_model_len: int):
        self.config = config
        self.world_size = config.tensor_parallel_size
        self.procs: dict[int, mp.Process] = {}
        self.failure: str | None = None  # why the engine can no longer run, once it cannot
        self.closed = False
        self._lock = threading.Lock()
        if dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is already initialized in this process: one tensor-parallel engine per "
                "process (shut the other down first)"
            )
        local = config.tp_local_ranks or self.world_size
        if config.device == "cuda" and local > torch.cuda.device_count():
            raise ValueError(
                f"{local} tensor-parallel ranks on this machine need {local} CUDA devices, "
                f"{torch.cuda.device_count()} are visible; lower tensor_parallel_size or tp_local_ranks"
            )
        self.store = dist.TCPStore(
            config.tp_master_addr, config.tp_master_port, self.world_size, is_master=True,
            timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S), wait_for_workers=False,
        )
        settings = {"config": dataclasses.asdict(config), "max_model_len": max_model_len}
        self.store.set(_KEY_SETTINGS, json.dumps(settings))
        try:
            self._spawn_local_workers()
            self._wait_for_ranks()
            self.state = _init_groups(config, self.store, rank=0, local_rank=0)
        except BaseException:
            self.shutdown()
            raise
        self._watchdog = threading.Thread(target=self._watch, name="bento-llm-tp-watchdog", daemon=True)
        self._watchdog.start()

    def _spawn_local_workers(self) -> None:
        ctx = mp.get_context("spawn")
        local = self.config.tp_local_ranks or self.world_size
        for rank in range(1, local):
            proc = ctx.Process(
                target=_spawned_worker,
                args=(rank, rank, self.config.tp_master_addr, self.store.port, self.world_size, os.getpid()),
                name=f"bento-llm-tp-rank{rank}",
                daemon=True,  # multiprocessing's own exit handler reaps them if nothing else does
            )
            proc.start()
            self.procs[rank] = proc
        logger.info("tensor parallel: started ranks 1..%d here (pids %s), store on port %d%s",
                    local - 1, [p.pid for p in self.procs.values()], self.store.port,
                    f"; waiting for ranks {local}..{self.world_size - 1} to join" if local < self.world_size else "")

    def _wait_for_ranks(self) -> None:
        keys = [f"bento_llm/joined/{r}" for r in range(1, self.world_size)]
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self.store.check(keys):
            self._raise_if_worker_died("while starting")
            if time.monotonic() > deadline:
                missing = [k.rsplit("/", 1)[1] for k in keys if not self.store.check([k])]
                raise TensorParallelError(f"tensor-parallel ranks {missing} did not join within {JOIN_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def _watch(self) -> None:
        """When a local worker dies, kill the others: every collective rank 0 may be blocked in
        then fails at once (their sockets close) instead of waiting for a timeout."""
        sentinels = {p.sentinel: rank for rank, p in self.procs.items()}
        while sentinels and not self.closed:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if ready and not self.closed:
                rank = sentinels[ready[0]]
                self.procs[rank].join(0)
                with self._lock:
                    if self.failure is None:
                        self.failure = self._describe_death(rank)
                logger.error("%s; stopping the other ranks", self.failure)
                self._kill_workers()
                return

    def _describe_death(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)  # another thread may be reaping it: wait for its exit code to be recorded
        code = proc.exitcode
        if code is None:
            how = "died"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        detail = self._rank_error(rank)
        return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}" + (f": {detail}" if detail else "")

    def _rank_error(self, rank: int) -> str | None:
        key = f"bento_llm/error/{rank}"
        try:
            return self.store.get(key).decode() if self.store.check([key]) else None
        except Exception:  # the store itself may be gone at shutdown
            return None

    def _raise_if_worker_died(self, when: str) -> None:
        for rank, proc in self.procs.items():
            if not proc.is_alive():
                raise TensorParallelError(f"{self._describe_death(rank)} {when}")

    def guard(self, what: str, fn):
        """Run a collective step; any failure in it is a broken engine, reported clearly."""
        if self.failure is not None:
            self.shutdown()
            raise TensorParallelError(f"{self.failure}; the engine cannot run: start a new one")
        try:
            return fn()
        except Exception as e:
            raise self._fail(what, e) from e

    def _fail(self, what: str, cause: BaseException) -> TensorParallelError:
        # The socket error usually beats the watchdog; give the exit a moment to be reaped so the
        # message can say which rank died and how.
        deadline = time.monotonic() + 2.0
        while self.failure is None and time.monotonic() < deadline:
            dead = [r for r, p in self.procs.items() if not p.is_alive()]
            if dead:
                self.procs[dead[0]].join(0.5)
                with self._lock:
                    if self.failure is None:
                        self.failure = self._describe_death(dead[0])
                break
            time.sleep(0.05)
        with self._lock:
            if self.failure is None:
                errors = [f"rank {r}: {m}" for r in range(1, self.world_size) if (m := self._rank_error(r))]
                self.failure = f"a tensor-parallel rank failed ({'; '.join(errors) or cause})"
        self.shutdown()
        return TensorParallelError(f"{self.failure} during {what}; the engine cannot run: start a new one")

    # -- commands ----------------------------------------------------------------------------
    def _broadcast(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        dist.broadcast(header, 0, group=self.state.control_group)
        if payload is not None and payload.numel():
            dist.broadcast(payload, 0, group=self.state.control_group)

    def send_step(self, token_ids, positions, meta: AttentionMetadata, logits_indices) -> None:
        self._broadcast(*_pack_step(token_ids, positions, meta, logits_indices))

    def send_copy(self, mapping: list[tuple[int, int]], cmd: int = _CMD_COPY, num_cpu_blocks: int = 0) -> None:
        header = torch.tensor([cmd, num_cpu_blocks, 0, 0, 0, 0, 0, len(mapping)], dtype=torch.int64)
        self._broadcast(header, torch.tensor(mapping, dtype=torch.int64).flatten())

    def memory_report(self) -> dict[int, dict[str, int]]:
        """Rank -> resident memory after loading (peak VmHWM, VmRSS...), as each rank measured it."""
        report = {0: _peak_rss()}
        for r in range(1, self.world_size):
            key = f"bento_llm/memory/{r}"
            if self.store.check([key]):
                report[r] = json.loads(self.store.get(key))
        return report

    # -- the end -----------------------------------------------------------------------------
    def _kill_workers(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self.procs.values():
            proc.join(5)

    def shutdown(self) -> None:
        """Stop every rank and leave no process behind; safe to call twice, or after a failure."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        state = getattr(self, "state", None)
        if state is not None and self.failure is None:
            try:
                self._broadcast(torch.tensor([_CMD_SHUTDOWN] + [0] * (_HEADER_LEN - 1), dtype=torch.int64), None)
            except Exception as e:  # a rank already gone: nothing to tell it
                logger.debug("shutdown broadcast failed: %s", e)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        if state is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:
                logger.debug("destroy_process_group: %s", e)
        logger.info("tensor parallel: all %d ranks stopped", self.world_size)


class DriverModel:
    """Rank 0's model: broadcasts each forward's inputs so every rank runs the same step, then runs
    its own shard; returns the full-vocabulary logits (gathered from every rank's LM-head shard)."""

    def __init__(self, driver: TensorParallelDriver, model: torch.nn.Module):
        self.driver = driver
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def __call__(self, token_ids, positions, backend, meta, logits_indices) -> torch.Tensor:
        def step():
            self.driver.send_step(token_ids, positions, meta, logits_indices)
            return self.model(token_ids, positions, backend, meta, logits_indices)

        return self.driver.guard("a forward step", step)


class DriverBackend:
    """Rank 0's attention backend: the block copies the scheduler asks for run on every rank's
    cache. (Any other cache operation added to the backend must be mirrored here.)"""

    def __init__(self, driver: TensorParallelDriver, backend):
        self.driver = driver
        self.backend = backend

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            self.driver.guard("a block copy", lambda: self.driver.send_copy(mapping))
        self.backend.copy_blocks(mapping)


class DriverSwapSpace:
    """Rank 0's CPU swap pool: each rank swaps its own KV heads' blocks in and out of its own pool."""

    def __init__(self, driver: TensorParallelDriver, swap_space):
        self.driver = driver
        self.swap_space = swap_space

    def __getattr__(self, name: str):
        return getattr(self.swap_space, name)

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        self._send(_CMD_SWAP_OUT, mapping)
        self.swap_space.swap_out(mapping)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        self._send(_CMD_SWAP_IN, mapping)
        self.swap_space.swap_in(mapping)

    def _send(self, cmd: int, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            pool = self.swap_space.num_blocks
            self.driver.guard("a swap", lambda: self.driver.send_copy(mapping, cmd, pool))


# ---- ranks 1..N-1 -------------------------------------------------------------------------------
def _spawned_worker(rank: int, local_rank: int, addr: str, port: int, world_size: int, parent_pid: int) -> None:
    # A worker started here must not outlive the engine even if the engine is SIGKILLed (gloo
    # notices closed sockets too, but only while a collective is pending).
    def watch_parent():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    run_worker(rank, local_rank, addr, port, world_size)


def run_worker(rank: int, local_rank: int, addr: str, port: int, world_size: int, model: str | None = None) -> None:
    """Join rank 0's store, load this rank's shard, then run every step rank 0 broadcasts until
    it says stop. Any error is left in the store for rank 0 to report, and ends the process."""
    from engine.loader import load_model_source
    from engine.model_runner import ModelRunner
    from engine.models.llama import ModelConfig

    store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    try:
        settings = json.loads(store.get(_KEY_SETTINGS))
        config = EngineConfig(**settings["config"])
        if model is not None:
            config.model = model
        if config.tensor_parallel_size != world_size:
            raise ValueError(f"WORLD_SIZE={world_size}, but the engine runs tensor_parallel_size={config.tensor_parallel_size}")
        store.set(f"bento_llm/joined/{rank}", str(os.getpid()))
        state = _init_groups(config, store, rank, local_rank)
        source = load_model_source(config.model)
        model_config = ModelConfig.from_hf(source.hf_config, source.path)
        before = _peak_rss()
        runner = ModelRunner(config, source, model_config, settings["max_model_len"], parallel=state)
        del source
        after = _peak_rss()
        after["VmRSS_before_weights"] = before.get("VmRSS", 0)
        after["RssAnon_before_weights"] = before.get("RssAnon", 0)
        store.set(f"bento_llm/memory/{rank}", json.dumps(after))
        _serve(runner, state)
    except BaseException as e:
        try:
            store.set(f"bento_llm/error/{rank}", f"{type(e).__name__}: {e}"[:2000])
        except Exception:
            pass
        raise
    dist.destroy_process_group()


def _serve(runner, state: ParallelState) -> None:
    from engine.swap_space import SwapSpace

    header = torch.empty(_HEADER_LEN, dtype=torch.int64)
    swap_space = None  # like rank 0's, allocated on first use
    while True:
        dist.broadcast(header, 0, group=state.control_group)
        values = header.tolist()
        payload = torch.empty(_payload_len(values), dtype=torch.int64)
        if payload.numel():
            dist.broadcast(payload, 0, group=state.control_group)
        if values[0] == _CMD_STEP:
            ids, pos, meta, logits_idx = _unpack_step(values, payload, runner.device)
            runner.model(ids, pos, runner.backend, meta, logits_idx)
        elif values[0] == _CMD_COPY:
            runner.backend.copy_blocks([tuple(p) for p in payload.view(-1, 2).tolist()])
        elif values[0] in (_CMD_SWAP_OUT, _CMD_SWAP_IN):
            if swap_space is None:
                swap_space = SwapSpace(runner.k_caches, runner.v_caches, values[1])
            mapping = [tuple(p) for p in payload.view(-1, 2).tolist()]
            (swap_space.swap_out if values[0] == _CMD_SWAP_OUT else swap_space.swap_in)(mapping)
        elif values[0] == _CMD_SHUTDOWN:
            return
        else:
            raise RuntimeError(f"unknown command {values[0]} from rank 0")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run tensor-parallel ranks of a bento-llm engine on this machine. Rendezvous from "
        "the usual variables: MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK (default 0)."
    )
    parser.add_argument("--model", help="the model's path on this machine, if not the engine's")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK')}] %(levelname)s %(name)s: %(message)s")
    try:
        env = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    except KeyError as e:
        parser.error(f"set {e.args[0]} (and MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK)")
    rank = int(env["RANK"])
    if not 1 <= rank < int(env["WORLD_SIZE"]):
        parser.error(f"RANK must be in 1..WORLD_SIZE-1 (rank 0 is the engine), got {rank}")
    run_worker(rank, int(os.environ.get("LOCAL_RANK", 0)), env["MASTER_ADDR"], int(env["MASTER_PORT"]),
               int(env["WORLD_SIZE"]), model=args.model)


if __name__ == "__main__":
    main()
