"""The "cpu" backend: fused C++ kernels (kernels/csrc/cpu_ops.cpp) with the names and
signatures of kernels/reference.py, the default on CPU.

The source is compiled on first import with torch.utils.cpp_extension (g++ and ninja, about 15
seconds) into torch's extension cache ($TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions), once per machine kind: the build targets the CPU's vector extensions
(AVX-512 or AVX2 as torch detects them), so the extension's name carries them. An import that
cannot build raises ImportError; the engine then falls back to the plain-torch backend.

Attention is one C++ kernel for prefill chunks, decodes and mixed batches, reading the paged
cache through the block table (see paged attention in the source); the cache writes and the
model's pointwise ops are C++ kernels too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from kernels.reference import copy_blocks, swap_blocks

logger = logging.getLogger(__name__)

# cpu_ops.cpp: attention, cache and pointwise ops; quant_ops.cpp: the AMX quantized matmuls;
# step_ops.cpp: a layer's rotation, cache write and attention in one call (qkv_attention), and a
# whole decode layer in one (decoder_layer);
# gemv_ops.cpp: AMX bfloat16 matmuls at few rows; amx_linear.cpp: the bfloat16 projections on
# hand-written AMX tile loops (amx_tiles.h); bf16_linear.cpp: the same strips on AVX512-BF16 where
# the CPU has no AMX; f32_linear.cpp: float32 projections on column strips of FMAs (both on
# strips_loops.h's loop nest); w4a8_linear.cpp: int4 weights times rows rounded to int8 on
# AVX512-VNNI (the same loop nest); sampler_ops.cpp: the sampler's filters and draw;
# thread_pool.cpp: the thread pool all of them split their work on (thread_pool.h), not torch's
# OpenMP threads.
SOURCES = [Path(__file__).parent / "csrc" / name
           for name in ("cpu_ops.cpp", "quant_ops.cpp", "step_ops.cpp", "gemv_ops.cpp", "amx_linear.cpp",
                        "bf16_linear.cpp", "f32_linear.cpp", "w4a8_linear.cpp", "sampler_ops.cpp", "thread_pool.cpp")]
# torch's name for the widest vector extension this CPU has -> the gcc target for it.
_ARCH_FLAGS = {"AVX512": ["-march=x86-64-v4"], "AVX2": ["-march=x86-64-v3"]}

__all__ = [
    "write_kv_cache", "decode_attention", "paged_attention", "copy_blocks", "swap_blocks",
    "rms_norm", "add_rms_norm", "silu_mul", "rotary_embedding_", "qkv_attention", "decoder_layer", "argmax_rows",
    "filter_rows", "sample_rows",
]


def load_sources(name: str, sources: list[Path]) -> None:
    """Builds (or finds in the extension cache) C++ sources with this backend's flags and loads
    them into the process (their ops register themselves). bench/bench_kv_cache.py builds another
    tree's attention with it for an A/B."""
    from torch.utils import cpp_extension

    try:
        # The ninja package's binary (a dependency) before any other on PATH: its venv's bin may
        # not be on PATH, and ninja versions read each other's build logs as stale (a rebuild).
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        # The float loops vectorize only with these math flags (reductions need reassociation).
        extra_cflags=[
            "-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
            *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), []),
        ],
        # libgomp.so.1 is the OpenMP runtime torch already loaded (same soname): one thread pool.
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _build() -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    name = f"bento_llm_cpu_ops_{capability.lower()}"
    started = time.perf_counter()
    try:
        load_sources(name, SOURCES)
    except Exception as e:  # a missing compiler, ninja or header: the caller falls back
        raise ImportError(f"the CPU kernels in {[s.name for s in SOURCES]} could not be built: {e}") from e
    # Compiled on first use (about 15 s), loaded from the cache after.
    logger.info("CPU kernels %s ready in %.1f s", name, time.perf_counter() - started)


if not hasattr(torch.ops.bento_llm, "paged_attention"):
    _build()
_ops = torch.ops.bento_llm

rms_norm = _ops.rms_norm
add_rms_norm = _ops.add_rms_norm
silu_mul = _ops.silu_mul
argmax_rows = _ops.argmax_rows
filter_rows = _ops.filter_rows
sample_rows = _ops.sample_rows
rotary_embedding_ = _ops.rotary_embedding_
write_kv_cache = _ops.write_kv_cache
decode_attention = _ops.decode_attention
paged_attention = _ops.paged_attention
qkv_attention = _ops.qkv_attention
decoder_layer = _ops.decoder_layer
# Whether bfloat16 attention runs its tile products in bfloat16 on AMX here (see the source), now:
# False without AMX, in AVX2 builds, and while torch.backends.mkldnn is disabled.
bfloat16_tiles_available = _ops.bfloat16_tiles_available
bfloat16_pairs_available = _ops.bfloat16_pairs_available
bfloat16_pair_product = _ops.bfloat16_pair_product
