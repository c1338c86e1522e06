"""The one engine of a server process, loaded in the background.

BentoML creates the service instance inside the ASGI lifespan, and uvicorn accepts no
connection until that returns; loading a model there would leave /livez unanswered for
the whole load and make Kubernetes kill a healthy pod. So the engine is built in a thread
and the routes answer 503 until it is ready.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any, Callable

from bento_llm.chat import template_source
from bento_llm.dashboard import Timeline
from bento_llm.errors import not_ready
from bento_llm.metrics import ServerMetrics
from bento_llm.reasoning import detect_reasoning_parser
from bento_llm.settings import Settings
from bento_llm.tool_parsers import detect_tool_parser

logger = logging.getLogger("bento_llm")

EngineFactory = Callable[[Any], Any]  # EngineConfig -> AsyncEngine


def _default_factory(config: Any) -> Any:
    from engine import AsyncEngine

    return AsyncEngine(config)


class LLMRuntime:
    def __init__(
        self,
        settings: Settings,
        engine_factory: EngineFactory | None = None,
        model_path: str | None = None,
        freeze_heap_when_loaded: bool = False,
    ) -> None:
        self.settings = settings
        # The server's one runtime lives as long as its process: what exists once the model is
        # loaded is moved out of the garbage collector's reach (gc.freeze), as vLLM does after
        # start-up. With the default model loaded, ~316k objects are tracked and one full
        # collection walks them all in ~165 ms (measured on this 2-vCPU Zen 4), holding the GIL:
        # a stall of every stream each time one comes. Tests build many runtimes in one process
        # and leave this off (frozen cyclic garbage of a discarded runtime would never be freed).
        self.freeze_heap_when_loaded = freeze_heap_when_loaded
        self.model_name = settings.model_name
        # Where the weights really are (a packed GGUF inside a Bento), when not settings.model.
        self.model_path = model_path
        self.engine_factory = engine_factory or _default_factory
        self.engine: Any | None = None
        self.tokenizer: Any | None = None
        self.max_model_len: int = 0
        self.vocab_size: int = 0
        self.tool_parser: str | None = None  # a name in tool_parsers.PARSERS
        self.reasoning_parser: str | None = None  # a name in reasoning.PARSERS
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._thread: threading.Thread | None = None
        self._token_text: dict[int, str] = {}
        self.metrics = ServerMetrics(self.model_name, self._stats)
        self.timeline = Timeline(self._stats, self.metrics.latency_totals)

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Loaded and able to run requests: a dead engine loop is not ready (and not alive)."""
        return self.engine is not None and not self.failed

    @property
    def failed(self) -> bool:
        """The model failed to load, or the engine's step loop died: nothing will run again."""
        if self.error is not None:
            return True
        # AsyncEngine records a fatal loop error here (and refuses new requests).
        return self.engine is not None and self.engine.is_dead

    def require_engine(self) -> Any:
        if self.engine is not None and self.engine.is_dead:
            raise not_ready("The engine stopped after an internal error; the server must be restarted (/livez is 503).")
        if self.engine is not None:
            return self.engine
        if self.error is not None:
            raise not_ready(f"The model failed to load: {self.error}")
        raise not_ready(f"The model {self.model_name} is still loading; retry when /readyz answers 200.")

    def _stats(self) -> Any | None:
        return self.engine.stats() if self.engine is not None else None

    # ------------------------------------------------------------------ loading

    def start(self) -> None:
        """Load in a background thread; returns at once."""
        self._thread = threading.Thread(target=self.load, name="bento-llm-load", daemon=True)
        self._thread.start()
        self.timeline.start()

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def load(self) -> None:
        started = time.perf_counter()
        try:
            overrides = {"model": self.model_path} if self.model_path else {}
            config = self.settings.engine_config(**overrides)
            logger.info("loading %s (%s)", self.model_name, config.model)
            engine = self.engine_factory(config)
            tokenizer = engine.tokenizer
            # The engine may cap the model's context to what its KV cache can hold.
            self.max_model_len = int(getattr(engine, "max_model_len", None) or engine.model_config.max_model_len)
            self.vocab_size = _vocab_size(engine, tokenizer)
            self.tokenizer = tokenizer
            self.tool_parser, self.reasoning_parser = _output_parsers(self.settings, tokenizer)
            if self.freeze_heap_when_loaded:
                gc.collect()  # what load left as garbage, freed, not frozen
                gc.freeze()
                logger.info("%d objects of the loaded model moved out of the garbage collector's reach (gc.freeze)",
                            gc.get_freeze_count())
            self.engine = engine  # last: this is what flips /readyz
            self.load_seconds = time.perf_counter() - started
            logger.info("model %s ready in %.1f s", self.model_name, self.load_seconds)
        except BaseException as e:  # noqa: BLE001 - a failed load must show on /livez, not kill a thread silently
            self.error = f"{type(e).__name__}: {e}"
            logger.exception("loading %s failed", self.model_name)

    async def shutdown(self) -> None:
        self.timeline.stop()
        engine, self.engine = self.engine, None
        if engine is not None:
            await engine.shutdown()

    # ------------------------------------------------------------------ tokens

    def token_text(self, token_id: int) -> str:
        """One token's text, as OpenAI shows it in logprobs."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text


def _output_parsers(settings: Settings, tokenizer: Any) -> tuple[str | None, str | None]:
    """The tool-call and reasoning parsers: the settings', or what the chat template shows."""
    template = template_source(tokenizer)
    tools, reasoning = settings.tool_call_parser, settings.reasoning_parser
    tools = detect_tool_parser(template) if tools == "auto" else tools
    reasoning = detect_reasoning_parser(template) if reasoning == "auto" else reasoning
    return (None if tools == "none" else tools), (None if reasoning == "none" else reasoning)


def _vocab_size(engine: Any, tokenizer: Any) -> int:
    """The model's vocabulary (its embedding rows), which can exceed the tokenizer's."""
    model_config = getattr(engine, "model_config", None)
    for name in ("vocab_size",):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return len(tokenizer)
