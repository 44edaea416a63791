"""The retrieval half of the integrations: first-stage candidates as framework items, and back.

A retriever's node / document carries its page image (path, or base64 PNG for pages without a file) and the
first stage's maps on the reranker's grid in metadata, so the framework's reranker prunes without recomputing:
``metadata["minirerank_importance"]`` (the query's map) and, when the reranker prunes at index time,
``metadata["minirerank_index_importance"]`` (the page's map), each ``{"grid": [h, w], "values": [...]}``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..candidates import Candidate, ImportanceMap
from ..errors import ConfigError
from ..pages import Page
from ..validation import check_positive_int

#: Metadata keys of the first stage's maps (hidden from LLM and embedding metadata by the retrievers).
IMPORTANCE_KEY = "minirerank_importance"
INDEX_IMPORTANCE_KEY = "minirerank_index_importance"
#: Bulky or machine-specific metadata an LLM or an embedding model should not see.
HIDDEN_KEYS = (IMPORTANCE_KEY, INDEX_IMPORTANCE_KEY, "image_path", "render", "width", "height", "page_count",
               "retrieval_rank")


def maps_to_metadata(c: Candidate, include_importance: bool = True) -> dict[str, Any]:
    if not include_importance:
        return {}
    out = {}
    if c.importance is not None:
        out[IMPORTANCE_KEY] = c.importance.to_json()
    if c.index_importance is not None:
        out[INDEX_IMPORTANCE_KEY] = c.index_importance.to_json()
    return out


def maps_from_metadata(metadata: Mapping[str, Any] | None, *, item: str | None = None) -> tuple[Any, Any]:
    """(query map, index-time map) from metadata: ImportanceMaps, or a flat list as given (checked against the
    page's grid by the reranker), or None. ``item`` names the node / document in errors ("node 'n3'")."""
    metadata = metadata or {}

    def read(key: str) -> Any:
        value = metadata.get(key)
        if value is None:
            return None
        if isinstance(value, Mapping):
            where = f"metadata[{key!r}]" if item is None else f"{item}: metadata[{key!r}]"
            return ImportanceMap.from_json(value, page=where)
        return value

    return read(IMPORTANCE_KEY), read(INDEX_IMPORTANCE_KEY)


def check_pipeline(pipeline: Any) -> Any:
    from ..pipeline import RerankPipeline

    if not isinstance(pipeline, RerankPipeline):
        raise ConfigError(f"pipeline must be a minirerank_core.pipeline.RerankPipeline, got {type(pipeline).__name__}")
    return pipeline


class Base64Cache:
    """PNG base64 of pages that have no image file (PDF pages kept in memory), so a retrieved node or document can
    carry its image; a bounded LRU so repeated queries do not re-encode the same pages."""

    def __init__(self, max_entries: int = 256) -> None:
        self._data: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, page: Page) -> str:
        key = page.content_hash
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
        buf = io.BytesIO()
        page.image().save(buf, format="PNG", compress_level=3)
        value = base64.b64encode(buf.getvalue()).decode("ascii")
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._max:
                self._data.popitem(last=False)
        return value


def page_label(c: Candidate) -> str:
    """A short human-readable label for a retrieved page ("report.pdf, page 3")."""
    source = c.metadata.get("source") or c.page.source
    name = os.path.basename(str(source)) if source else c.page_id
    return f"{name}, page {c.metadata['page']}" if c.metadata.get("page") is not None else name


class RetrieverAdapter:
    """What both frameworks' retrievers share: the pipeline, the first stage (sync and off the event loop), and
    each candidate's metadata and image reference."""

    def __init__(self, pipeline: Any, include_importance: bool = True) -> None:
        self.pipeline = check_pipeline(pipeline)
        self.include_importance = bool(include_importance)
        self.images = Base64Cache()

    def candidates(self, query: str, k: Any) -> list[Candidate]:
        return self.pipeline.candidates(query, check_positive_int("k", k))

    async def acandidates(self, query: str, k: Any) -> list[Candidate]:
        """:meth:`candidates` on the embedder's model thread (query encoding, search, maps)."""
        from .reranking import model_executor

        k = check_positive_int("k", k)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(model_executor(self.pipeline.embedder),
                                          functools.partial(self.pipeline.candidates, query, k))

    def metadata(self, c: Candidate, *, with_score: bool = True) -> dict[str, Any]:
        """The page's index metadata, its id, first-stage rank (and score), and its maps."""
        score = {"retrieval_score": c.first_stage_score} if with_score else {}
        return {**c.metadata, "page_id": c.page_id, **score, "retrieval_rank": c.first_stage_rank,
                **maps_to_metadata(c, self.include_importance)}

    def image(self, c: Candidate) -> dict[str, str]:
        """``{"image_path": ...}`` for a page with a file, else ``{"image": base64 PNG}``."""
        return {"image_path": c.page.source} if c.page.source else {"image": self.images.get(c.page)}


__all__ = ["HIDDEN_KEYS", "IMPORTANCE_KEY", "INDEX_IMPORTANCE_KEY", "Base64Cache", "RetrieverAdapter", "check_pipeline",
           "maps_from_metadata", "maps_to_metadata", "page_label"]
