"""Tensor parallelism over torch.distributed: one process per rank, rank 0 is the engine.

Rank 0 (the engine process, which holds the scheduler) starts ranks 1..L-1 on this machine as
spawned processes; ranks L..N-1, if any, join from other machines by running this module:

    MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 WORLD_SIZE=4 RANK=2 LOCAL_RANK=0 python -m engine.distributed

(the engine on 10.0.0.1 runs with tensor_parallel_size=4, tp_local_ranks=2, tp_master_port=29500;
every machine needs the model files at the same path, or `--model PATH`).

The rendezvous is a TCPStore served by rank 0; it also hands the engine settings to the other
ranks, so a remote rank needs nothing but the four variables above. Two process groups
(engine.parallel_state.init_groups):
  device group  gloo on CPU, NCCL on CUDA: the all-reduces and the logits gather of the forward.
                Its timeout (tp_timeout_s) bounds how long a stuck rank can stall a step.
  control group always gloo, no practical timeout: rank 0 broadcasts each call (a Worker method
                and its arguments) on it, and idle workers wait on it for as long as the engine idles.
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

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.memory import process_memory
from engine.parallel_state import init_groups, send_call
from engine.worker import JOIN_TIMEOUT_S, KEY_SETTINGS, SHUTDOWN, exit_rank, run_worker, spawned_worker

logger = logging.getLogger(__name__)


class TensorParallelError(EngineDeadError):
    """A tensor-parallel rank died, hung or failed; the engine cannot go on and must be restarted."""


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
        self.store.set(KEY_SETTINGS, json.dumps(settings))
        try:
            self._spawn_local_workers()
            self._wait_for_ranks()
            self.state = init_groups(config, self.store, rank=0, local_rank=0)
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
                target=spawned_worker,
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

    # -- calls -------------------------------------------------------------------------------
    def send(self, method: str, args: tuple) -> None:
        """Every other rank calls Worker.<method>(*args); rank 0 runs its own call after this."""
        send_call(self.state, method, args)

    def memory_report(self) -> dict[int, dict[str, int]]:
        """Rank -> resident memory after loading (peak VmHWM, VmRSS...), as each rank measured it."""
        report = {0: process_memory()}
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
                self.send(SHUTDOWN, ())
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


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.distributed`: one rank, until rank 0 stops it; the process then ends
    (exit_rank: os._exit(0)), so this is not a function to call inside another program."""
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
    exit_rank()


if __name__ == "__main__":
    main()
