"""Stop handling and the outputs built from it (engine/output_processor.py), one sequence at a time:
when EOS, a stop token, a stop string or the length limit ends a sequence and with what reason,
and how finished and running sequences become the RequestOutput the caller sees."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine import SamplingParams
from engine.beam_search import beam_score
from engine.output_processor import build_output, check_stop, error_output
from engine.outputs import RequestMetrics
from engine.sequence import Sequence
from engine.sequence_group import GroupStatus, SequenceGroup
from tests.helpers import default_tokenizer

EOS = 0
PROMPT = [11, 12, 13]
MAX_MODEL_LEN = 64


def make_seq(params: SamplingParams, output=(), text: str = "", index: int = 0, max_tokens: int = 16) -> Sequence:
    seq = Sequence("r", "the prompt", list(PROMPT), params, RequestMetrics(arrival_time=0.0))
    seq.token_ids += list(output)
    seq.output_text, seq.index, seq.max_tokens = text, index, max_tokens
    return seq


def stop(seq: Sequence, num_new_chars: int = 0, max_model_len: int = MAX_MODEL_LEN) -> tuple[str | None, int | str | None]:
    check_stop(seq, num_new_chars, [EOS], max_model_len)
    return seq.finish_reason, seq.stop_reason


# ---- check_stop ---------------------------------------------------------------------------------
def test_eos_stops_with_no_stop_reason_from_min_tokens_on():
    params = SamplingParams(min_tokens=2)
    assert stop(make_seq(params, [EOS])) == (None, None)  # 1 token: under min_tokens
    assert stop(make_seq(params, [5, EOS])) == ("stop", None)  # exactly min_tokens
    assert stop(make_seq(SamplingParams(), [5])) == (None, None)


def test_ignore_eos_generates_through_eos():
    assert stop(make_seq(SamplingParams(ignore_eos=True), [EOS])) == (None, None)


def test_a_stop_token_stops_with_itself_as_the_stop_reason_from_min_tokens_on():
    params = SamplingParams(stop_token_ids=[7, 9], min_tokens=2)
    assert stop(make_seq(params, [9])) == (None, None)
    assert stop(make_seq(params, [5, 9])) == ("stop", 9)
    assert stop(make_seq(params, [5, 8])) == (None, None)


def test_eos_listed_as_a_stop_token_stops_as_eos_unless_eos_is_ignored():
    """vLLM's order: EOS first (no stop reason), then stop tokens (the token is the reason)."""
    assert stop(make_seq(SamplingParams(stop_token_ids=[EOS]), [EOS])) == ("stop", None)
    assert stop(make_seq(SamplingParams(stop_token_ids=[EOS], ignore_eos=True), [EOS])) == ("stop", EOS)


def test_a_stop_string_in_the_new_text_stops_and_is_cut_from_the_output():
    seq = make_seq(SamplingParams(stop=["wor", "xyz"]), [5, 6], text="hello world")
    assert stop(seq, num_new_chars=6) == ("stop", "wor")
    assert seq.output_text == "hello "


def test_a_stop_string_is_not_looked_for_under_min_tokens():
    seq = make_seq(SamplingParams(stop=["wor"], min_tokens=3), [5, 6], text="hello world")
    assert stop(seq, num_new_chars=6) == (None, None)
    assert seq.output_text == "hello world"


def test_max_tokens_ends_the_output_with_length_exactly_when_reached():
    assert stop(make_seq(SamplingParams(), [5, 6, 7], max_tokens=4)) == (None, None)
    assert stop(make_seq(SamplingParams(), [5, 6, 7, 8], max_tokens=4)) == ("length", None)


def test_the_context_length_ends_the_output_exactly_when_reached_even_under_min_tokens():
    params = SamplingParams(min_tokens=10)
    assert stop(make_seq(params, [5, 6], max_tokens=16), max_model_len=len(PROMPT) + 3) == (None, None)
    assert stop(make_seq(params, [5, 6, 7], max_tokens=16), max_model_len=len(PROMPT) + 3) == ("length", None)


@pytest.mark.parametrize("ending, reason", [(EOS, None), (7, 7)])
def test_a_stop_at_the_last_allowed_token_is_a_stop_not_a_length(ending, reason):
    seq = make_seq(SamplingParams(stop_token_ids=[7]), [5, ending], max_tokens=2)
    assert stop(seq) == ("stop", reason)


def test_a_stop_string_at_the_last_allowed_token_is_a_stop_not_a_length():
    seq = make_seq(SamplingParams(stop=["ld"]), [5, 6], text="hello world", max_tokens=2)
    assert stop(seq, num_new_chars=3) == ("stop", "ld")


# ---- build_output / error_output ----------------------------------------------------------------
def finish(seq: Sequence, reason: str, stop_reason=None) -> Sequence:
    seq.finish(reason, stop_reason)
    return seq


def test_samples_come_back_in_index_order_with_their_own_fields():
    params = SamplingParams(n=3, temperature=1.0)
    running = [make_seq(params, [21, 22], "ab", index=2), make_seq(params, [31], "c", index=0)]
    done = [finish(make_seq(params, [41, 7], "de", index=1), "stop", 7)]
    for seq, logprob in zip(running + done, (-1.0, -2.0, -3.0)):
        seq.cumulative_logprob = logprob
    group = SequenceGroup("req", running, status=GroupStatus.RUNNING, finished=done, num_cached_tokens=16)
    out = build_output(group, tokenizer=None)
    assert (out.request_id, out.prompt, out.prompt_token_ids, out.finished) == ("req", "the prompt", PROMPT, False)
    assert out.metrics is group.metrics and out.num_cached_tokens == 16 and out.prompt_logprobs is None
    got = [(c.index, c.text, c.token_ids, c.cumulative_logprob, c.finish_reason, c.stop_reason) for c in out.outputs]
    assert got == [(0, "c", [31], -2.0, None, None), (1, "de", [41, 7], -3.0, "stop", 7), (2, "ab", [21, 22], -1.0, None, None)]
    group.status = GroupStatus.FINISHED
    assert build_output(group, tokenizer=None).finished


def test_best_of_returns_the_n_best_by_cumulative_logprob_renumbered():
    params = SamplingParams(n=2, best_of=4, temperature=1.0)
    seqs = [make_seq(params, [20 + i], f"s{i}", index=i) for i in range(4)]
    for seq, logprob in zip(seqs, (-3.0, -1.0, -2.0, -5.0)):
        seq.cumulative_logprob = logprob
    group = SequenceGroup("req", seqs[:2], finished=[finish(s, "length") for s in seqs[2:]])
    out = build_output(group, tokenizer=None)
    assert [(c.index, c.text, c.cumulative_logprob) for c in out.outputs] == [(0, "s1", -1.0), (1, "s2", -2.0)]


@pytest.mark.parametrize("kwargs, reported", [(dict(), False), (dict(logprobs=0), True), (dict(n=2, temperature=1.0), True)])
def test_cumulative_logprob_is_reported_with_logprobs_or_several_samples(kwargs, reported):
    seq = make_seq(SamplingParams(**kwargs), [5])
    seq.cumulative_logprob = -0.5
    assert build_output(SequenceGroup.single(seq), tokenizer=None).outputs[0].cumulative_logprob == (-0.5 if reported else None)


def test_an_output_keeps_its_logprobs_when_the_sequence_goes_on():
    """Outputs are streamed while the sequence grows: each holds its own copy of the lists."""
    seq = make_seq(SamplingParams(logprobs=1, prompt_logprobs=1), [5], "a")
    seq.logprobs.append({5: -0.1})
    seq.prompt_logprobs += [{12: -1.0}, {13: -2.0}]
    out = build_output(SequenceGroup.single(seq), tokenizer=None)
    seq.append_token(6, -0.2, {6: -0.2})
    seq.prompt_logprobs.append({99: -3.0})
    assert out.outputs[0].logprobs == [{5: -0.1}] and out.outputs[0].token_ids == [5]
    assert out.prompt_logprobs == [None, {12: -1.0}, {13: -2.0}]


def beam_group(width: int, n: int, length_penalty: float, hypotheses: list[tuple[str, float]], live: list[tuple[str, float]]):
    tokenizer = default_tokenizer()
    params = SamplingParams(use_beam_search=True, n=n, best_of=width, temperature=0.0, length_penalty=length_penalty)

    def beam(text: str, logprob: float, index: int) -> Sequence:
        seq = make_seq(params, tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id], index=index)
        seq.cumulative_logprob = logprob
        return seq

    finished = [finish(beam(t, lp, i), "stop") for i, (t, lp) in enumerate(hypotheses)]
    seqs = [beam(t, lp, i) for i, (t, lp) in enumerate(live)]
    return SequenceGroup("beams", seqs, finished=finished), tokenizer


def test_beam_search_returns_the_n_best_finished_hypotheses_by_length_normalized_score_with_decoded_text():
    # The longest hypothesis has the lowest cumulative logprob but the best score per token.
    group, tokenizer = beam_group(3, 2, 1.0, [(" a b", -2.0), (" a b c d e f", -2.5), (" x", -1.9)], [(" live", -0.1)])
    ranked = sorted(group.finished, key=lambda s: -beam_score(s, 1.0))
    assert ranked[0].num_output_tokens > ranked[1].num_output_tokens
    out = build_output(group, tokenizer)
    assert [c.token_ids for c in out.outputs] == [s.output_token_ids for s in ranked[:2]]
    assert [c.text for c in out.outputs] == [" a b c d e f", " a b"]  # EOS skipped, nothing cleaned up
    assert [c.index for c in out.outputs] == [0, 1]


def test_beam_text_keeps_the_spaces_the_model_wrote_where_the_tokenizer_would_clean_them_up():
    """As streamed text (test_detokenizer): a word-piece tokenizer's clean-up would turn " ." into "."."""
    vocab = {w: i for i, w in enumerate(["<unk>", "▁so", "▁it", "▁'s", "▁done", "▁."])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix=""))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", clean_up_tokenization_spaces=True)
    ids = tokenizer.encode("so it 's done .", add_special_tokens=False)
    assert tokenizer.decode(ids) == "so it's done."
    params = SamplingParams(use_beam_search=True, best_of=2, temperature=0.0)
    group = SequenceGroup("beams", [], finished=[finish(make_seq(params, ids), "length")])
    assert build_output(group, tokenizer).outputs[0].text == "so it 's done ."


def test_a_beam_search_without_finished_hypotheses_reports_its_best_live_beams():
    group, _ = beam_group(3, 2, 1.0, [], [(" p q", -3.0), (" r s", -1.0), (" t u", -2.0)])
    out = build_output(group, default_tokenizer())
    assert [c.text for c in out.outputs] == [" r s", " t u"]


def test_a_beam_search_aborted_before_its_first_token_builds_an_output():
    params = SamplingParams(use_beam_search=True, best_of=2, temperature=0.0)
    group = SequenceGroup("beams", [make_seq(params, [], index=0), make_seq(params, [], index=1)])
    out = build_output(group, default_tokenizer())  # no division by a zero length
    assert [c.token_ids for c in out.outputs] == [[]]


def test_a_failed_request_reports_error_on_the_samples_that_had_not_finished():
    params = SamplingParams(n=2, best_of=3, temperature=1.0)
    done = finish(make_seq(params, [7], "x", index=1), "stop", 7)
    group = SequenceGroup("req", [make_seq(params, [5, 6], "ab", index=2), make_seq(params, [4], "c", index=0)],
                          finished=[done], num_cached_tokens=32)
    out = error_output(group)
    assert (out.request_id, out.prompt, out.prompt_token_ids, out.finished, out.num_cached_tokens) == ("req", "the prompt", PROMPT, True, 32)
    assert out.metrics is group.metrics
    got = [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in out.outputs]
    assert got == [(0, "c", [4], "error", None), (1, "x", [7], "stop", 7)]
