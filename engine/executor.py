"""Runs each step on every rank: the engine's one handle on the model.

Tensor parallel size 1: the worker lives in this process and a call is a method call.
Larger: this process is rank 0 and holds a worker too; engine.distributed starts the others,
and every call is broadcast (Worker method name and arguments) before rank 0 runs its own, so
all ranks enter the step's collectives together. A new per-step operation is a Worker method
called through run_all; it needs no opcode, no wire format and no proxy.
"""

from __future__ import annotations

import weakref

import torch

from engine.config import EngineConfig
from engine.distributed import TensorParallelDriver
from engine.loader import ModelSource
from engine.model_runner import ModelRunner, StepResult
from engine.models.config import ModelConfig
from engine.sampler import Sampler
from engine.scheduler import SchedulerOutput
from engine.worker import Worker


class Executor:
    def __init__(self, config: EngineConfig, source: ModelSource, model_config: ModelConfig, max_model_len: int):
        self.driver: TensorParallelDriver | None = None
        parallel = None
        if config.tensor_parallel_size > 1:
            model_config.check_tensor_parallel(config.tensor_parallel_size)  # before any process starts
            self.driver = TensorParallelDriver(config, max_model_len)
            parallel = self.driver.state
        try:
            self.worker = Worker(config, source, model_config, max_model_len, parallel)
        except BaseException:
            self.shutdown()
            raise
        if self.driver is not None:
            # A forgotten engine must not leave its ranks running (also runs at interpreter exit).
            weakref.finalize(self, self.driver.shutdown)
        self.num_cpu_blocks = 0

    @property
    def model_runner(self) -> ModelRunner:
        """Rank 0's runner."""
        return self.worker.runner

    # Rank 0's view of the model, for logs and tests.
    @property
    def model(self) -> torch.nn.Module:
        return self.model_runner.model

    @property
    def backend(self):
        return self.model_runner.backend

    @property
    def dtype(self) -> torch.dtype:
        return self.model_runner.dtype

    @property
    def num_blocks(self) -> int:
        return self.model_runner.num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.model_runner.bytes_per_block

    @property
    def sampler(self) -> Sampler:
        return self.model_runner.sampler

    def run_all(self, method: str, *args):
        """Worker.<method>(*args) on every rank; rank 0's result."""
        if self.driver is None:
            return getattr(self.worker, method)(*args)

        def call():
            self.driver.send(method, args)
            return getattr(self.worker, method)(*args)

        return self.driver.guard(method, call)

    @torch.inference_mode()  # the sampler edits the logits in place (masks, penalties)
    def execute(self, schedule: SchedulerOutput) -> StepResult:
        if schedule.block_copies:
            self.run_all("copy_blocks", schedule.block_copies)
        step = self.model_runner.prepare(schedule)
        logits: torch.Tensor = self.run_all("execute_model", step.inputs)
        return self.model_runner.sample(logits, schedule, step)

    # The engine's swap pool: every rank swaps its own KV heads' blocks.
    def make_swap_space(self, num_cpu_blocks: int) -> "Executor":
        self.num_cpu_blocks = num_cpu_blocks
        return self

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            self.run_all("swap_out", mapping, self.num_cpu_blocks)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        if mapping:
            self.run_all("swap_in", mapping, self.num_cpu_blocks)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks (nothing to do in one process); safe to call twice."""
        if self.driver is not None:
            self.driver.shutdown()
