"""What sampling costs a decode step: the sampler on fixed logits at SmolLM2's vocabulary, per batch
size and sampling setting, this tree's C++ sample_rows and torch sample_rows, and optionally the
sampler of another git revision, timed alternately in one process.

    python bench/bench_sampler.py                          # batch 16 and 64; top_p 0.9 and top_k 50 at T 0.7, T 1.0, greedy
    python bench/bench_sampler.py --baseline HEAD~1        # also the whole Sampler as it was at a revision
    python bench/bench_sampler.py --batch-sizes 64 --repeats 20

Logits: a bulk of N(0, 2.5^2) values (a model's uninformed tokens) plus 32 tokens per row raised by
4-12 (its plausible continuations), rounded to bfloat16 as the default model's LM head makes them
(so equal values occur). At T 0.7, top_p 0.9 keeps a few to a few dozen tokens a row, as chat
replies do. Each entry is the minimum over --repeats calls of Sampler(logits, seqs) in ms
(everything the step's sampling does: the processors, uniforms, the draw), with the same logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import SamplingParams  # noqa: E402
from engine.outputs import RequestMetrics  # noqa: E402
from engine.sampler import Sampler  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from kernels import cpu_ops, reference  # noqa: E402

VOCAB = 49152  # SmolLM2's
SETTINGS = {
    "top_p=0.9 T=0.7": SamplingParams(temperature=0.7, top_p=0.9),
    "top_k=50 T=0.7": SamplingParams(temperature=0.7, top_k=50),
    "top_k=50 top_p=0.9 min_p=0.05": SamplingParams(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05),
    "T=1.0": SamplingParams(temperature=1.0),
    "greedy": SamplingParams(temperature=0.0),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--baseline", metavar="REV", help="also time engine/sampler.py as it was at this git revision")
    return p.parse_args()


def make_logits(rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=gen) * 2.5
    peaks = torch.randint(0, VOCAB, (rows, 32), generator=gen)
    logits.scatter_add_(1, peaks, 4 + 8 * torch.rand(rows, 32, generator=gen))
    return logits.to(torch.bfloat16).float()


def baseline_sampler(rev: str):
    """engine/sampler.py at rev, loaded as its own module beside this tree's engine."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:engine/sampler.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("baseline_sampler", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:engine/sampler.py", "exec"), module.__dict__)
    return module.Sampler(VOCAB, eos_token_ids=[0], argmax=cpu_ops.argmax_rows)


def best_ms(sampler, logits: torch.Tensor, seqs: list[Sequence]) -> float:
    start = time.perf_counter()
    sampler(logits.clone(), seqs)  # the engine hands over logits nothing else reads
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    args = parse_args()
    samplers = {
        "cpu": Sampler(VOCAB, eos_token_ids=[0], argmax=cpu_ops.argmax_rows, sample=cpu_ops.sample_rows),
        "torch": Sampler(VOCAB, eos_token_ids=[0], argmax=cpu_ops.argmax_rows, sample=reference.sample_rows),
    }
    if args.baseline:
        samplers[args.baseline] = baseline_sampler(args.baseline)
    print(f"threads {torch.get_num_threads()}, vocab {VOCAB}; min ms of {args.repeats} calls (clone of the logits included)")
    print(f"{'batch':>5} {'setting':<32}" + "".join(f"{name:>12}" for name in samplers))
    for rows in args.batch_sizes:
        logits = make_logits(rows)
        for name, params in SETTINGS.items():
            seqs = [Sequence(str(i), None, [1, 2, 3], params, RequestMetrics(arrival_time=0.0)) for i in range(rows)]
            times = {s: [] for s in samplers}
            for _ in range(args.repeats):  # alternate, so drift on a shared machine hits every sampler alike
                for s, sampler in samplers.items():
                    times[s].append(best_ms(sampler, logits, seqs))
            print(f"{rows:>5} {name:<32}" + "".join(f"{min(t):>12.2f}" for t in times.values()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
