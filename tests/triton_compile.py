"""Compile Triton kernels for a GPU on a machine without one.

Every kernel launch the scenarios below make (through the public wrappers, with TRITON_INTERPRET=0)
is compiled instead of run: its own argument types, constexprs and launch options, for a CUDA
target. This catches what the interpreter lets through in CPU-only CI: code the compiler rejects
(the interpreter runs Python, so a `return` inside a constexpr branch skips the rest; the
compiler still generates it), dots of mixed dtypes, and the half-precision paths the
interpreter never takes (it computes every dot in fp32). The wrappers' outputs are garbage:
nothing runs.

Each launch is bound by Triton's own binder for the target, so it compiles with the
specialization a real launch gets (integer arguments of 1 as constants, arguments and pointers
divisible by 16 marked so): what decides whether loads are vectorized.

By default the pipeline stops after Triton's GPU IR (ttgir: the frontend, types and layouts, a
few seconds for every kernel). --full runs it to the cubin with Triton's bundled ptxas and fails
on shared memory past the smallest target card's limit (minutes, cold). --vector-loads compiles
the decode attention over 8-bit caches to PTX, with rows as the engine lays them out on CUDA and
unpadded, and fails unless the padded rows' codes load 8-16 bytes at a time (where unpadded rows
load byte by byte: 3-37x slower on an H200, bench/RESULTS.md 2026-12-04). The binding uses
Triton's internals (create_function_from_signature, JITFunction._pack_args): pinned triton 3.7.1.

--specializations compiles nothing: it binds the launches a serving engine makes over many batch shapes
(decode batches of 1-70 sequences, block tables 1-40 wide, prefills of 1-300 tokens, MoE steps of 1-70
tokens, the per-token kernels over as many rows) and fails unless each kernel has one specialization per choice of its constexprs and launch
options. A launch whose integer argument changed the specialization (1, a multiple of 16, anything else)
would compile again mid-serving on a GPU: 0.6 s stalls of a request's first token on an H200
(bench/RESULTS.md 2026-12-04 18:36), so per-step integers are the kernels' do_not_specialize.

Run in a fresh process, since Triton reads TRITON_INTERPRET when a kernel module is imported:
    TRITON_INTERPRET=0 python -m tests.triton_compile [--full | --vector-loads | --specializations]
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
    mode = argv[0] if argv else ""
    if len(argv) > 1 or mode not in ("", "--full", "--vector-loads", "--specializations"):
        print("usage: python -m tests.triton_compile [--full | --vector-loads | --specializations]", file=sys.stderr)
        return 2
    import torch
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if mode == "":
        knobs.runtime.add_stages_inspection_hook = stop_after_ttgir
    target = GPUTarget("cuda", 90 if mode == "--vector-loads" else TARGET_ARCH, 32)
    backend = make_backend(target)
    seen: set[tuple] = set()
    compiled: list = []  # (kernel name, compiled kernel) for --vector-loads
    variants: dict[tuple, set] = {}  # (kernel, constexprs, launch) -> specializations, for --specializations

    def compile_instead(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, _ = binder(*args, **kwargs)
        _, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, kwargs)
        constants = {p.name: bound[p.name] for p in self.params if p.is_constexpr}
        launch = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = (self.__name__, tuple(signature.items()), tuple(sorted(map(str, constexprs.items()))), str(attrs),
               tuple(launch.items()))
        if key in seen:
            return
        seen.add(key)
        if mode == "--specializations":  # grouped by the declared constexprs: an argument of 1 adds its own
            variants.setdefault((key[0], str(constants), key[4]), set()).add(key[1:4])
            return
        try:
            kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target, options=launch)
        except ReachedLowering:
            print(f"{self.__name__} {constants} {launch}")
            return
        compiled.append((self.__name__, kernel))
        shared = kernel.metadata.shared
        print(f"{self.__name__} {constants} {launch}: {shared} bytes of shared memory")
        if shared > SHARED_LIMIT:
            raise RuntimeError(f"{self.__name__} needs {shared} bytes of shared memory, over {SHARED_LIMIT}")

    JITFunction.run = compile_instead
    if mode == "--vector-loads":
        return check_vector_loads(torch, compiled)
    if mode == "--specializations":
        return check_specializations(torch, variants)
    for scenario in (moe_launches, attention_launches, pointwise_launches):
        scenario(torch)
    print(f"{len(seen)} kernels compiled for sm_{TARGET_ARCH}" + (" (through ttgir)" if mode == "" else ""))
    return 0


def check_vector_loads(torch, compiled: list) -> int:
    """Decode attention over int8 and e4m3 caches (bf16 queries, the heads of an 8B model: 32 over
    8 of 128), rows padded as the engine does on CUDA and unpadded: the loads in each kernel's PTX.
    The padded rows must read their codes 8-16 bytes at a time, leaving single bytes for the scales
    only (2 per row a thread holds); the unpadded rows show what the check catches."""
    import re

    from kernels.reference import kv_row_width
    from kernels.triton_attention import attention

    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 32, 8, 128, 16, 16
    failed = False
    for cache_dtype in (torch.int8, torch.float8_e4m3fn):
        for device in ("cuda", "cpu"):  # the CPU's row is the unpadded one
            width = kv_row_width(head_dim, cache_dtype, device)
            k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, width).to(cache_dtype)
            tables = torch.zeros(2, num_blocks // 2, dtype=torch.int32)
            lens = torch.tensor([40, 64], dtype=torch.int32)
            query = torch.zeros(2, num_heads, head_dim, dtype=torch.bfloat16)
            compiled.clear()
            attention(query, k_cache, k_cache, tables, lens, None, 0.1, num_segments=1)
            (kernel,) = [k for name, k in compiled if name == "_paged_attention_kernel"]
            ptx = kernel.asm["ptx"]
            single = len(re.findall(r"ld\.global(?:\.\w+)*\.[bsu]8\b", ptx))
            # Wide reads: vector loads, or asynchronous copies to shared memory of 8 or 16 bytes
            # (the compiler pipelines the K/V tiles through them once rows are aligned).
            wide = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx)) + \
                len(re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], 0x(?:8|10)\b", ptx))
            print(f"{cache_dtype} rows of {width} bytes: {single} single-byte and {wide} wide (8-16 byte) reads in the PTX")
            if width % 16 == 0 and (single > 32 or wide < 4):
                print(f"  FAIL: rows of {width} bytes should load their codes as vectors")
                failed = True
    return 1 if failed else 0


def check_specializations(torch, variants: dict[tuple, set]) -> int:
    """Binds the serving engine's launches over many batch shapes; one specialization per
    kernel and constexpr choice, or the kernel would compile again when a new shape arrives."""
    from kernels.triton_attention import attention
    from kernels.triton_cache import write_kv_cache
    from kernels.triton_moe import fused_moe

    bf16 = torch.bfloat16
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 64, 16, 64
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=bf16)
    for num_seqs in (1, 2, 3, 7, 16, 17, 32, 48, 63, 64, 70):
        for width in (1, 2, 3, 16, 17, 40):
            tables = torch.zeros(num_seqs, width, dtype=torch.int32)
            lens = torch.full((num_seqs,), width * block_size, dtype=torch.int32)
            attention(torch.zeros(num_seqs, num_heads, head_dim, dtype=bf16), k_cache, k_cache, tables, lens, None, 0.1)
            tokens = num_seqs * 5 - 1 if num_seqs > 1 else 300
            cu = torch.linspace(0, tokens, num_seqs + 1).round().to(torch.int32)
            attention(torch.zeros(tokens, num_heads, head_dim, dtype=bf16), k_cache, k_cache, tables, lens, cu, 0.1)
        key = torch.zeros(num_seqs, num_kv_heads, head_dim, dtype=bf16)
        write_kv_cache(key, key, k_cache, k_cache, torch.zeros(num_seqs, dtype=torch.int64))
        num_experts, top_k, hidden, inter = 8, 2, 128, 64
        weights, experts = torch.rand(num_seqs, num_experts).topk(top_k, dim=-1)
        fused_moe(torch.zeros(num_seqs, hidden, dtype=bf16), torch.zeros(num_experts, 2 * inter, hidden, dtype=bf16),
                  torch.zeros(num_experts, hidden, inter, dtype=bf16), weights, experts)
        for tokens in (num_seqs, num_seqs * 5 - 1):  # a decode step's rows, a prefill's
            launch_pointwise(torch, bf16, tokens, hidden=576, inter=1536, heads=15, head_dim=head_dim)
    failed = False
    for (name, constexprs, launch), specs in sorted(variants.items(), key=str):
        if len(specs) > 1:
            failed = True
            print(f"FAIL: {name} {dict(launch)} compiles {len(specs)} times for one choice of constexprs: per-step integer "
                  f"arguments are specialized (mark them do_not_specialize)\n  {constexprs}")
    print(f"{len(variants)} kernel variants over the batch shapes" + (": each compiles once" if not failed else ""))
    return 1 if failed else 0


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


def pointwise_launches(torch) -> None:
    """The norms (with and without the residual), silu-and-mul and rotary in each dtype, at a small
    model's widths and a large one's (many rows a program, and one row of 8192)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, hidden, inter, heads, head_dim in ((3, 576, 1536, 15, 64), (2, 8192, 28672, 40, 128)):
            launch_pointwise(torch, dtype, rows, hidden=hidden, inter=inter, heads=heads, head_dim=head_dim)


def launch_pointwise(torch, dtype, rows: int, *, hidden: int, inter: int, heads: int, head_dim: int) -> None:
    """Each per-token kernel once over `rows` rows of a model of these widths; rotary on the q/k
    heads of a fused projection (strided rows), as the engine calls it."""
    from kernels.triton_pointwise import add_rms_norm, rms_norm, rotary_embedding_, silu_mul

    x = torch.zeros(rows, hidden, dtype=dtype)
    weight = torch.zeros(hidden)
    rms_norm(x, weight, 1e-6)
    add_rms_norm(x.clone(), x, weight, 1e-6)
    silu_mul(torch.zeros(rows, 2 * inter, dtype=dtype))
    qkv = torch.zeros(rows, (heads + 2) * head_dim, dtype=dtype)
    table = torch.zeros(rows, 1, head_dim, dtype=dtype)
    rotary_embedding_(qkv[:, : heads * head_dim].view(rows, heads, head_dim), table, table)


def attention_launches(torch) -> None:
    """Decode and mixed batches over 16/32-bit caches in their own dtype and over 8-bit caches
    (the codes carry their scale, rows padded as on CUDA) with bf16 queries, and int8 with fp16
    ones (their V scales apply to the tile, not the probabilities); one pass without
    variants, and split-K with a window and soft-cap."""
    from kernels.reference import kv_row_width
    from kernels.triton_attention import attention
    from kernels.triton_cache import write_kv_cache

    bf16 = torch.bfloat16
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 16
    layouts = [(bf16, bf16), (torch.float16, torch.float16), (torch.float32, torch.float32), (bf16, torch.int8),
               (bf16, torch.float8_e4m3fn), (torch.float16, torch.int8)]
    for dtype, cache_dtype in layouts:
        width = kv_row_width(head_dim, cache_dtype, "cuda")
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
