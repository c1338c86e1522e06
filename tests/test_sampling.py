"""Sampling: seeded draws, top-k/top-p/min-p, penalties, logit bias, stop conditions, logprobs."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampler import SampleResult, Sampler
from engine.sequence import Sequence
from engine.step_inputs import SamplingTensors
from engine.outputs import RequestMetrics
from kernels import cpu_ops, reference
from tests.helpers import load_hf_reference

VOCAB = 50


@pytest.fixture(scope="module")
def llm(tiny_path):
    return LLM(tiny_path, num_kv_blocks=128)


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Sequence:
    seq = Sequence("r", None, list(prompt), params, RequestMetrics(arrival_time=0.0))
    seq.token_ids += list(output)
    return seq


# The sampler's filters and draw: the plain-torch oracle and the C++ kernels (the CPU default).
BACKENDS = [pytest.param(reference, id="torch"), pytest.param(cpu_ops, id="cpu")]


def draw_many(params: SamplingParams, logits: torch.Tensor, n: int = 4000, ops=reference) -> torch.Tensor:
    sampler = Sampler(VOCAB, eos_token_ids=[0], sample=ops.sample_rows)
    seqs = [make_seq(params) for _ in range(n)]
    return torch.tensor(sampler(logits.expand(n, -1).clone(), seqs).token_ids)


def processed(logits: torch.Tensor, seqs: list[Sequence], ops=reference) -> torch.Tensor:
    """The logits after every processor and filter (-inf: dropped), as the sampler draws from them."""
    sampler = Sampler(VOCAB, eos_token_ids=[0])
    tensors = sampler.buffers.fill([s.params for s in seqs], VOCAB)
    logits = sampler._apply_processors(logits.clone(), seqs, tensors)
    return ops.filter_rows(logits, tensors.temperature, tensors.top_k, tensors.top_p, tensors.min_p)


def kept_by_processors(params: SamplingParams, logits: torch.Tensor) -> set[int]:
    """The tokens the sampler's filters leave drawable (a finite logit) for one row, the same in
    the torch and C++ filters."""
    kept = [set(torch.nonzero(torch.isfinite(processed(logits[None], [make_seq(params)], ops)[0])).flatten().tolist())
            for ops in (reference, cpu_ops)]
    assert kept[0] == kept[1]
    return kept[0]


def top_p_set(probs: list[float], p: float, candidates: list[int]) -> set[int]:
    """The smallest set of the most likely candidates whose mass (renormalized over the
    candidates) reaches p, computed the slow way."""
    total = sum(probs[i] for i in candidates)
    kept, mass = set(), 0.0
    for i in sorted(candidates, key=lambda i: -probs[i]):
        kept.add(i)
        mass += probs[i] / total
        if mass >= p:
            break
    return kept


# Distinct probabilities, no cumulative sum within 1e-3 of the thresholds used below.
SHAPED = torch.log(torch.tensor([0.22, 0.18, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04, 0.03] + [0.02 / 41] * 41))
SHAPED = SHAPED[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))]


@pytest.mark.parametrize("ops", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_most_likely_tokens(k, ops):
    allowed = set(SHAPED.topk(k).indices.tolist())
    params = SamplingParams(temperature=1.0, top_k=k)
    assert kept_by_processors(params, SHAPED) == allowed
    assert set(draw_many(params, SHAPED, ops=ops).tolist()) == allowed  # nothing outside, every one inside


@pytest.mark.parametrize("ops", BACKENDS)
@pytest.mark.parametrize("p", [0.3, 0.5, 0.62, 0.9])
def test_top_p_keeps_exactly_the_smallest_set_reaching_p(p, ops):
    probs = SHAPED.softmax(-1).tolist()
    allowed = top_p_set(probs, p, list(range(VOCAB)))
    params = SamplingParams(temperature=1.0, top_p=p)
    assert kept_by_processors(params, SHAPED) == allowed
    if len(allowed) <= 9:  # the tail tokens are too rare to all appear in the draws
        assert set(draw_many(params, SHAPED, ops=ops).tolist()) == allowed


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    probs = SHAPED.softmax(-1).tolist()
    top4 = SHAPED.topk(4).indices.tolist()
    # The top two hold 0.40 of the top four's 0.67 (0.6 >= 0.5); of the whole vocabulary, 0.40 < 0.5.
    allowed = top_p_set(probs, 0.5, top4)
    assert len(allowed) == 2 and len(top_p_set(probs, 0.5, list(range(VOCAB)))) == 3
    assert kept_by_processors(SamplingParams(temperature=1.0, top_k=4, top_p=0.5), SHAPED) == allowed


def test_top_k_top_p_over_a_large_vocabulary_keeps_what_sorting_every_row_keeps():
    # Rows the largest logits decide (peaked, or a top_k among them) and rows sorted whole (flat, a
    # top_k past the candidates, a top_p the candidates' mass does not reach).
    from kernels.reference import _TOP_CANDIDATES, _sorted_top_k_top_p, _top_k_top_p

    vocab = 8 * _TOP_CANDIDATES
    logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(0))
    logits[:4] *= 6
    top_k = torch.tensor([vocab, 50, 3 * _TOP_CANDIDATES, vocab, vocab, vocab, _TOP_CANDIDATES + 1, 7])
    top_p = torch.tensor([0.9, 0.95, 0.8, 1.0, 0.9, 0.3, 1.0, 0.99])
    got, want = _top_k_top_p(logits, top_k, top_p), _sorted_top_k_top_p(logits, top_k, top_p)
    kept = want.isfinite()
    assert torch.equal(got.isfinite(), kept) and torch.equal(got[kept], logits[kept])
    assert kept[4].sum() > _TOP_CANDIDATES  # a flat row's nucleus: past the candidates
    assert kept[0].sum() < _TOP_CANDIDATES and kept[7].sum() == 7
    assert kept[3].all()  # top_p 1 without top_k: nothing dropped, not even a tail rounded past the total


@pytest.mark.parametrize("ops", BACKENDS)
@pytest.mark.parametrize("min_p, temperature", [(0.2, 1.0), (0.5, 1.0), (0.2, 0.5), (0.05, 2.0)])
def test_min_p_keeps_exactly_the_tokens_above_a_fraction_of_the_top_probability(min_p, temperature, ops):
    probs = (SHAPED / temperature).softmax(-1)  # min-p reads the temperature-scaled distribution
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < VOCAB
    params = SamplingParams(temperature=temperature, min_p=min_p)
    assert kept_by_processors(params, SHAPED) == allowed
    if len(allowed) <= 9:
        assert set(draw_many(params, SHAPED, ops=ops).tolist()) == allowed


@pytest.mark.parametrize("ops", BACKENDS)
def test_sampling_follows_the_temperature_scaled_distribution(ops):
    logits = torch.tensor([2.0, 1.0, 0.0] + [-30.0] * (VOCAB - 3))
    drawn = draw_many(SamplingParams(temperature=0.5), logits, n=20000, ops=ops)
    freq = torch.bincount(drawn, minlength=VOCAB)[:3].float() / len(drawn)
    expected = (logits[:3] / 0.5).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.02)


@pytest.mark.parametrize("ops", BACKENDS)
def test_each_token_is_drawn_with_its_probability_in_a_flat_distribution(ops):
    """Found by mutation: drawing argmax(p * noise) instead of argmax(p / noise) passed the skewed
    distribution above (two-token races come out right either way); at 0.5/0.3/0.2 it draws the
    first token 53% of the time."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2] + [1e-30] * (VOCAB - 3)))
    drawn = draw_many(SamplingParams(temperature=1.0), logits, n=20000, ops=ops)
    freq = torch.bincount(drawn, minlength=VOCAB)[:3].float() / len(drawn)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.015), freq


@pytest.mark.parametrize("ops", BACKENDS)
def test_sampled_rows_follow_their_distribution_and_greedy_rows_take_the_argmax_in_one_batch(ops):
    """Mixed batches: greedy rows (some with filters set, which greedy ignores) keep the argmax of
    their own logits while the sampled rows beside them draw from their temperature-scaled and
    filtered distributions, row by row."""
    logits = torch.tensor([2.0, 1.0, 0.0] + [-30.0] * (VOCAB - 3))
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.5),
             SamplingParams(temperature=0.0, top_k=2, min_p=0.3), SamplingParams(temperature=2.0, top_k=2)]
    n = 4 * 6000
    rows = logits.expand(n, -1).clone()
    rows[2::4] = rows[2::4].flip(-1)  # the filtered greedy rows' argmax is the last token
    sampler = Sampler(VOCAB, eos_token_ids=[0], sample=ops.sample_rows)
    drawn = torch.tensor(sampler(rows, [make_seq(kinds[i % 4]) for i in range(n)]).token_ids)
    assert set(drawn[0::4].tolist()) == {0} and set(drawn[2::4].tolist()) == {VOCAB - 1}
    for kind, temperature, kept in ((1, 0.5, 3), (3, 2.0, 2)):
        freq = torch.bincount(drawn[kind::4], minlength=VOCAB)[:3].float() / (n // 4)
        expected = torch.zeros(3)
        expected[:kept] = (logits[:kept] / temperature).softmax(-1)
        assert torch.allclose(freq, expected, atol=0.025), (kind, freq, expected)


def test_sampling_parameters_are_copied_into_the_same_buffers_every_step(llm):
    """A sampled step allocates no tensor for its parameters: each one's step tensor is a view of
    one persistent buffer, at the same address over steps whose batches differ in size and in
    which parameters they use; and a step fills only what its rows need."""
    sampler = llm.engine.runner.sampler
    fill = sampler.buffers.fill
    steps: list[tuple[int, dict[str, int]]] = []

    def recording_fill(params, vocab_size):
        tensors = fill(params, vocab_size)
        used = {name: t.data_ptr() for name, t in vars(tensors).items() if isinstance(t, torch.Tensor)}
        steps.append((len(params), used))
        return tensors

    sampler.buffers.fill = recording_fill
    try:
        params = [
            SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
            SamplingParams(temperature=0.8, top_k=5, max_tokens=9, ignore_eos=True),
            SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.2, max_tokens=6, ignore_eos=True),
            SamplingParams(temperature=0.0, presence_penalty=0.5, max_tokens=12, ignore_eos=True),
        ]
        llm.generate(["one", "two two", "three three three", "four"], params, use_tqdm=False)
    finally:
        del sampler.buffers.fill
    assert len({rows for rows, _ in steps}) > 2  # the batch shrank as requests finished
    addresses: dict[str, set[int]] = {}
    for _, used in steps:
        for name, ptr in used.items():
            addresses.setdefault(name, set()).add(ptr)
    assert set(addresses) == {"greedy", "temperature", "top_k", "top_p", "min_p", "penalized_rows",
                              "repetition", "frequency", "presence"}
    assert addresses == {name: {getattr(sampler.buffers, name).on_device.data_ptr()} for name in addresses}
    # The last steps run the greedy, penalized request alone: penalties only, no sampling tensors.
    assert steps[-1] == (1, {name: addresses[name].pop() for name in ("penalized_rows", "repetition", "frequency", "presence")})


def test_a_greedy_batch_fills_no_sampling_buffer():
    params = [SamplingParams(temperature=0.0, top_k=3), SamplingParams(use_beam_search=True, best_of=2, temperature=0.0)]
    assert vars(Sampler(VOCAB, [0]).buffers.fill(params, VOCAB)) == vars(SamplingTensors())


def test_penalties_and_logit_bias_change_logits_exactly_as_defined():
    torch.manual_seed(0)
    logits = torch.randn(VOCAB) * 3
    prompt, output = [4, 5, 6], [6, 7, 7, 7]
    params = SamplingParams(
        temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={9: 5.0}
    )
    got = processed(logits[None], [make_seq(params, prompt, output)])[0]
    want = logits.clone()
    want[9] += 5.0
    for token in {4, 5, 6, 7}:  # prompt or output: repetition penalty
        want[token] = want[token] / 1.3 if want[token] > 0 else want[token] * 1.3
    counts = {6: 1, 7: 3}
    for token, count in counts.items():  # output only: frequency and presence
        want[token] -= 0.25 * count + 0.5
    assert torch.allclose(got, want, atol=1e-6)


def test_repetition_penalty_divides_positive_logits_below_one_and_counts_tokens_generated_once():
    """Found by mutation: every penalized logit of the test above was above 1 in size, and every
    output token was also in the prompt or generated three times."""
    logits = torch.full((VOCAB,), -3.0)
    logits[[10, 11, 12, 13]] = torch.tensor([0.5, 0.8, -0.5, 0.9])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # 10 in the prompt, 11 and 12 generated once each (not in the prompt), 13 never seen.
    got = processed(logits[None], [make_seq(params, prompt=[10], output=[11, 12])])[0]
    want = logits.clone()
    want[[10, 11, 12]] = torch.tensor([0.25, 0.4, -1.0])
    assert torch.equal(got, want)


def test_ignore_eos_leaves_eos_drawable_under_min_tokens_while_stop_tokens_stay_banned():
    """ignore_eos makes EOS an ordinary token (as vLLM): min_tokens bans only the stop tokens then."""
    logits = torch.zeros(VOCAB)
    logits[3] = 60.0  # a stop token dominates
    logits[0] = 50.0  # then EOS
    seq = make_seq(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3], ignore_eos=True), output=[11])
    assert Sampler(VOCAB, eos_token_ids=[0])(logits[None].clone(), [seq]).token_ids == [0]


@pytest.mark.parametrize("logprobs", [None, 1])
def test_a_row_whose_own_processing_raises_is_reported_failed_and_the_others_sample_as_alone(logprobs):
    """Per-row failures come back in SampleResult.failed on the all-greedy path without logprobs
    too (found by mutation: that path could drop them, and the engine would then carry on with a
    meaningless token), and the other rows' results are those of a batch without the failing row."""
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    sampler = Sampler(VOCAB, eos_token_ids=[0])
    good = SamplingParams(temperature=0.0, logprobs=logprobs)
    bad = SamplingParams(temperature=0.0, logit_bias={VOCAB + 10: 1.0})  # an id this sampler cannot index
    result = sampler(logits.clone(), [make_seq(good), make_seq(bad), make_seq(good)])
    assert list(result.failed) == [1] and isinstance(result.failed[1], IndexError)
    alone = sampler(logits[[0, 2]].clone(), [make_seq(good), make_seq(good)])
    keep = [0, 2]
    assert [result.token_ids[i] for i in keep] == alone.token_ids == logits[keep].argmax(-1).tolist()
    assert [result.logprobs[i] for i in keep] == alone.logprobs
    assert [result.top_logprobs[i] for i in keep] == alone.top_logprobs


def test_a_greedy_batch_without_logprobs_reports_zero_logprobs_and_no_entries():
    """The all-greedy fast path fills every SampleResult field as the general path would for
    rows that asked for nothing: logprob 0.0, no top entries, no beam candidates, no failures."""
    torch.manual_seed(2)
    logits = torch.randn(2, VOCAB)
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(2)]
    got = Sampler(VOCAB, eos_token_ids=[0])(logits.clone(), seqs)
    assert got == SampleResult(logits.argmax(-1).tolist(), [0.0, 0.0], [None, None], [None, None], {})


def test_logprob_entries_hold_the_sampled_token_and_each_rows_own_top_k():
    """Rows ask for different numbers of top logprobs (0, 1, 3); a sampled token outside its row's
    top k is added to the entry; every value is the raw log-softmax."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-30] * (VOCAB - 4)))
    raw = logits.log_softmax(-1)
    sampler = Sampler(VOCAB, eos_token_ids=[0])
    forced = {2: 100.0}  # logit_bias moves the draw to token 2; logprobs stay the model's
    seqs = [
        make_seq(SamplingParams(temperature=0.0, logprobs=0)),
        make_seq(SamplingParams(temperature=0.0, logprobs=1, logit_bias=forced)),
        make_seq(SamplingParams(temperature=0.0, logprobs=3)),
        make_seq(SamplingParams(temperature=0.0)),
    ]
    got = sampler(logits.expand(4, -1).clone(), seqs)
    assert got.token_ids == [0, 2, 0, 0]
    assert got.logprobs == pytest.approx([float(raw[0]), float(raw[2]), float(raw[0]), float(raw[0])])
    assert got.top_logprobs[0] == pytest.approx({0: float(raw[0])})
    assert got.top_logprobs[1] == pytest.approx({2: float(raw[2]), 0: float(raw[0])})
    assert got.top_logprobs[2] == pytest.approx({i: float(raw[i]) for i in range(3)})
    assert got.top_logprobs[3] is None


def test_beam_rows_get_enough_candidates_for_their_stop_tokens_scored_after_the_processors():
    """Each beam row offers max(2, 1 + its stop tokens, EOS included unless ignored) x width
    candidates, ranked by log-softmax of its processed logits (here a logit bias); other rows
    none. Found by mutation: every fast beam test ignores EOS, so candidates counted without the
    EOS ids passed."""
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)
    sampler = Sampler(VOCAB, eos_token_ids=[0])
    beams = dict(use_beam_search=True, best_of=2, temperature=0.0, stop_token_ids=[3, 4], logit_bias={7: 5.0})
    seqs = [make_seq(SamplingParams(**beams)), make_seq(SamplingParams(**beams, ignore_eos=True)), make_seq(SamplingParams(temperature=0.0))]
    got = sampler(logits.clone(), seqs).beam_candidates
    processed = logits.clone()
    processed[:2, 7] += 5.0
    for row, k in ((0, 4 * 2), (1, 3 * 2)):  # stops {0, 3, 4} and {3, 4}
        values, ids = processed[row].log_softmax(-1).topk(k)
        assert got[row][0] == ids.tolist() and got[row][1] == pytest.approx(values.tolist())
    assert got[0][0][0] == 7 and got[2] is None


def test_min_tokens_bans_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(VOCAB)
    logits[0] = 50.0  # EOS dominates
    logits[3] = 49.0  # then a stop token
    sampler = Sampler(VOCAB, eos_token_ids=[0])
    seq = make_seq(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3]), output=[11])
    assert sampler(logits[None].clone(), [seq]).token_ids[0] not in (0, 3)
    seq = make_seq(SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[3]), output=[11])
    assert sampler(logits[None].clone(), [seq]).token_ids == [0]


def test_a_seeded_request_gives_the_same_tokens_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate("The weather today", seeded, use_tqdm=False)[0].outputs[0].token_ids
    different_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    alone_other_seed = llm.generate("The weather today", different_seed, use_tqdm=False)[0].outputs[0].token_ids
    assert alone_other_seed != alone
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    # Two seeded rows in one batch: each draws from its own generator only.
    batch = llm.generate(
        ["Some other prompt", "The weather today", "A third one", "The weather today"],
        [others, seeded, others, different_seed], use_tqdm=False,
    )
    assert batch[1].outputs[0].token_ids == alone and batch[3].outputs[0].token_ids == alone_other_seed


def test_stop_token_ids_end_the_output_with_that_token(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = llm.generate("Count with me", greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = llm.generate(
        "Count with me", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)


def test_eos_ends_generation_unless_ignore_eos(llm):
    eos = llm.engine.eos_token_ids[0]
    forced = dict(temperature=0.0, max_tokens=5, logit_bias={eos: 100.0})
    out = llm.generate("Hi", SamplingParams(**forced), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == ([eos], "stop")
    out = llm.generate("Hi", SamplingParams(**forced, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.finish_reason) == (5, "length")


def test_stop_strings_spanning_tokens_are_cut_from_the_output(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate("Tell me a story", greedy, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    # A stop string made of the end of token 3's text and the start of token 4's.
    piece3 = tokenizer.decode(full.token_ids[:4])
    piece4 = tokenizer.decode(full.token_ids[:5])
    boundary = len(piece3)
    stop = piece4[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and stop in full.text
    cut = full.text.index(stop)
    out = llm.generate("Tell me a story", SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (full.text[:cut], "stop", stop)
    kept = llm.generate(
        "Tell me a story",
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full.text[: cut + len(stop)]


def test_a_stop_string_at_the_start_of_the_output_ends_it_with_empty_text(llm):
    greedy = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = llm.generate("Tell me a story", SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
    first_text = llm.get_tokenizer().decode(full.token_ids[:1])
    stop = first_text[:2]
    assert stop and full.text.startswith(stop)
    out = llm.generate("Tell me a story", SamplingParams(**greedy, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("", "stop", stop)
    assert out.token_ids == full.token_ids[:1]  # it stopped at once, not at max_tokens


def test_logprobs_equal_log_softmax_of_transformers_logits(llm, tiny_path):
    out = llm.generate("Logprobs please", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3),
                       use_tqdm=False)[0]
    ref = load_hf_reference(tiny_path)
    ids = torch.tensor([out.prompt_token_ids + out.outputs[0].token_ids])
    with torch.inference_mode():
        logprobs = ref(input_ids=ids).logits[0].float().log_softmax(-1)
    n_prompt = len(out.prompt_token_ids)
    total = 0.0
    for pos, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = logprobs[n_prompt + pos - 1]
        assert len(entry) == 3 and token in entry  # greedy: the chosen token is in the top 3
        for tid, value in entry.items():
            assert value == pytest.approx(float(row[tid]), abs=1e-4)
        assert set(entry) == set(row.topk(3).indices.tolist())
        total += entry[token]
    assert out.outputs[0].cumulative_logprob == pytest.approx(total, abs=1e-4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(logit_bias={1: 200}), "logit_bias"),
    ],
)
def test_impossible_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def recording(op, dtypes: list[torch.dtype]):
    """A CPU backend op on logits (argmax_rows, sample_rows), noting the dtype of each tensor it reads."""

    def call(x: torch.Tensor, *args) -> torch.Tensor:
        dtypes.append(x.dtype)
        return op(x, *args)

    return call


def test_a_plain_greedy_batch_takes_the_argmax_of_the_bfloat16_logits_without_a_float32_copy():
    """Greedy rows that no processor changes and whose distribution nothing reads: the tokens are
    the argmax of the logits as the LM head made them (bfloat16 read once), first of equal maxima."""
    torch.manual_seed(3)
    logits = torch.randn(64, VOCAB).to(torch.bfloat16)
    logits[5, [7, 30]] = logits[5].max() + 1  # a tie: the first wins
    dtypes: list[torch.dtype] = []
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(64)]
    got = Sampler(VOCAB, eos_token_ids=[0], argmax=recording(cpu_ops.argmax_rows, dtypes))(logits, seqs)
    assert got == SampleResult(logits.float().argmax(-1).tolist(), [0.0] * 64, [None] * 64, [None] * 64, {})
    assert got.token_ids[5] == 7
    assert dtypes == [torch.bfloat16]


@pytest.mark.parametrize("params", [
    pytest.param(dict(temperature=0.0, logit_bias={4: 100.0}), id="logit_bias"),
    pytest.param(dict(temperature=0.0, repetition_penalty=3.0), id="penalty"),
    pytest.param(dict(temperature=0.0, min_tokens=5, stop_token_ids=[4]), id="min_tokens"),
    pytest.param(dict(temperature=0.0, logprobs=2), id="logprobs"),
    pytest.param(dict(temperature=0.7, seed=5), id="sampled"),
])
def test_a_bfloat16_batch_with_a_processed_row_samples_as_its_float32_logits_would(params):
    """One row that needs its logits processed or its distribution read sends the whole batch
    through the float32 path: every result equals that of the same logits given in float32."""
    torch.manual_seed(4)
    logits = torch.randn(8, VOCAB).to(torch.bfloat16)
    logits[:, 4] = logits.max() + 1  # token 4: everyone's greedy pick, so a ban or penalty shows

    def results(x: torch.Tensor, dtypes: list[torch.dtype]) -> SampleResult:
        special = make_seq(SamplingParams(**params), prompt=[4])
        seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(7)] + [special]
        return Sampler(VOCAB, eos_token_ids=[0], argmax=recording(cpu_ops.argmax_rows, dtypes),
                       sample=recording(cpu_ops.sample_rows, dtypes))(x, seqs)

    ours, theirs = [], []
    got, want = results(logits, ours), results(logits.float(), theirs)
    assert got == want
    assert set(ours) == {torch.float32}
    assert got.token_ids[:7] == [4] * 7
