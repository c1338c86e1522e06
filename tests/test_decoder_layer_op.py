"""decoder_layer: a Llama-shaped decoder layer at decode batch sizes as one op (kernels/csrc/
step_ops.cpp), against the same layer unfused (the backend's norms, qkv_attention and SwiGLU, each
projection through Linear.project), bit for bit, for every projection layout that names one op
(Linear.kernel_call: bfloat16 strips, float32 strips, int4 and int8 codes on bfloat16 rows and in float32 strips, w8a8 on
bfloat16 and on float32 rows) and for a plain op by name (aten::linear,
which every CPU runs); a DecoderStack against its layers' ops; then whole engines with the layers as
one stack, one op each and on their Python path (seed printed; KERNEL_TEST_SEED=<n> replays it)."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import Linear
from engine.layers.linear_kernels import avx512_bf16_ops, f32_strips_ops
from engine.layers.quant_kernels import vector_kernels, w4a8_kernels, w8a8_kernels
from kernels import cpu_ops, reference
from tests.test_step_ops import step_of

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, EPS = 64, 96, 4, 2, 16, 1e-5


def projections(gen, layout: str) -> list[Linear]:
    """q/k/v, o, gate/up and down in `layout`: "strips" (bfloat16), "f32 strips" (float32),
    "int4", "int8" or "w8a8" (their vector loops), "f32 int4", "f32 int8", "f32 w8a8" or "f32 w4a8" (in a float32
    layer), or "plain" (a bfloat16 weight that aten::linear multiplies), with biases where the
    layout's one op takes them."""
    shapes = [(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM), (HEADS * HEAD_DIM, HIDDEN), (HIDDEN, 2 * INTERMEDIATE),
              (INTERMEDIATE, HIDDEN)]
    out = []
    for i, (k, n) in enumerate(shapes):
        bias = layout in ("strips", "f32 strips", "plain") and i < 2  # q/k/v and o with biases (Qwen2's q/k/v, Phi's o)
        linear = Linear(k, n, bias=bias).to(layout_dtype(layout)).requires_grad_(False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.2)
            if bias:
                linear.bias.copy_(torch.randn(n, generator=gen))
        if layout != "plain":
            method = None if layout.endswith("strips") else layout.removeprefix("f32 ")
            assert linear.finalize(method, 32, pack=True) == ("strips" if method is None else method)
        out.append(linear)
    return out


def layout_dtype(layout: str) -> torch.dtype:
    return torch.float32 if layout.startswith("f32 ") else torch.bfloat16


def kernel_calls(linears: list[Linear], rows: int, layout: str):
    if layout == "plain":
        return [("aten::linear", [m.weight, m.bias], []) for m in linears]
    return [m.kernel_call(rows) for m in linears]


LAYOUTS = ["plain", "strips", "f32 strips", "int4", "int8", "w8a8", "f32 int4", "f32 int8", "f32 w8a8", "f32 w4a8"]


def layout_available(layout: str) -> bool:
    if layout == "strips":
        return avx512_bf16_ops() is not None and vector_kernels() is not None and not vector_kernels().amx_bf16_supported()
    if layout in ("f32 strips", "f32 int4", "f32 int8"):  # f32_linear's loops: any AVX-512 CPU, AMX ones included
        return f32_strips_ops() is not None
    if layout in ("int4", "int8"):
        ops = vector_kernels()
        return ops is not None and not ops.amx_bf16_supported() and (layout == "int4" or ops.avx512_vnni_supported())
    if layout in ("w8a8", "f32 w8a8"):  # w8a8_mm_vnni (AMX runs w8a8_mm_amx, which names no op for the layer)
        ops = w8a8_kernels()  # bfloat16 rows where the CPU has AVX512-BF16, float32 rows on any
        return ops is not None and not ops.amx_bf16_supported() and (layout == "f32 w8a8" or ops.avx512_vnni_supported())
    if layout == "f32 w4a8":  # w4a8_linear: float32 rows on AVX-512 with AVX512-VNNI, AMX CPUs included
        return w4a8_kernels() is not None
    return True


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows,decode", [(1, True), (3, True), (16, True), (64, True), (3, False)], ids=str)
@pytest.mark.parametrize("first", [False, True], ids=["later", "first"])
def test_decoder_layer_is_the_unfused_layer_bit_for_bit(gen, layout, rows, decode, first):
    if not layout_available(layout):
        pytest.skip(f"no {layout} vector kernels on this CPU (AMX CPUs keep the Python path)")
    linears = projections(gen, layout)
    calls = kernel_calls(linears, rows, layout)
    assert None not in calls
    # Decodes at contexts 1..; mixed: a prefill chunk after cached context, and a decode.
    steps = [(1, 1 + 7 * i) for i in range(rows)] if decode else [(2, 9), (1, 20)]
    dtype = layout_dtype(layout)
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(
        gen, steps, HEADS, KV_HEADS, HEAD_DIM, 16, dtype)
    tokens = qkv.shape[0]
    x = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    residual = torch.randn(tokens, HIDDEN, generator=gen).to(dtype)
    norms = [torch.rand(HIDDEN, generator=gen) + 0.5 for _ in range(2)]
    cu_arg = None if decode else cu
    names, tensors, ints = [c[0] for c in calls], [t for c in calls for t in c[1]], [i for c in calls for i in c[2]]

    # The unfused Python path: Linear.project (plain: F.linear, the op named for it).
    project = [(lambda h, m=m: torch.nn.functional.linear(h, m.weight, m.bias)) if layout == "plain" else m
               for m in linears]

    def run(layer, python_projections: bool):
        res, caches = residual.clone(), [k_cache.clone(), v_cache.clone()]
        if python_projections:  # the backend's ops between the projections, as LlamaDecoderLayer calls them
            h = cpu_ops.rms_norm(res, norms[0], EPS) if first else cpu_ops.add_rms_norm(res, x, norms[0], EPS)
            attended = cpu_ops.qkv_attention(project[0](h), cos, sin, *caches, slots, tables, lens, cu_arg, HEADS,
                                             HEAD_DIM**-0.5)
            h = cpu_ops.add_rms_norm(res, project[1](attended), norms[1], EPS)
            out = project[3](cpu_ops.silu_mul(project[2](h)))
        else:
            out = layer(res, None if first else x, cos, sin, *caches, slots, tables, lens, cu_arg, *norms, EPS, names,
                        tensors, ints, HEADS, HEAD_DIM**-0.5)
        return out, res, *caches

    fused = run(cpu_ops.decoder_layer, False)
    assert fused[0].shape == (tokens, HIDDEN)
    for want in (run(None, True), run(reference.composed_decoder_layer(cpu_ops), False)):
        for got, expected in zip(fused, want):
            assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
    assert not torch.equal(fused[1], residual)  # the residual stream was updated in place


def test_decoder_layer_refuses_arguments_its_projections_do_not_take(gen):
    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, _ = step_of(gen, [(1, 5)], HEADS, KV_HEADS, HEAD_DIM, 16,
                                                                     torch.float32)
    linears = projections(gen, "plain")
    weights = [m.weight.float() for m in linears]
    x = torch.randn(1, HIDDEN, generator=gen)
    norm = torch.ones(HIDDEN)
    args = (x.clone(), x, cos, sin, k_cache, v_cache, slots, tables, lens, None, norm, norm, EPS, ["aten::linear"] * 4)
    each = [t for w in weights for t in (w, None)]  # aten::linear's weight and bias
    with pytest.raises(RuntimeError, match="took 8 of 9 tensors and 0 of 1 ints"):
        cpu_ops.decoder_layer(*args, [*each, None], [3], HEADS, HEAD_DIM**-0.5)
    with pytest.raises(RuntimeError, match="needs more tensor arguments"):
        cpu_ops.decoder_layer(*args, each[:-1], [], HEADS, HEAD_DIM**-0.5)
    with pytest.raises(RuntimeError, match="argument weight is a Tensor: None given"):
        cpu_ops.decoder_layer(*args, [None, *each[1:]], [], HEADS, HEAD_DIM**-0.5)
    out = cpu_ops.decoder_layer(*args, each, [], HEADS, HEAD_DIM**-0.5)
    assert out.shape == x.shape and out.isfinite().all()
    # An int list argument (aten::new_zeros's size): its length, then its elements; zeros projected
    # leave the residual stream as the norms and attention made it, and the layer's output zero.
    zeros = cpu_ops.decoder_layer(*args[:-1], ["aten::new_zeros"] * 4, [], [2, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM, 2, 1, HIDDEN, 2, 1, 2 * INTERMEDIATE, 2, 1, HIDDEN],
                                  HEADS, HEAD_DIM**-0.5)
    assert zeros.shape == (1, HIDDEN) and not zeros.any()


def test_decoder_layer_gives_the_same_bits_after_calls_of_other_shapes_and_dtypes(gen):
    """decoder_layer keeps its norms' and activation's outputs across calls (step_ops.cpp's
    LayerScratch): a call after calls of other row counts and dtypes gives the first call's bits."""
    def case(rows, dtype):
        qkv, cos, sin, k_cache, v_cache, slots, tables, lens, _ = step_of(
            gen, [(1, 3 + 5 * i) for i in range(rows)], HEADS, KV_HEADS, HEAD_DIM, 16, dtype)
        each = [t for m in projections(gen, "plain") for t in (m.weight.to(dtype), None)]  # aten::linear's weight and bias
        x, residual = (torch.randn(rows, HIDDEN, generator=gen).to(dtype) for _ in range(2))
        norms = [torch.rand(HIDDEN, generator=gen) + 0.5 for _ in range(2)]

        def run():
            res, caches = residual.clone(), [k_cache.clone(), v_cache.clone()]
            out = cpu_ops.decoder_layer(res, x, cos, sin, *caches, slots, tables, lens, None, *norms, EPS,
                                        ["aten::linear"] * 4, each, [], HEADS, HEAD_DIM**-0.5)
            return [t.clone() for t in (out, res, *caches)]
        return run

    three, one, float32 = case(3, torch.bfloat16), case(1, torch.bfloat16), case(3, torch.float32)
    first = three()
    for other in (one, float32, three):
        other()
    for got, want in zip(three(), first):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_an_int_list_argument_takes_its_length_then_its_elements(gen):
    x = torch.randn(2, 8, generator=gen)
    assert reference.projection("aten::new_zeros", x, [], [2, 2, 5]).shape == (2, 5)
    assert torch.equal(reference.projection("aten::linear", x, [torch.eye(8), None], []), x)


@pytest.mark.parametrize("rows,decode", [(1, True), (3, True), (16, True), (64, True), (3, False)], ids=str)
def test_a_decoder_stack_is_its_layers_ops_bit_for_bit(gen, rows, decode):
    """DecoderStack.run (step_ops.cpp) against decoder_layer called per layer: three layers in
    different projection layouts (those this CPU has), one with a sliding window, each on the
    KV cache its cache index names (not the layers' order)."""
    layouts = [layout for layout in ("strips", "int4", "int8", "plain") if layout_available(layout)][:3]
    layouts += ["plain"] * (3 - len(layouts))
    steps = [(1, 1 + 7 * i) for i in range(rows)] if decode else [(2, 9), (1, 20)]
    _, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(gen, steps, HEADS, KV_HEADS, HEAD_DIM, 16,
                                                                     torch.bfloat16)
    caches = [(k_cache + i, v_cache - i) for i in range(3)]
    step = (slots, tables, lens, None if decode else cu)
    layers = []
    for i, (layout, window) in enumerate(zip(layouts, (None, 4, None))):
        calls = kernel_calls(projections(gen, layout), cos.shape[0], layout)
        norms = [torch.rand(HIDDEN, generator=gen) + 0.5 for _ in range(2)]
        layers.append((2 - i, (*norms, EPS, [c[0] for c in calls], [t for c in calls for t in c[1]],
                               [n for c in calls for n in c[2]], HEADS, HEAD_DIM**-0.5, window, None)))
    embeddings = torch.randn(cos.shape[0], HIDDEN, generator=gen).bfloat16()

    def fresh():
        return embeddings.clone(), [k.clone() for k, _ in caches], [v.clone() for _, v in caches]

    residual, k_caches, v_caches = fresh()
    x = None
    for index, args in layers:
        x = cpu_ops.decoder_layer(residual, x, cos, sin, k_caches[index], v_caches[index], *step, *args)
    per_layer = (x, residual, *k_caches, *v_caches)
    stack = torch.classes.bento_llm.DecoderStack()
    for index, args in layers:
        stack.add_layer(index, *args)
    residual, k_caches, v_caches = fresh()
    stack.set_caches(k_caches, v_caches)  # kept: each run writes these tensors
    out, stack_residual = stack.run(residual, cos, sin, *step)
    assert stack_residual is residual or torch.equal(stack_residual, residual)
    for got, want in zip((out, stack_residual, *k_caches, *v_caches), per_layer):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(per_layer[2], caches[0][0])  # the caches were written
    stack.set_caches(k_caches[:2], v_caches[:2])
    with pytest.raises(RuntimeError, match="no KV cache for layer 2"):
        stack.run(embeddings.clone(), cos, sin, *step)
    with pytest.raises(RuntimeError, match="a DecoderStack without layers"):
        torch.classes.bento_llm.DecoderStack().run(embeddings.clone(), cos, sin, *step)
    with pytest.raises(RuntimeError, match="a layer's cache index must not be negative"):
        torch.classes.bento_llm.DecoderStack().add_layer(-1, *layers[0][1])


ENGINE_CASES = [("LlamaConfig", "none", {}, "auto"), ("LlamaConfig", "int4", {}, "auto"), ("Qwen2Config", "none", {}, "auto"),
                ("Qwen2Config", "int4", {}, "auto"), ("LlamaConfig", "w8a8", {}, "auto"), ("LlamaConfig", "f32 w8a8", {}, "auto"),
                ("LlamaConfig", "f32 int4", {}, "auto"), ("LlamaConfig", "f32 w4a8", {}, "auto"),
                ("MistralConfig", "none", dict(sliding_window=4), "auto"),
                ("LlamaConfig", "none", {}, "int8")]


@pytest.mark.parametrize("family,quantization,overrides,kv_cache_dtype", ENGINE_CASES, ids=str)
def test_an_engine_decodes_the_same_with_its_layers_as_one_op_and_not(tmp_path, family, quantization, overrides,
                                                                     kv_cache_dtype):
    """A bfloat16 engine, or a float32 one where the quantization says "f32 ..."."""
    from engine import LLM, SamplingParams
    from engine.models.llama import LlamaDecoderLayer
    from tests.model_factories import make_tiny_checkpoint

    if not layout_available("strips" if quantization == "none" else quantization):
        pytest.skip("no vector kernels for this layout here: the layers run their Python path")
    path = make_tiny_checkpoint(tmp_path, family, **overrides)
    dtype = layout_dtype(quantization)
    llm = LLM(str(path), dtype=str(dtype).removeprefix("torch."), quantization=quantization.removeprefix("f32 "),
              num_kv_blocks=64, max_num_seqs=8, kv_cache_dtype=kv_cache_dtype)
    prompts = ["Hello, my name is", "The history of the city goes back", "def add(a, b):"]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    model = llm.engine.runner.model_runner.model
    results = {}
    # The layers as one DecoderStack call, as one decoder_layer op each, on their Python path.
    try:
        for mode in ("stack", "layer op", "python"):
            LlamaDecoderLayer.layer_op, LlamaDecoderLayer.layer_stack = mode != "python", mode == "stack"
            outs = llm.generate(prompts, params)
            results[mode] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    finally:
        LlamaDecoderLayer.layer_op = LlamaDecoderLayer.layer_stack = True
    plans = model.layers[0].__dict__["layer_op_plans"]
    # The three-sequence decodes ran as one op per layer; not Qwen2's int4 q/k/v, whose bias is a
    # second op after the matmul (its layers keep their Python path).
    assert (plans[3] is not None) == (family != "Qwen2Config" or quantization == "none")
    assert (model.__dict__["layer_op_plans"][3] is not None) == (plans[3] is not None)
    assert results["stack"] == results["layer op"] == results["python"]


def test_a_model_with_a_layer_off_its_op_or_hooked_runs_layer_by_layer_and_rebuilds_its_stack(tmp_path):
    from engine import LLM, SamplingParams
    from engine.models.llama import forget_layer_op_plans
    from tests.model_factories import make_tiny_checkpoint

    if not layout_available("strips"):
        pytest.skip("no bfloat16 vector kernels here: the layers run their Python path")
    llm = LLM(str(make_tiny_checkpoint(tmp_path, "LlamaConfig")), dtype="bfloat16", quantization="none",
              num_kv_blocks=64, max_num_seqs=8)
    model = llm.engine.runner.model_runner.model
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)

    def generate():
        outs = llm.generate(["Hello, my name is", "def add(a, b):"], params)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]

    stacked = generate()
    stack = model.__dict__["layer_op_plans"][2]  # (the DecoderStack, the hook dicts it checks)
    assert stack is not None
    calls = []
    hook = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        assert generate() == stacked and calls  # hooked: the layers ran one by one
    finally:
        hook.remove()
    forget_layer_op_plans(model)
    assert "layer_op_plans" not in model.__dict__
    assert generate() == stacked
    rebuilt = model.__dict__["layer_op_plans"][2]
    assert rebuilt is not None and rebuilt[0] is not stack[0]  # built again
    # A layer without a plan (its norms' eps differ: layer_op_plan refuses it): no stack, the other
    # layers still one op each.
    forget_layer_op_plans(model)
    model.layers[1].post_attention_layernorm.eps *= 2
    generate()
    assert model.__dict__["layer_op_plans"][2] is None
    assert model.layers[1].__dict__["layer_op_plans"][2] is None
    assert model.layers[0].__dict__["layer_op_plans"][2] is not None


def test_a_forward_on_another_backends_kv_caches_gets_stacks_on_those_caches(tmp_path):
    """DecoderStack keeps the KV caches it was built on: a forward on another backend (other cache
    tensors) replaces the model's stacks, writes only its own caches and decodes the same."""
    from engine import LLM, SamplingParams
    from engine.attention import AttentionBackend
    from tests.model_factories import make_tiny_checkpoint

    if not layout_available("strips"):
        pytest.skip("no bfloat16 vector kernels here: the layers run their Python path")
    llm = LLM(str(make_tiny_checkpoint(tmp_path, "LlamaConfig")), dtype="bfloat16", quantization="none",
              num_kv_blocks=64, max_num_seqs=8, enable_prefix_caching=False)
    runner = llm.engine.runner.model_runner
    model = runner.model
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def generate():
        return [o.outputs[0].token_ids for o in llm.generate(["Hello, my name is", "def add(a, b):"], params)]

    first = generate()
    old_stacks, old_backend = model.__dict__["layer_op_plans"], runner.backend
    assert old_stacks[2] is not None and old_stacks.backend is old_backend
    old_caches = [c.clone() for c in (*old_backend.k_caches, *old_backend.v_caches)]
    k_caches = [torch.zeros_like(c) for c in old_backend.k_caches]
    v_caches = [torch.zeros_like(c) for c in old_backend.v_caches]
    runner.backend = AttentionBackend(old_backend.name, k_caches, v_caches)
    try:
        assert generate() == first
        stacks = model.__dict__["layer_op_plans"]
        assert stacks is not old_stacks and stacks.backend is runner.backend and stacks[2] is not None
        assert all(c.abs().sum() > 0 for c in (*k_caches, *v_caches))  # every layer wrote its new cache
        assert all(torch.equal(a, b) for a, b in zip(old_caches, (*old_backend.k_caches, *old_backend.v_caches)))
    finally:
        runner.backend = old_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_reference_decoder_layer_matches_the_cpp_op(gen, dtype):
    from tests.test_cpu_ops import assert_close

    qkv, cos, sin, k_cache, v_cache, slots, tables, lens, cu = step_of(
        gen, [(1, 9), (4, 20), (1, 33)], HEADS, KV_HEADS, HEAD_DIM, 16, dtype)
    weights = [m.weight.to(dtype) for m in projections(gen, "plain")]
    each = [t for w in weights for t in (w * 0.5, None)]  # aten::linear's weight and bias
    x, residual = (torch.randn(qkv.shape[0], HIDDEN, generator=gen).to(dtype) for _ in range(2))
    norms = [torch.rand(HIDDEN, generator=gen) + 0.5 for _ in range(2)]
    outs = []
    for layer in (cpu_ops.decoder_layer, reference.decoder_layer):
        res, caches = residual.clone(), [k_cache.clone(), v_cache.clone()]
        out = layer(res, x, cos, sin, *caches, slots, tables, lens, cu, *norms, EPS, ["aten::linear"] * 4, each, [],
                    HEADS, HEAD_DIM**-0.5)
        outs.append((out, res))
    for got, want in zip(*outs):
        assert_close(got, want.float(), dtype)
