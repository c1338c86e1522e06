"""Incremental detokenization and stop-string handling.

Decoding each new token alone breaks multi-byte characters (split across byte-level tokens)
and word-piece spaces (a SentencePiece token's leading space depends on what precedes it).
Fast tokenizers (a Rust `tokenizers` backend, nearly all of them) use tokenizers' own
DecodeStream, seeded with the prompt's last tokens for context; it holds back incomplete
characters itself and costs one token per step instead of decoding a window twice. Others
fall back to vLLM's way: decode a short window ending at the new tokens and emit only the text
past the window's previous end, holding back text that still ends in an incomplete character.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from engine.sequence import Sequence

# Tokens of context before the unread ones: enough for any tokenizer's merge or space rule.
_WINDOW = 6
# Sequence.decode_stream of a sequence whose decoder rewrote text DecodeStream had already
# emitted (tokenizers then raises): it goes on with the window decoder, which handles that.
_WINDOW_ONLY = ("window", 0)


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.all_special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.backend = tokenizer.backend_tokenizer if getattr(tokenizer, "is_fast", False) else None

    def start(self, seq: Sequence) -> None:
        """Position the window at the end of the prompt."""
        seq.read_offset = seq.num_prompt_tokens
        seq.prefix_offset = max(0, seq.num_prompt_tokens - _WINDOW)
        seq.decode_stream = None

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)

    def step(self, seq: Sequence) -> str:
        """Append the text of newly generated tokens to seq.output_text; return the new text."""
        if self.backend is None or seq.decode_stream == _WINDOW_ONLY:
            return self._step_window(seq)
        ids = seq.token_ids
        if seq.decode_stream is None:  # first step, or a fork's first: context up to the text emitted
            stream = DecodeStream(ids=ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=seq.params.skip_special_tokens)
            seq.decode_stream = (stream, seq.read_offset)
        stream, fed = seq.decode_stream
        try:
            new_text = stream.step(self.backend, ids[fed:]) if len(ids) > fed else None
        except Exception:  # noqa: BLE001 - tokenizers' "Invalid prefix encountered while decoding stream"
            seq.decode_stream = _WINDOW_ONLY
            return self._step_window(seq)
        seq.decode_stream = (stream, len(ids))
        if not new_text:
            return ""  # a character still incomplete (tokens fed, text not yet emitted), or a skipped special token
        seq.read_offset = len(ids)
        seq.prefix_offset = max(0, seq.read_offset - _WINDOW)
        seq.output_text += new_text
        return new_text

    def _step_window(self, seq: Sequence) -> str:
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        if skip and ids[-1] in self.all_special_ids:
            return ""
        prefix_text = self._decode(ids[seq.prefix_offset : seq.read_offset], skip)
        full_text = self._decode(ids[seq.prefix_offset :], skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""  # nothing printable yet, or a character still incomplete
        if not full_text.startswith(prefix_text):
            # A merge changed earlier characters; the window's common prefix is still safe.
            common = 0
            while common < min(len(prefix_text), len(full_text)) and prefix_text[common] == full_text[common]:
                common += 1
            prefix_text = prefix_text[:common]
        new_text = full_text[len(prefix_text) :]
        seq.prefix_offset = seq.read_offset
        seq.read_offset = len(ids)
        seq.output_text += new_text
        return new_text


def find_stop_string(seq: Sequence, num_new_chars: int) -> str | None:
    """Find a stop string that ends within the newest characters; cut the output there.
    Stop strings may span tokens, so each is searched from its own length back before the new
    characters: older text was checked when it arrived (or came before min_tokens, when nothing
    is checked), and a short stop string wholly inside it must not be found now."""
    stops = seq.params.stop
    if not stops or not num_new_chars:
        return None
    text = seq.output_text
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return None
    at, stop = best
    seq.output_text = text[: at + len(stop)] if seq.params.include_stop_str_in_output else text[:at]
    return stop
