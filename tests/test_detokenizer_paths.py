"""Both detokenizer paths give the same text: tokenizers' DecodeStream (fast tokenizers) and the
windowed fallback (tokenizers without a Rust backend), token by token and across a fork.
tests/test_detokenizer.py covers multi-byte characters and word-piece spaces on the fast path."""

from __future__ import annotations

import random

from engine import SamplingParams
from engine.detokenizer import Detokenizer
from engine.outputs import RequestMetrics
from engine.sequence import Sequence
from tests.helpers import default_tokenizer

TEXT = "Grüße aus Köln 🎉🚀, 日本語のテキスト and  double  spaces\nnew\tlines. " * 3


class PythonOnlyTokenizer:
    """The default tokenizer seen through `decode` alone, as a tokenizer without a Rust backend
    (a slow, sentencepiece or tiktoken one) is: the engine must take the windowed path."""

    is_fast = False

    def __init__(self, tokenizer) -> None:
        self.decode = tokenizer.decode
        self.all_special_ids = tokenizer.all_special_ids


def streamed(detokenizer: Detokenizer, prompt: list[int], output: list[int], fork_at: int | None = None) -> Sequence:
    seq = Sequence("r", None, prompt, SamplingParams(), RequestMetrics(arrival_time=0.0))
    detokenizer.start(seq)
    for i, token in enumerate(output):
        if i == fork_at:
            seq = seq.fork(1)
        seq.token_ids.append(token)
        detokenizer.step(seq)
    return seq


def test_the_stream_and_the_window_fallback_agree():
    tokenizer = default_tokenizer()
    fast, fallback = Detokenizer(tokenizer), Detokenizer(PythonOnlyTokenizer(tokenizer))
    assert fast.backend is not None and fallback.backend is None
    prompt = tokenizer.encode("Say:")
    output = tokenizer.encode(TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
    expected = tokenizer.decode(output, skip_special_tokens=True)
    assert streamed(fast, prompt, output).output_text == expected == streamed(fallback, prompt, output).output_text
    rng = random.Random(0)
    for fork_at in rng.sample(range(1, len(output)), 8):  # a fork (n > 1, beams) mid-character too
        assert streamed(fast, prompt, output, fork_at).output_text == expected, fork_at
