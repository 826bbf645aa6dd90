"""The OpenAI-compatible HTTP server: app factory, guards (API key, body size), errors, small routes.

Every error leaves as an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``:
400 for bad input, 401 without the key, 404 for an unknown model or route, 413 for an over-large
body, 415 for a body that is not JSON, 503 (with Retry-After) when the queue is full or the server
is stopping, 504 past the request timeout, and 500 only when the engine itself has failed
(``/health`` says so too).
"""

from __future__ import annotations

import hmac
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_llm import AsyncLLM, RequestTimeoutError, ServerShutdownError
from tokenmill.engine.core_proc import EngineDeadError
from tokenmill.errors import RequestError, TokenizerError
from tokenmill.logger import get_logger
from tokenmill.server.api_error import APIError
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.settings import ServerSettings

logger = get_logger(__name__)


class _ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message can never fail to encode (a lone surrogate from
    the request would make a UTF-8 body raise, and the connection be dropped)."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return _ASCIIJSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                              status_code=status, headers=headers)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 422: "invalid_request_error"}


class GuardMiddleware:
    """Pure ASGI: the API key on /v1 routes, a JSON content type on their bodies, and the body-size
    limit (also for chunked bodies), all checked before the body is read."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                            "authentication_error", code="invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if scope["method"] == "POST" and scope["path"].startswith("/v1") and content_type and not _is_json(content_type):
            return await error_response(415, f"Content-Type must be application/json, got {content_type[:100]!r}: "
                                        "send the body as JSON", "invalid_request_error",
                                        code="unsupported_media_type")(scope, receive, send)
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(limit)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise APIError(413, f"request body is larger than {limit} bytes", "invalid_request_error")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except APIError as e:  # raised while reading a chunked body, before any response started
            await error_response(e.status, e.message, e.type)(scope, receive, send)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body is larger than {limit} bytes", "invalid_request_error")


def _param_of(message: str) -> str | None:
    """The field a SamplingParams message names first ("top_k must be ...")."""
    first = message.split(" ", 1)[0].split("[", 1)[0]
    return first if first.isidentifier() and first.islower() else None


def create_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(settings.model_name)
    engine.on_stats = metrics.on_stats
    engine.on_finished = metrics.on_finished
    engine.on_dead = metrics.on_engine_dead
    if hasattr(engine.client, "replicas"):  # a data-parallel router: per-replica series
        metrics.watch_replicas(engine.client)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="tokenmill", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.created = int(time.time())
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # Our own checks (value errors) say the most; a union field also lists each member's mismatch.
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else
                     {"loc": (), "msg": "invalid request", "type": ""})

        def field(error) -> str:  # the top-level field, not union members
            loc = [x for x in error.get("loc", ()) if x != "body"]
            return str(loc[0]) if loc and isinstance(loc[0], str) else ""

        where, msg = field(first), str(first.get("msg")).removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            where, msg = "", f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})"
        message = f"{where}: {msg}" if where else msg
        others = {field(e) for e in errors} - {where}
        if others:
            message += f" (and problems with {', '.join(sorted(o or 'the body' for o in others))})"
        return error_response(400, message, "invalid_request_error", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return error_response(exc.status_code, message, _STATUS_TYPES.get(exc.status_code, "api_error"),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        return error_response(400, str(exc), "invalid_request_error", param=_param_of(str(exc)))

    @app.exception_handler(TokenizerError)
    async def on_tokenizer_error(request: Request, exc: TokenizerError):
        return error_response(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestTimeoutError)
    async def on_timeout(request: Request, exc: RequestTimeoutError):
        return error_response(504, str(exc), "timeout_error", code="request_timeout")

    @app.exception_handler(EngineDeadError)
    async def on_dead(request: Request, exc: EngineDeadError):
        return error_response(500, str(exc), "internal_server_error", code="engine_dead")

    @app.exception_handler(ServerShutdownError)
    async def on_shutdown(request: Request, exc: ServerShutdownError):
        return error_response(503, str(exc), "server_shutting_down", code="server_shutting_down")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_server_error")

    @app.get("/health")
    async def health():
        if engine.dead_reason is not None:
            return error_response(500, f"the engine failed: {engine.dead_reason}", "internal_server_error",
                                  code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": app.state.created, "owned_by": "tokenmill",
            "max_model_len": engine.limits.max_model_len}]}

    from tokenmill.server.serving import register_routes

    register_routes(app, engine, settings)
    return app
