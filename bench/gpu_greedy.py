"""Greedy equality against transformers on CUDA for two families (Qwen3 dense, Mixtral MoE):
float32 token for token (the near-tie rule), bfloat16 within the near-tie rule at a looser
tolerance (bfloat16 rounding, not a bug, separates close logits). Part of bench/gpu_check.sh;
exits non-zero on a mismatch.

    python bench/gpu_greedy.py [--device cuda] [--families qwen3 mixtral]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = {
    "qwen3": ("Qwen3Config", {}),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    if n < 2:\n"]
BF16_RTOL = 2e-2


def check_family(name: str, device: str, dtype: str, max_tokens: int) -> tuple[int, int, int]:
    """(sequences, tokens compared, near-ties); raises AssertionError on a real mismatch."""
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams
    from tests import greedy_reference
    from tests.greedy_reference import Comparison, compare_greedy
    from tests.model_factories import make_tiny_checkpoint

    config_class, overrides = FAMILIES[name]
    path = make_tiny_checkpoint(tempfile.mkdtemp(prefix=f"gpu-check-{name}-"), config_class, **overrides)
    torch_dtype = getattr(torch, dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="eager").to(device).eval()
    llm = LLM(path, device=device, dtype=dtype, num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    old_rtol = greedy_reference.NEAR_TIE_RTOL
    greedy_reference.NEAR_TIE_RTOL = old_rtol if dtype == "float32" else BF16_RTOL
    result = Comparison()
    try:
        for out in outs:
            ids = torch.tensor(out.prompt_token_ids)
            tokens, logits = _hf_on(ref, ids, max_tokens)
            compare_greedy(out.outputs[0].token_ids, tokens, logits, result)
    finally:
        greedy_reference.NEAR_TIE_RTOL = old_rtol
    return result.num_sequences, result.num_tokens_compared, result.near_ties


def _hf_on(ref, ids: torch.Tensor, max_tokens: int):
    with torch.inference_mode():
        out = ref.generate(ids[None].to(ref.device), attention_mask=torch.ones_like(ids[None]).to(ref.device),
                           max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), [step[0].float().cpu() for step in out.logits]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    failed = False
    for name in args.families:
        for dtype in args.dtypes:
            try:
                seqs, tokens, ties = check_family(name, args.device, dtype, args.max_tokens)
                print(f"{name} {dtype} on {args.device}: OK, {seqs} sequences, {tokens} tokens, {ties} near-ties")
            except AssertionError as e:
                failed = True
                print(f"{name} {dtype} on {args.device}: MISMATCH {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
