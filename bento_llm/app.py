"""The FastAPI app that BentoML mounts at /v1: routes and OpenAI-shaped error handling.

Bodies are parsed here, not by FastAPI's body parameters, so that malformed JSON, wrong
types and unknown fields all go through one mapping to OpenAI's error shape, strictly."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bento_llm.errors import OpenAIError, bad_request, from_validation_error, server_error
from bento_llm.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from bento_llm.runtime import LLMRuntime
from bento_llm.serving import OpenAIServing
from bento_llm.tokenize import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest, detokenize, tokenize, tokenize_request_model

logger = logging.getLogger("bento_llm")

RuntimeGetter = Callable[[], LLMRuntime | None]


_BODY_SCHEMAS: dict[str, Any] = {}  # nested models of hand-parsed bodies, for components/schemas


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route really gives, for the OpenAPI document. 401 comes from the
    API-key middleware, 413 from the body limit, 429 from the concurrency limit."""
    meaning = {
        400: "Invalid request: the error's `param` names the field", 401: "Missing or wrong API key",
        404: "Unknown model or URL", 413: "Request body too large",
        429: "Too many concurrent requests; retry shortly", 503: "The model is loading, or the engine stopped",
    }  # fmt: skip
    return {status: {"model": ErrorResponse, "description": meaning[status]} for status in statuses}


_READ_ERRORS = _errors(401, 404, 429, 503)
_GENERATE_ERRORS = _errors(400, 401, 404, 413, 429, 503)


def _schema_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body parsed by hand, so /docs still shows it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _BODY_SCHEMAS.update(schema.pop("$defs", {}))
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _parse(request: Request, model: type[BaseModel] | Callable[[Any], type[BaseModel]]) -> Any:
    """The body as `model`, or as the model `model(body)` picks when it is a function."""
    body = await request.body()
    try:
        if isinstance(model, type):
            return model.model_validate_json(body or b"null")
        raw = json.loads(body or b"null")
        return model(raw).model_validate(raw)
    except json.JSONDecodeError as e:
        raise bad_request(f"We could not parse the JSON body of your request: {e}. The body must be a JSON object.", code="invalid_json") from None
    except ValidationError as e:
        raise from_validation_error(e) from None


def _error_response(request: Request, exc: Exception) -> Response:
    """Answered here rather than by an exception handler: Starlette re-raises unhandled
    exceptions after answering, which would log every 400 as a server crash."""
    if isinstance(exc, OpenAIError):
        return exc.response()
    # One request failed; log it with its trace and answer it alone with a 500.
    logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return server_error().response()


def _handle_errors(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        return _error_response(request, exc)


def _serving(get_runtime: RuntimeGetter) -> OpenAIServing:
    runtime = get_runtime()
    if runtime is None:
        raise OpenAIError("The server is starting; retry when /readyz answers 200.", 503, "server_error", code="model_not_ready")
    return OpenAIServing(runtime)


def create_app(get_runtime: RuntimeGetter) -> FastAPI:
    """`get_runtime` returns the process's LLMRuntime; BentoML creates it after import,
    so the app looks it up per request."""
    app = FastAPI(
        title="bento-llm OpenAI-compatible API",
        description="OpenAI's /v1 completions, chat completions and models, served by bento-llm's paged-KV engine.",
        docs_url="/docs",
        openapi_url="/openapi.json",
    )

    def serving() -> OpenAIServing:
        return _serving(get_runtime)

    @app.get("/models", response_model=ModelList, responses=_READ_ERRORS)
    async def list_models() -> Any:
        return serving().models()

    @app.get("/models/{model_id:path}", responses={200: {"model": ModelCard}, **_READ_ERRORS})
    async def get_model(model_id: str) -> Any:
        s = serving()
        s.check_model(model_id)
        return s.models().data[0]

    @app.post("/completions", openapi_extra=_schema_body(CompletionRequest), responses={200: {"model": CompletionResponse}, **_GENERATE_ERRORS})
    async def completions(request: Request) -> Response:
        try:
            s = serving()
            return await s.completions(await _parse(request, CompletionRequest), request)
        except Exception as e:  # noqa: BLE001
            return _error_response(request, e)

    @app.post("/chat/completions", openapi_extra=_schema_body(ChatCompletionRequest), responses={200: {"model": ChatCompletionResponse}, **_GENERATE_ERRORS})
    async def chat_completions(request: Request) -> Response:
        try:
            s = serving()
            return await s.chat(await _parse(request, ChatCompletionRequest), request)
        except Exception as e:  # noqa: BLE001
            return _error_response(request, e)

    # BentoML mounts this app "passively": a path no route matches falls through to
    # BentoML's plain 404. Catch the rest of /v1 here so it answers in OpenAI's shape.
    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(request: Request, path: str) -> Response:
        return OpenAIError(f"Unknown request URL: {request.method} {request.url.path}", 404, code="unknown_url").response()

    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = generate_openapi()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(_BODY_SCHEMAS)
        # FastAPI documents a 422 for every route with a parameter; this app never sends one
        # (a bad path or body is a 400 or 404 in OpenAI's shape).
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]

    _handle_errors(app)
    return app


def create_root_app(get_runtime: RuntimeGetter) -> FastAPI:
    """vLLM's routes outside /v1: POST /tokenize and POST /detokenize. Mounted at the server's
    root, where BentoML's own routes come first; it has no docs pages of its own so that it
    never shadows BentoML's."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        try:
            s = _serving(get_runtime)
            body: TokenizeChatRequest | TokenizeCompletionRequest = await _parse(request, tokenize_request_model)
            s.check_model(body.model)
            return JSONResponse(await tokenize(s.runtime, body))
        except Exception as e:  # noqa: BLE001
            return _error_response(request, e)

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        try:
            s = _serving(get_runtime)
            body: DetokenizeRequest = await _parse(request, DetokenizeRequest)
            s.check_model(body.model)
            return JSONResponse(await detokenize(s.runtime, body))
        except Exception as e:  # noqa: BLE001
            return _error_response(request, e)

    _handle_errors(app)
    return app
