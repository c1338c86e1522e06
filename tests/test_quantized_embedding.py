"""The token embedding and LM head under quantization: int8 rows with one scale each, looked up
exactly as the dequantized table's rows, one copy for a tied model's embedding and head, under
w8a8 a head of rotated rows that rounds its input to int8, the head's accuracy rule on tiny
tied and untied models, a GGUF's Q8_0 token_embd read into those rows, and a quantized load
that finalizes each module as its weights land."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from engine import DEFAULT_MODEL, LLM, SamplingParams
from engine.config import EngineConfig
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.quant import QuantizedWeight, quantize_int4, quantize_int8, quantize_w8a8
from engine.layers.quant_kernels import w8a8_kernels
from engine.layers.rotation import hadamard_block, rotate
from engine.models.base import CausalLM
from tests.helpers import default_gguf_reader, make_tiny_llama

PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time", "Water boils at"]


def int8_embedding(weight: torch.Tensor, tied: bool) -> tuple[VocabParallelEmbedding, ParallelLMHead]:
    embedding = VocabParallelEmbedding(weight.shape[0], weight.shape[1], parallel=None).to(weight.dtype)
    head = ParallelLMHead(embedding, tied=tied).to(weight.dtype)
    head.retie()
    with torch.no_grad():
        embedding.load_rows(embedding.weight, weight)
        if not tied:
            embedding.load_rows(head.weight, weight)
    assert embedding.finalize("int8") == "int8"
    assert head.finalize("int8", 32, pack=False) == ("tied int8" if tied else "int8")
    return embedding, head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_lookup_returns_the_dequantized_tables_rows_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(1000, 96, generator=gen) * 0.05).to(dtype)
    embedding, _ = int8_embedding(weight, tied=True)
    assert embedding.weight is None and embedding.quantized.qweight.dtype == torch.int8
    table = embedding.quantized.int8_rows().to(dtype) * embedding.quantized.scales[:, None]
    ids = torch.randint(0, 1000, (300,), generator=gen)  # repeats too
    rows = embedding(ids)
    assert rows.dtype == dtype and torch.equal(rows, table[ids])
    # int8 rows: within half a step (max |row| / 254) of the float rows, plus the scale's rounding.
    step = weight.float().abs().amax(1, keepdim=True) / 127
    slack = 0.5 if dtype == torch.float32 else 0.5 + 127 * 2**-8
    assert ((rows.float() - weight[ids].float()).abs() <= step[ids] * slack * (1 + 1e-5)).all()


@pytest.mark.parametrize("tied", [True, False])
def test_the_int8_lm_head_multiplies_with_the_dequantized_table_within_one_percent_of_float(tied):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, 96, generator=gen)
    embedding, head = int8_embedding(weight, tied)
    if tied:
        assert head.quantized is embedding.quantized and head.weight is None  # one copy serves both
    table = quantize_int8(weight).dequantize()
    x = torch.randn(5, 96, generator=gen)
    with torch.inference_mode():
        logits = head(x)
    torch.testing.assert_close(logits, x @ table.t(), atol=1e-4, rtol=1e-4)
    float_logits = x @ weight.t()
    assert (logits - float_logits).norm() / float_logits.norm() < 0.01


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_model_holds_one_int8_table_for_its_embedding_and_head(tmp_path, tied):
    path = make_tiny_llama(tmp_path, tie_word_embeddings=tied)
    llm = LLM(path, num_kv_blocks=16, quantization="int4", dtype="float32")
    runner = llm.engine.runner.model_runner
    model = runner.model
    embedding, head = model.embed_tokens, model.lm_head
    assert embedding.weight is None and head.weight is None
    assert head.quantized.bits == 8  # int8 even under int4
    assert [n for n, p in model.named_parameters() if p.dim() == 2] == []  # no float matrix left
    if tied:  # one copy, counted once in the resident report
        assert head.quantized is embedding.quantized and embedding.grouped is None
        buffers = model.named_buffers(remove_duplicate=False)  # the shared table twice
        everything = sum(b.nbytes for name, b in buffers if not name.startswith("rotary."))
        table = embedding.quantized.qweight.nbytes + embedding.quantized.scales.nbytes
        assert runner.memory["weights"] == everything + sum(p.nbytes for p in model.parameters()) - table
    else:  # gathered only: in the projections' format, int4 groups
        assert embedding.quantized is None and (embedding.grouped.bits, embedding.grouped.group_size) == (4, 32)
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 96)])
def test_an_untied_tables_grouped_rows_are_its_codes_dequantized_exactly(bits, group):
    """An untied table keeps the codes it is given (a GGUF's Q4_0/Q4_1/Q4_K as int4 groups of
    32, Q8_0 as int8 groups of 32) and a lookup returns exactly their dequantized rows."""
    gen = torch.Generator().manual_seed(bits + group)
    rows, cols = 300, 192
    if bits == 4:
        codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8, generator=gen)
        zero = torch.randn(rows, cols // group, generator=gen) * 0.01
    else:
        codes, zero = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen), None
    q = QuantizedWeight(bits, codes, torch.rand(rows, cols // group, generator=gen) * 0.01, zero, group)
    embedding = VocabParallelEmbedding(rows, cols, parallel=None)
    embedding.load_rows(embedding.weight, q)
    assert embedding.finalize("int8", "int4", 32) == ("int8" if group == cols else f"int{bits} groups of {group}")
    assert embedding.weight is None and embedding.grouped.codes.nbytes == rows * cols * bits // 8
    ids = torch.randint(0, rows, (500,), generator=gen)
    assert torch.equal(embedding(ids), q.dequantize()[ids])


needs_w8a8 = pytest.mark.skipif(w8a8_kernels() is None, reason="w8a8 needs AMX-INT8 or AVX512-VNNI")


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_w8a8_the_tied_table_is_int8_of_its_rotated_rows_and_a_lookup_rotates_them_back(dtype):
    """w8a8's head multiplies rotated rows (as its projections do), so the one tied table holds
    int8 codes of W R; a lookup gathers them and multiplies by R again (its own inverse): W's
    rows up to their int8 rounding, as the unrotated table's lookup is."""
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(1000, 192, generator=gen) * 0.05).to(dtype)
    weight[:, 5] *= 20  # an outlier column, as real tables have
    embedding = VocabParallelEmbedding(1000, 192, parallel=None).to(dtype)
    head = ParallelLMHead(embedding, tied=True).to(dtype)
    head.retie()
    with torch.no_grad():
        embedding.load_rows(embedding.weight, weight)
    assert embedding.finalize("int8", "w8a8") == "w8a8" and head.finalize("int8", 32, False, "w8a8") == "tied w8a8"
    q = embedding.quantized
    assert head.quantized is q and q.w8a8 and q.rotation == 64 == hadamard_block(192)
    expected = quantize_w8a8(weight)  # int8 of W R, row by row
    assert torch.equal(q.int8_rows(), expected.codes) and torch.equal(q.scales[:1000], expected.scale.reshape(-1))
    codes = expected.codes.float() * expected.scale
    ids = torch.randint(0, 1000, (300,), generator=gen)
    rows = embedding(ids)
    assert rows.dtype == dtype
    ulp = 0 if dtype == torch.float32 else 2**-7  # one bfloat16 step: (the matmul and the butterflies round differently)
    torch.testing.assert_close(rows.float(), rotate(codes[ids], 64).to(dtype).float(), atol=2e-6, rtol=ulp)
    # R is orthogonal: a row's error is its rotated row's rounding error, at most half a step
    # (max |W R| / 127) in each of its 192 entries.
    error = (rows.float() - weight[ids].float()).norm(dim=1)
    step = rotate(weight[ids].float(), 64).abs().amax(1) / 127
    slack = 1 + (0 if dtype == torch.float32 else 2**-7 * 40)  # + bfloat16's rounding of the row
    assert (error <= 0.5 * step * 192**0.5 * slack).all()


@needs_w8a8
@pytest.mark.parametrize("projections", ["w8a8", "w4a8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [True, False])
def test_under_w8a8_the_lm_head_rounds_its_input_to_int8_as_the_projections_do(tied, dtype, projections):
    """Tied or not, an int8 head under w8a8 (or w4a8) projections is a w8a8 matmul of the rotated codes:
    logits equal to w8a8_mm's on the same codes (on the rows its kernel takes here: bfloat16 or
    float32), within 2% of the float head's."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(1000, 192, generator=gen).to(dtype)
    embedding = VocabParallelEmbedding(1000, 192, parallel=None).to(dtype)
    head = ParallelLMHead(embedding, tied=tied).to(dtype)
    head.retie()
    with torch.no_grad():
        embedding.load_rows(embedding.weight, weight)
        if not tied:
            embedding.load_rows(head.weight, weight)
    embedding.finalize("int8", projections)
    assert head.finalize("int8", 32, False, projections) == ("tied w8a8" if tied else "w8a8")
    q = head.quantized
    assert q.w8a8 and q.rotation == 64 and (q is embedding.quantized) == tied
    x = torch.randn(7, 192, generator=gen).to(dtype)
    with torch.inference_mode():
        logits = head(x)
    ops = w8a8_kernels()
    matmul = ops.w8a8_mm_amx if q.amx else ops.w8a8_mm_vnni
    assert logits.dtype == dtype and torch.equal(logits, matmul(x.to(q.rows_dtype), q.qweight, q.scales, 1000, 64).to(dtype))
    float_logits = x.float() @ weight.float().t()
    assert (logits.float() - float_logits).norm() / float_logits.norm() < 0.02


def test_a_table_quantized_in_chunks_has_the_whole_tables_codes(monkeypatch):
    """The table is quantized a few hundred rows at a time (cache-sized float32 chunks, 3x less
    CPU for a 128k-row table): the codes and scales are those of quantizing it whole."""
    from engine.layers import embedding as embedding_module

    monkeypatch.setattr(embedding_module, "_QUANTIZE_CHUNK_BYTES", 4 * 96 * 7)  # 7 rows a chunk
    weight = torch.randn(100, 96, generator=torch.Generator().manual_seed(7)).bfloat16()
    chunked, whole = embedding_module.int8_rows(weight), quantize_int8(weight)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scale, whole.scale)
    chunked, whole = embedding_module.int8_rows(weight, w8a8=True), quantize_w8a8(weight)
    assert torch.equal(chunked.codes, whole.codes) and torch.equal(chunked.scale, whole.scale)
    assert chunked.rotation == whole.rotation == 32
    chunked, whole = embedding_module.quantize_table(weight, "int4", 32), quantize_int4(weight, 32)
    assert all(torch.equal(a, b) for a, b in [(chunked.codes, whole.codes), (chunked.scale, whole.scale),
                                                (chunked.zero, whole.zero)])


def test_embedding_quantization_is_a_validated_setting():
    assert EngineConfig(quantization="int4").embedding_quantization_method == "int8"
    assert EngineConfig(quantization="int4", embedding_quantization="none").embedding_quantization_method is None
    assert EngineConfig(quantization="none").embedding_quantization_method is None  # nothing quantized without `quantization`
    with pytest.raises(ValueError, match="embedding_quantization"):
        EngineConfig(quantization="int4", embedding_quantization="int4")
    from bento_llm.settings import load_settings

    config = load_settings({"quantization": "int4", "embedding_quantization": "none"}).engine_config()
    assert config.embedding_quantization_method is None


def test_embedding_quantization_none_keeps_the_table_in_dtype(tiny_path):
    llm = LLM(tiny_path, num_kv_blocks=16, quantization="int8", dtype="float32", embedding_quantization="none")
    model = llm.engine.runner.model_runner.model
    assert model.embed_tokens.quantized is None and model.embed_tokens.weight.dtype == torch.float32


def teacher_forced(llm: LLM, reference: LLM) -> list[tuple[float, bool, float]]:
    """Along the reference's greedy tokens: per position, (the reference's lead of its top-1
    over its runner-up, whether both pick the same top-1, |delta logprob| of the token)."""
    rows = []
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    scored = SamplingParams(max_tokens=1, prompt_logprobs=2)
    for out in reference.generate(PROMPTS, greedy, use_tqdm=False):
        ids, tokens = out.prompt_token_ids, out.outputs[0].token_ids
        ours, theirs = (e.generate([ids + tokens], scored, use_tqdm=False)[0] for e in (llm, reference))
        for j, token in enumerate(tokens):
            a, b = ours.prompt_logprobs[len(ids) + j], theirs.prompt_logprobs[len(ids) + j]
            first, second = sorted(b.values(), reverse=True)[:2]
            rows.append((first - second, max(a, key=a.get) == max(b, key=b.get), abs(a[token] - b[token])))
    return rows


@pytest.mark.parametrize("tied,quantization", [(True, "int4"), (False, "int8")])
def test_the_int8_head_keeps_every_greedy_token_that_leads_by_a_quarter_nat(tmp_path, tied, quantization):
    """The accuracy rule of the int8 head (and int8 embedding rows), against the same quantized
    model with them in float (float32 activations, so they are the only difference; untied
    under int8, since under int4 its embedding is int4 groups, a rounding of the inputs like any
    int4 projection's), teacher-forced along the float head's greedy tokens (4 prompts x 16):
    every position where its top-1 leads the runner-up by more than 0.25 nats keeps its top-1,
    and the median |delta logprob| is under 0.05. Measured on these tiny random models (whose
    logits are flat: a third of positions lead by 0.5): flips only at leads under 0.13, median
    0.02-0.03, worst 0.34."""
    path = make_tiny_llama(tmp_path, tie_word_embeddings=tied)
    settings = dict(num_kv_blocks=64, quantization=quantization, dtype="float32")
    rows = teacher_forced(LLM(path, **settings), LLM(path, embedding_quantization="none", **settings))
    assert all(same for lead, same, _ in rows if lead > 0.25), [r for r in rows if not r[1]]
    deltas = sorted(delta for _, _, delta in rows)
    assert deltas[len(deltas) // 2] < 0.05, deltas


def test_a_quantized_load_frees_each_float_weight_while_later_weights_still_stream(tiny_path, monkeypatch):
    """No float copy of the whole model: halfway through the checkpoint's tensors, the float
    weights of the projections loaded so far are gone (nothing holds them: quantized as their
    module completed), and by the end every float matrix is."""
    load_weights = CausalLM.load_weights
    freed_when_read: list[int] = []

    def watched(self, weights, source, on_module_loaded=None):
        floats = [weakref.ref(p) for p in self.parameters() if p.dim() == 2]

        def stream():
            for name, weight in weights:
                freed_when_read.append(sum(ref() is None for ref in floats))
                yield name, weight
            freed_when_read.append(sum(ref() is None for ref in floats))
        return load_weights(self, stream(), source, on_module_loaded)

    monkeypatch.setattr(CausalLM, "load_weights", watched)
    llm = LLM(tiny_path, num_kv_blocks=16, quantization="int4", dtype="float32")
    # 4 projections per layer, the embedding, and an untied head.
    floats = len(llm.engine.runner.model_runner.model.layers) * 4 + 1 + (not llm.engine.model_config.tie_word_embeddings)
    assert freed_when_read == sorted(freed_when_read)
    assert 0 < freed_when_read[len(freed_when_read) // 2] < floats
    assert freed_when_read[-1] == floats


@pytest.mark.slow  # loads the default model: ~30 s on a loaded machine
def test_the_default_models_q8_0_token_embd_becomes_its_int8_rows():
    """The default model's token_embd is Q8_0 (int8 in groups of 32), read from the file's
    blocks: tied, it is re-quantized to one scale per row (what the head's matmul reads) from
    exactly gguf's own dequantization, not kept as a float table."""
    gguf = pytest.importorskip("gguf")
    reader = default_gguf_reader()
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0"
    expected = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    llm = LLM(DEFAULT_MODEL, num_kv_blocks=16, quantization="int4", dtype="float32")
    embedding = llm.engine.runner.model_runner.model.embed_tokens
    q = quantize_int8(expected)
    assert torch.equal(embedding.quantized.int8_rows(), q.codes)
    torch.testing.assert_close(embedding.quantized.scales, q.scale.reshape(-1), rtol=0, atol=0)
    # What the loader reads: the file's own Q8_0 codes (an untied table would keep them as they are).
    from engine.gguf_weights import weights_keeping_gguf_blocks
    from engine.loader import load_model_source

    weights = weights_keeping_gguf_blocks(load_model_source(DEFAULT_MODEL), llm.engine.model_config)
    read = next(w for name, w in weights if name == "model.embed_tokens.weight")
    assert isinstance(read, QuantizedWeight) and (read.bits, read.group_size) == (8, 32)
    assert torch.equal(read.dequantize(), expected)
