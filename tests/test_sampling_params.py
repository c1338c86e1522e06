"""SamplingParams for several sequences: n, best_of, beam search; impossible combinations name the field."""

from __future__ import annotations

import pytest

from engine import SamplingParams


def test_best_of_defaults_to_n_and_beam_width_to_best_of():
    assert SamplingParams(n=3).best_of == 3
    assert SamplingParams(n=2, best_of=5).best_of == 5
    assert SamplingParams(use_beam_search=True, n=2, temperature=0.0).beam_width == 2
    assert SamplingParams(use_beam_search=True, best_of=4, temperature=0.0).beam_width == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=3, best_of=2), "best_of"),
        (dict(n=2, temperature=0.0), "best_of"),  # greedy samples would all be equal
        (dict(use_beam_search=True, best_of=4, temperature=0.7), "temperature"),
        (dict(use_beam_search=True, temperature=0.0), "best_of"),  # width 1 is greedy decoding
        (dict(use_beam_search=True, best_of=2, temperature=0.0, top_p=0.5), "top_p"),
        (dict(use_beam_search=True, best_of=2, temperature=0.0, seed=1), "seed"),
        (dict(use_beam_search=True, best_of=2, temperature=0.0, stop=["x"]), "stop"),
        (dict(use_beam_search=True, best_of=2, temperature=0.0, early_stopping="sometimes"), "early_stopping"),
        (dict(length_penalty=2.0), "length_penalty"),
        (dict(early_stopping=True), "early_stopping"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
    ],
)
def test_impossible_combinations_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} "):
        SamplingParams(**kwargs)
