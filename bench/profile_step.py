"""Where a decode step's time goes outside the projections: the offline engine decoding one (or
--batch) sequence, greedy, timed by phase and profiled by op.

    python bench/profile_step.py                    # default model, bfloat16, batch 1, 2 threads
    python bench/profile_step.py --dtype float32 --batch 16
    python bench/profile_step.py --quantization none   # the bfloat16 weights (default: int4 on the GGUF's codes)
    python bench/profile_step.py --quantization none --ab-fused-mlp 6   # MLPs fused vs not, A/B
    python bench/profile_step.py --quantization none --ab-lm-head 6   # LM head on bf16_mm_rows vs torch.mv, A/B
    python bench/profile_step.py --dtype float32 --quantization none --ab-lm-head 6   # f32_mm_rows vs F.linear
    python bench/profile_step.py --quantization w8a8 --batch 64 --ab-lm-head 6   # w8a8's head as w8a8 vs int8 weight-only
    python bench/profile_step.py --ab-pool-spin 200,50 6   # our kernels' pool spinning 200 / 50 / 0 us vs OpenMP, A/B
    python bench/profile_step.py --quantization none --ab-read-ahead 6   # pool workers reading the next weight ahead or not, A/B
    python bench/profile_step.py --quantization none --ab-huge-pages 6   # weights on 2 MiB pages vs 4 KiB pages, A/B
    python bench/profile_step.py --quantization none --ab-layer-op 6   # decode layers as one DecoderStack call vs one decoder_layer op each vs Python, A/B
    python bench/profile_step.py --quantization none --ab-streaming 6   # the few-row matmuls' streaming loops vs prefetching ones, A/B
    python bench/profile_step.py --batch 64 --prompt-len 110   # chat64's shape: contexts ~50-180 while decoding
    python bench/profile_step.py --trace /tmp/step.json   # also a Chrome trace of the profiled steps
    python bench/profile_step.py --prompt-len 2000 --kv-cache-dtype int8   # an 8-bit KV cache, long context
    python bench/profile_step.py --model /tmp/bento-llm-bench-3b --quantization int4 --group-size 64 --steps 8 --profile-steps 4
        # bench_quant.py's 3B-shaped checkpoint (a path)

Prints three tables:
1. the step by phase (median ms over the timed steps): scheduling, step-input preparation, the
   forward pass, sampling, and the engine's bookkeeping after (update, detokenize);
2. the forward pass again with every projection's matmul skipped (zero outputs; where a layer runs
   as one decoder_layer op, each projection is a new_zeros of the output's shape instead, a real
   op: the stand-ins' own time, timed alone, is printed too): what the
   step spends in everything else inside the model, with the decoder layers as one DecoderStack
   call, as one op each and on their Python path;
3. torch.profiler's ops over whole steps (self CPU time and calls per step) by op name, each
   split into its share per decoder layer and what runs outside the layers (embedding, final
   norm, LM head, sampling); then each op's fastest call per input shape (over 5 us), the
   number to read on a loaded machine.
The header line says which of AMX-BF16 / AMX-INT8 / AVX512-BF16 the CPU has (so which kernels ran).
Timings are medians over --steps steps of one process; on a loaded machine they are noisy.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  (before torch: its OpenMP wait setting, engine/config.py)
import torch  # noqa: E402

from bench.bench_limits import cpu_features, random_prompt  # noqa: E402


class PhaseTimer:
    """Wraps methods of live objects to add their wall time into named phases (per step)."""

    def __init__(self):
        self.current: dict[str, float] = defaultdict(float)
        self.wrapped: list[tuple[object, str]] = []

    def wrap(self, obj, name: str, phase: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - start

        setattr(obj, name, timed)
        self.wrapped.append((obj, name))

    def restore(self) -> None:
        """The methods back as they were (instance attributes shadowing the class's, removed)."""
        for obj, name in reversed(self.wrapped):
            if name in vars(obj):
                delattr(obj, name)
        self.wrapped.clear()

    def take(self) -> dict[str, float]:
        out, self.current = dict(self.current), defaultdict(float)
        return out


# engine.step's phases as phase_timer times them, and what a step's median leaves besides them.
PHASES = ("schedule", "prepare inputs", "forward", "sample", "detokenize")
REST = "rest of engine.step (bookkeeping, stops, outputs)"


def phase_timer(engine) -> PhaseTimer:
    """A PhaseTimer on the engine's PHASES: its scheduler, its runner's input preparation, forward
    pass and sampling, and its detokenizer (whatever each method is now: a wrapper set on the
    runner before this call is timed as the forward pass)."""
    runner = engine.runner.model_runner
    timer = PhaseTimer()
    for obj, method, phase in zip((engine.scheduler, runner, runner, runner, engine.detokenizer),
                                  ("schedule", "prepare", "execute_model", "sample", "step"), PHASES):
        timer.wrap(obj, method, phase)
    return timer


def phase_medians(phases: list[dict[str, float]], step: float) -> list[tuple[str, float]]:
    """(phase, median seconds over the steps) for each of PHASES, then (REST, step less their sum)."""
    medians = [(name, statistics.median(p.get(name, 0.0) for p in phases)) for name in PHASES]
    return [*medians, (REST, step - sum(seconds for _, seconds in medians))]


def decode_steps(engine, batch: int, steps: int, vocab: int, on_step=None, prompt_len: int = 32,
                 mark: bool = False) -> list[float]:
    """Adds `batch` requests of `prompt_len` tokens and steps the engine; the wall time of each
    all-decode step. on_step(kept) after every step: kept, whether its time is in the list. mark:
    each step inside a profiler mark (decode_op_shares reads them), only where a profiler runs: a
    record_function costs ~6 us a step even without one, which the phase table would count as the
    engine's own."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"profile-{time.monotonic_ns()}-{i}", random_prompt(vocab, prompt_len, 100 + i), params)
    times = []
    while engine.has_unfinished_requests():
        running = engine.scheduler.running  # none before the first step: that one prefills
        decoding = bool(running) and all(s.num_computed_tokens == len(s.token_ids) - 1 for g in running for s in g.seqs)
        start = time.perf_counter()
        with torch.profiler.record_function(DECODE_STEP if decoding else OTHER_STEP) if mark else contextlib.nullcontext():
            engine.step()
        kept = decoding and bool(engine.scheduler.running)  # a step that finished nothing
        if kept:
            times.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(kept)
    return times


DECODE_STEP, OTHER_STEP = "decode step", "other step"  # profiler marks around engine.step()
# decode_op_shares' groups: the first whose test takes an op (name, whether it ran in a decoder layer).
OP_GROUPS = [
    ("projections (matmuls in the layers)", lambda name, inside: inside and _is_matmul(name)),
    ("LM head (matmul outside the layers)", lambda name, inside: _is_matmul(name)),
    ("decode attention kernel", lambda name, inside: name.endswith(("decode_attention", "paged_attention"))),
    ("rotary, KV-cache write, qkv_attention's and decoder_layer's own", lambda name, inside: name.endswith(
        ("rotary_embedding_", "write_kv_cache", "qkv_attention", "decoder_layer"))),
    ("norms and SiLU", lambda name, inside: name.endswith(("rms_norm", "silu_mul"))),
    ("other ops in the layers (views, copies, empty)", lambda name, inside: inside),
    ("sampler and other ops outside the layers", lambda name, inside: True),
]


def _is_matmul(name: str) -> bool:
    # _linear_pointwise: oneDNN's packed matmul (the projections without AMX); mv/addmv: ATen's GEMV.
    return name.endswith(("::mm", "::addmm", "::mv", "::addmv", "::matmul", "::linear", "_linear_pointwise", "_mm_amx",
                          "_mm_rows", "_mm_dpbf16", "_mm_dpbusd", "_mm_vnni", "_dequantize", "amx_linear", "bf16_linear",
                          "f32_linear", "w4a8_linear"))


def decode_op_shares(events, in_layer) -> None:
    """Ops of the profiled all-decode steps by group: each op's fastest call per input shape times
    its calls (load-proof: what a quiet machine gives), and the profiled self time (loaded)."""
    ranges = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == DECODE_STEP)
    starts, steps = [r[0] for r in ranges], max(len(ranges), 1)
    # (name, input shapes, in a layer) -> [fastest call us, calls, total us]
    fastest: dict[tuple[str, str, bool], list[float]] = {}
    for e in events:
        k = bisect.bisect_right(starts, e.time_range.start) - 1
        if e.name == DECODE_STEP or e.name.startswith("layer ") or k < 0 or e.time_range.end > ranges[k][1]:
            continue
        row = fastest.setdefault((e.name, str(e.input_shapes), in_layer(e)), [float("inf"), 0, 0.0])
        row[0] = min(row[0], e.self_cpu_time_total)
        row[1] += 1
        row[2] += e.self_cpu_time_total
    groups = {name: [0.0, 0.0] for name, _ in OP_GROUPS}
    for (name, _, inside), (best, calls, total) in fastest.items():
        group = next(g for g, takes in OP_GROUPS if takes(name, inside))
        groups[group][0] += best * calls / steps
        groups[group][1] += total / steps
    whole = sum(g[0] for g in groups.values())
    print(f"\nThe decode steps' ops by group ({steps} profiled decode steps): each op's fastest call per shape x "
          "its calls\n(close to a quiet machine's time), and the profiled self time (the machine as it was)\n")
    print("| group | ms per step at the fastest calls | share | profiled ms per step |")
    print("| --- | --- | --- | --- |")
    for name, (best, total) in groups.items():
        print(f"| {name} | {best / 1e3:.2f} | {best / whole:.0%} | {total / 1e3:.2f} |")
    print(f"| **all ops** | **{whole / 1e3:.2f}** | | **{sum(g[1] for g in groups.values()) / 1e3:.2f}** |")


@contextlib.contextmanager
def projections_skipped(model):
    """Every projection returns a zero output of its shape without reading its weight: what is
    left of the forward pass is everything but the matmuls (fused MLPs run unfused for it). A
    layer that runs as one decoder_layer op calls aten::new_zeros of the output's shape instead (an
    op it can call by name; stand_in_time says what these cost)."""
    from engine.layers.linear import Linear
    from engine.models.llama import forget_layer_op_plans

    outputs: dict[tuple[int, int], torch.Tensor] = {}
    project, kernel_call = Linear.project, Linear.kernel_call
    fused = {m: m.fused_rows for m in model.modules() if getattr(m, "fused_rows", None)}
    for m in fused:
        m.fused_rows = 0

    def zeros(self, x, bias=None):
        key = (id(self), x.shape[0])
        if key not in outputs:
            outputs[key] = torch.zeros(x.shape[0], self.out_features, dtype=x.dtype)
        return outputs[key]

    def new_zeros(self, rows):
        return None if kernel_call(self, rows) is None else ("aten::new_zeros", [], [2, rows, self.out_features])

    Linear.project, Linear.kernel_call = zeros, new_zeros
    forget_layer_op_plans(model)
    try:
        yield
    finally:
        Linear.project, Linear.kernel_call = project, kernel_call
        forget_layer_op_plans(model)
        for m, rows in fused.items():
            m.fused_rows = rows


def pass_line(label: str, ms: list[float], fastest: list[float] | None = None, unit: str = "pass",
              units: str = "passes") -> str:
    """One A/B mode's line: its step median per pass (or run), their median, and where given the
    fastest step per pass and their median (on a loaded machine the closer to a quiet one)."""
    line = (f"{label}: step median per {unit} {' '.join(f'{t:.2f}' for t in ms)} ms; median of {units} "
            f"{statistics.median(ms):.2f}")
    if fastest is not None:
        line += (f"; fastest step per {unit} {' '.join(f'{t:.2f}' for t in fastest)}, "
                 f"median {statistics.median(fastest):.2f}")
    return line


def alternating_passes(steps, rounds: int, names: list[str], set_mode) -> tuple[dict, dict]:
    """ROUNDS rounds of one pass of decode steps (steps()) per mode, set_mode(name) before each, the
    order reversed every other round (a loaded machine drifts): each mode's step median and fastest
    step per pass, in ms. The A/B options below share it."""
    passes: dict[str, list[float]] = {name: [] for name in names}
    fastest: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            set_mode(name)
            times = steps()
            passes[name].append(statistics.median(times) * 1e3)
            fastest[name].append(min(times) * 1e3)
    return passes, fastest


def fused_mlp_ab(model, steps, rounds: int) -> None:
    """Decode steps with each MLP fused (amx_silu_mlp) and unfused (three calls), alternating in
    this process, every pass printed (other processes load a shared machine)."""
    mlps = {m: m.fused_rows for m in model.modules() if getattr(m, "fused_rows", None)}
    if not mlps:
        print("no MLP runs fused here (no AMX strips: not bfloat16 on an AMX CPU, or quantized)")
        return

    def set_mode(name: str) -> None:
        for m, rows in mlps.items():
            m.fused_rows = rows if name == "fused" else 0

    passes, _ = alternating_passes(steps, rounds, ["fused", "unfused"], set_mode)
    for name, ms in passes.items():
        print(pass_line(f"{name} MLPs", ms))


def lm_head_ab(steps, rounds: int, float32: bool) -> None:
    """Decode steps with the tied LM head (a plain weight) on our few-row loops (kernels/csrc/
    gemv_ops.cpp: bf16_mm_rows in bfloat16, f32_mm_rows in float32) and on PyTorch's matmuls as
    before them (bfloat16: torch.mv/mm; float32: F.linear), alternating in this process, every pass
    printed (other processes load a shared machine)."""
    from engine.layers import linear_kernels as linear

    rows_ops = linear.avx512_bf16_ops
    if rows_ops() is None or (linear.amx_kernels() is not None and not float32):
        print("the LM head does not run on bf16_mm_rows / f32_mm_rows here (AMX runs it, or no AVX512-BF16)")
        return

    def set_mode(name: str) -> None:
        linear.avx512_bf16_ops = rows_ops if name == "our few-row loop" else (lambda: None)

    try:
        passes, _ = alternating_passes(steps, rounds, ["our few-row loop", "PyTorch's matmul"], set_mode)
    finally:
        linear.avx512_bf16_ops = rows_ops
    for name, ms in passes.items():
        print(pass_line(f"LM head on {name}", ms))


def w8a8_head_ab(model, steps, rounds: int) -> None:
    """Decode steps with w8a8's tied LM head as w8a8 (rotated int8 rows, the input rounded to
    int8: w8a8_mm) and as int8 weight-only rows (int8_mm_dpbf16 / int8_mm_amx: what it was
    before), alternating in this process, every pass printed. The weight-only table is built from
    the w8a8 codes rotated back (a second rounding: for timing only)."""
    from engine.layers.embedding import int8_rows
    from engine.layers.packed_weight import PackedQuantizedWeight
    from engine.layers.rotation import rotate

    head, embedding = model.lm_head, model.embed_tokens
    w8a8 = head.quantized
    if w8a8 is None or not w8a8.w8a8 or w8a8 is not embedding.quantized:
        print("the LM head here is not a tied w8a8 table")
        return
    codes = w8a8.int8_rows().float() * w8a8.scales[: w8a8.out_features, None]
    table = rotate(codes, w8a8.rotation) if w8a8.rotation else codes
    weight_only = PackedQuantizedWeight(int8_rows(table), w8a8.dtype, table.device)
    heads = {"w8a8 (rotated rows, int8 input)": w8a8, "int8 weight-only rows": weight_only}

    def set_mode(name: str) -> None:
        head.quantized = embedding.quantized = heads[name]

    try:
        passes, fastest = alternating_passes(steps, rounds, list(heads), set_mode)
    finally:
        set_mode(next(iter(heads)))
    for name, ms in passes.items():
        print(pass_line(f"LM head {name}", ms, fastest[name]))


def pool_ab(steps, spins: str, rounds: int) -> None:
    """Decode steps with our kernels' regions on their pool (kernels/csrc/thread_pool.h), its
    workers spinning each of `spins` (comma-separated us) for the next op, or sleeping after each
    (spin 0), or on torch's OpenMP threads as before the pool, or on one thread (torch's ops too);
    rotating in this process, every pass printed."""
    ops = torch.ops.bento_llm
    modes = {f"pool, spin {us} us": (True, us) for us in sorted({int(us) for us in spins.split(",")} | {0}, reverse=True)}
    modes["OpenMP (no pool)"] = (False, 0)
    modes["one thread"] = (True, 0)
    passes: dict[str, list[float]] = {name: [] for name in modes}
    worker_share: dict[str, list[int]] = {name: [0, 0] for name in modes}  # parts run by workers, all parts
    spin_before, threads = ops.kernel_pool_spin_us(), torch.get_num_threads()
    names = list(modes)
    try:
        for i in range(rounds):
            for name in names[i % len(names):] + names[: i % len(names)]:
                enabled, spin = modes[name]
                ops.set_kernel_pool_enabled(enabled)
                ops.set_kernel_pool_spin_us(spin)
                torch.set_num_threads(1 if name == "one thread" else threads)
                before = ops.kernel_pool_stats()
                passes[name].append(statistics.median(steps()) * 1e3)
                after = ops.kernel_pool_stats()  # [pooled, serial_busy, caller parts, worker parts, ...]
                worker_share[name][0] += after[3] - before[3]
                worker_share[name][1] += after[2] + after[3] - before[2] - before[3]
    finally:
        torch.set_num_threads(threads)
        ops.set_kernel_pool_enabled(True)
        ops.set_kernel_pool_spin_us(spin_before)
    for name, ms in passes.items():
        workers, parts = worker_share[name]
        share = f"; workers ran {workers / parts:.0%} of {parts} parts" if parts else ""
        print(pass_line(name, ms) + share)


def read_ahead_ab(steps, rounds: int) -> None:
    """Decode steps with our kernels' pool workers reading the next matmul's weight into their
    cache between ops (kernels/csrc/thread_pool.h) and without, alternating in this process, every
    pass printed (median step, and fastest step: on a loaded machine the closer to a quiet one),
    with the bytes read ahead per step."""
    ops = torch.ops.bento_llm
    ahead: list[int] = []  # bytes read ahead per step, each read-ahead pass
    mode = ["read-ahead"]

    def set_mode(name: str) -> None:
        mode[0] = name
        ops.set_kernel_pool_read_ahead(name == "read-ahead")

    def counted_steps() -> list[float]:
        before = ops.kernel_pool_stats()[8]
        times = steps()
        if mode[0] == "read-ahead":
            ahead.append((ops.kernel_pool_stats()[8] - before) // max(len(times), 1))
        return times

    try:
        passes, fastest = alternating_passes(counted_steps, rounds, ["read-ahead", "no read-ahead"], set_mode)
    finally:
        ops.set_kernel_pool_read_ahead(True)
    for name, ms in passes.items():
        print(pass_line(name, ms, fastest[name]))
    print(f"read ahead per step (MiB, each read-ahead pass): {' '.join(f'{b / 2**20:.1f}' for b in ahead)}")


def huge_pages_ab(model, steps, rounds: int) -> None:
    """Decode steps with the weights in one arena on 2 MiB pages (the engine's placement,
    engine/host_arena.py) and in one from torch's allocator (4 KiB pages unless THP is "always"),
    moved between passes, alternating in this process, every pass printed (median step, and
    fastest step)."""
    from engine.host_arena import huge_page_buffer, huge_page_bytes, move_weights, plain_buffer
    from engine.models.llama import forget_layer_op_plans

    names = ["2 MiB pages", "4 KiB pages"]
    on_huge: list[float] = []

    def set_mode(name: str) -> None:
        arena = move_weights(model, huge_page_buffer if name == names[0] else plain_buffer)
        forget_layer_op_plans(model)  # the layers' plans are built again on the moved weights
        if name == names[0] and arena is not None:
            on_huge.append(huge_page_bytes(arena) / arena.numel())

    try:
        passes, fastest = alternating_passes(steps, rounds, names, set_mode)
    finally:
        set_mode(names[0])
    for name, ms in passes.items():
        print(pass_line(f"weights on {name}", ms, fastest[name]))
    print(f"share of the arena the kernel gave huge pages, each 2 MiB pass: {' '.join(f'{s:.2f}' for s in on_huge)}")


def stand_in_time(model, rows: int, repeats: int) -> float:
    """Median seconds of a forward's projection stand-ins under projections_skipped (each layer's
    four aten::new_zeros) called alone, from Python (so an upper bound: a call from Python costs
    ~1 us more than decoder_layer's from C++)."""
    from engine.layers.linear import Linear

    x = torch.zeros(rows, 1, dtype=torch.bfloat16)
    shapes = [(rows, m.out_features) for layer in model.layers for m in layer.modules() if isinstance(m, Linear)]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for shape in shapes:
            x.new_zeros(shape)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def streaming_ab(steps, rounds: int) -> None:
    """Decode steps with the few-row loops cpu_features.h's streaming rule picks (bf16_linear's and
    f32_linear's at 1-6 rows, bf16_mm_rows' and int8_mm_rows' at 1-2: plain streams, no software
    prefetch) and with their prefetching loops, alternating in this process, every pass printed
    (median step, and fastest step). Covers bfloat16's and float32's projections, bfloat16's head
    and the int8 codes of int8's projections and of int4's (GGUF) LM head."""
    ops = torch.ops.bento_llm
    switches = (ops.set_bf16_linear_streaming, ops.set_f32_linear_streaming, ops.set_bf16_mm_rows_streaming,
                ops.set_int8_rows_streaming)

    def set_all(on: bool | None) -> None:
        for switch in switches:
            switch(on)

    try:
        passes, fastest = alternating_passes(steps, rounds, ["streaming loops", "prefetching loops"],
                                             lambda name: set_all(name == "streaming loops"))
    finally:
        set_all(None)  # the CPU's rule again
    for name, ms in passes.items():
        print(pass_line(f"few-row matmuls on their {name}", ms, fastest[name]))


def layer_op_ab(engine, batch: int, steps: int, vocab: int, prompt_len: int, rounds: int) -> None:
    """Decode steps with the decoder layers as one DecoderStack call, as one decoder_layer op each
    (kernels/csrc/step_ops.cpp) and on their Python path, the mode changing every step (so all see
    the same load; a loaded machine drifts between passes), ROUNDS runs of --steps steps; each run's
    median and fastest step printed."""
    from engine.models.llama import LlamaDecoderLayer

    names = ["decoder stack", "decoder_layer op", "Python layers"]
    passes: dict[str, list[float]] = {name: [] for name in names}
    fastest: dict[str, list[float]] = {name: [] for name in names}

    def set_mode(name: str) -> None:
        LlamaDecoderLayer.layer_op, LlamaDecoderLayer.layer_stack = name != names[2], name == names[0]

    try:
        for i in range(rounds):
            kept_modes: list[str] = []  # the mode each timed step ran
            mode = [i % len(names)]

            def switch(kept: bool) -> None:  # after every step: the next one runs the next mode
                if kept:
                    kept_modes.append(names[mode[0]])
                mode[0] = (mode[0] + 1) % len(names)
                set_mode(names[mode[0]])

            set_mode(names[mode[0]])
            times = decode_steps(engine, batch, steps, vocab, on_step=switch, prompt_len=prompt_len)
            by_mode: dict[str, list[float]] = {name: [] for name in names}
            for t, name in zip(times, kept_modes):
                by_mode[name].append(t)
            for name in names:
                passes[name].append(statistics.median(by_mode[name]) * 1e3)
                fastest[name].append(min(by_mode[name]) * 1e3)
    finally:
        set_mode(names[0])
    for name, ms in passes.items():
        print(pass_line(name, ms, fastest[name], "run", "runs"))


def forward_times(runner, inputs, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median seconds of this thread's CPU time) of the forward pass: on a
    loaded machine the thread's CPU time is the steadier one (it leaves out time the thread
    waited for a core; with several threads it also leaves out the other threads' work)."""
    runner.execute_model(inputs)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        runner.execute_model(inputs)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--quantization", default="auto",
                        help="the engine's quantization ('auto': int4 for the default Q4 GGUF on AMX; 'none': --dtype weights)")
    parser.add_argument("--group-size", type=int, default=32,
                        help="int4's group size where the weights are quantized at load (a GGUF's Q4 keeps its 32)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="the engine's kv_cache_dtype (auto, bfloat16, int8, fp8_e4m3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed by phase")
    parser.add_argument("--prompt-len", type=int, default=32,
                        help="tokens per prompt: the decode attention's context (chat64's is ~50-180)")
    parser.add_argument("--profile-steps", type=int, default=16,
                        help="decode steps under torch.profiler (0: none, the phase and forward tables only)")
    parser.add_argument("--top", type=int, default=25, help="ops listed")
    parser.add_argument("--trace", help="write a Chrome trace of the profiled steps here")
    parser.add_argument("--ab-fused-mlp", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the MLPs fused vs unfused, alternating, ROUNDS rounds")
    parser.add_argument("--ab-lm-head", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the LM head on bf16_mm_rows (float32: f32_mm_rows) vs "
                        "PyTorch's matmul (w8a8: its head as w8a8 vs int8 weight-only rows), alternating, ROUNDS rounds")
    parser.add_argument("--ab-read-ahead", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the pool's workers reading the next weight ahead vs not, "
                             "alternating, ROUNDS rounds")
    parser.add_argument("--ab-streaming", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the few-row matmuls (bf16_linear, bf16_mm_rows, int8_mm_rows) "
                             "on their streaming loops vs the prefetching ones, alternating, ROUNDS rounds (without AMX)")
    parser.add_argument("--ab-layer-op", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the decoder layers as one DecoderStack call vs one "
                             "decoder_layer op each vs their Python path, switching every step, ROUNDS runs")
    parser.add_argument("--ab-huge-pages", type=int, default=0, metavar="ROUNDS",
                        help="only: --steps decode steps with the weights on 2 MiB pages (the engine's) vs 4 KiB pages, "
                             "moved between passes, alternating, ROUNDS rounds")
    parser.add_argument("--ab-pool-spin", nargs=2, default=None, metavar=("US", "ROUNDS"),
                        help="only: --steps decode steps with our kernels' pool spinning US us (a comma-separated list), spin 0, "
                             "and on OpenMP, rotating, ROUNDS rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine import LLM

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              quantization_group_size=args.group_size, num_threads=args.threads, max_num_seqs=max(args.batch, 8))
    engine = llm.engine
    runner = engine.runner.model_runner
    vocab = engine.model_config.vocab_size
    # Warm-up: oneDNN builds its kernels per row count.
    decode_steps(engine, args.batch, 4, vocab, prompt_len=args.prompt_len)
    if args.ab_fused_mlp:
        fused_mlp_ab(runner.model, lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len),
                     args.ab_fused_mlp)
        return
    if args.ab_lm_head and args.quantization == "w8a8":
        w8a8_head_ab(runner.model, lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len),
                     args.ab_lm_head)
        return
    if args.ab_lm_head:
        lm_head_ab(lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len), args.ab_lm_head,
                   args.dtype == "float32")
        return
    if args.ab_read_ahead:
        import kernels.cpu_ops  # noqa: F401  (the pool's ops)

        read_ahead_ab(lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len),
                      args.ab_read_ahead)
        return
    if args.ab_streaming:
        streaming_ab(lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len),
                     args.ab_streaming)
        return
    if args.ab_layer_op:
        layer_op_ab(engine, args.batch, args.steps, vocab, args.prompt_len, args.ab_layer_op)
        return
    if args.ab_huge_pages:
        huge_pages_ab(runner.model, lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len),
                      args.ab_huge_pages)
        return
    if args.ab_pool_spin:
        import kernels.cpu_ops  # noqa: F401  (the pool's ops)

        pool_ab(lambda: decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len), args.ab_pool_spin[0],
                int(args.ab_pool_spin[1]))
        return

    # 1. phases
    last_inputs = []
    execute_model = runner.execute_model

    def keeping_inputs(inputs):
        last_inputs[:] = [inputs]
        return execute_model(inputs)

    runner.execute_model = keeping_inputs
    timer = phase_timer(engine)
    phases: list[dict[str, float]] = []
    times = decode_steps(engine, args.batch, args.steps, vocab, prompt_len=args.prompt_len,
                         on_step=lambda kept: phases.append(timer.take()) if kept else timer.take())
    timer.restore()
    step = statistics.median(times)
    wait = os.environ.get("GOMP_SPINCOUNT") and f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    print(f"\n{args.model}, {args.dtype}, quantization {runner.config.quantization or 'none'}, kv cache {args.kv_cache_dtype}, batch {args.batch}, {args.threads} threads "
          f"(OpenMP wait: {wait or os.environ.get('OMP_WAIT_POLICY', 'spin, libgomp default')}), {cpu_features()}, "
          f"torch {torch.__version__}; "
          f"`python bench/profile_step.py {' '.join(sys.argv[1:])}`\n")
    print("| phase | ms per step (median) | share |")
    print("| --- | --- | --- |")
    for name, seconds in phase_medians(phases, step):
        print(f"| {name} | {seconds * 1e3:.3f} | {seconds / step:.0%} |")
    print(f"| **whole step** | **{step * 1e3:.3f}** | |")

    # The last decode step's forward again, with and without the projections' matmuls.
    repeats = max(20, args.steps)
    from engine.models.llama import LlamaDecoderLayer

    full = forward_times(runner, last_inputs[0], repeats)
    # The layers as one DecoderStack call, one decoder_layer op each, on their Python path: five
    # interleaved rounds (a loaded machine drifts), the median of the rounds' medians.
    rounds: list[list[tuple[float, float]]] = [[], [], []]
    with projections_skipped(runner.model):
        try:
            for _ in range(5):
                for mode, times in enumerate(rounds):
                    LlamaDecoderLayer.layer_op, LlamaDecoderLayer.layer_stack = mode < 2, mode == 0
                    times.append(forward_times(runner, last_inputs[0], max(4, repeats // 5)))
        finally:
            LlamaDecoderLayer.layer_op = LlamaDecoderLayer.layer_stack = True
    rest, op_rest, python_rest = ((statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))
                                  for times in rounds)
    print("\n| forward pass (the last decode step's inputs again) | wall ms (median) | this thread's CPU ms (median) |")
    print("| --- | --- | --- |")
    print(f"| whole | {full[0] * 1e3:.3f} | {full[1] * 1e3:.3f} |")
    print(f"| without the projections' matmuls (zero outputs) | {rest[0] * 1e3:.3f} | {rest[1] * 1e3:.3f} |")
    print(f"| ... per decoder layer | {rest[0] * 1e3 / len(runner.model.layers):.4f} | "
          f"{rest[1] * 1e3 / len(runner.model.layers):.4f} |")
    print(f"| ... the same, one decoder_layer op per layer (no DecoderStack) | {op_rest[0] * 1e3:.3f} | "
          f"{op_rest[1] * 1e3:.3f} |")
    print(f"| ... the same, decoder layers on their Python path (no decoder_layer op) | {python_rest[0] * 1e3:.3f} | "
          f"{python_rest[1] * 1e3:.3f} |")
    print(f"| (the decoder_layer ops' projection stand-ins, aten::new_zeros, timed alone from Python) | "
          f"{stand_in_time(runner.model, args.batch, repeats) * 1e3:.3f} | |")

    if args.profile_steps <= 0:  # the phase and forward tables only
        return
    # 2. and 3. ops under the profiler, each decoder layer marked by a record_function
    model = runner.model
    hooks = []
    for i, layer in enumerate(model.layers):
        marks = {}

        def pre(module, inputs, i=i, marks=marks):
            marks["r"] = torch.profiler.record_function(f"layer {i}")
            marks["r"].__enter__()

        def post(module, inputs, output, marks=marks):
            marks["r"].__exit__(None, None, None)

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=False) as prof:
        profiled = decode_steps(engine, args.batch, args.profile_steps, vocab, prompt_len=args.prompt_len, mark=True)
    for h in hooks:
        h.remove()
    if args.trace:
        prof.export_chrome_trace(args.trace)
    n = len(profiled)
    events = prof.events()
    # Which layer (if any) each op ran in: ops whose time interval lies inside a "layer i" range.
    layer_ranges = sorted((e.time_range.start, e.time_range.end) for e in events if e.name.startswith("layer "))
    starts = [r[0] for r in layer_ranges]

    def in_layer(e) -> bool:
        k = bisect.bisect_right(starts, e.time_range.start) - 1
        return k >= 0 and e.time_range.end <= layer_ranges[k][1]

    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0, 0.0])  # self us, calls, in-layer us, outside us
    # Each op's fastest call per input shape: on a loaded machine the sums above take in every
    # preemption (and, with 2 threads, every wait for a descheduled worker); the fastest call of
    # a shape called hundreds of times is close to what a quiet machine gives.
    fastest: dict[tuple[str, str], float] = {}
    for e in events:
        if e.name.startswith(("layer ", "ProfilerStep")) or e.name in (DECODE_STEP, OTHER_STEP):
            continue
        row = by_op[e.name]
        row[0] += e.self_cpu_time_total
        row[1] += 1
        row[2 if in_layer(e) else 3] += e.self_cpu_time_total
        key = (e.name, str(e.input_shapes))
        fastest[key] = min(fastest.get(key, float("inf")), e.self_cpu_time_total)
    total_self = sum(r[0] for r in by_op.values())
    layer_total = sum(e.cpu_time_total for e in events if e.name.startswith("layer "))
    num_layers = len(model.layers)
    print(f"\ntorch.profiler, {n} decode steps (profiled steps median {statistics.median(profiled) * 1e3:.2f} ms; "
          f"the profiler adds its own overhead per op): self CPU time per step\n")
    print("| op | us per step | calls per step | us per layer (in layers) | us per step outside layers |")
    print("| --- | --- | --- | --- | --- |")
    for name, (us, calls, inside, outside) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {name} | {us / n:.0f} | {calls / n:.1f} | {inside / n / num_layers:.1f} | {outside / n:.0f} |")
    print(f"| (all ops) | {total_self / n:.0f} | | | |")
    decode_op_shares(events, in_layer)
    print(f"\nlayers: {layer_total / n:.0f} us per step, {layer_total / n / num_layers:.0f} us per layer "
          f"({num_layers} layers)")
    print("\n| op | input shapes | fastest call (us) |")
    print("| --- | --- | --- |")
    top = {name for name, _ in sorted(by_op.items(), key=lambda kv: -kv[1][0])[: args.top]}
    for (name, shapes), us in sorted(fastest.items(), key=lambda kv: -kv[1]):
        if name in top and us >= 5:
            print(f"| {name} | {shapes} | {us:.1f} |")


if __name__ == "__main__":
    main()
