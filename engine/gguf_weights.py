"""A GGUF file's quantized projections, read straight from its blocks into int4/int8 codes.

Q4_0 (d * (q - 8)), Q4_1 (d * q + m) and Q4_K (super-blocks of 256: per 32, d*sc * q - dmin*m)
are all affine int4 in groups of 32, so their codes are kept bit for bit and only the float16
scales become float32 scale/zero (value = (q - 8) * scale + zero): no float weight is made.
Q8_0 (d * q, int8 groups of 32) is read as group-32 int8, which the int8 layout (one scale per
row) and int4 re-quantize, logged. Other types (Q6_K, F16, ...) come from the converted float
copy and are quantized at load like any float checkpoint. token_embd is read the same way: an
untied embedding keeps these codes as they are (gathered, never multiplied with); a tied one
becomes the LM head's int8 rows.

llama.cpp stores a llama model's q/k rows permuted for its rotary layout; as in transformers'
conversion, the rows are put back (a row permutation: exact on codes).

MoE experts are stacked 3-D in the file (ffn_gate_exps/ffn_up_exps [experts, I, H],
ffn_down_exps [experts, H, I]; transformers' copy fuses gate and up into one gate_up_proj): each
expert's rows of a quantized one are yielded under its per-expert name (experts.N.gate_proj...),
so the MoE layer takes them expert by expert like a checkpoint's.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch

from engine.gguf_index import GGUFIndex
from engine.layers.quant import QuantizedWeight
from engine.layers.quant_kernels import int4_f32_kernels, int4_kernels_beat_bfloat16
from engine.models.config import ModelConfig
from engine.parallel_state import read_all

logger = logging.getLogger(__name__)

# Projections, and the token embedding (engine/layers/embedding.py keeps an untied one's codes).
_PROJECTION = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|embed_tokens)\.weight$")
# transformers' names for a layer's stacked experts -> the parts (GGUF tensor, per-expert name).
_STACKED_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_EXPERT_PARTS = {"gate_up_proj": (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj")),
                 "down_proj": (("ffn_down_exps", "down_proj"),)}
# A decoder block's projections (dense, or a MoE layer's stacked experts), by their GGUF names.
_BLOCK_PROJECTION = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)(_exps)?\.weight$")
# Block types that are int4 group-32 codes as they are.
INT4_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _halves(raw: torch.Tensor) -> torch.Tensor:
    """float16 fields (2 bytes, little-endian) of each block as float32 [..., 1]."""
    return raw.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 codes: the low nibbles are elements 0..15, the high ones 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def parse_q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _halves(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:18]), d, torch.zeros_like(d)


def parse_q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:20]), d, m + 8 * d


def parse_q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 144-byte super-block -> 8 groups of 32 (codes [..., 8, 32], scale and zero [..., 8, 1])."""
    d, dmin = _halves(blocks[..., 0:2]), _halves(blocks[..., 2:4])
    s = blocks[..., 4:16].long()
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    qs = blocks[..., 16:144].reshape(*blocks.shape[:-1], 4, 32)
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(*blocks.shape[:-1], 8, 32)
    scale = d * sc.float()
    return codes, scale[..., None], (8 * scale - dmin * mn.float())[..., None]


def parse_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    return blocks[..., 2:34].contiguous().view(torch.int8), _halves(blocks[..., 0:2]), None


# GGML type name -> (bytes per block, parser, bits)
_FORMATS = {"Q4_0": (18, parse_q4_0, 4), "Q4_1": (20, parse_q4_1, 4), "Q4_K": (144, parse_q4_k, 4), "Q8_0": (34, parse_q8_0, 8)}


def quantized_weight(type_name: str, raw: np.ndarray | torch.Tensor, rows: int, cols: int) -> QuantizedWeight | None:
    """A GGUF tensor's raw bytes [rows, bytes per row] as codes with float32 scales (None: a type kept as float)."""
    if type_name not in _FORMATS:
        return None
    block_bytes, parse, bits = _FORMATS[type_name]
    data = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(rows, -1, block_bytes)  # a copy: the file is mapped read-only
    codes, scale, zero = parse(data)
    groups = cols // 32
    zero = None if zero is None else zero.reshape(rows, groups)
    return QuantizedWeight(bits, codes.reshape(rows, cols), scale.reshape(rows, groups), zero, 32)


def unpermute_rows(q: QuantizedWeight, num_heads: int) -> QuantizedWeight:
    """Undo llama.cpp's q/k permutation (transformers' _reverse_permute_weights, on row indices)."""
    rows = q.shape[0]
    index = torch.arange(rows).reshape(num_heads, rows // num_heads // 2, 2).transpose(1, 2).reshape(rows)
    zero = None if q.zero is None else q.zero[index]
    return QuantizedWeight(q.bits, q.codes[index], q.scale[index], zero, q.group_size)


def weights_keeping_gguf_blocks(source, model_config: ModelConfig) -> Iterator[tuple[str, object]]:
    """The source's (name, weight) pairs, lazy slices of its float copy except for projections
    the GGUF stores as Q4_0/Q4_1/Q4_K/Q8_0: those are QuantizedWeights read from the file."""
    import gguf

    reader = _reader(source.path)
    arch_name = reader.fields["general.architecture"]
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name), None)
    names = gguf.get_tensor_name_map(arch, model_config.num_layers) if arch is not None else None
    tensors = {t.name: t for t in reader.tensors}
    kept: Counter = Counter()
    for hf_name, weight in source.iter_weight_slices():
        stacked = _STACKED_EXPERTS.search(hf_name)
        if stacked is not None:
            yield from _expert_blocks(hf_name, stacked, weight, tensors, kept)
            continue
        tensor = None
        if names is not None and _PROJECTION.search(hf_name):
            tensors_name = names.get_name(hf_name.removesuffix(".weight"))
            tensor = tensors.get(f"{tensors_name}.weight")
        q = None
        if tensor is not None:
            cols, rows = (int(n) for n in tensor.shape[:2])
            q = quantized_weight(tensor.tensor_type.name, tensor.data, rows, cols)
        if q is None:
            kept["float " + (tensor.tensor_type.name if tensor is not None else "other")] += 1
            yield hf_name, read_all(weight) if isinstance(weight, torch.Tensor) else weight
            continue
        if arch_name == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            q = unpermute_rows(q, model_config.num_heads if ".q_proj." in hf_name else model_config.num_kv_heads)
        kept[tensor.tensor_type.name] += 1
        yield hf_name, q
    logger.info("%s: tensors read from GGUF blocks / from the float copy: %s", source.path, dict(kept))
    _cached_reader.cache_clear()  # the load is done: drop the file's mapping


def _expert_blocks(hf_name: str, stacked: re.Match, weight, tensors: dict, kept: Counter) -> Iterator[tuple[str, object]]:
    """Per-expert (name, weight) pairs of one stacked expert tensor: the file's blocks where its
    type maps, else rows of the float copy (read once, for the whole stack)."""
    layer, stack = stacked.groups()
    prefix = hf_name[: stacked.end() - len(stack)]  # "...layers.N.mlp.experts."
    parts = _EXPERT_PARTS[stack]
    floats = None
    for i, (gguf_name, part) in enumerate(parts):
        tensor = tensors.get(f"blk.{layer}.{gguf_name}.weight")
        blocks = None
        if tensor is not None:
            cols, rows, experts = (int(n) for n in tensor.shape[:3])
            q = quantized_weight(tensor.tensor_type.name, tensor.data, experts * rows, cols)
            blocks = None if q is None else [q.rows(e * rows, rows) for e in range(experts)]
        if blocks is None:
            kept["float " + (tensor.tensor_type.name if tensor is not None else "other")] += 1
            floats = read_all(weight) if floats is None else floats
            blocks = [stack_rows.chunk(len(parts))[i] for stack_rows in floats]  # gate_up_proj: gate, then up
        else:
            kept[tensor.tensor_type.name] += 1
        for expert, block in enumerate(blocks):
            yield f"{prefix}{expert}.{part}.weight", block


def _reader(path: str) -> GGUFIndex:
    """The file's tensor index, read once for quantization="auto"'s look at its types and the load
    that follows; a changed file is read again."""
    stat = os.stat(path)
    return _cached_reader(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, mtime_ns: int, size: int) -> GGUFIndex:
    return GGUFIndex(path)


def block_projection_types(path: str) -> Counter:
    """How many of the GGUF's decoder-block projections are stored in each type (Q4_1: 210)."""
    return Counter(t.tensor_type.name for t in _reader(path).tensors if _BLOCK_PROJECTION.match(t.name))


def auto_quantization(config, source) -> tuple[str | None, str]:
    """What quantization="auto" is for this model on this machine, and why (for the log): int4
    on the file's own codes for a GGUF whose projections are all Q4_0/Q4_1/Q4_K, run on CPU where
    our int4 kernels measured at least as fast as the unquantized weights at 1-64 sequences: in
    bfloat16 quant_kernels.int4_kernels_beat_bfloat16 (AMX, or AVX512-BF16 on AMD); in float32
    chosen by dtype="auto" (a CPU without native bfloat16) int4_f32_linear's strips on any AVX-512
    CPU (1.86x / 1.22x / 1.08x float32's tokens/s at 1 / 16 / 64 sequences on a Xeon without
    AVX512-BF16, bench/bench_quant.py --dtype float32). dtype="float32" asked for is the exact
    mode: its weights stay float32. Else None, weights in dtype. The codes are the file's own:
    int4 multiplies the very weights the float dtype would hold dequantized."""
    if not source.path.lower().endswith(".gguf"):
        return None, "not a GGUF: a float checkpoint stays float unless quantization is set"
    if config.device != "cpu":
        return None, f"int4 is the default on CPU only, not {config.device}"
    dtype = config.torch_dtype(source.checkpoint_dtype)
    if dtype == torch.float32 and config.dtype == "auto":
        kernels = "float32 FMAs on int4 strips (AVX-512)" if int4_f32_kernels() is not None else None
        if kernels is None:
            return None, "float32 activations on a CPU without AVX-512 (or the C++ kernels did not build): no int4 kernels"
    elif dtype == torch.bfloat16:
        kernels = int4_kernels_beat_bfloat16()
        if kernels is None:
            return None, ("no int4 kernels here that measured as fast as bfloat16 at 16 sequences (they are AMX's, "
                          "or AVX512-BF16's on AMD; not on this CPU, or the C++ kernels did not build: see the log above)")
    else:
        return None, f"dtype={config.dtype} was asked for (float32: the exact mode, weights stay float32)"
    types = block_projection_types(source.path)
    if not types or set(types) - set(INT4_BLOCK_TYPES):
        _cached_reader.cache_clear()  # no block load follows
        return None, f"the file's projections are {dict(types)}, not all 4-bit blocks (Q4_0/Q4_1/Q4_K)"
    return "int4", f"the file's projections are 4-bit blocks ({dict(types)}), kept as they are, on {kernels}"
