"""The sampler's filters and draw (kernels' filter_rows and sample_rows): the C++ kernels against
the plain-torch oracle of kernels/reference.py, and the oracle's fast path against sorting every row.

Inputs are random logits (never zeros) at vocabulary sizes that are not multiples of 16, some rows
rounded to bfloat16 (equal values, as the default model's LM head makes them) and some holding
-inf (grammar masks, banned tokens). The two agree exactly: the same kept tokens with the same
values, the same token for the same uniform. (They sum masses in different orders, so a mass
within rounding of top_p or of a drawn target could split them; random inputs never land there.)
"""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_ops, reference
from kernels.reference import _sorted_top_k_top_p, _top_k_top_p

SCALES = [0.3, 1.0, 2.5, 5.0, 9.0]  # flat rows (nuclei of hundreds) to peaked ones (one token)


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(SCALES)[torch.arange(rows) % len(SCALES)]
    logits = torch.randn(rows, vocab, generator=gen) * scale[:, None]
    logits[::2] = logits[::2].to(torch.bfloat16).float()  # ties
    masked = torch.rand(rows, vocab, generator=gen) < 0.2
    masked[1::3] = False
    return logits.masked_fill(masked, float("-inf"))


def row_params(rows: int, top_k: int, top_p: float, min_p: float | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([0.7, 1.0, 1.3])[torch.arange(rows) % 3]
    min_p_rows = None if min_p is None else torch.full((rows,), min_p)
    return (temperature, torch.full((rows,), top_k), torch.full((rows,), top_p), min_p_rows,
            torch.rand(rows, generator=gen))


def assert_same_kept(got: torch.Tensor, want: torch.Tensor) -> None:
    kept = want.isfinite()
    assert torch.equal(got.isfinite(), kept), (got.isfinite() != kept).any(-1).nonzero().flatten().tolist()
    assert torch.equal(got[kept], want[kept])


@pytest.mark.parametrize("vocab", [1007, 4099])
@pytest.mark.parametrize("top_k", [1, 50, None], ids=["k1", "k50", "kvocab"])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 1.0])
@pytest.mark.parametrize("min_p", [None, 0.05])
def test_the_kernels_keep_and_draw_what_the_torch_sampler_does(vocab, top_k, top_p, min_p):
    rows = 40
    logits = random_logits(rows, vocab, seed=vocab + (top_k or 0))
    temperature, top_k_rows, top_p_rows, min_p_rows, _ = row_params(rows, top_k or vocab, top_p, min_p, seed=1)
    want = reference.filter_rows(logits, temperature, top_k_rows, top_p_rows, min_p_rows)
    assert_same_kept(cpu_ops.filter_rows(logits, temperature, top_k_rows, top_p_rows, min_p_rows), want)
    if top_k == 1:
        assert (want.isfinite().sum(-1) == 1).all()
    # Every row at 16 uniforms, a few greedy rows among them.
    repeat = lambda t: None if t is None else t.repeat(16)  # noqa: E731
    uniform = torch.rand(16 * rows, generator=torch.Generator().manual_seed(2))
    greedy = torch.arange(16 * rows) % 7 == 3
    args = (logits.repeat(16, 1), uniform, greedy, repeat(temperature), repeat(top_k_rows), repeat(top_p_rows),
            repeat(min_p_rows))
    got = cpu_ops.sample_rows(*args)
    assert torch.equal(got, reference.sample_rows(*args))
    assert torch.equal(got[greedy], logits.repeat(16, 1)[greedy].argmax(-1))
    assert want.repeat(16, 1)[~greedy].gather(1, got[~greedy, None]).isfinite().all()  # only kept tokens drawn


def test_the_kernels_sample_unfiltered_rows_and_rows_with_temperature_only():
    logits = random_logits(30, 2080, seed=5)[:, :2053]  # strided rows, as an LM head padded past the vocabulary
    uniform = torch.rand(30, generator=torch.Generator().manual_seed(6))
    greedy = torch.zeros(30, dtype=torch.bool)
    temperature = torch.linspace(0.3, 2.0, 30)
    for t in (None, temperature):
        assert torch.equal(cpu_ops.sample_rows(logits, uniform, greedy, t, None, None, None),
                           reference.sample_rows(logits, uniform, greedy, t, None, None, None))
        assert torch.equal(cpu_ops.filter_rows(logits, t, None, None, None), reference.filter_rows(logits, t, None, None, None))


def test_equal_values_at_the_cut_keep_the_lowest_indices():
    # Values 0..4, nine of each: top_k 12 takes the nine 4s and the first three 3s; top_p over
    # equal probabilities keeps the first ones too.
    row = torch.tensor([float(i % 5) for i in range(45)])[None]
    top_k, top_p = torch.tensor([12]), torch.tensor([1.0])
    want = torch.full_like(row, float("-inf"))
    keep = list(range(4, 45, 5)) + [3, 8, 13]
    want[0, keep] = row[0, keep]
    for ops in (cpu_ops, reference):
        assert_same_kept(ops.filter_rows(row, None, top_k, top_p, None), want)
    flat = torch.zeros(1, 101)
    for ops in (cpu_ops, reference):
        kept = ops.filter_rows(flat, None, torch.tensor([101]), torch.tensor([0.5]), None).isfinite()[0]
        assert kept.nonzero().flatten().tolist() == list(range(51))  # the mass before the 51st is 50/101


@pytest.mark.parametrize("vocab", [1000, 3001])
def test_the_torch_fast_path_keeps_what_sorting_every_row_keeps(vocab):
    """Candidates decide most rows, sorting the rest; bfloat16 ties at the cut and -inf included."""
    logits = random_logits(30, vocab, seed=7)
    gen = torch.Generator().manual_seed(8)
    top_k = torch.tensor([1, 7, 50, 255, 256, 257, 600, vocab - 1, vocab, vocab] * 3)
    top_p = torch.rand(30, generator=gen) * 1.2  # a third of the rows at top_p >= 1
    assert_same_kept(_top_k_top_p(logits, top_k, top_p), _sorted_top_k_top_p(logits, top_k, top_p))


def test_the_kernels_draw_the_same_tokens_on_one_thread_and_two():
    logits = random_logits(24, 4099, seed=9)
    temperature, top_k, top_p, min_p, uniform = row_params(24, 4099, 0.9, 0.02, seed=10)
    greedy = torch.zeros(24, dtype=torch.bool)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_ops.sample_rows(logits, uniform, greedy, temperature, top_k, top_p, min_p)
        torch.set_num_threads(2)
        assert torch.equal(cpu_ops.sample_rows(logits, uniform, greedy, temperature, top_k, top_p, min_p), one)
    finally:
        torch.set_num_threads(threads)


def test_the_kernels_name_a_malformed_argument():
    logits = torch.randn(3, 100)
    uniform, greedy = torch.rand(3), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="top_k and top_p must be given together"):
        cpu_ops.sample_rows(logits, uniform, greedy, None, torch.full((3,), 5), None, None)
    with pytest.raises(RuntimeError, match="temperature must be"):
        cpu_ops.sample_rows(logits, uniform, greedy, torch.ones(2), None, None, None)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        cpu_ops.sample_rows(logits.double(), uniform, greedy, None, None, None, None)
