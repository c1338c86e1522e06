"""The engine's two kinds of failure: one pinned to some requests (they fail, the engine goes
on) and one that leaves the engine unable to run anything (every request fails, it reports
itself dead and must be rebuilt)."""

from __future__ import annotations

from engine.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine cannot run any request again (its loop died, a tensor-parallel rank is gone,
    or its forward pass keeps failing); build a new one."""


class EngineStepError(RuntimeError):
    """A step failed for some requests: those were aborted and their blocks freed.

    `outputs` are the step's outputs of every other request, which went on; `errors` maps each
    failed request to its own exception (the forward pass failing fails all of its requests
    with one cause)."""

    def __init__(
        self,
        request_ids: list[str],
        cause: BaseException,
        outputs: list[RequestOutput] | None = None,
        errors: dict[str, BaseException] | None = None,
    ):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {cause!r}")
        self.request_ids = request_ids
        self.outputs = outputs or []
        self.errors = errors or {rid: cause for rid in request_ids}
