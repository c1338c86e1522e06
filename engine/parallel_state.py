"""One rank's view of tensor parallelism, and the shard maths every layer uses.

A leaf module (it imports only torch), so layers, models, the runner and the executor can all
read it without importing each other. A model built without a ParallelState is the
single-process model: world size 1, no collectives.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def rank_and_size(parallel: ParallelState | None) -> tuple[int, int]:
    return (0, 1) if parallel is None else (parallel.rank, parallel.world_size)


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, count) on this rank: split when there are at least as many heads as
    ranks, else each head replicated on size / num_kv_heads consecutive ranks."""
    if num_kv_heads >= size:
        per_rank = num_kv_heads // size
        return rank * per_rank, per_rank
    return rank // (size // num_kv_heads), 1


def check_tensor_parallel(split_dims: dict[str, int], num_kv_heads: int, size: int) -> None:
    """Refuse a split the model's shapes do not allow, before any process starts or weight
    loads. split_dims: config field -> a size every rank takes an equal part of."""
    if size == 1:
        return

    def fits(n: int) -> bool:
        return all(d % n == 0 for d in split_dims.values()) and (num_kv_heads % n == 0 or n % num_kv_heads == 0)

    if fits(size):
        return
    problems = [f"{name}={d} is not divisible by it" for name, d in split_dims.items() if d % size]
    if num_kv_heads % size and size % num_kv_heads:
        problems.append(f"num_key_value_heads={num_kv_heads} neither divides it nor is divisible by it")
    bound = min(split_dims.values(), default=size)
    divisors = [n for n in range(1, bound + 1) if fits(n)]
    raise ValueError(f"tensor_parallel_size={size} cannot split this model: {'; '.join(problems)}. Sizes that work: {divisors}")


# ---- reading a shard of a checkpoint tensor ------------------------------------------------
# A weight is a torch.Tensor, or safetensors' lazy slice of one (loader.iter_weight_slices):
# indexing the slice reads only those rows or columns from the file.


def weight_shape(weight) -> tuple[int, ...]:
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else tuple(weight.get_shape())


def read_part(weight, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start + size) of a weight, as a tensor."""
    if isinstance(weight, torch.Tensor):
        return weight.narrow(dim, start, size)
    return weight[start : start + size] if dim == 0 else weight[:, start : start + size]


def read_all(weight) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight[:]


# ---- the process groups ----------------------------------------------------------------------
# Idle workers wait for the next call on the control group; a year is "forever" to gloo.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


def init_groups(config, store: dist.Store, rank: int, local_rank: int) -> ParallelState:
    """Two groups: the device group (gloo on CPU, NCCL on CUDA) for the forward's collectives,
    bounded by tp_timeout_s; the control group (gloo, no practical timeout) for rank 0's calls."""
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


def send_call(state: ParallelState, method: str, args: tuple) -> None:
    """Rank 0: tell every other rank to call Worker.<method>(*args)."""
    dist.broadcast_object_list([method, args], src=0, group=state.control_group)


def receive_call(state: ParallelState) -> tuple[str, tuple]:
    message = [None, None]
    dist.broadcast_object_list(message, src=0, group=state.control_group)
    return message[0], message[1]
