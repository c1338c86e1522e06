"""Compile Triton kernels for a GPU on a machine without one.

Every kernel launch the scenarios below make (through the public wrappers, with TRITON_INTERPRET=0)
is compiled instead of run: its own argument types, constexprs and launch options, for a CUDA
target, with Triton's bundled ptxas. This catches what the interpreter lets through (code the
compiler rejects, mixed dtypes in a dot, shared memory past the card's limit) in CPU-only CI.
The wrappers' outputs are garbage here: nothing runs.

Run in a fresh process, since Triton reads TRITON_INTERPRET when a kernel module is imported:
    TRITON_INTERPRET=0 python -m tests.triton_compile
It prints one line per distinct compiled kernel and exits 1 on the first failure.
"""

from __future__ import annotations

import os
import sys

# A100's opt-in shared memory per block (163 KiB): the smallest of the cards we target.
TARGET_ARCH, SHARED_LIMIT = 80, 163 * 1024


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        print("run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    target = GPUTarget("cuda", TARGET_ARCH, 32)
    seen: dict[tuple, int] = {}

    def compile_instead(self, *args, grid, warmup, **kwargs):
        values = dict(zip((p.name for p in self.params), args)) | kwargs
        signature, constexprs = {}, {}
        for p in self.params:
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", values[p.name]
            else:
                signature[p.name] = mangle_type(values[p.name])
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = (self.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))
        if key not in seen:
            seen[key] = triton.compile(ASTSource(self, signature, constexprs), target=target, options=options
                                       ).metadata.shared
            print(f"{self.__name__} {constexprs} {options}: {seen[key]} bytes of shared memory")
            if seen[key] > SHARED_LIMIT:
                raise RuntimeError(f"{self.__name__} needs {seen[key]} bytes of shared memory, over {SHARED_LIMIT}")

    JITFunction.run = compile_instead
    from kernels.triton_moe import fused_moe

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens, act in ((2, "silu"), (300, "gelu_pytorch_tanh")):  # 16- and 64-row tiles
            num_experts, top_k, hidden, inter = 8, 2, 256, 128
            x = torch.randn(tokens, hidden, generator=gen).to(dtype)
            w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen).to(dtype)
            w2 = torch.randn(num_experts, hidden, inter, generator=gen).to(dtype)
            weights, experts = torch.rand(tokens, num_experts, generator=gen).topk(top_k, dim=-1)
            fused_moe(x, w13, w2, weights, experts, act)
    print(f"{len(seen)} kernels compiled for sm_{TARGET_ARCH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
