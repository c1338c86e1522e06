"""The offline API in vLLM's shape: LLM(model=...).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from tqdm.auto import tqdm

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.llm_engine import EngineStepError, LLMEngine, Prompt
from engine.output_processor import error_output
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Messages = list[dict]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also stop when the LLM is
        garbage-collected or the interpreter exits)."""
        self.engine.runner.shutdown()

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A request that fails on its own (an error in its sampling or bookkeeping, or a forward
        pass that failed under it) comes back finished with finish_reason "error" (the engine
        logs the cause) while the others complete, as vLLM reports a failed request. Only an
        engine that cannot run at all (EngineDeadError) makes the call raise."""
        return self._run(_as_prompt_list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: Messages | list[Messages],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and generate a reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [self.engine.apply_chat_template(list(c)) for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt"
                )
        # Validate everything before queueing anything, so a bad prompt leaves no request behind.
        order: dict[str, int] = {}
        groups = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            rid = f"offline-{next(self._request_ids)}"
            groups.append(self.engine.make_sequence(rid, prompt, params))
            order[rid] = i
        for group in groups:  # a grammar that cannot compile is a ValueError here, like any bad value
            if group.grammar_future is not None:
                group.grammar_future.result()
        for group in groups:
            self.engine.add_sequence(group)

        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm)
        generated = 0
        try:
            while self.engine.has_unfinished_requests():
                try:
                    outputs = self.engine.step()
                except EngineStepError as e:
                    outputs = e.outputs + [error_output(group) for group in groups if group.request_id in e.errors]
                for out in outputs:
                    generated += 1
                    if out.finished:
                        results[order[out.request_id]] = out
                        bar.update(1)
                if bar.format_dict.get("elapsed"):
                    bar.set_postfix_str(f"{generated / bar.format_dict['elapsed']:.1f} tok/s", refresh=False)
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # one prompt of token ids
    for p in prompts:
        if not isinstance(p, (str, list)):
            raise ValueError(f"each prompt must be a string or a list of token ids, got {type(p).__name__}")
    return prompts
