"""Constrained decoding with xgrammar: grammars compiled against the tokenizer off the step loop
and cached by their spec, one matcher per sequence, and the token bitmask the sampler applies.

Why xgrammar over llguidance (measured on this project's default model, SmolLM2's 49152-token
vocabulary, one CPU thread; numbers in the commit that chose it): filling the next-token
bitmask of 16 sequences took 0.07 ms per step with xgrammar against 1.1 ms with llguidance
(xgrammar precomputes per-state token masks when it compiles), and applying the bitmask to
[16, 49152] logits 4.3 ms against 1.2 s with llguidance's torch helper on CPU. llguidance
compiles faster (about 1 ms per schema against 1-16 ms), but compilation runs once per schema,
off the step loop, and is cached; the mask runs on every step of every constrained sequence.

JSON grammars never allow free whitespace: items are separated by ", " and keys by ": " (what
json.dumps writes, and so what models have seen most), nothing else, so a small model sampling
at temperature 1 cannot spend its tokens on newlines.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import re
import threading
from typing import TYPE_CHECKING

import torch

from engine.structured_outputs import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar
# xgrammar itself is imported where first used: about 0.7 s that a server or a test run with no
# constrained request never pays.

logger = logging.getLogger(__name__)

JSON_SEPARATORS = (", ", ": ")
# How long an otherwise idle engine step waits for a grammar to finish compiling before it
# returns (the online loop then drains its commands and steps again).
GRAMMAR_WAIT_S = 0.01
# Compiled grammars kept (least recently used dropped first); a JSON schema's grammar is a few
# hundred KiB at most.
MAX_CACHED_GRAMMARS = 256
_LIBRARY_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[10:09:13] /project/cpp/x.cc:94: "


class GrammarCompiler:
    """Compiles StructuredOutputsParams on a worker thread; each spec once (cached futures)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None  # built on first use (~0.3 s)
        self._cache: collections.OrderedDict[tuple[str, str], concurrent.futures.Future] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bento-llm-grammar")

    def submit(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the compiled grammar; it raises ValueError if the spec cannot compile."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is None:
                future = self._pool.submit(self._compile, spec)
                self._cache[key] = future
                while len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return future

    def compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        return self.submit(spec).result()

    def _library_compiler(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            # Our own cache keeps futures, so concurrent requests for one spec share one compile.
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _compile(self, spec: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        compiler = self._library_compiler()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(json.dumps(spec.json), any_whitespace=False, separators=JSON_SEPARATORS)
            if spec.kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, separators=JSON_SEPARATORS, strict_mode=False
                )
            if spec.kind == "regex":
                return compiler.compile_regex(spec.regex)
            if spec.kind == "choice":
                return compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(c) for c in spec.choice))
            return compiler.compile_grammar(spec.grammar)
        except (RuntimeError, ValueError) as e:
            reason = _LIBRARY_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise ValueError(f"SamplingParams.structured_outputs {spec.kind} cannot be compiled: {reason}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ebnf_literal(text: str) -> str:
    # EBNF string literals take JSON's escapes; non-ASCII characters are written as themselves.
    return json.dumps(text, ensure_ascii=False)


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("matcher", "__weakref__")

    def __init__(self, matcher: xgrammar.GrammarMatcher):
        self.matcher = matcher

    @classmethod
    def start(cls, grammar: xgrammar.CompiledGrammar) -> "GrammarState":
        import xgrammar

        return cls(xgrammar.GrammarMatcher(grammar))

    def fork(self) -> "GrammarState":
        return GrammarState(self.matcher.fork())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} does not continue the request's grammar (the mask allowed it)")

    @property
    def is_terminated(self) -> bool:
        """The grammar's stop token (end of sequence) was accepted: nothing may follow."""
        return self.matcher.is_terminated()


def apply_grammar_masks(logits: torch.Tensor, grammars: list[GrammarState | None], vocab_size: int, fill) -> list[int]:
    """Set to -inf every token a row's grammar forbids, for the rows that have one; `fill(row,
    work, *args)` runs each row's mask fill (the sampler pins a failure to its row). Returns
    the constrained rows."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return rows
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(grammars), vocab_size)  # all allowed
    for i in rows:
        fill(i, grammars[i].fill, bitmask, i)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab_size, indices=rows)
    return rows


class CompilingRequests(dict):
    """Request id -> a request (SequenceGroup) added before its grammar compiled."""

    def take_done(self, idle: bool) -> tuple[list, list[tuple[object, BaseException]]]:
        """The requests whose grammar is ready, each sequence started at the grammar's start,
        and (request, error) for those whose grammar failed; both leave. idle: nothing else
        would run this step, so wait a moment for a compile to finish."""
        if idle and self:
            futures = [group.grammar_future for group in self.values()]
            concurrent.futures.wait(futures, timeout=GRAMMAR_WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED)
        ready, failed = [], []
        for request_id, group in list(self.items()):
            if not group.grammar_future.done():
                continue
            del self[request_id]
            try:
                grammar = group.grammar_future.result()
            except Exception as e:  # noqa: BLE001 - this request's own grammar
                failed.append((group, e))
                continue
            for seq in group.seqs:
                seq.grammar = GrammarState.start(grammar)
            ready.append(group)
        return ready, failed
