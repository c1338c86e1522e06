"""bench/gpu_check.sh's CPU-runnable parts: arguments, the refusal without a GPU, the results
file, and the greedy-check helper it runs (here on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)


def test_dry_run_writes_every_step_as_skipped(tmp_path):
    out = tmp_path / "results.md"
    done = run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert text.startswith("# bento-llm GPU check") and "- card: none (dry run)" in text
    for step in ("kernels", "greedy", "bandwidth", "kvcache", "serving", "stepops"):
        assert f"## {step}: skipped (dry run)" in text
    assert "TRITON_INTERPRET" not in text and "tests/test_kernels.py" in text


def test_only_runs_the_named_steps(tmp_path):
    out = tmp_path / "results.md"
    assert run("--dry-run", "--only", "greedy,bandwidth", "--out", str(out)).returncode == 0
    text = out.read_text()
    assert "## greedy:" in text and "## bandwidth:" in text and "## kernels:" not in text and "## serving:" not in text


@pytest.mark.parametrize("args, message", [
    (("--only", "warp"), "unknown step 'warp'"),
    (("--frobnicate",), "unknown argument '--frobnicate'"),
    (("--out",), "--out needs a file"),
])
def test_bad_arguments_exit_2_naming_them(args, message):
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_refuses_and_says_how_to_dry_run(tmp_path):
    done = run("--out", str(tmp_path / "r.md"))
    assert done.returncode == 3 and "no CUDA device" in done.stderr and "--dry-run" in done.stderr


@pytest.mark.slow  # a tiny engine: ~10 s
def test_the_step_ops_count_runs_on_cpu(tmp_path, capsys):
    """bench/step_ops.py (the stepops step) on a tiny model on the CPU, its layers on their Python
    path: a step time, its phases (the engine's host work against the forward pass), the ops a step
    by name (the projections among them), and the copy sites."""
    sys.path.insert(0, str(ROOT / "bench"))
    import step_ops

    from tests.helpers import make_tiny_llama

    path = make_tiny_llama(tmp_path)
    assert step_ops.main(["--model", path, "--device", "cpu", "--batch", "2", "--steps", "3", "--count-steps", "2",
                          "--python-layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cpu, bfloat16, 2 sequences, eager: decode step median") and "aten ops a step" in out[0]
    assert out[1].startswith("the timed steps by phase, median ms")
    phases = {line.split(maxsplit=1)[1]: float(line.split()[0]) for line in out[2:8]}
    assert list(phases) == ["schedule", "prepare inputs", "forward", "sample", "detokenize",
                            "rest of engine.step (bookkeeping, stops, outputs)"]
    assert phases["forward"] > 0 and all(phases[name] >= 0 for name in ("schedule", "prepare inputs", "sample", "detokenize"))
    counts = {line.split()[1]: float(line.split()[0]) for line in out[8 : out.index("copies a step, by the engine line that issues them:")]}
    assert counts.get("embedding") == 1.0 and sum(counts.values()) > 10


def test_the_greedy_helper_passes_on_cpu_float32():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_greedy

    assert gpu_greedy.main(["--device", "cpu", "--families", "qwen3", "--dtypes", "float32", "--max-tokens", "4"]) == 0
