"""A request's way in: every check that can refuse it (with a ValueError naming what to
change), its tokenization and its chat template, before it touches any engine state. The
offline LLM and the AsyncEngine both come through here, so they refuse the same things."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.detokenizer import Detokenizer
from engine.models.config import ModelConfig
from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.sequence_group import SequenceGroup

Prompt = str | list[int]


def model_max_len(model_config: ModelConfig, wanted: int | None, source: str) -> int:
    """max_model_len: what the user asked for, within what the model supports (sliding-window
    layers apply their windows, so a window does not shorten it)."""
    model_max = model_config.max_position_embeddings
    if wanted is None:
        return model_max
    if wanted > model_max:
        raise ValueError(
            f"max_model_len={wanted} exceeds what {source} supports ({model_max}, its "
            "max_position_embeddings); lower max_model_len"
        )
    return wanted


@dataclass
class InputProcessor:
    config: EngineConfig
    model_config: ModelConfig
    model_name: str
    tokenizer: object
    detokenizer: Detokenizer
    max_model_len: int
    num_blocks: int  # for the error message of a prompt too long for the KV cache

    def make_sequence(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None, arrival_time: float | None = None,
    ) -> SequenceGroup:
        """Validate and tokenize a request without touching engine state (any thread may call)."""
        params = params if params is not None else SamplingParams()
        for limit in ("max_num_seqs", "max_num_batched_tokens"):
            if params.best_of > getattr(self.config, limit):
                field = "n" if params.n == params.best_of else "best_of"  # the one the user set
                raise ValueError(
                    f"SamplingParams.{field} asks for {params.best_of} sequences, but the engine runs at most "
                    f"{limit}={getattr(self.config, limit)} sequences together; lower it"
                )
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
            outside = [t for t in ids if t >= vocab]
            if outside:
                raise ValueError(f"SamplingParams.{name} token ids must be below the vocabulary size {vocab}, got {outside[:5]}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty; send at least one character or token")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            if not token_ids:
                raise ValueError("prompt is empty; send at least one token id")
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, but max_model_len is {self.max_model_len} "
                f"(KV cache: {self.num_blocks} blocks x {self.config.block_size} tokens) and at least "
                "one token must be generated; shorten the prompt"
            )
        room = self.max_model_len - len(token_ids)
        seq = Sequence(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            metrics=RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.time()),
        )
        seq.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self.detokenizer.start(seq)
        return SequenceGroup.single(seq)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.model_name} has no chat template; send a plain prompt instead")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template already wrote the special tokens; encoding must not add a second BOS.
        return self.tokenizer.encode(text, add_special_tokens=False)
