"""How much w8a8's rounding costs per matmul on the default model's real activations, plain and
with the input and weight rotated by the same orthogonal matrix (y = (x R)(W R)^T = x W^T).

    python bench/bench_w8a8_rotation.py

Runs transformers' float32 SmolLM2-135M-Instruct (the default model's dequantized weights) over
the 8 prompts of tests/test_default_model.py, records every decoder projection's input, and
reports for each projection kind (q/k/v, o, gate/up, down) the mean over layers of the relative
error ||y_q - y|| / ||y|| against the float product, simulated in float32:
- int8: weight-only, symmetric per output row (quantization=int8)
- w8a8: the same weight times the input rounded to int8 per row (max |x| / 127)
- had B: w8a8 after a block-diagonal Walsh-Hadamard rotation of B input columns per block
- pow2: the largest power-of-two block that divides K (64 for K = 576, 512 for 1536)
- full: all K columns mixed, the Kronecker product of a random orthogonal matrix of the odd factor
  and the pow2 Hadamard matrix (9 for K = 576, 3 for 1536)
- smooth: SmoothQuant (alpha 0.5) with per-channel scales calibrated on these same inputs (an
  optimistic bound: the engine has no calibration data at load)
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine import DEFAULT_MODEL  # noqa: E402
from engine.layers.rotation import rotate  # noqa: E402
from engine.loader import load_model_source  # noqa: E402
from tests.test_default_model import PROMPTS  # noqa: E402


def int8_rows(t: torch.Tensor) -> torch.Tensor:
    """t rounded to int8 per row (symmetric, max |t| / 127), back in float."""
    scale = t.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(t / scale).clamp(-127, 127) * scale


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def errors(x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    k = x.shape[1]
    y = x @ w.t()
    out = {"int8": rel(x @ int8_rows(w).t(), y), "w8a8": rel(int8_rows(x) @ int8_rows(w).t(), y)}
    pow2 = k & -k
    for block in (32, 64, 128, pow2):
        if k % block == 0:
            name = "pow2" if block == pow2 and block > 128 else f"had {block}"
            out[name] = rel(int8_rows(rotate(x, block)) @ int8_rows(rotate(w, block)).t(), y)
    odd = k // pow2  # R = kron(Q, H_pow2): the pow2 blocks, then Q mixing the blocks
    q = torch.linalg.qr(torch.randn(odd, odd, generator=torch.Generator().manual_seed(0)))[0]
    full = lambda t: torch.einsum("ncb,cd->ndb", rotate(t, pow2).reshape(-1, odd, pow2), q).reshape(t.shape)  # noqa: E731
    out["full"] = rel(int8_rows(full(x)) @ int8_rows(full(w)).t(), y)
    s = (x.abs().amax(0).clamp_min(1e-5) ** 0.5) / (w.abs().amax(0).clamp_min(1e-5) ** 0.5)
    out["smooth"] = rel(int8_rows(x / s) @ int8_rows(w * s).t(), y)
    return out


@torch.no_grad()
def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = load_model_source(DEFAULT_MODEL)
    path = Path(source.weight_files[0]).parent
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path if Path(source.path).is_dir() else path)
    inputs = defaultdict(list)
    hooks = [m.register_forward_hook(lambda m, args, _, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
             for name, m in model.named_modules() if name.split(".")[-1].endswith("_proj")]
    for prompt in PROMPTS:
        model(input_ids=torch.tensor([tokenizer.encode(prompt)]))
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    table = defaultdict(lambda: defaultdict(list))
    for name, xs in inputs.items():
        kind = name.split(".")[-1]
        for method, e in errors(torch.cat(xs), modules[name].weight.float()).items():
            table[kind][method].append(e)
    methods = [m for m in ("int8", "w8a8", "had 32", "had 64", "had 128", "pow2", "full", "smooth")
               if any(m in row for row in table.values())]
    print("| projection | K | " + " | ".join(methods) + " |\n|" + " --- |" * (2 + len(methods)))
    for kind, row in table.items():
        k = modules[next(n for n in inputs if n.endswith(kind))].weight.shape[1]
        cells = [f"{sum(row[m]) / len(row[m]):.4f}" if m in row else "" for m in methods]
        print(f"| {kind} | {k} | " + " | ".join(cells) + " |")
    worst = {m: max(max(row.get(m, [0])) for row in table.values()) for m in methods}
    print("| worst layer | | " + " | ".join(f"{worst[m]:.4f}" for m in methods) + " |")


if __name__ == "__main__":
    main()
