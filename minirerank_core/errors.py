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
    """A setting or argument is invalid (a reranker setting outside the loaded model's range, a bad top_n, ...)."""


class InvalidImportanceError(MiniRerankError, ValueError):
    """A pruning importance map is not finite, or its shape does not match the page's visual grid."""


class ModelNotFoundError(ConfigError, OSError):
    """A checkpoint path or hub id names nothing loadable: no such local directory, and the hub id cannot be
    fetched (offline and not cached, no such repository, no access), or a PEFT adapter's base cannot be found."""


class UnsupportedModelError(MiniRerankError, ValueError):
    """The model's architecture is not one of the supported families."""


class CacheCorruptError(MiniRerankError, RuntimeError):
    """A cache file is truncated, corrupt, or was written for another model or setting.

    Stores catch this internally and recompute; it escapes only from explicit low-level reads.
    """


class IndexStateError(MiniRerankError, RuntimeError):
    """A retrieval index on disk is missing, corrupt or of an unknown format version."""


class DiskFullError(MiniRerankError, OSError):
    """A write failed for lack of space; the previous state is intact and no temporary files are left."""


class LockTimeoutError(MiniRerankError, TimeoutError):
    """Another process holds the writer lock of an index or workspace for longer than the timeout."""


class PdfError(InvalidImageError):
    """A PDF cannot be rendered: encrypted, corrupt or without pages."""


class MiniRerankWarning(UserWarning):
    """Base class of minirerank's warnings."""


class UnprunedWarning(MiniRerankWarning):
    """A pruning reranker got candidates without first-stage importance maps and attends to every visual token."""


class MissingImageWarning(MiniRerankWarning):
    """A candidate without a readable page image was skipped (on_missing_image="skip")."""


class QueryTruncatedWarning(MiniRerankWarning):
    """A query over the token limit was cut to it (query_overflow="truncate")."""


class CacheDiskWarning(MiniRerankWarning):
    """The disk page cache could not be written (full, read-only, not a directory); pages stay in memory."""


class IndexMergeWarning(MiniRerankWarning):
    """Pages were added, but merging the index's segments afterwards failed (retried on the next change)."""


class UntrainedLayoutWarning(MiniRerankWarning):
    """A listwise checkpoint was asked for a layout (single pass / cached) it saved no settings for: it was not trained
    for that layout, which then runs on ListwiseConfig defaults and may rank no better than chance."""


class ToyModelWarning(MiniRerankWarning):
    """The shipped default models are serving pages: they read only their own toy layout (said once per process)."""
