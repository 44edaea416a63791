"""Exception types. Every user-facing failure raises one of these, with a message that says what to fix.

Each also derives from the builtin a caller would naturally catch (ValueError, KeyError, RuntimeError).
"""

from __future__ import annotations


class MiniRerankError(Exception):
    """Base class of every minirerank error."""


class InvalidImageError(MiniRerankError, ValueError):
    """A page image cannot be read: missing, empty, truncated, corrupt or of an unsupported kind."""


class ImageTooLargeError(InvalidImageError):
    """A page image is larger than the configured pixel limit (decompression-bomb guard)."""


class InvalidQueryError(MiniRerankError, ValueError):
    """The query is empty, blank or not a string."""


class EmptyCandidatesError(MiniRerankError, ValueError):
    """rerank() was given no candidate pages."""


class DuplicatePageIdError(MiniRerankError, ValueError):
    """Two different pages share one id in a call or an index."""


class ConfigError(MiniRerankError, ValueError):
    """A reranker setting is invalid or outside the loaded model's range."""


class UnsupportedModelError(MiniRerankError, ValueError):
    """The model's architecture is not one of the supported families."""


class CacheCorruptError(MiniRerankError, RuntimeError):
    """A cache file is truncated, corrupt, or was written for another model or setting.

    Stores catch this internally and recompute; it escapes only from explicit low-level reads.
    """


class IndexStateError(MiniRerankError, RuntimeError):
    """A retrieval index on disk is missing, corrupt or of an unknown format version."""


class PdfError(InvalidImageError):
    """A PDF cannot be rendered: encrypted, corrupt or without pages."""
