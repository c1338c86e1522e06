"""A decode step on any device, by the ops it dispatches: the step's wall time (synchronized), the
aten ops per step by name, and the engine source lines that issue copies (clone, contiguous, dtype
conversions, copy_, cat, roll, index_select). On a GPU every op that computes (not views such as
`t`, `view`, `slice`) is at least one kernel launch, so this counts the host work a step costs where
the card idles (bench/RESULTS.md, 2026-12-04: an
H200 busy ~2 ms of an 11.6 ms step of a 1.1B Llama). On CUDA it runs the step replayed from CUDA
graphs, then eagerly, in one process (ops inside a replayed graph are not dispatched: what it counts
then is the host's work outside the graph). Part of bench/gpu_check.sh.

    python bench/step_ops.py --model DIR --device cuda               # 16 sequences, bfloat16, graphs and eager
    python bench/step_ops.py --model DIR --device cpu --python-layers  # the layers' Python path on CPU
    TRITON_INTERPRET=1 python bench/step_ops.py --model DIR --device cpu --dtype float32 --attention-backend triton
        # a GPU step's ops, counted on a CPU (Triton's interpreter runs the kernels; times mean nothing)
Prints the step time and its phases (the engine's host work against the forward pass and the wait for
it), then the ops a step by name, then each copy's two innermost engine frames.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

COPIES = ("clone", "contiguous", "_to_copy", "copy_", "cat", "roll", "index_select")


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched, and for the copies the two innermost engine/kernels frames;
    and each Triton kernel launch as an op named "triton:<kernel>" (a launch is no aten op; the
    interpreter's own torch calls inside one are not counted)."""

    def __init__(self):
        super().__init__()
        self.ops, self.sites = collections.Counter(), collections.Counter()
        self.in_triton = False

    def __enter__(self):
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        self.patched = []
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            run = cls.run

            def counted(fn, *args, _run=run, **kwargs):
                self.ops[f"triton:{fn.fn.__name__}"] += 1
                inside, self.in_triton = self.in_triton, True
                try:
                    return _run(fn, *args, **kwargs)
                finally:
                    self.in_triton = inside

            self.patched.append((cls, run))
            cls.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        for cls, run in self.patched:
            cls.run = run
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_triton:
            return func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if name in COPIES:
            frames = [f for f in traceback.extract_stack() if "/engine/" in f.filename or "/kernels/" in f.filename]
            self.sites[(name, " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}"
                                          for f in reversed(frames[-2:])))] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[16], help="sequences a step (several: one run each)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed")
    parser.add_argument("--count-steps", type=int, default=4, help="decode steps whose ops are counted")
    parser.add_argument("--modes", nargs="+", choices=("graphs", "eager"), default=None,
                        help="CUDA: decode steps replayed from CUDA graphs and/or eagerly, one after the other in "
                             "this process (default both); the CPU has eager steps only")
    parser.add_argument("--python-layers", action="store_true",
                        help="decoder layers on their Python path instead of one decoder_layer op each (CPU)")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "cpu", "torch", "triton"),
                        help="the engine's backend (triton on a CPU: under TRITON_INTERPRET=1, to count a GPU step's ops)")
    args = parser.parse_args(argv)

    from engine.models.llama import LlamaDecoderLayer

    layer_op = LlamaDecoderLayer.layer_op
    if args.python_layers:
        LlamaDecoderLayer.layer_op = False
    on_cuda = args.device.startswith("cuda")
    summary = []
    try:
        for batch in args.batch:
            for mode in args.modes or (["graphs", "eager"] if on_cuda else ["eager"]):
                summary.append((batch, mode, *count_ops(args, batch, enforce_eager=mode == "eager")))
        print("summary: sequences, mode, decode step median, aten ops a step (outside any graph), "
              "the batch's prefill step the first time and again")
        for batch, mode, median, ops, first, again in summary:
            print(f"  {batch:4d}  {mode:6s}  {median * 1e3:8.2f} ms  {ops:6.0f} ops  prefill {first * 1e3:8.2f} / {again * 1e3:8.2f} ms")
        return 0
    finally:
        LlamaDecoderLayer.layer_op = layer_op  # a class attribute: the caller's process keeps its own


def count_ops(args: argparse.Namespace, batch: int, enforce_eager: bool) -> tuple[float, float, float, float]:
    """(median decode step seconds, aten ops a step, the batch's prefill step seconds the first time
    and again) of `batch` sequences, after printing them."""
    from bench.profile_step import phase_medians, phase_timer
    from engine import LLM, SamplingParams

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    # A fixed cache: the second engine of a CUDA A/B must not size its cache by the first one's leftovers.
    llm = LLM(args.model, device=args.device, dtype=args.dtype, num_kv_blocks=64 * batch, enforce_eager=enforce_eager,
              attention_backend=args.attention_backend)
    eng = llm.engine
    total = 8 + args.steps + args.count_steps
    params = SamplingParams(temperature=0.0, max_tokens=total + 8, ignore_eos=True)
    def timed_step() -> float:
        sync()
        start = time.perf_counter()
        eng.step()
        sync()
        return time.perf_counter() - start

    def add_batch(tag: str) -> None:
        for i in range(batch):
            eng.add_request(f"{tag}{i}", f"{tag.title()} request {i}: tell me a story about the number {i * 7}.", params)

    # The batch's prefill, its first time in this engine (in this process, for the first engine:
    # kernel builds, Triton compiles for new shapes), and again after the decodes (steady).
    add_batch("first")
    prefill_first = timed_step()
    for _ in range(7):  # a few decodes (kernel builds, first-touch pages)
        eng.step()
    timer = phase_timer(eng)
    times, phases = [], []
    for _ in range(args.steps):
        times.append(timed_step())
        phases.append(timer.take())
    timer.restore()
    counter = CountOps()
    with counter:
        for _ in range(args.count_steps):
            eng.step()
    while eng.has_unfinished_requests():
        eng.step()
    add_batch("again")
    prefill_again = timed_step()
    while eng.has_unfinished_requests():
        eng.step()

    n = args.count_steps
    graphs = "eager" if eng.runner.model_runner.decode_graphs is None else "CUDA graphs"
    print(f"{args.device}, {args.dtype}, {batch} sequences, {graphs}: decode step median {statistics.median(times) * 1e3:.2f} ms "
          f"(min {min(times) * 1e3:.2f}) over {args.steps}; {sum(counter.ops.values()) / n:.0f} aten ops a step; "
          f"the batch's prefill step {prefill_first * 1e3:.2f} ms the first time, {prefill_again * 1e3:.2f} ms again")
    step = statistics.median(times)
    print("the timed steps by phase, median ms (on a GPU the forward phase launches the step and sample waits for it; "
          "what is left of the step is the engine's own host work):")
    for name, seconds in phase_medians(phases, step):
        print(f"{seconds * 1e3:8.3f}  {name}")
    for name, count in counter.ops.most_common(25):
        print(f"{count / n:8.1f}  {name}")
    print("copies a step, by the engine line that issues them:")
    for (name, site), count in counter.sites.most_common(25):
        print(f"{count / n:8.1f}  {name:14s} {site}")
    del llm, eng
    if args.device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
    return statistics.median(times), sum(counter.ops.values()) / n, prefill_first, prefill_again


if __name__ == "__main__":
    sys.exit(main())
