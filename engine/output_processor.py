"""What a step makes of a request's new tokens: stop checks, and the RequestOutput the
caller sees (cumulative text, the n best sequences in order)."""

from __future__ import annotations

from engine.beam_search import beam_score
from engine.detokenizer import find_stop_string
from engine.outputs import CompletionOutput, RequestOutput
from engine.sequence import Sequence
from engine.sequence_group import SequenceGroup


def check_stop(seq: Sequence, num_new_chars: int, eos_token_ids: list[int], max_model_len: int) -> None:
    p = seq.params
    token = seq.token_ids[-1]
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in eos_token_ids:
            return seq.finish("stop")
        if token in p.stop_token_ids:
            return seq.finish("stop", token)
        stop = find_stop_string(seq, num_new_chars)
        if stop is not None:
            return seq.finish("stop", stop)
    if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish("length")


def build_output(group: SequenceGroup, tokenizer) -> RequestOutput:
    first = group.first  # (a property: read once, as this runs for every request every step)
    p = first.params
    if p.use_beam_search:
        # The best finished hypotheses; while running (or aborted), the best live beams.
        pool = group.finished or group.seqs
        seqs = sorted(pool, key=lambda s: -beam_score(s, p.length_penalty) if s.num_output_tokens else 0.0)
    else:
        seqs = group.seqs + group.finished
        if len(seqs) > 1:  # n or best_of > 1; most requests have one sequence, nothing to order
            seqs.sort(key=(lambda s: -s.cumulative_logprob) if p.best_of > p.n else (lambda s: s.index))
    report_cumulative = p.logprobs is not None or p.best_of > 1
    completions = [
        CompletionOutput.of_sequence_lists(
            i,
            _beam_text(tokenizer, seq) if p.use_beam_search else seq.output_text,
            seq.token_ids,
            seq.num_prompt_tokens,
            seq.logprobs,
            cumulative_logprob=seq.cumulative_logprob if report_cumulative else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
        for i, seq in enumerate(seqs[: p.n])
    ]
    return RequestOutput(
        request_id=group.request_id,
        prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids,
        outputs=completions,
        finished=group.is_finished,
        metrics=first.metrics,
        num_cached_tokens=group.num_cached_tokens,
        prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
    )


def error_output(group: SequenceGroup) -> RequestOutput:
    """The last output of a request that failed: what it had generated, each sequence that had
    not finished before the failure with finish_reason "error". Built from plain fields only,
    so it cannot fail the way the request did (in detokenization or beam ranking)."""
    seqs = sorted(group.seqs + group.finished, key=lambda s: s.index)[: group.params.n]
    completions = [
        CompletionOutput(index=i, text=seq.output_text, token_ids=seq.output_token_ids,
                         finish_reason=seq.finish_reason or "error", stop_reason=seq.stop_reason)
        for i, seq in enumerate(seqs)
    ]
    return RequestOutput(
        request_id=group.request_id, prompt=group.prompt, prompt_token_ids=group.prompt_token_ids,
        outputs=completions, finished=True, metrics=group.metrics, num_cached_tokens=group.num_cached_tokens,
    )


def _beam_text(tokenizer, seq: Sequence) -> str:
    # Beams fork and die every step, so their text is decoded once, not incrementally.
    return tokenizer.decode(
        seq.output_token_ids, skip_special_tokens=seq.params.skip_special_tokens,
        clean_up_tokenization_spaces=False,
    )
