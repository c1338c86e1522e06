"""The engine against this machine's limits, as ratios: every number next to the ceiling that
bounds it, measured in the same run on the same machine.

    python bench/bench_limits.py                       # the default model in bfloat16 (where the CPU packs it)
    python bench/bench_limits.py --dtype float32       # the exact mode
    python bench/bench_limits.py --quick               # fewer repetitions (a smoke run)
    python bench/bench_limits.py --ttft-only           # only the TTFT rows and its split (and their matmul limit)
    python bench/bench_limits.py --amx-linear          # only: each kind of projection on the column
                                                       # strips (amx_linear on AMX, else bf16_linear on
                                                       # AVX512-BF16) vs unpack + F.linear vs F.linear
                                                       # on a plain weight vs oneDNN packed, 1-2000 rows
    python bench/bench_limits.py --read-ahead 40       # only: each kind of projection at 1 row, a busy gap
                                                       # after each call (--gap-us, as a step's other ops
                                                       # leave), with our pool's workers reading the next
                                                       # weight ahead and without, alternating, 40 rounds
    python bench/bench_limits.py --interleaved 8       # only: the batch-1 step against the weight read, both
                                                       # measured in each of 8 rounds (the host's read drifts)
    python bench/bench_limits.py --lm-head             # only: the tied LM head alone at 1-64 rows, each
                                                       # kernel (bf16_mm_amx / bf16_mm_rows where the CPU
                                                       # runs them, torch.mv/mm, F.linear) vs its read time

Ceilings (measured first, with the engine's model loaded and idle):
- memory read bandwidth: the best of several passes of a float32 sum over a buffer much larger
  than the caches, on 2 MiB pages (as the engine's weights are) and on 4 KiB pages, the faster
  of the two; weight-read time: the bytes a decode step reads (every projection, the norms
  and the LM head; the embedding only where the LM head is it) at that bandwidth;
- matmul time at 1, 16, 64 rows and at a prefill chunk's rows: the model's own projections,
  called one after another in model order exactly as the engine calls them (oneDNN-packed where
  the engine packs), LM head included, so the weights stream from memory as in a step; also
  reported as GFLOP/s; at 1 row also by kind of projection (qkv_proj, ..., lm_head) against the
  time to read that kind's weights at the measured bandwidth.
Engine results (offline, this process, greedy, ignore_eos):
- the decode step at batch 1, 16 and 64 (median engine.step() over steps where every sequence
  decodes) against max(weight-read time, matmul time at that many rows);
- TTFT of one prompt of --prompt-len tokens (alone, prefix cache cold) and its prefill tok/s,
  against the matmul time at that many rows plus attention's FLOPs (causal q.k and p.v) at the
  projections' measured FLOP/s.
The batch-1 row also gives the forward pass alone (the rest of a step is scheduling, sampling
and bookkeeping).
Prints a markdown table (ratio = result / limit; 1.0 is the limit), under a header line that says
which of AMX-BF16 / AMX-INT8 / AVX512-BF16 the CPU has (so which kernels ran).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401  first: engine/config.py sets OpenMP's wait policy before torch loads libgomp
import torch  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first calls build oneDNN kernels
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_buffers(nbytes: int = 1 << 29) -> dict[str, torch.Tensor]:
    """Random float32 buffers of nbytes (far beyond the last-level cache), by the pages under them:
    2 MiB ones (engine/host_arena.py's, where the engine keeps its weights) and torch's
    allocator's (4 KiB pages unless THP is "always")."""
    from engine.host_arena import huge_page_buffer

    return {"2 MiB pages": huge_page_buffer(nbytes).view(torch.float32).uniform_(), "4 KiB pages": torch.rand(nbytes // 4)}


def sum_rates(buffers: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Bytes/s of a float32 sum over each buffer, the best of `repeats` passes."""
    return {pages: b.numel() * 4 / best_seconds(lambda b=b: b.sum(), repeats) for pages, b in buffers.items()}


def read_bandwidths(repeats: int, nbytes: int = 1 << 29) -> dict[str, float]:
    """sum_rates over read_buffers: on the 2-vCPU EPYC Zen 4 the sum reads up to ~1.3x as fast on
    2 MiB pages."""
    return sum_rates(read_buffers(nbytes), repeats)


def interleaved_batch1(engine, rounds: int, decode_tokens: int) -> list[str]:
    """The batch-1 decode step against the weight read, each round measuring both back to back
    (the read as read_bandwidths' faster sum, best of 3 passes over buffers kept for the run; then
    one prompt's decode steps, their median): on a shared host whose read rate drifts 1.5x
    between minutes, a ceiling measured once at the start says little about a step timed later.
    Table rows, then the median of the rounds' ratios."""
    buffers = read_buffers()
    weight_bytes = step_read_bytes(engine.runner.model_runner.model)
    vocab = engine.model_config.vocab_size
    lines, ratios = [], []
    for r in range(rounds):
        rates = sum_rates(buffers, 3)
        read = weight_bytes / max(rates.values())
        step = statistics.median(timed_steps(engine, [random_prompt(vocab, 32, 5000 + r)], decode_tokens))
        ratios.append(step / read)
        lines.append(f"| {r + 1} | {rates['2 MiB pages'] / 1e9:.1f} | {rates['4 KiB pages'] / 1e9:.1f} | {read * 1e3:.2f} "
                     f"| {step * 1e3:.2f} | {step / read:.2f} |")
    lines.append(f"| median of {rounds} rounds | | | | | **{statistics.median(ratios):.2f}** |")
    return lines


def read_bandwidth(repeats: int, nbytes: int = 1 << 29) -> float:
    """The machine's memory read ceiling: the faster of read_bandwidths' sums."""
    return max(read_bandwidths(repeats, nbytes).values())


def cpu_features() -> str:
    """Which of the instruction sets our kernels choose by this CPU has, from /proc/cpuinfo's
    flags (the kernels ask the CPU the same): AMX-BF16 and AMX-INT8 tiles, AVX512-BF16."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    names = {"amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "avx512_bf16": "AVX512-BF16"}
    return ", ".join(name if flag in flags else f"no {name}" for flag, name in names.items())


def step_read_bytes(model) -> int:
    """What one decode step reads: every weight (engine.memory's count) less an untied
    embedding, of which a step reads one row per token."""
    from engine.memory import storage_bytes, weight_tensors

    total = storage_bytes(weight_tensors(model))
    if not getattr(model.lm_head, "tied", False):
        total -= storage_bytes([model.embed_tokens.weight])
    return total


def model_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """(kind, module) of every projection in model order; kind is its attribute name (qkv_proj, lm_head, ...)."""
    from engine.layers.linear import Linear

    return [(name.rsplit(".", 1)[-1], m) for name, m in model.named_modules() if isinstance(m, Linear)]


@torch.inference_mode()
def matmul_seconds(model, rows: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(seconds, FLOPs) of every projection of the model at `rows` input rows, in model order."""
    linears = [m for _, m in model_linears(model)]
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for m in linears}
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)

    def run():
        for m in linears:
            m(inputs[m.in_features])

    return best_seconds(run, repeats), flops


@torch.inference_mode()
def projection_seconds(model, rows: int, dtype: torch.dtype, repeats: int) -> dict[str, tuple[float, int, int]]:
    """kind -> (seconds, weight bytes, count) of all projections of that kind at `rows` rows, each
    call timed inside passes over every projection in model order (so weights stream from memory
    as in a step); a kind's best pass."""
    from engine.memory import storage_bytes, weight_tensors

    linears = model_linears(model)
    inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=dtype) for _, m in linears}
    best: dict[str, float] = {}
    for repeat in range(repeats + 1):  # the first pass warms up
        spent = dict.fromkeys((kind for kind, _ in linears), 0.0)
        for kind, m in linears:
            start = time.perf_counter()
            m(inputs[m.in_features])
            spent[kind] += time.perf_counter() - start
        if repeat:
            best = {kind: min(t, best.get(kind, t)) for kind, t in spent.items()}
    return {kind: (seconds, storage_bytes(t for k, m in linears if k == kind for t in weight_tensors(m)),
                   sum(k == kind for k, _ in linears))
            for kind, seconds in best.items()}


@torch.inference_mode()
def amx_linear_table(model, bandwidth: float, rows_list: list[int], repeats: int) -> list[str]:
    """Markdown rows: per kind of projection and row count, the engine's column strips
    (kernels/csrc/amx_linear.cpp on AMX, else bf16_linear.cpp on AVX512-BF16) against their per-call unpack + F.linear (the engine's path past
    AMX_STRIPS_MAX_ROWS / BF16_STRIPS_MAX_ROWS), against F.linear on a plain weight (what the unpack costs on top) and
    against oneDNN's packed matmul on the same weights (plain and packed copies made here, for
    comparison only), each pass over every projection in model order (weights stream from memory
    as in a step), the paths alternating pass by pass; a kind's best pass. On one thread the
    clock is the thread's CPU time (a shared machine's other processes then cost less of the
    reading). Limit: its weights' read time at the bandwidth."""
    import torch.nn.functional as F

    from engine.layers.linear_kernels import amx_linear_ops, strips_ops

    ops = strips_ops()
    linears = [(kind, m) for kind, m in model_linears(model) if m.strips and m.packed_weight.dtype == torch.bfloat16]
    if ops is None or not linears:
        return ["(no projection is kept in column strips here: no AMX-BF16 or AVX512-BF16, or not bfloat16)"]
    strips = ops.amx_linear if amx_linear_ops() is not None else ops.bf16_linear
    plain = {id(m): ops.amx_linear_unpack(m.packed_weight, m.out_features) for _, m in linears}
    onednn = {id(m): torch.ops.mkldnn._reorder_linear_weight(plain[id(m)], None) for _, m in linears}
    paths = {
        "oneDNN": lambda m, x: torch.ops.mkldnn._linear_pointwise(x, onednn[id(m)], m.bias, "none", [], ""),
        "strips": lambda m, x: strips(x, m.packed_weight, m.bias, m.out_features),
        "unpack": lambda m, x: F.linear(x, ops.amx_linear_unpack(m.packed_weight, m.out_features), m.bias),
        "plain": lambda m, x: F.linear(x, plain[id(m)], m.bias),
    }
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    lines = []
    for rows in rows_list:
        inputs = {m.in_features: torch.randn(rows, m.in_features, dtype=torch.bfloat16) for _, m in linears}
        best: dict[tuple[str, str], float] = {}
        for repeat in range((repeats if rows <= 256 else max(2, repeats // 3)) + 1):  # the first pass warms up
            for path, call in paths.items():
                spent = dict.fromkeys((kind for kind, _ in linears), 0.0)
                for kind, m in linears:
                    start = clock()
                    call(m, inputs[m.in_features])
                    spent[kind] += clock() - start
                if repeat:
                    for kind, t in spent.items():
                        best[path, kind] = min(t, best.get((path, kind), t))
        for kind in dict.fromkeys(kind for kind, _ in linears):
            mods = [m for k, m in linears if k == kind]
            read = sum(m.in_features * m.out_features * 2 for m in mods) / bandwidth
            flops = sum(2 * rows * m.in_features * m.out_features for m in mods)
            dnn, mine, unpack, flat = (best[path, kind] for path in ("oneDNN", "strips", "unpack", "plain"))
            lines.append(f"| {kind} (x{len(mods)}) | {rows} | {dnn * 1e3:.2f} | {flat * 1e3:.2f} | {mine * 1e3:.2f} "
                         f"| {unpack * 1e3:.2f} | {mine / dnn:.2f} | {mine / unpack:.2f} | {read * 1e3:.2f} "
                         f"| {mine / read:.2f} | {flops / mine / 1e9:.0f} |")
    return lines


@torch.inference_mode()
def lm_head_table(model, bandwidth: float, rows_list: list[int], repeats: int) -> list[str]:
    """Markdown rows: the tied LM head's matmul alone (its weight is the embedding table, kept
    plain) at each row count through every kernel this CPU runs: the engine's AMX brgemm
    (bf16_mm_amx) and AVX512-BF16 dot products (bf16_mm_rows), and PyTorch's torch.mv (1 row) /
    torch.mm (up to 16) and F.linear; the kernels alternating call by call, each its best of
    `repeats` rounds. Limit: the weight's read time at the bandwidth measured in this run."""
    import torch.nn.functional as F

    from engine.layers.linear_kernels import avx512_bf16_ops
    from engine.layers.quant_kernels import amx_kernels

    weight = model.lm_head.weight
    if weight is None or weight.dtype != torch.bfloat16 or not getattr(model.lm_head, "tied", False):
        return ["(the LM head here is not a tied plain bfloat16 weight)"]
    paths = {}
    if amx_kernels() is not None:
        paths["bf16_mm_amx"] = lambda x: amx_kernels().bf16_mm_amx(x, weight)
    if avx512_bf16_ops() is not None:
        paths["bf16_mm_rows"] = lambda x: avx512_bf16_ops().bf16_mm_rows(x, weight)
    paths["torch.mv/mm"] = lambda x: (torch.mv(weight, x[0]).unsqueeze(0) if x.shape[0] == 1
                                      else torch.mm(weight, x.T).T.contiguous())
    paths["F.linear"] = lambda x: F.linear(x, weight)
    nbytes = weight.numel() * weight.element_size()
    read = nbytes / bandwidth
    lines = []
    for rows in rows_list:
        x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
        best: dict[str, float] = {}
        for repeat in range(repeats + 1):  # the first round warms up
            for path, call in paths.items():
                start = time.perf_counter()
                call(x)
                seconds = time.perf_counter() - start
                if repeat:
                    best[path] = min(seconds, best.get(path, seconds))
        for path, seconds in best.items():
            lines.append(f"| {path} | {rows} | {seconds * 1e3:.2f} | {nbytes / seconds / 1e9:.1f} | {read * 1e3:.2f} "
                         f"| {seconds / read:.2f} |")
    return lines


@torch.inference_mode()
def read_ahead_table(model, bandwidth: float, rounds: int, gap_us: float) -> list[str]:
    """Markdown rows: per kind of projection at 1 row, its time with our kernel pool's workers
    reading the next weight ahead between calls (kernels/csrc/thread_pool.h) and without, passes
    over every projection in model order, a gap_us busy wait after each call (the norms,
    attention and Python a decode step runs between them), on and off alternating pass by pass in
    this process; each kind's median pass and fastest pass (on a loaded machine the fastest is the
    closer to a quiet one, and the workers, sharing their cores, read ahead in fewer passes)."""
    import kernels.cpu_ops  # noqa: F401  (the pool's ops)

    ops = torch.ops.bento_llm
    linears = model_linears(model)
    inputs = {m.in_features: torch.randn(1, m.in_features, dtype=torch.bfloat16) for _, m in linears}
    passes: dict[bool, list[dict[str, float]]] = {True: [], False: []}

    def one_pass() -> dict[str, float]:
        spent = dict.fromkeys((kind for kind, _ in linears), 0.0)
        for kind, m in linears:
            start = time.perf_counter()
            m(inputs[m.in_features])
            end = time.perf_counter()
            spent[kind] += end - start
            while time.perf_counter() - end < gap_us * 1e-6:
                pass
        return spent

    try:
        for i in range(rounds + 1):  # the first round warms up
            for on in (True, False) if i % 2 else (False, True):
                ops.set_kernel_pool_read_ahead(on)
                spent = one_pass()
                if i:
                    passes[on].append(spent)
    finally:
        ops.set_kernel_pool_read_ahead(True)
    from engine.memory import storage_bytes, weight_tensors

    rows = []
    for kind in passes[True][0]:
        nbytes = storage_bytes(t for k, m in linears if k == kind for t in weight_tensors(m))
        on, off = ([p[kind] * 1e3 for p in passes[flag]] for flag in (True, False))
        read = nbytes / bandwidth * 1e3
        rows.append(f"| {kind} | {statistics.median(off):.2f} / {min(off):.2f} | {statistics.median(on):.2f} / "
                    f"{min(on):.2f} | {statistics.median(on) / statistics.median(off):.2f} / {min(on) / min(off):.2f} | "
                    f"{read:.2f} | {min(off) / read:.2f} / {min(on) / read:.2f} |")
    return rows


def timed_steps(engine, prompts: list[list[int]], max_tokens: int, clock=time.perf_counter) -> list[float]:
    """engine.step() seconds (by `clock`) of every step in which all sequences decode one token."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"limits-{time.monotonic_ns()}-{i}", p, params)
    times = []
    while engine.has_unfinished_requests():
        running = engine.scheduler.running
        all_decoding = len(running) == len(prompts) and all(s.num_computed_tokens == len(s.token_ids) - 1
                                                            for g in running for s in g.seqs)
        start = clock()
        engine.step()
        if all_decoding:
            times.append(clock() - start)
    return times


# Where a prefill's time goes: torch.profiler's self time of each op, by the op names in each part.
PREFILL_PARTS = {
    "projections": ("aten::mm", "aten::addmm", "amx_linear", "bf16_linear", "f32_linear", "mkldnn", "bf16_mm_amx", "int4", "int8",
                    "w8a8", "w4a8"),
    "attention (rotary, cache write, paged attention)": ("paged_attention", "qkv_attention", "write_kv_cache",
                                                         "rotary", "attention"),
    "norms and activation": ("rms_norm", "silu_mul", "gelu"),
}


def prefill_parts(engine, prompt: list[int]) -> tuple[float, dict[str, float]]:
    """(seconds, seconds by part) of one prefill under torch.profiler; "other" is what no op of a
    part took (the embedding, the LM head's sampling, scheduling, Python between the ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        timed_steps(engine, [prompt], 1)
        total = time.perf_counter() - start
    parts = dict.fromkeys(PREFILL_PARTS, 0.0)
    for event in prof.key_averages():
        part = next((name for name, keys in PREFILL_PARTS.items() if any(k in event.key for k in keys)), None)
        if part is not None:
            parts[part] += event.self_cpu_time_total / 1e6
    parts["other"] = max(0.0, total - sum(parts.values()))
    return total, parts


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per sequence in the decode runs")
    parser.add_argument("--prompt-len", type=int, default=2000, help="tokens of the TTFT prompt")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    parser.add_argument("--ttft-only", action="store_true", help="only the TTFT rows: no decode or 1-row rows")
    parser.add_argument("--amx-linear", action="store_true",
                        help="only compare the projections on the column strips (amx_linear.cpp or bf16_linear.cpp), "
                             "unpacked + F.linear and oneDNN (bfloat16)")
    parser.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")],
                        help="with --amx-linear or --lm-head: the row counts, comma-separated")
    parser.add_argument("--quantization", default="none",
                        help="the engine's quantization; 'none' (the default here) keeps the weights in --dtype, "
                             "which this table is about ('auto' is the engine's default: int4 for a Q4 GGUF on AMX)")
    parser.add_argument("--read-ahead", type=int, default=0, metavar="ROUNDS",
                        help="only: the projections at 1 row with the pool's workers reading the next weight ahead vs "
                             "not, alternating, ROUNDS rounds")
    parser.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                        help="only: the batch-1 decode step against the weight read, both measured in every round")
    parser.add_argument("--gap-us", type=float, default=10.0, help="--read-ahead's busy wait after each call")
    parser.add_argument("--lm-head", action="store_true",
                        help="only time the tied LM head alone through each kernel at --rows (default 1,4,16,64)")
    args = parser.parse_args()
    if args.amx_linear and args.dtype != "bfloat16":
        parser.error("--amx-linear compares bfloat16 projections: use --dtype bfloat16")
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 10
    decode_tokens = 16 if args.quick else args.decode_tokens

    from engine import LLM

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization, num_threads=args.threads, max_num_seqs=64)
    engine = llm.engine
    runner = engine.runner.model_runner
    model, dtype = runner.model, runner.dtype
    vocab = engine.model_config.vocab_size
    chunk = min(args.prompt_len, engine.config.max_num_batched_tokens)

    if args.interleaved:
        timed_steps(engine, [random_prompt(vocab, 32, 0)], 4)  # warm-up
        print(f"\n{args.model}, {args.dtype}, quantization {args.quantization}, {args.threads} threads, {cpu_features()}, "
              f"{step_read_bytes(model) / 2**20:.0f} MiB read a step; `python bench/bench_limits.py {' '.join(sys.argv[1:])}`\n")
        print("| round | read GB/s (2 MiB pages) | read GB/s (4 KiB pages) | weight read ms | batch-1 step ms | step / read |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(interleaved_batch1(engine, args.interleaved, decode_tokens)))
        return
    bandwidths = read_bandwidths(repeats)
    bandwidth = max(bandwidths.values())
    if args.lm_head:
        print(f"\n{args.model}, {args.threads} threads, {cpu_features()}, memory read {bandwidth / 1e9:.1f} GB/s; "
              f"`python bench/bench_limits.py {' '.join(sys.argv[1:])}`\n")
        print("| kernel | rows | ms | GB/s of weight | weight read ms | ratio to read |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(lm_head_table(model, bandwidth, args.rows or [1, 4, 16, 64], repeats)))
        return
    if args.read_ahead:
        print(f"\n{args.model}, {args.threads} threads, {cpu_features()}, memory read {bandwidth / 1e9:.1f} GB/s, "
              f"a {args.gap_us:g} us gap after each call; `python bench/bench_limits.py {' '.join(sys.argv[1:])}`\n")
        print("| projection (all of a kind, 1 row) | no read-ahead ms (median / fastest pass) | read-ahead ms "
              "| read-ahead / none | weight read ms | fastest / read (none / read-ahead) |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(read_ahead_table(model, bandwidth, args.read_ahead, args.gap_us)))
        return
    if args.amx_linear:
        print(f"\n{args.model}, {args.threads} threads, {cpu_features()}, memory read {bandwidth / 1e9:.1f} GB/s; "
              f"`python bench/bench_limits.py {' '.join(sys.argv[1:])}`\n")
        from engine.layers.linear_kernels import amx_linear_ops

        kernel = "amx_linear" if amx_linear_ops() is not None else "bf16_linear"
        print(f"| projection | rows | oneDNN ms | F.linear (plain) ms | {kernel} ms | unpack + F.linear ms "
              f"| {kernel} / oneDNN | {kernel} / unpack | weight read ms | {kernel} / read | {kernel} GFLOP/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        rows_list = args.rows or [1, 16, 64, 128, 256, 512, 768, 1024, args.prompt_len]
        print("\n".join(amx_linear_table(model, bandwidth, rows_list, repeats)))
        return
    weight_bytes = step_read_bytes(model)
    weight_read = weight_bytes / bandwidth
    mm = {rows: matmul_seconds(model, rows, dtype, repeats if rows <= 64 else max(2, repeats // 3))
          for rows in ((chunk,) if args.ttft_only else (1, 16, 64, chunk))}

    rows_out: list[tuple[str, str, str, float]] = []
    for pages, rate in bandwidths.items():
        rows_out.append((f"memory read bandwidth ({pages})", f"{rate / 1e9:.1f} GB/s",
                         "the ceiling" if rate == bandwidth else "", float("nan")))
    rows_out.append(("weight-read time", f"{weight_read * 1e3:.2f} ms", f"{weight_bytes / 2**20:.0f} MiB", float("nan")))
    for rows, (seconds, flops) in mm.items():
        rows_out.append((f"matmuls at {rows} rows", f"{seconds * 1e3:.2f} ms",
                         f"{flops / seconds / 1e9:.0f} GFLOP/s", float("nan")))
    # Batch 1 by kind of projection, each against reading its weights once at the bandwidth.
    per_kind = {} if args.ttft_only else projection_seconds(model, 1, dtype, repeats)
    for kind, (seconds, nbytes, count) in per_kind.items():
        rows_out.append((f"  {kind} (x{count}) at 1 row", f"{seconds * 1e3:.2f} ms", f"{nbytes / bandwidth * 1e3:.2f} ms",
                         seconds * bandwidth / nbytes))

    # Warm-up: the first steps build oneDNN kernels for each row count.
    timed_steps(engine, [random_prompt(vocab, 32, 0)], 4)
    forward_times: list[float] = []
    execute_model = runner.execute_model

    def timed_forward(inputs):
        start = time.perf_counter()
        logits = execute_model(inputs)
        forward_times.append(time.perf_counter() - start)
        return logits

    for batch in () if args.ttft_only else (1, 16, 64):
        prompts = [random_prompt(vocab, 32, 1000 * batch + i) for i in range(batch)]
        forward_times.clear()
        runner.execute_model = timed_forward
        step = statistics.median(timed_steps(engine, prompts, decode_tokens))
        runner.execute_model = execute_model
        limit = max(weight_read, mm[batch][0])
        rows_out.append((f"decode step, batch {batch}", f"{step * 1e3:.2f} ms", f"{limit * 1e3:.2f} ms", step / limit))
        if batch == 1:
            forward = statistics.median(forward_times[1:])  # the prefill's forward first
            rows_out.append(("  its forward pass", f"{forward * 1e3:.2f} ms", f"{limit * 1e3:.2f} ms", forward / limit))
        rows_out.append((f"decode tok/s, batch {batch}", f"{batch / step:.0f}", f"{batch / limit:.0f}", limit / step))

    # Attention's FLOPs (q.k and p.v over the causal half of the prompt) count at the
    # projections' measured throughput: the prefill limit is all of its matmul work.
    cfg = engine.model_config
    attention_flops = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * args.prompt_len**2 / 2
    ttfts = []
    for i in range(max(2, repeats // 3)):
        prompt = random_prompt(vocab, args.prompt_len, 7 + i)  # a new prompt: no prefix-cache hits
        start = time.perf_counter()
        timed_steps(engine, [prompt], 1)
        ttfts.append(time.perf_counter() - start)
    ttft = min(ttfts)
    chunks = -(-args.prompt_len // chunk)
    seconds, flops = mm[chunk]
    limit = seconds * (args.prompt_len / chunk + attention_flops / flops)
    rows_out.append((f"TTFT, {args.prompt_len}-token prompt ({chunks} chunk(s))", f"{ttft * 1e3:.0f} ms",
                     f"{limit * 1e3:.0f} ms", ttft / limit))
    rows_out.append(("prefill tok/s", f"{args.prompt_len / ttft:.0f}", f"{args.prompt_len / limit:.0f}", limit / ttft))
    # One more prompt, profiled: the TTFT's parts (the profiler adds a little to each op).
    profiled, parts = prefill_parts(engine, random_prompt(vocab, args.prompt_len, 99))
    for part, seconds in parts.items():
        rows_out.append((f"  TTFT's {part}", f"{seconds * 1e3:.0f} ms", f"{seconds / profiled:.0%} of a profiled "
                         f"{profiled * 1e3:.0f} ms", float("nan")))

    print(f"\n{args.model}, {args.dtype}, {args.threads} threads, {platform.processor() or platform.machine()} "
          f"({cpu_features()}), torch {torch.__version__}; `python bench/bench_limits.py {' '.join(sys.argv[1:])}`\n")
    print("| measure | result | limit | ratio to limit |")
    print("| --- | --- | --- | --- |")
    for name, value, limit_text, ratio in rows_out:
        print(f"| {name} | {value} | {limit_text} | {'' if ratio != ratio else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main()
