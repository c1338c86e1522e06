"""The CPU block pool that swapped-out requests' K/V live in, and the copies in and out."""

from __future__ import annotations

import torch

from kernels.reference import swap_blocks


class SwapSpace:
    def __init__(self, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], num_blocks: int):
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.num_blocks = num_blocks
        self._cpu_k: list[torch.Tensor] | None = None
        self._cpu_v: list[torch.Tensor] | None = None

    def _allocate(self) -> None:
        # On first use: most engines never swap, and the pool may be gigabytes.
        pin = self.k_caches[0].is_cuda
        shape = (self.num_blocks, *self.k_caches[0].shape[1:])

        def make() -> torch.Tensor:
            return torch.empty(shape, dtype=self.k_caches[0].dtype, device="cpu", pin_memory=pin)

        self._cpu_k = [make() for _ in self.k_caches]
        self._cpu_v = [make() for _ in self.v_caches]

    def swap_out(self, mapping: list[tuple[int, int]]) -> None:
        """Copy device blocks to CPU blocks: mapping is (device block, CPU block) pairs."""
        if not mapping:
            return
        if self._cpu_k is None:
            self._allocate()
        pairs = torch.tensor(mapping, dtype=torch.int64)
        for src, dst in zip(self.k_caches + self.v_caches, self._cpu_k + self._cpu_v):
            swap_blocks(src, dst, pairs)

    def swap_in(self, mapping: list[tuple[int, int]]) -> None:
        """Copy CPU blocks back to device blocks: mapping is (CPU block, device block) pairs."""
        if not mapping:
            return
        pairs = torch.tensor(mapping, dtype=torch.int64)
        for src, dst in zip(self._cpu_k + self._cpu_v, self.k_caches + self.v_caches):
            swap_blocks(src, dst, pairs)
