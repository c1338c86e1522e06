"""The real service with faults that a request can trigger, for server tests that need a
failure no valid request can cause: `bentoml serve tests.fault_service:BentoLLM`. A request
asks for one with a marker among its stop strings:

- FAIL_BOOKKEEPING: its detokenization raises from its second token on (a failure in the
  step's per-request bookkeeping, after the forward pass);
- KILL_ENGINE: the scheduler raises when it sees the request (a failure pinned to no
  request: the engine must report itself dead);
- BREAK_FORWARD: from the step that first runs it on, every forward pass raises, whatever it
  runs (a model that cannot run any more: the engine must report itself dead, not fail
  request after request behind a ready probe).
"""

from __future__ import annotations

from engine.detokenizer import Detokenizer
from engine.executor import Executor
from engine.scheduler import Scheduler
from service import BentoLLM  # noqa: F401 - the service this module serves

FAIL_BOOKKEEPING = "FAIL-IN-BOOKKEEPING"
KILL_ENGINE = "KILL-THE-ENGINE"
BREAK_FORWARD = "BREAK-THE-FORWARD"

_detokenize = Detokenizer.step
_schedule = Scheduler.schedule
_execute = Executor.execute
_forward_broken: list[bool] = []


def _failing_detokenize(self, seq):
    if FAIL_BOOKKEEPING in seq.params.stop and seq.num_output_tokens >= 2:
        raise RuntimeError("injected bookkeeping failure")
    return _detokenize(self, seq)


def _failing_schedule(self):
    if any(KILL_ENGINE in group.params.stop for group in self.waiting):
        raise RuntimeError("injected engine failure")
    return _schedule(self)


def _breakable_execute(self, schedule):
    if any(BREAK_FORWARD in item.seq.params.stop for item in schedule.scheduled):
        _forward_broken.append(True)
    if _forward_broken:
        raise RuntimeError("injected permanent forward failure")
    return _execute(self, schedule)


Detokenizer.step = _failing_detokenize
Executor.execute = _breakable_execute
Scheduler.schedule = _failing_schedule
