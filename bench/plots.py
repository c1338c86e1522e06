"""PNG plots beside the benchmarks' tables (matplotlib, no display needed).

    python bench/plots.py bench/serving_results.jsonl     # -> bench/serving_results.png

bench_serving.py redraws its plot after each --result-json run; bench_sharing.py draws KV blocks
over time. One helper draws every line chart, so the plots look alike.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: benchmarks run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402


def draw_lines(ax, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str, title: str,
               baselines: dict[str, float] | None = None, log_x: bool = False) -> None:  # fmt: skip
    """One line per series (x, y), markers on the measured points; baselines as dashed lines."""
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(value, linestyle=("--", ":", "-.")[i % 3], color="black", linewidth=1, label=name)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if series or baselines:
        ax.legend(fontsize=8)


def save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"plot: {path}")
    return path


def serving_plot(results: list[dict], path: str | Path) -> Path:
    """Output tokens/s and mean TTFT against concurrency, one line per run series (a label less
    its `c=N`), with transformers' one-at-a-time throughput on the same axes."""
    runs: dict[str, list[dict]] = defaultdict(list)
    baselines: dict[str, float] = {}
    for result in results:
        label = result.get("label") or "run"
        if result.get("hf_baseline"):
            baselines[f"transformers generate, 1 at a time ({result.get('dtype', 'float32')})"] = result["output_throughput"]
        elif result.get("max_concurrency"):
            runs[re.sub(r"\s*c=\d+", "", label)].append(result)
    throughput, ttft = {}, {}
    for name, group in runs.items():
        group.sort(key=lambda r: r["max_concurrency"])
        xs = [r["max_concurrency"] for r in group]
        throughput[name] = (xs, [r["output_throughput"] for r in group])
        ttft[name] = (xs, [r["mean_ttft_ms"] for r in group])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    draw_lines(left, throughput, "concurrent requests", "output tokens/s", "Throughput", baselines, log_x=True)
    draw_lines(right, ttft, "concurrent requests", "mean TTFT (ms)", "Time to first token", log_x=True)
    return save(fig, path)


def kv_blocks_plot(traces: dict[str, list[int]], path: str | Path, title: str) -> Path:
    """KV blocks in use at every engine step, one line per run."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {name: (list(range(len(trace))), trace) for name, trace in traces.items()}
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=f"{name} (peak {max(ys, default=0)})")
    ax.set(xlabel="engine step", ylabel="KV blocks in use", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a bench_serving.py --result-json file (JSON lines)")
    parser.add_argument("-o", "--output", default=None, help="default: the results file with .png")
    args = parser.parse_args()
    path = Path(args.results)
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    serving_plot(results, args.output or path.with_suffix(".png"))


if __name__ == "__main__":
    main()
