"""Incremental detokenization (text streamed token by token equals decoding all at once) and
stop strings (found where they end, cut where they begin)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine import SamplingParams
from engine.detokenizer import Detokenizer, find_stop_string
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


def text_seq(params: SamplingParams, text: str) -> Sequence:
    seq = Sequence("r", None, [1], params, RequestMetrics(arrival_time=0.0))
    seq.output_text = text
    return seq


@pytest.mark.parametrize("include", [False, True])
def test_the_stop_string_that_occurs_first_in_the_text_wins_whatever_its_place_in_the_list(include):
    # One step added "Hello. World! Bye", which holds both stop strings.
    seq = text_seq(SamplingParams(stop=["!", ". W"], include_stop_str_in_output=include), "Hello. World! Bye")
    assert find_stop_string(seq, num_new_chars=17) == ". W"
    assert seq.output_text == ("Hello. W" if include else "Hello")


def test_of_two_stop_strings_at_the_same_place_the_first_listed_wins():
    seq = text_seq(SamplingParams(stop=["ab", "abc"]), "xxabcd")
    assert find_stop_string(seq, num_new_chars=3) == "ab" and seq.output_text == "xx"


def test_a_stop_string_that_began_in_earlier_text_is_found_and_cut_there():
    seq = text_seq(SamplingParams(stop=["STOP"]), "one ST" + "OP two")
    assert find_stop_string(seq, num_new_chars=len("OP two")) == "STOP"
    assert seq.output_text == "one "


def test_a_stop_string_wholly_in_older_text_is_not_found_again():
    # Older text was checked when it arrived (or came before min_tokens, when nothing is
    # checked): a stop string ending just before the new text is not cut out again.
    seq = text_seq(SamplingParams(stop=["xy"]), "abxy" + "def")
    assert find_stop_string(seq, num_new_chars=3) is None and seq.output_text == "abxydef"


def test_a_stop_string_at_the_very_start_cuts_the_output_to_nothing():
    seq = text_seq(SamplingParams(stop=["Hel"]), "Hello")
    assert find_stop_string(seq, num_new_chars=5) == "Hel"
    assert seq.output_text == ""
    kept = text_seq(SamplingParams(stop=["Hel"], include_stop_str_in_output=True), "Hello")
    assert find_stop_string(kept, num_new_chars=5) == "Hel" and kept.output_text == "Hel"


def test_no_new_text_finds_no_stop_string():
    seq = text_seq(SamplingParams(stop=["lo"]), "Hello")
    assert find_stop_string(seq, num_new_chars=0) is None and seq.output_text == "Hello"


def test_a_short_stop_string_wholly_in_older_text_is_not_found_beside_a_longer_one():
    """Each stop string is searched back only its own length before the new text (a search
    from the longest one's length found "lo", which ended before the new "!", and cut there)."""
    seq = text_seq(SamplingParams(stop=["lo", "xyz"]), "Hello" + "!")
    assert find_stop_string(seq, num_new_chars=1) is None and seq.output_text == "Hello!"


def test_a_stop_string_with_only_its_last_character_in_the_new_text_is_found():
    seq = text_seq(SamplingParams(stop=["STOP"]), "one STO" + "P two")
    assert find_stop_string(seq, num_new_chars=len("P two")) == "STOP" and seq.output_text == "one "


def test_a_stop_string_twice_in_the_new_text_cuts_at_its_first_occurrence():
    seq = text_seq(SamplingParams(stop=["."]), "a" + ".b.c")
    assert find_stop_string(seq, num_new_chars=4) == "." and seq.output_text == "a"


def test_a_one_token_prompt_still_gives_the_first_word_its_space():
    """The decoding window starts at the prompt's first token, never after it: a word piece's
    leading space depends on the token before it."""
    tokenizer = sentencepiece_style_tokenizer()
    ids = tokenizer.encode("hello world how", add_special_tokens=False)
    assert "".join(stream(tokenizer, ids[:1], ids[1:])) == " world how"


def test_special_tokens_inside_the_prompt_or_the_output_are_skipped_and_the_text_after_them_kept():
    tokenizer = default_tokenizer()
    eos = tokenizer.eos_token_id
    hi, there = tokenizer.encode("Hi", add_special_tokens=False), tokenizer.encode(" there", add_special_tokens=False)
    output = tokenizer.encode("Hello", add_special_tokens=False) + [eos] + tokenizer.encode(" world", add_special_tokens=False)
    assert "".join(stream(tokenizer, hi + [eos] + there, output)) == "Hello world"
    kept = SamplingParams(skip_special_tokens=False)
    seq = Sequence("r", None, hi, kept, RequestMetrics(arrival_time=0.0))
    detok = Detokenizer(tokenizer)
    detok.start(seq)
    for token in output:
        seq.token_ids.append(token)
        detok.step(seq)
    assert seq.output_text == tokenizer.decode(output, skip_special_tokens=False) == f"Hello{tokenizer.eos_token} world"


def test_streamed_text_is_never_cleaned_up_even_where_the_tokenizer_would():
    """clean_up_tokenization_spaces (applied to word-piece tokenizers) rewrites " ." to "." and
    " 's" to "'s": the stream keeps the text the model wrote, whatever the tokenizer's default."""
    words = ["<unk>", "▁it", "▁'s", "▁fine", "▁."]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="<unk>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", clean_up_tokenization_spaces=True)
    ids = tokenizer.encode("it 's fine .", add_special_tokens=False)
    assert tokenizer.decode(ids) == "it's fine."  # the tokenizer's own default cleans it
    assert "".join(stream(tokenizer, ids[:1], ids[1:])) == " 's fine ."


def test_a_decoder_that_rewrites_earlier_text_streams_what_follows_the_unchanged_part():
    """A decoder that rewrites across token boundaries (here: "ab" -> "X" on the fused text)
    changes text already streamed ("zzza" became "zzzX"); it cannot be taken back, so the
    stream waits while the window's text does not grow, then goes on from the longest
    unchanged prefix of it ("zzz")."""
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "zzza": 1, "b": 2, "a": 3}, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert tokenizer.decode([1, 2, 3]) == "zzzXa"
    assert stream(tokenizer, [3], [1, 2, 3]) == ["zzza", "", "Xa"]
