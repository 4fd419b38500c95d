"""The HTTP app: OpenAI's routes over an `AsyncLLM`, with auth, limits and OpenAI-format errors.

    /v1/completions, /v1/chat/completions   jinfer.server.serving
    /v1/models, /version, /health           plain JSON (/health needs no key)
    /metrics                                Prometheus text (jinfer.engine.metrics)

Every error leaves as OpenAI's `{"error": {message, type, param, code}}`: validation failures
and malformed JSON as 400, a missing or wrong key as 401, an unknown model as 404, a body over
the limit as 413, an engine over its pending-request limit as 503, an engine failure as 500.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

import jinfer
from jinfer.api.async_llm import AsyncLLM
from jinfer.server import protocol as p
from jinfer.server.serving import APIError, OpenAIServing, ServerLimits

logger = logging.getLogger(__name__)

__all__ = ["build_app", "ServerLimits"]


def _error(message: str, status: int, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, status, param), status_code=status)


class _Guard:
    """ASGI middleware: the API key (all but /health) and the request body's size limit."""

    def __init__(self, app, api_key: Optional[str], max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/health":
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}"):
                return await _error("missing or wrong API key: send the header "
                                    "'Authorization: Bearer <key>'", 401)(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large()(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._too_large()(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return _error(f"the request body is larger than this server's limit of "
                      f"{self.max_bytes} bytes (--max-request-bytes)", 413)


class _BodyTooLarge(Exception):
    pass


def build_app(engine: AsyncLLM, model_name: str, *, api_key: Optional[str] = None,
              limits: ServerLimits = ServerLimits(), shutdown_timeout: float = 3.0) -> FastAPI:
    """The app serving `engine` as `model_name`. Its shutdown stops the engine (running
    requests get `shutdown_timeout` seconds)."""
    serving = OpenAIServing(engine, model_name, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await engine.shutdown(shutdown_timeout)

    app = FastAPI(title="jinfer", version=jinfer.__version__, lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_bytes=limits.max_request_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return _error(message, 400, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        logger.exception("internal error on %s", request.url.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.get("/v1/models")
    async def models():
        card = p.ModelCard(id=model_name, max_model_len=engine.max_model_len)
        return p.ModelList(data=[card]).model_dump()

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running() else 503)

    @app.get("/version")
    async def version():
        return {"version": jinfer.__version__}

    @app.get("/metrics")
    async def metrics():
        await engine.get_stats()  # refreshes the gauges on the engine thread
        return PlainTextResponse(engine.metrics.render(),
                                 media_type="text/plain; version=0.0.4")

    return app


def _validation_message(errors: list[dict]) -> tuple[str, Optional[str]]:
    """A 400's message and bad field from FastAPI's errors (which locate fields under "body")."""
    if errors and errors[0].get("type") == "json_invalid":
        return f"the request body is not valid JSON: {errors[0]['ctx']['error']}", None
    return p.validation_error_message(
        [{**e, "loc": tuple(e["loc"])[1:] if tuple(e["loc"])[:1] == ("body",) else e["loc"]}
         for e in errors])
