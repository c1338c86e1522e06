"""One request's failure never hurts another: any SamplingParams is refused naming a field or
runs to the end, a failure in one request's step bookkeeping fails that request alone, and
every block comes back."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.llm_engine import EngineStepError
from tests.conftest import assert_all_blocks_free
from tests.helpers import fail_detokenizing_the_doomed_prompt

NORMAL = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
FIELDS = set(SamplingParams.__dataclass_fields__)


@pytest.fixture(scope="module")
def engine(tiny_path):
    # A short context keeps requests that ask for "as many tokens as fit" quick.
    return LLMEngine(EngineConfig(model=tiny_path, num_kv_blocks=48, max_model_len=40))


def run(engine: LLMEngine, requests: dict, max_steps: int = 100_000) -> tuple[dict, dict]:
    """Run requests together to the end, or for max_steps (an engine that stalls returns with
    requests unfinished instead of hanging the test): (final outputs, errors) by request id."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finals, errors = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        try:
            outputs = engine.step()
        except EngineStepError as e:
            errors.update(e.errors)
            outputs = e.outputs
        finals.update({o.request_id: o for o in outputs if o.finished})
    return finals, errors


@pytest.fixture(scope="module")
def alone(engine):
    finals, errors = run(engine, {"alone": ("The normal request", NORMAL)})
    assert not errors
    return finals["alone"].outputs[0].token_ids


EXTREME_FLOATS = st.one_of(
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=1.0),  # twice: most drawn values should be usable
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e-40, 5e-324, 1e308, -1e308, 2.0, 0.5, 1.0, 100.0, 101.0]),
)
EXTREME_INTS = st.one_of(
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=-3, max_value=40),
    st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]),
)
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "length_penalty"]
INT_FIELDS = ["n", "best_of", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed"]


@st.composite
def sampling_kwargs(draw) -> dict:
    kwargs = {}
    for name in draw(st.sets(st.sampled_from(FLOAT_FIELDS), max_size=3), label="floats"):
        kwargs[name] = draw(EXTREME_FLOATS)
    for name in draw(st.sets(st.sampled_from(INT_FIELDS), max_size=3), label="ints"):
        kwargs[name] = draw(EXTREME_INTS)
    if draw(st.integers(0, 3)) == 0:
        kwargs.update(use_beam_search=True, temperature=0.0, best_of=kwargs.get("best_of", 2))
    if draw(st.booleans()):
        kwargs["stop_token_ids"] = draw(st.lists(EXTREME_INTS, max_size=2))
    if draw(st.booleans()):
        kwargs["logit_bias"] = draw(st.dictionaries(EXTREME_INTS, EXTREME_FLOATS, max_size=2))
    if draw(st.booleans()):
        kwargs["stop"] = draw(st.lists(st.text(max_size=3), max_size=2))
    kwargs["ignore_eos"] = draw(st.booleans())
    return kwargs


def names_a_field(error: ValueError) -> bool:
    match = re.search(r"SamplingParams\.(\w+)", str(error))
    return match is not None and match.group(1) in FIELDS


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(kwargs=sampling_kwargs())
def test_any_sampling_params_beside_a_normal_request(engine, alone, kwargs):
    try:
        params = SamplingParams(**kwargs)
        engine.make_sequence("probe", "A request with odd settings", params)
    except ValueError as e:
        assert names_a_field(e), e
        event("refused")
        return
    event("ran")
    finals, errors = run(engine, {"odd": ("A request with odd settings", params), "normal": ("The normal request", NORMAL)})
    # Everything validation lets through, the engine computes, except a request of several
    # sequences that outgrew the whole cache (each may stop early, so admission cannot know):
    # it fails alone with an error naming the field to lower (tests/test_swapping.py).
    if errors:
        assert list(errors) == ["odd"] and params.best_of > 1 and "grew beyond the KV cache" in str(errors["odd"])
        assert names_a_field(errors["odd"]), errors
    else:
        assert finals["odd"].finished
    assert finals["normal"].outputs[0].token_ids == alone
    assert_all_blocks_free(engine)


def test_a_failure_in_one_requests_bookkeeping_fails_it_alone(engine, alone, monkeypatch):
    """Detokenization, stop checks and output building run per request: one raising there
    aborts only its request, with its own error, and frees its blocks."""
    fail_detokenizing_the_doomed_prompt(engine, monkeypatch)
    long = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    finals, errors = run(engine, {"doomed": ("the doomed prompt", long), "normal": ("The normal request", NORMAL)})
    assert list(errors) == ["doomed"] and "injected detokenizer failure" in str(errors["doomed"])
    assert "doomed" not in finals and finals["normal"].outputs[0].token_ids == alone
    assert_all_blocks_free(engine)


def test_a_failure_in_the_sampler_for_one_row_fails_that_request_alone(engine, alone, monkeypatch):
    """The sampler's per-row work (here: a seeded request's own uniform draw) is pinned to its row."""
    from engine import sampler as sampler_module

    real_failures = sampler_module._RowFailures

    class FailSeeded(real_failures):
        def run(self, row, work, *args):
            if work.__name__ == "seeded_uniform":
                return super().run(row, _raise)
            return super().run(row, work, *args)

    def _raise():
        raise RuntimeError("injected sampler failure")

    monkeypatch.setattr(sampler_module, "_RowFailures", FailSeeded)
    seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True)
    finals, errors = run(engine, {"seeded": ("A seeded prompt", seeded), "normal": ("The normal request", NORMAL)})
    assert list(errors) == ["seeded"] and "injected sampler failure" in str(errors["seeded"])
    assert finals["normal"].outputs[0].token_ids == alone
    assert_all_blocks_free(engine)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(repetition_penalty=1e-300), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(top_k=2**63), "top_k"),
        (dict(seed=2**64), "seed"),
        (dict(use_beam_search=True, best_of=2, temperature=0.0, length_penalty=1e308), "length_penalty"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_values_the_engine_cannot_compute_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)


def test_tiny_temperatures_are_clamped_as_vllm_does_and_ids_outside_the_vocabulary_refused(engine):
    assert SamplingParams(temperature=1e-40).temperature == 0.01
    vocab = engine.model_config.vocab_size
    for kwargs, field in ((dict(stop_token_ids=[vocab]), "stop_token_ids"), (dict(logit_bias={vocab + 5: 1.0}), "logit_bias")):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
            engine.make_sequence("x", "hi", SamplingParams(**kwargs))


def test_more_sequences_than_the_engine_runs_together_is_refused_naming_n_or_best_of(engine):
    """Found by the property test above: the refusal named no field, so the server's 400 had no param."""
    limit = engine.config.max_num_seqs
    for kwargs, field in ((dict(n=limit + 1), "n"), (dict(n=2, best_of=2**31, temperature=1.0), "best_of")):
        with pytest.raises(ValueError, match=rf"SamplingParams\.{field} asks for"):
            engine.make_sequence("x", "hi", SamplingParams(**kwargs))
