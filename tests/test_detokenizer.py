"""Incremental detokenization: text streamed token by token equals decoding all at once."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine import SamplingParams
from engine.detokenizer import Detokenizer
from engine.outputs import RequestMetrics
from engine.sequence import Sequence
from tests.helpers import default_tokenizer


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int]) -> list[str]:
    seq = Sequence("r", None, prompt_ids, SamplingParams(), RequestMetrics(arrival_time=0.0))
    detok = Detokenizer(tokenizer)
    detok.start(seq)
    pieces = []
    for token in output_ids:
        seq.token_ids.append(token)
        pieces.append(detok.step(seq))
    assert "".join(pieces) == seq.output_text
    return pieces


@pytest.mark.parametrize(
    "text",
    ["Grüße aus Köln, naïve café", "emoji: 🎉🚀 and 日本語のテキスト", " leading space and  double  spaces", "a\nnew\tline"],
)
def test_multibyte_characters_are_never_split(text):
    tokenizer = default_tokenizer()
    prompt = tokenizer.encode("Say:")
    output = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, prompt, output)
    assert "".join(pieces) == tokenizer.decode(output)
    assert not any("\ufffd" in piece for piece in pieces)


def test_special_tokens_are_skipped_by_default():
    tokenizer = default_tokenizer()
    output = tokenizer.encode("Hello", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(stream(tokenizer, tokenizer.encode("Hi"), output)) == "Hello"


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A word-piece vocabulary with SentencePiece's space marker: decoding one token alone drops
    its leading space, so a naive per-token detokenizer glues words together."""
    words = ["<unk>", "▁hello", "▁world", "▁how", "▁are", "▁you", "▁to", "day", "?"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_word_piece_spaces_survive_token_by_token_decoding():
    tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer.encode("hello world how are you today?", add_special_tokens=False)
    assert tokenizer.decode(ids[3:4]) == "are"  # alone, the space is lost
    pieces = stream(tokenizer, ids[:2], ids[2:])
    assert "".join(pieces) == " how are you today?"
