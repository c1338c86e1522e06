"""One rank: its model runner and swap pool, and, on ranks 1..N-1, the loop that runs whatever
rank 0's executor sends.

Rank 0 broadcasts (method name, arguments) on the control group; every rank calls that method
of its Worker. A new per-step operation is a new Worker method, nothing more.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.loader import load_model_source
from engine.memory import process_memory
from engine.model_runner import ModelRunner
from engine.models.config import ModelConfig
from engine.parallel_state import ParallelState, init_groups, receive_call
from engine.step_inputs import StepInputs
from engine.swap_space import SwapSpace

logger = logging.getLogger(__name__)

KEY_SETTINGS = "bento_llm/settings"
# How long rank 0 waits for every rank to reach the store (spawn + imports, or a person starting
# remote ranks), and how long a rank waits for the store itself.
JOIN_TIMEOUT_S = 600.0
SHUTDOWN = "shutdown"


class Worker:
    def __init__(self, config: EngineConfig, source, model_config: ModelConfig, max_model_len: int,
                 parallel: ParallelState | None = None):
        self.runner = ModelRunner(config, source, model_config, max_model_len, parallel)
        self.swap_space: SwapSpace | None = None

    def execute_model(self, inputs: StepInputs) -> torch.Tensor | None:
        return self.runner.execute_model(inputs)

    def copy_blocks(self, mapping: list[tuple[int, int]]) -> None:
        self.runner.copy_blocks(mapping)

    def swap_out(self, mapping: list[tuple[int, int]], num_cpu_blocks: int) -> None:
        self._swap_space(num_cpu_blocks).swap_out(mapping)

    def swap_in(self, mapping: list[tuple[int, int]], num_cpu_blocks: int) -> None:
        self._swap_space(num_cpu_blocks).swap_in(mapping)

    def _swap_space(self, num_cpu_blocks: int) -> SwapSpace:
        # Every rank swaps its own KV heads into its own pool (allocated on first use).
        if self.swap_space is None:
            self.swap_space = SwapSpace(self.runner.k_caches, self.runner.v_caches, num_cpu_blocks)
        return self.swap_space


def spawned_worker(rank: int, local_rank: int, addr: str, port: int, world_size: int, parent_pid: int) -> None:
    # A worker started here must not outlive the engine even if the engine is SIGKILLed (gloo
    # notices closed sockets too, but only while a collective is pending).
    def watch_parent():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    run_worker(rank, local_rank, addr, port, world_size)
    exit_rank()


def exit_rank() -> None:
    """End a rank's process once run_worker has returned (its process group destroyed): flush, then
    os._exit(0), skipping the interpreter's teardown. There a C++ thread of torch's distributed
    backend that is still joinable could abort the process with SIGABRT ("terminate called without
    an active exception", no Python frame left): 3 of 9 runs of a rank started by hand on a loaded
    2-vCPU machine, tests/test_tensor_parallel.py. Nothing this process owns needs the teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def run_worker(rank: int, local_rank: int, addr: str, port: int, world_size: int, model: str | None = None) -> None:
    """Join rank 0's store, load this rank's shard, then run every call rank 0 broadcasts until
    it says stop. Any error is left in the store for rank 0 to report, and ends the process."""
    store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    try:
        settings = json.loads(store.get(KEY_SETTINGS))
        config = EngineConfig(**settings["config"])
        if model is not None:
            config.model = model
        if config.tensor_parallel_size != world_size:
            raise ValueError(f"WORLD_SIZE={world_size}, but the engine runs tensor_parallel_size={config.tensor_parallel_size}")
        store.set(f"bento_llm/joined/{rank}", str(os.getpid()))
        state = init_groups(config, store, rank, local_rank)
        source = load_model_source(config.model)
        model_config = ModelConfig.from_hf(source.hf_config, source.path)
        before = process_memory()
        worker = Worker(config, source, model_config, settings["max_model_len"], parallel=state)
        del source
        after = process_memory()
        after["VmRSS_before_weights"] = before.get("VmRSS", 0)
        after["RssAnon_before_weights"] = before.get("RssAnon", 0)
        store.set(f"bento_llm/memory/{rank}", json.dumps(after))
        while True:
            method, args = receive_call(state)
            if method == SHUTDOWN:
                break
            getattr(worker, method)(*args)
    except BaseException as e:
        try:
            store.set(f"bento_llm/error/{rank}", f"{type(e).__name__}: {e}"[:2000])
        except Exception:
            pass
        raise
    dist.destroy_process_group()
