"""bento-llm's paged-KV inference engine."""

from engine.config import DEFAULT_MODEL, EngineConfig
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = [
    "DEFAULT_MODEL",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "LLM",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]


def __getattr__(name: str):
    # The heavy parts (model loading, transformers) import on first use.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "AsyncEngine":
        from engine.async_engine import AsyncEngine

        return AsyncEngine
    raise AttributeError(name)
