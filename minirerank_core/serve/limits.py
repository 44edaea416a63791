"""The service's limits, each a number with a named error, and how every error maps to an HTTP status.

Nothing here imports a web framework: the limits and errors are plain Python, checked by ``service.py`` and
turned into JSON responses by ``app.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import (
    ConfigError,
    DuplicatePageIdError,
    EmptyCandidatesError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidImportanceError,
    InvalidQueryError,
    MiniRerankError,
)
from ..validation import check_positive_int

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    max_documents: documents in one /v1/rerank request, and candidates (``k``) in one /v1/search request.
    max_image_bytes: encoded bytes of one image (base64 is decoded size, checked before decoding).
    max_image_pixels: width x height of one image, read from its header before any pixel is decoded.
    max_request_bytes: the whole request body, counted while it is received (base64 adds a third to images).
    request_timeout_s: from arrival to answer; a request still queued then is dropped, never run.
    max_pending: requests admitted on the model routes (running or queued); one more is refused at once.
    """

    max_documents: int = 128  # an image page costs ~100x a text passage: a small multiple of a typical top-k
    max_image_bytes: int = 20 * MiB  # a scanned page at 300 dpi is 1-5 MB as PNG or JPEG
    max_image_pixels: int = 40_000_000  # an A4 page at 600 dpi is ~35 M pixels
    max_request_bytes: int = 64 * MiB  # bounds the memory one request can pin while it is parsed
    request_timeout_s: float = 60.0
    max_pending: int = 32  # one model thread serves them in turn: deeper queues only add latency

    def __post_init__(self) -> None:
        for name in ("max_documents", "max_image_bytes", "max_image_pixels", "max_request_bytes", "max_pending"):
            check_positive_int(name, getattr(self, name))
        t = self.request_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ConfigError(f"request_timeout_s must be a positive number of seconds, got {t!r}")


# --- errors the service raises (each names the limit it enforces) --------------------------------------------
class ServeError(MiniRerankError):
    """An error the service answers with ``status`` and a JSON body ``{"type", "message", ...}``."""

    status: int = 400


class TooManyDocumentsError(ServeError, ValueError):
    """More documents (or a larger ``k``) than ``Limits.max_documents``."""

    status = 400


class InvalidDocumentError(ServeError, ValueError):
    """A document is not an image (data URL / base64), not a page id of the index, nor a file under ``--root``."""

    status = 400


class PathOutsideRootError(InvalidDocumentError):
    """A document names a local path while the server has no ``--root``, or a path outside it."""


class ImageBytesError(ServeError, ValueError):
    """An image larger than ``Limits.max_image_bytes``."""

    status = 413


class RequestTooLargeError(ServeError, ValueError):
    """A request body larger than ``Limits.max_request_bytes``."""

    status = 413


class NoIndexError(ServeError, ValueError):
    """/v1/search on a server started without an index (``--index DIR``)."""

    status = 400


class UnauthorizedError(ServeError, PermissionError):
    """A missing or wrong bearer key on a server started with ``--api-key``."""

    status = 401


class ServerBusyError(ServeError, RuntimeError):
    """``Limits.max_pending`` requests are already admitted, or the server is shutting down."""

    status = 503


class RequestTimeoutError(ServeError, TimeoutError):
    """The request was not answered within ``Limits.request_timeout_s``."""

    status = 504


# core errors caused by the request's content: the client's to fix, never a 500
_CLIENT_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (ImageTooLargeError, 413),  # before InvalidImageError, its base
    (InvalidQueryError, 400),
    (InvalidImageError, 400),
    (InvalidImportanceError, 400),
    (EmptyCandidatesError, 400),
    (DuplicatePageIdError, 400),
    (ConfigError, 400),
)


def status_for(exc: BaseException) -> int | None:
    """The HTTP status for an error a request caused, or None for a server fault (500)."""
    if isinstance(exc, ServeError):
        return exc.status
    for kind, status in _CLIENT_ERRORS:
        if isinstance(exc, kind):
            return status
    return None


__all__ = [
    "ImageBytesError", "InvalidDocumentError", "Limits", "NoIndexError", "PathOutsideRootError", "RequestTimeoutError",
    "RequestTooLargeError", "ServeError", "ServerBusyError", "TooManyDocumentsError", "UnauthorizedError", "status_for",
]
