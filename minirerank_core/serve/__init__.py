"""The HTTP service: ``minirerank serve``, or from Python

    from minirerank_core.serve import BackgroundServer, create_app, run_server
    app = create_app(RerankPipeline.open("ws"), api_key="secret", root="/data/pages")
    run_server(app, host="127.0.0.1", port=8080)           # until SIGINT / SIGTERM; requests in flight finish

Routes: ``POST /v1/rerank`` (Cohere / Jina compatible; also ``/v2/rerank`` for Cohere's ClientV2),
``POST /v1/search``, ``GET /health``, ``/ready``, ``/metrics``. Needs the ``[serve]`` extra (FastAPI + uvicorn);
``import minirerank_core`` never imports this package.

    app.py      routes, bearer key, JSON errors, body limit, metrics middleware
    service.py  request handling without the framework: documents -> pages, first-stage maps, rerank, search
    schemas.py  pydantic request / response bodies
    limits.py   the limits, their named errors and HTTP statuses
    metrics.py  Prometheus text format
    server.py   uvicorn in the foreground or a background thread, graceful shutdown
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("the minirerank server needs FastAPI and uvicorn: pip install 'minirerank[serve]'") from exc

from .app import create_app
from .limits import (
    ImageBytesError,
    InvalidDocumentError,
    Limits,
    NoIndexError,
    PathOutsideRootError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServeError,
    ServerBusyError,
    TooManyDocumentsError,
    UnauthorizedError,
)
from .server import BackgroundServer, run_server
from .service import RerankService, encode_image

__all__ = [
    "BackgroundServer", "ImageBytesError", "InvalidDocumentError", "Limits", "NoIndexError", "PathOutsideRootError",
    "RequestTimeoutError", "RequestTooLargeError", "RerankService", "ServeError", "ServerBusyError",
    "TooManyDocumentsError", "UnauthorizedError", "create_app", "encode_image", "run_server",
]
