"""The FastAPI app: routes, bearer-key check, JSON errors, body-size limit and metrics.

    POST /v1/rerank  (also /v2/rerank for Cohere's ClientV2, /rerank)   Cohere / Jina compatible reranking
    POST /v1/search                                                      first stage + rerank over the index
    GET  /health  /ready  /metrics
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError
from ..rerankers.base import Reranker
from .limits import Limits, RequestTooLargeError, ServeError, UnauthorizedError, status_for
from .metrics import CONTENT_TYPE
from .schemas import ErrorResponse, RerankRequest, RerankResponse, SearchRequest, SearchResponse
from .service import RerankService

logger = logging.getLogger("minirerank.serve")

RERANK_ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")
ROUTES = frozenset((*RERANK_ROUTES, "/v1/search", "/health", "/ready", "/metrics"))
_ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           422: {"model": ErrorResponse}, 503: {"model": ErrorResponse}, 504: {"model": ErrorResponse}}


def error_body(kind: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"type": kind, "message": message, "detail": message if detail is None else detail}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON answer to an error: its status when the request caused it, else a 500 without internals."""
    status = status_for(exc)
    if status is None:
        logger.exception("minirerank: internal error", exc_info=exc)
        return JSONResponse(error_body("InternalError", "internal server error"), status_code=500)
    headers = {"Retry-After": "1"} if status == 503 else {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status, headers=headers)


# --- ASGI middleware (pure, so they see every response, errors included) --------------------------------------
class BodyLimit:
    """Reads the request body up to ``max_bytes`` (413 past it, before the app parses anything), then replays it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, f"{int(declared):,} bytes")
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._refuse(scope, receive, send, f"over {self.max_bytes:,} bytes")
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any, size: str) -> None:
        exc = RequestTooLargeError(f"request body is {size}, over the limit of {self.max_bytes:,} bytes "
                                   "(max_request_bytes)")
        await error_response(exc)(scope, receive, send)


class RecordMetrics:
    """Counts every response by route, method and status, and observes its latency."""

    def __init__(self, app: Any, service: RerankService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 500

        async def record_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
            self.service.metrics.observe(route, scope["method"], status, time.perf_counter() - t0)


# --- the app ----------------------------------------------------------------------------------------------------
def create_app(
    target: Any,
    *,
    embedder: Any = None,
    api_key: str | None = None,
    root: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The service over ``target``: a RerankPipeline (rerank with its embedder's maps, and /v1/search over its
    index) or a Reranker (rerank only; with ``embedder``, a PageEmbedder, requests' pages get pruning maps).
    ``api_key``: required as ``Authorization: Bearer KEY`` on the /v1 and /v2 routes (health, readiness and
    metrics stay open for probes and scrapers). ``root``: the directory whose files documents may name."""
    from ..pipeline import RerankPipeline

    if isinstance(target, RerankPipeline):
        if embedder is not None:
            raise ConfigError("a pipeline brings its own embedder; pass embedder= only with a Reranker")
        service = RerankService(target.reranker, embedder=target.embedder, pipeline=target, root=root, limits=limits)
    elif isinstance(target, Reranker):
        service = RerankService(target, embedder=embedder, root=root, limits=limits)
    else:
        raise ConfigError(f"create_app takes a RerankPipeline or a Reranker, got {type(target).__name__}")
    if api_key is not None and not api_key:
        raise ConfigError("api_key is empty")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.ready = True
        yield
        service.ready = False

    app = FastAPI(title="minirerank", summary="Multimodal page reranking (Cohere / Jina compatible)", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_request_bytes)
    app.add_middleware(RecordMetrics, service=service)  # added last: outermost, so it sees the 413s too

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = json.loads(json.dumps(exc.errors(), default=str))  # ctx may hold exceptions
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body("RequestValidationError", message, errors), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body("HTTPError", str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    async def answer(call: Any) -> Any:
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - mapped: the request's fault -> 4xx, else 500 (logged)
            return error_response(exc)

    async def rerank(body: RerankRequest) -> Any:
        return await answer(service.rerank(body))

    for path in RERANK_ROUTES:
        app.add_api_route(path, rerank, methods=["POST"], response_model=RerankResponse, response_model_exclude_none=True,
                          dependencies=[Depends(check_key)], responses=_ERRORS, include_in_schema=path == "/v1/rerank",
                          summary="Rerank page images for a query (Cohere / Jina rerank API)")

    @app.post("/v1/search", response_model=SearchResponse, dependencies=[Depends(check_key)], responses=_ERRORS,
              summary="First stage + rerank over the server's index (as `minirerank search --json`)")
    async def search(body: SearchRequest) -> Any:
        return await answer(service.search(body))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if service.ready and not service.draining:
            return {"status": "ready", **service.info()}
        return JSONResponse({"status": "draining" if service.draining else "starting"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(service.gauges()), media_type=CONTENT_TYPE)

    return app


__all__ = ["create_app", "error_response"]
