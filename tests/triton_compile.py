"""Compile Triton kernels for a GPU on a machine without one.

Every kernel launch the scenarios below make (through the public wrappers, with TRITON_INTERPRET=0)
is compiled instead of run: its own argument types, constexprs and launch options, for a CUDA
target. This catches what the interpreter lets through in CPU-only CI: code the compiler rejects
(the interpreter runs Python, so a `return` inside a constexpr branch skips the rest; the
compiler still generates it), dots of mixed dtypes, and the half-precision paths the
interpreter never takes (it computes every dot in fp32). The wrappers' outputs are garbage:
nothing runs.

By default the pipeline stops after Triton's GPU IR (ttgir: the frontend, types and layouts, a
few seconds for every kernel). --full runs it to the cubin with Triton's bundled ptxas and fails
on shared memory past the smallest target card's limit (minutes, cold).

Run in a fresh process, since Triton reads TRITON_INTERPRET when a kernel module is imported:
    TRITON_INTERPRET=0 python -m tests.triton_compile [--full]
It prints one line per distinct kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

# A100's opt-in shared memory per block (163 KiB): the smallest of the cards we target.
TARGET_ARCH, SHARED_LIMIT = 80, 163 * 1024


class ReachedLowering(Exception):
    """Raised where the pipeline would lower ttgir to LLVM IR: the frontend and layouts passed."""


def stop_after_ttgir(*args):
    """A knobs.runtime.add_stages_inspection_hook: called without arguments it names itself for the
    cache key; with (backend, stages, options, language, capability) it makes the stage after
    ttgir raise ReachedLowering, so nothing is lowered or cached."""
    if not args:
        return "stop-after-ttgir", "stop-after-ttgir"

    def stop(src, metadata):
        raise ReachedLowering

    args[1]["llir"] = stop


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        print("run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    full = argv == ["--full"]
    if argv and not full:
        print("usage: python -m tests.triton_compile [--full]", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction, mangle_type

    if not full:
        knobs.runtime.add_stages_inspection_hook = stop_after_ttgir
    target = GPUTarget("cuda", TARGET_ARCH, 32)
    seen: set[tuple] = set()

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
        if key in seen:
            return
        seen.add(key)
        try:
            shared = triton.compile(ASTSource(self, signature, constexprs), target=target, options=options
                                    ).metadata.shared
        except ReachedLowering:
            print(f"{self.__name__} {constexprs} {options}")
            return
        print(f"{self.__name__} {constexprs} {options}: {shared} bytes of shared memory")
        if shared > SHARED_LIMIT:
            raise RuntimeError(f"{self.__name__} needs {shared} bytes of shared memory, over {SHARED_LIMIT}")

    JITFunction.run = compile_instead
    for scenario in (moe_launches, attention_launches):
        scenario(torch)
    print(f"{len(seen)} kernels compiled for sm_{TARGET_ARCH}" + ("" if full else " (through ttgir)"))
    return 0


def moe_launches(torch) -> None:
    from kernels.triton_moe import fused_moe

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tokens, act in ((2, "silu"), (300, "gelu_pytorch_tanh")):  # 16- and 64-row tiles
            num_experts, top_k, hidden, inter = 8, 2, 256, 128
            x = torch.zeros(tokens, hidden, dtype=dtype)
            w13 = torch.zeros(num_experts, 2 * inter, hidden, dtype=dtype)
            w2 = torch.zeros(num_experts, hidden, inter, dtype=dtype)
            weights, experts = torch.rand(tokens, num_experts).topk(top_k, dim=-1)
            fused_moe(x, w13, w2, weights, experts, act)


def attention_launches(torch) -> None:
    """Decode and mixed batches over 16/32-bit caches in their own dtype and over 8-bit caches
    (the codes carry their scale: head_dim + 2 bytes a row) with bf16 queries; one pass without
    variants, and split-K with a window and soft-cap."""
    from kernels.triton_attention import attention
    from kernels.triton_cache import write_kv_cache

    bf16 = torch.bfloat16
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 16
    layouts = [(bf16, bf16), (torch.float16, torch.float16), (torch.float32, torch.float32), (bf16, torch.int8),
               (bf16, torch.float8_e4m3fn)]
    for dtype, cache_dtype in layouts:
        width = head_dim + (2 if cache_dtype.itemsize == 1 else 0)
        k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, width).to(cache_dtype)
        v_cache = torch.zeros_like(k_cache)
        key = torch.zeros(64, num_kv_heads, head_dim, dtype=dtype)
        write_kv_cache(key, key, k_cache, v_cache, torch.zeros(64, dtype=torch.int64))
        tables = torch.zeros(2, num_blocks // 2, dtype=torch.int32)
        lens = torch.tensor([40, 64], dtype=torch.int32)
        for segments, variant in ((1, dict()), (2, dict(sliding_window=8, soft_cap=30.0))):
            decode_q = torch.zeros(2, num_heads, head_dim, dtype=dtype)
            attention(decode_q, k_cache, v_cache, tables, lens, None, 0.1, num_segments=segments, **variant)
            prefill_q = torch.zeros(64, num_heads, head_dim, dtype=dtype)
            cu = torch.tensor([0, 32, 64], dtype=torch.int32)
            attention(prefill_q, k_cache, v_cache, tables, lens, cu, 0.1, num_segments=segments, **variant)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
