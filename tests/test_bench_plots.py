"""bench/plots.py draws the benchmarks' PNGs: serving throughput and TTFT against concurrency with
the transformers baseline, and KV blocks over time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
plots = pytest.importorskip("plots")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_serving_plot_has_a_line_per_series_and_the_baseline(tmp_path):
    runs = [{"label": f"bf16 c={c}", "max_concurrency": c, "output_throughput": 20.0 * c, "mean_ttft_ms": 50.0 * c}
            for c in (1, 4, 16)]  # fmt: skip
    runs += [{"label": "hf", "hf_baseline": True, "output_throughput": 20.5, "dtype": "float32"}]
    path = plots.serving_plot(runs, tmp_path / "serving.png")
    width, height = _png_size(path)
    assert width > 2 * height > 0  # two panels side by side


def test_the_kv_blocks_plot_draws_every_trace(tmp_path):
    path = plots.kv_blocks_plot({"unshared": [4, 8, 12, 0], "n=4": [2, 3, 4, 0]}, tmp_path / "kv.png", "blocks")
    assert min(_png_size(path)) > 100
