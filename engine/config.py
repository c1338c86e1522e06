"""Every engine setting, validated in one place."""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import asdict, dataclass, fields

# How torch's OpenMP threads wait between parallel regions, chosen here because libgomp reads it
# once, when torch is imported (engine/__init__.py imports this module first). libgomp's default
# spins ~5 ms (300,000 pauses of 16 ns on this Xeon) before sleeping: while the other thread of a
# region is descheduled, the spinning one burns its time slice waiting at the barrier. A batch-1
# decode step does ~120 regions (one per int4/AMX projection); on the 2-vCPU Xeon shared with
# other work (load 12-16), in one process each: spinning 540-2900 ms a step, passive 80-100 ms,
# one thread 48 ms. Passive waiting costs a futex wake per region on an idle machine (a small
# parallel op after a 30 us gap: 15 us passive vs 9 us spinning, fastest of 3,000). The user's
# own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; a process that imported torch before the engine
# keeps libgomp's default (the model runner warns). Our own C++ kernels (every projection,
# attention, norm) no longer run on OpenMP: their pool (kernels/csrc/thread_pool.h) spins briefly
# and never makes the caller wait for a descheduled worker; this setting now covers torch's ops.
OPENMP_WAIT_POLICY = "PASSIVE"
OPENMP_WAIT_SET_BY_USER = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
OPENMP_WAIT_APPLIED = not OPENMP_WAIT_SET_BY_USER and "torch" not in sys.modules
if OPENMP_WAIT_APPLIED:
    os.environ["OMP_WAIT_POLICY"] = OPENMP_WAIT_POLICY

import torch  # noqa: E402  (after the OpenMP setting above)

logger = logging.getLogger(__name__)


@functools.cache  # once per process
def warn_if_openmp_spins() -> None:
    """The setting above comes before torch loads; where torch was imported first (and the user
    set neither variable), libgomp spins, which a shared machine pays for (the model runner calls
    this as it builds the model)."""
    if torch.get_num_threads() > 1 and not (OPENMP_WAIT_APPLIED or OPENMP_WAIT_SET_BY_USER):
        logger.warning("torch was imported before engine, so its OpenMP threads spin ~5 ms at every barrier "
                       "(libgomp's default): where other processes share the cores, steps can take 10x longer. "
                       "Import engine first, or set OMP_WAIT_POLICY=PASSIVE before starting Python.")


DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
ATTENTION_BACKENDS = ("cpu", "torch", "triton")
# Quantization at load (engine/layers/quant.py): weight-only int8 / int4 (int4's group sizes in
# input columns below); w8a8: int8 weights times int8 activations quantized per token (CPUs
# with AMX-INT8 or AVX512-VNNI); w4a8: int4 weights (int4's groups) times activations rounded to
# int8 per token and group (CPUs with AVX512-VNNI).
QUANTIZATIONS = ("int8", "int4", "w8a8", "w4a8")
# The methods whose kernels round each input row to int8 (CPU only), and those whose weights are
# int4 codes.
INT8_ACTIVATION_QUANTIZATIONS = ("w8a8", "w4a8")
INT4_QUANTIZATIONS = ("int4", "w4a8")
QUANTIZATION_GROUP_SIZES = (32, 64, 128, 256)
# The token embedding and LM head under quantization (engine/layers/embedding.py): "int8" rows
# with one scale each (a tied head multiplies with the same codes), "none" keeps them in dtype;
# "auto" is int8 on CPU and none on CUDA (which has no int8 matmul op to multiply them with).
EMBEDDING_QUANTIZATIONS = ("auto", "int8", "none")
# KV cache element types: the model's dtype ("auto"), a float type, or 8 bits with a float16
# scale per token and KV head (kernels/reference.py): int8 (absmax / 127, the more accurate) or
# fp8_e4m3 (absmax / 448). 8 bits hold 2 * head_dim / (head_dim + 2) times the tokens of 16 (on CUDA
# rows pad to 16 bytes: kernels/reference.kv_row_width).
KV_CACHE_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "fp8_e4m3": torch.float8_e4m3fn,
    "int8": torch.int8,
}

PREEMPTION_MODES = ("auto", "swap", "recompute")
# stream_interval's largest value, in tokens.
MAX_STREAM_INTERVAL = 4096


@dataclass
class EngineConfig:
    model: str = DEFAULT_MODEL
    # "auto": on CUDA the checkpoint's half dtype (or bf16); on CPU bfloat16 where the CPU has
    # AMX or AVX512-BF16 and the checkpoint is not float32, else float32 (see torch_dtype).
    dtype: str = "auto"
    # "auto" (the model's dtype) or one of KV_CACHE_DTYPES.
    kv_cache_dtype: str = "auto"
    # None (or "none"): weights in dtype. "int8": one scale per output row. "int4": affine
    # groups of quantization_group_size input columns; a GGUF's Q4_0/Q4_1/Q4_K tensors load
    # as they are (group 32). Norms stay in dtype; the embedding and LM head follow
    # embedding_quantization. "auto" (resolved when the model loads, logged, see
    # engine/gguf_weights.py auto_quantization): int4 for a GGUF whose projections are all 4-bit
    # blocks, on CPU where our int4 kernels measure faster (bfloat16: AMX's, AMD's AVX512-BF16
    # loops; float32 from dtype="auto": AVX-512's int4 strips); else None. "w4a8": int4's weights
    # (a GGUF's 4-bit blocks as they are) times each token's inputs rounded to int8 per group, as
    # llama.cpp multiplies them on AVX512-VNNI: less accurate than int4, more than w8a8 (README).
    quantization: str | None = "auto"
    quantization_group_size: int = 32
    # With quantization set: the embedding and LM head in int8 rows even under int4 (the head
    # decides every token, as llama.cpp's Q4_K_M keeps them at higher precision), or "none".
    embedding_quantization: str = "auto"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    # KV cache size: a block count wins over bytes; on CUDA, neither set means
    # gpu_memory_utilization decides after profiling a dummy forward.
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    # "cpu": C++ kernels (CPU only); "torch": plain torch (any device); "triton": Triton kernels.
    # "auto": triton on CUDA; cpu on CPU, or torch where the C++ kernels cannot be built.
    attention_backend: str = "auto"
    # CUDA only: True runs every step eagerly; False (vLLM's default too) captures the decode step
    # as CUDA graphs at start-up and replays them (engine/cuda_graphs.py, where it applies).
    enforce_eager: bool = False
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's choice
    tensor_parallel_size: int = 1
    # Tensor-parallel rendezvous (torch.distributed TCP store on rank 0, the engine process).
    # tp_master_port 0 picks a free port, which only works when every rank runs on this machine.
    tp_master_addr: str = "127.0.0.1"
    tp_master_port: int = 0
    # Ranks started on this machine (0..tp_local_ranks-1); the rest join from other machines
    # with `python -m engine.distributed` (see its docstring). None: all of them.
    tp_local_ranks: int | None = None
    # A collective that waits longer than this means a rank is stuck: the engine fails.
    tp_timeout_s: float = 30.0
    # Full blocks are cached by content and reused by later requests with the same prefix.
    enable_prefix_caching: bool = True
    # CPU block pool for swapped-out requests, in GiB (allocated on first swap).
    swap_space: float = 4.0
    # "auto": swap requests with several sequences (n > 1, beams), whose shared blocks a
    # recompute would lose; recompute single-sequence requests. Swap falls back to recompute
    # when the CPU pool is full.
    preemption_mode: str = "auto"
    # AsyncEngine (the server): a streamed request's outputs reach its reader every this many
    # tokens, its first token at once and its last always (vLLM's --stream-interval). 1 sends
    # every token as it comes; more sends fewer, longer server-sent events, which saves the event
    # loop a wake-up and a socket write per stream per step (on a small CPU, time taken from the
    # step) at the price of a choppier stream. A non-streaming request gets only its first output
    # (time to first token) and its last, whatever this says. The offline LLM ignores it.
    # At most MAX_STREAM_INTERVAL: beyond a few hundred tokens a stream is final-only in effect.
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("EngineConfig.model must name a model directory, GGUF file or known model")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EngineConfig.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"EngineConfig.dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.quantization in ("none", ""):
            self.quantization = None
        if self.quantization is not None and self.quantization not in ("auto", *QUANTIZATIONS):
            raise ValueError(
                f"EngineConfig.quantization must be 'auto', None, 'none' or one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.quantization_group_size not in QUANTIZATION_GROUP_SIZES:
            raise ValueError(
                f"EngineConfig.quantization_group_size must be one of {QUANTIZATION_GROUP_SIZES}, "
                f"got {self.quantization_group_size}"
            )
        if self.embedding_quantization not in EMBEDDING_QUANTIZATIONS:
            raise ValueError(
                f"EngineConfig.embedding_quantization must be one of {EMBEDDING_QUANTIZATIONS}, "
                f"got {self.embedding_quantization!r}"
            )
        if self.quantization in INT8_ACTIVATION_QUANTIZATIONS and self.device != "cpu":
            raise ValueError(f"EngineConfig.quantization {self.quantization!r} runs on CPUs only "
                             "(AMX-INT8 or AVX512-VNNI): use 'int8' or 'int4' on CUDA")
        if self.quantization == "int4" and self.device.startswith("cuda") and self.dtype not in ("auto", "bfloat16", "bf16"):
            raise ValueError("EngineConfig.quantization 'int4' on CUDA runs in bfloat16 only: set dtype 'bfloat16' or 'auto'")
        # "auto" is resolved where the backend is built (engine/attention.py): on CPU it
        # depends on whether the C++ kernels build on this machine.
        if self.attention_backend != "auto" and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"EngineConfig.attention_backend must be 'auto' or one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"EngineConfig.block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"EngineConfig.num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(
                f"EngineConfig.kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens must be at least block_size ({self.block_size}), "
                f"got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"EngineConfig.max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"EngineConfig.max_model_len must be at least 1, got {self.max_model_len}")
        self._check_tensor_parallel()
        if self.swap_space < 0:
            raise ValueError(f"EngineConfig.swap_space must be non-negative (GiB), got {self.swap_space}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"EngineConfig.preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}"
            )
        if not 1 <= self.stream_interval <= MAX_STREAM_INTERVAL:
            raise ValueError(
                f"EngineConfig.stream_interval must be in [1, {MAX_STREAM_INTERVAL}] tokens, got {self.stream_interval}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"EngineConfig.num_threads must be at least 1, got {self.num_threads}")

    def _check_tensor_parallel(self) -> None:
        n = self.tensor_parallel_size
        if n < 1:
            raise ValueError(f"EngineConfig.tensor_parallel_size must be at least 1, got {n}")
        if n > 1 and self.device not in ("cpu", "cuda"):
            raise ValueError(
                f"EngineConfig.device must be 'cpu' or 'cuda' with tensor_parallel_size > 1 (rank r uses "
                f"cuda:r on its machine), got {self.device!r}"
            )
        if self.tp_local_ranks is not None and not 1 <= self.tp_local_ranks <= n:
            raise ValueError(
                f"EngineConfig.tp_local_ranks must be between 1 and tensor_parallel_size ({n}), got {self.tp_local_ranks}"
            )
        if not 0 <= self.tp_master_port < 65536:
            raise ValueError(f"EngineConfig.tp_master_port must be a TCP port (0 picks one), got {self.tp_master_port}")
        if self.tp_master_port == 0 and (self.tp_local_ranks or n) < n:
            raise ValueError("EngineConfig.tp_master_port must be set when some ranks run on other machines")
        if self.tp_timeout_s <= 0:
            raise ValueError(f"EngineConfig.tp_timeout_s must be positive, got {self.tp_timeout_s}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def embedding_quantization_method(self) -> str | None:
        """How the embedding and LM head are stored: "int8", or None (in dtype). After
        quantization "auto" is resolved (engine/model_runner.py)."""
        if self.quantization == "auto":
            raise ValueError("EngineConfig.quantization 'auto' is resolved when the model loads")
        if self.quantization is None or self.embedding_quantization == "none":
            return None
        if self.embedding_quantization == "auto" and self.device.startswith("cuda"):
            return None
        return "int8"

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.device == "cpu":
            # A float32 checkpoint stays float32 (exact against transformers' float32); a 16-bit
            # or quantized one (GGUF: checkpoint_dtype None) runs in bfloat16 where the CPU has
            # native bfloat16 matmuls, float32 elsewhere (emulated bfloat16 is far slower).
            # Quantized weights: the packed int4/int8 matmuls are fastest on bfloat16 rows, so
            # bfloat16 wherever it is native (float32 rows: int4/int8 strips on AVX-512 CPUs,
            # PyTorch's scalar-speed ops elsewhere). w4a8's kernel takes float32 rows: float32.
            if self.quantization == "w4a8":
                return torch.float32
            quantized = self.quantization not in (None, "auto")  # auto: int4 only for a GGUF (None here)
            if (checkpoint_dtype != torch.float32 or quantized) and cpu_has_native_bfloat16():
                return torch.bfloat16
            return torch.float32
        if self.quantization == "int4":
            return torch.bfloat16  # PyTorch's CUDA int4 matmul takes bfloat16 activations only
        if checkpoint_dtype in (torch.float16, torch.bfloat16):
            return checkpoint_dtype
        return torch.bfloat16

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kv_cache_dtype == "auto" else KV_CACHE_DTYPES[self.kv_cache_dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def cpu_has_native_bfloat16() -> bool:
    """AMX or AVX512-BF16: oneDNN then runs bfloat16 matmuls natively, measured 2.5-4x faster
    than float32 on a 2-core Xeon with AMX; without them bfloat16 is emulated and much slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private torch API: may go away
    return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, p, lambda: False)() for p in probes)
