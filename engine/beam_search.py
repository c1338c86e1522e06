"""Beam search over paged sequences, step for step the algorithm of transformers' `_beam_search`.

Each step every live beam offers its top candidates (beam score plus next-token logprob). The
best `width` candidates that do not end continue; those that end (a stop token, or the length
limit) among the best `width` join the finished hypotheses, scored by
cumulative logprob / generated_length ** length_penalty, and the best `width` of those are kept.
A beam chosen by several candidates forks: the copies share its blocks and copy the partly
filled last block on their first write. A beam chosen by none is pruned and frees its blocks
at once.

Stopping, as transformers: early_stopping=True ends the search once `width` hypotheses are
finished; False and "never" end it once no running beam can beat the worst finished
hypothesis, estimated at the current length ("never" with length_penalty > 0: at the maximum
length).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.sequence_group import GroupStatus, SequenceGroup


def stop_token_ids(params: SamplingParams, eos_token_ids: list[int]) -> set[int]:
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))


def num_candidates(params: SamplingParams, eos_token_ids: list[int]) -> int:
    """Candidates kept per step: enough that `width` survive even if the best all end."""
    return max(2, 1 + len(stop_token_ids(params, eos_token_ids))) * params.beam_width


def beam_score(seq: Sequence, length_penalty: float) -> float:
    return seq.cumulative_logprob / (seq.num_output_tokens**length_penalty)


@dataclass
class _Candidate:
    parent: Sequence
    token_id: int
    logprob: float
    score: float  # the parent's cumulative logprob plus this token's


def beam_search_step(
    group: SequenceGroup,
    samples: list[tuple[Sequence, list[int], list[float]]],
    block_manager: BlockManager,
    eos_token_ids: list[int],
    max_model_len: int,
) -> None:
    """Advance a beam group by one token. samples: each live beam with its candidate token ids
    and their logprobs. Updates group.seqs, group.finished and group.status."""
    params = group.params
    width = params.beam_width
    stops = stop_token_ids(params, eos_token_ids)
    candidates = sorted(
        (_Candidate(seq, t, lp, seq.cumulative_logprob + lp) for seq, ids, lps in samples for t, lp in zip(ids, lps)),
        key=lambda c: -c.score,
    )[: num_candidates(params, eos_token_ids)]

    def ends(c: _Candidate) -> str | None:
        if c.token_id in stops and c.parent.num_output_tokens + 1 >= params.min_tokens:
            return "stop"
        if c.parent.num_output_tokens + 1 >= c.parent.max_tokens or c.parent.num_tokens + 1 >= max_model_len:
            return "length"
        return None

    pool_was_full = len(group.finished) >= width
    continuing: list[_Candidate] = []
    for rank, c in enumerate(candidates):
        reason = ends(c)
        if reason is None:
            if len(continuing) < width:
                continuing.append(c)
        elif rank < width and not (pool_was_full and params.early_stopping is True):
            done = c.parent.fork(0)  # a hypothesis needs its tokens, not its blocks
            done.append_token(c.token_id, c.logprob, None)
            done.finish(reason, c.token_id if c.token_id in params.stop_token_ids else None)
            group.finished.append(done)
    group.finished.sort(key=lambda s: -beam_score(s, params.length_penalty))
    del group.finished[width:]

    # Forks first, from the parents as they were; then every survivor takes its token. A
    # failure part-way frees the forks made so far: aborting the request frees group.seqs,
    # and a fork must not hold blocks outside it.
    survivors: list[tuple[Sequence, _Candidate]] = []
    reused: set[int] = set()
    try:
        for c in continuing:
            if c.parent.seq_id in reused:
                child = c.parent.fork(0)
                survivors.append((child, c))
                block_manager.fork(c.parent, child)
            else:
                reused.add(c.parent.seq_id)
                survivors.append((c.parent, c))
    except BaseException:
        for seq, _ in survivors:
            if seq.seq_id not in reused:
                block_manager.free(seq)
        raise
    for seq in group.seqs:
        if seq.seq_id not in reused:
            block_manager.free(seq)  # pruned
    group.seqs = [seq for seq, _ in survivors]
    for seq, c in survivors:
        seq.append_token(c.token_id, c.logprob, None)

    if _search_is_done(group, continuing, params):
        for seq in group.seqs:
            block_manager.free(seq)
        group.seqs = []
        group.status = GroupStatus.FINISHED


def _search_is_done(group: SequenceGroup, continuing: list[_Candidate], params: SamplingParams) -> bool:
    width = params.beam_width
    if not continuing:
        return True
    if len(group.finished) < width:
        return False
    if params.early_stopping is True:
        return True
    best = continuing[0]
    if params.early_stopping == "never" and params.length_penalty > 0:
        length = best.parent.max_tokens
    else:
        length = best.parent.num_output_tokens  # survivors have taken their token already
    best_possible = best.score / (length**params.length_penalty)
    worst_finished = min(beam_score(s, params.length_penalty) for s in group.finished)
    return best_possible <= worst_finished
