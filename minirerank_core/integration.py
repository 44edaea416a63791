"""Framework-independent plumbing shared by the LlamaIndex and LangChain integrations (both depend on the core,
so this one copy serves both without either framework depending on the other).

What lives here: building a reranker from an instance or a model path (point-wise MiniReranker or listwise
ListwiseReranker), scoring candidates in batches, the async path, reading an image reference (path,
file:// URL, base64 / data URL, raw bytes) into a minirerank Page, the missing-image policy, and the first
stage over a RerankPipeline's index (candidates with their pruning maps) for the retrievers.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import os
import threading
import urllib.parse
import urllib.request
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from minirerank_core import ConfigError, InvalidImageError, InvalidQueryError, MiniReranker, Page, RerankConfig
from minirerank_core.pages.ingest import IMAGE_EXTENSIONS
from minirerank_core.engine.settings import saved_config

logger = logging.getLogger("minirerank.integrations")

Mode = Literal["pointwise", "listwise"]
MissingImagePolicy = Literal["raise", "skip"]
MODES = ("pointwise", "listwise")
POLICIES = ("raise", "skip")

#: Metadata key under which the minirerank retrievers leave the first stage's per-visual-token importance
#: map (a list of floats on the reranker's grid) for the postprocessor / compressor to prune with.
IMPORTANCE_KEY = "minirerank_importance"


class MissingImageWarning(UserWarning):
    """A candidate without a readable page image was skipped (on_missing_image="skip")."""


class UnprunedWarning(UserWarning):
    """A pruning reranker got candidates without first-stage importance maps and attends to every visual token."""


class NoImage(Exception):
    """Internal: the candidate carries no usable image; the message says why."""


# --- building the reranker --------------------------------------------------------------------------------
def _listwise_class():
    try:
        from minirerank_core.listwise import ListwiseReranker
    except ImportError as exc:
        raise ConfigError(
            "mode='listwise' needs minirerank_core.listwise.ListwiseReranker, which this installation of "
            "minirerank does not provide; use mode='pointwise' or upgrade minirerank"
        ) from exc
    return ListwiseReranker


def is_listwise(reranker: Any) -> bool:
    try:
        from minirerank_core.listwise import ListwiseReranker
    except ImportError:
        return False
    return isinstance(reranker, ListwiseReranker)


def build_reranker(
    reranker: Any = None,
    model: str | os.PathLike[str] | None = None,
    *,
    mode: Mode | None = None,
    device: str | None = None,
    config: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Mode]:
    """The reranker to use and its mode: ``reranker`` (an instance; its mode is inferred), else ``model`` (a
    local checkpoint path or hub id), else the default model shipped with minirerank. ``config`` is a
    RerankConfig (point-wise) or ListwiseConfig (listwise) and ``device`` overrides its device."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    if reranker is not None and model is not None:
        raise ConfigError("give either reranker= (an instance) or model= (a checkpoint path), not both")
    if reranker is not None:
        if not callable(getattr(reranker, "score", None)):
            raise ConfigError(
                f"reranker must be a MiniReranker or ListwiseReranker (an object with score()), got {type(reranker).__name__}"
            )
        actual: Mode = "listwise" if is_listwise(reranker) else "pointwise"
        if mode == "listwise" and actual != "listwise":
            _listwise_class()  # a clear error when listwise support is not installed at all
            raise ConfigError(f"mode='listwise' but the reranker given is a {type(reranker).__name__}, not a ListwiseReranker")
        if mode == "pointwise" and actual == "listwise":
            raise ConfigError("mode='pointwise' but the reranker given is a ListwiseReranker")
        current = getattr(getattr(reranker, "config", None), "device", None)
        if device is not None and current is not None and str(device) != str(current):
            raise ConfigError(
                f"device={device!r} but the reranker given runs on {current!r}; build it with "
                f"device={device!r} in its config, or leave device unset"
            )
        if config is not None or cache_dir is not None:
            raise ConfigError("config= and cache_dir= apply when loading from model=; configure the reranker instance instead")
        return reranker, actual
    mode = mode or "pointwise"
    if mode == "listwise":
        cls = _listwise_class()
        from minirerank_core.listwise import ListwiseConfig

        if config is not None and not isinstance(config, ListwiseConfig):
            raise ConfigError(f"mode='listwise' takes a ListwiseConfig, got {type(config).__name__}")
        if device is not None:
            config = (config or ListwiseConfig()).replace(device=str(device))
        return cls.from_pretrained(model, config, cache_dir=cache_dir), "listwise"
    if config is not None and not isinstance(config, RerankConfig):
        raise ConfigError(f"mode='pointwise' takes a RerankConfig, got {type(config).__name__}")
    if device is not None:
        # keep the settings a checkpoint was trained with (minirerank_config.json); only the device changes
        config = (config or saved_config(model) or RerankConfig()).replace(device=str(device))
    return MiniReranker.from_pretrained(model, config, cache_dir=cache_dir), "pointwise"


def model_name(reranker: Any) -> str:
    """A short name of the underlying checkpoint for events and traces."""
    model = getattr(reranker, "model", None)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return f"minirerank:{name}" if name else f"minirerank:{type(reranker).__name__}"


def check_top_n(top_n: Any) -> int | None:
    if top_n is None:
        return None
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ConfigError(f"top_n must be a positive int or None (keep all), got {top_n!r}")
    return top_n


def check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int or None, got {batch_size!r}")
    return batch_size


def check_policy(policy: Any) -> MissingImagePolicy:
    if policy not in POLICIES:
        raise ConfigError(f"on_missing_image must be one of {POLICIES}, got {policy!r}")
    return policy


# --- images -----------------------------------------------------------------------------------------------
def local_path_from_url(url: str) -> str:
    """The local path of a file:// URL; NoImage for any other scheme (nothing is downloaded)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise NoImage(
            f"image_url {url[:80]!r} is not a local file:// URL; minirerank never downloads images — "
            "fetch the image first and set image_path (or image as base64)"
        )
    if parsed.netloc not in ("", "localhost"):
        raise NoImage(f"image_url {url[:80]!r} names a remote host; only local file:// URLs are read")
    return urllib.request.url2pathname(parsed.path)


def page_from_path(path: str | os.PathLike[str], *, page_id: str, where: str) -> Page:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NoImage(f"{where} {path!r} does not exist" if not os.path.exists(path) else f"{where} {path!r} is not a file")
    return Page.from_path(path, id=page_id)


def page_from_base64(data: str | bytes, *, page_id: str, where: str) -> Page:
    if isinstance(data, (bytes, bytearray)):
        data = bytes(data).decode("ascii", errors="replace")
    if not data.strip():
        raise NoImage(f"{where} is empty")
    try:
        return Page.from_base64(data, id=page_id)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{page_id}: {where} is not valid base64 image data ({exc})") from exc


def is_image_file_name(path: str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def collect_pages(
    items: Sequence[Any],
    to_page: Callable[[Any, str], Page],
    item_id: Callable[[Any, int], str],
    policy: MissingImagePolicy,
    kind: str,
) -> tuple[list[Page], list[int]]:
    """Pages for the items that have an image and the items' positions. A NoImage raises InvalidImageError
    (policy "raise") or is skipped with one MissingImageWarning per call (policy "skip")."""
    pages: list[Page] = []
    kept: list[int] = []
    skipped: list[str] = []
    for i, item in enumerate(items):
        ident = item_id(item, i)
        try:
            # internal ids are positional: candidates may share an id or have none; results map back by position
            pages.append(to_page(item, f"{i}:{ident}"))
            kept.append(i)
        except NoImage as exc:
            if policy == "raise":
                raise InvalidImageError(
                    f"{kind} {ident!r} has no readable page image: {exc}. Pass on_missing_image='skip' to drop "
                    f"such {kind}s with a warning instead"
                ) from None
            skipped.append(f"{ident!r} ({exc})")
    if skipped:
        msg = f"minirerank skipped {len(skipped)} {kind}(s) without a readable page image: " + "; ".join(skipped[:5])
        if len(skipped) > 5:
            msg += f"; and {len(skipped) - 5} more"
        warnings.warn(msg, MissingImageWarning, stacklevel=4)
        logger.warning(msg)
    return pages, kept


def check_importance(reranker: Any, importance: list[Any], ids: list[str], kind: str) -> None:
    """A reranker that prunes at query time (keep_ratio < 1) needs the first-stage map of every candidate, or of
    none: a point-wise reranker then attends to every visual token (Scorer passes keep_ratio=1.0; scores of a
    pruned and an unpruned page are not comparable, so a mix is refused)."""
    keep = float(getattr(getattr(reranker, "config", None), "keep_ratio", 1.0))
    missing = [i for i, imp in zip(ids, importance) if imp is None]
    if keep >= 1.0 or not missing:
        return
    if len(missing) == len(ids) and not is_listwise(reranker):
        msg = (f"minirerank: the reranker prunes visual tokens (keep_ratio={keep:g}) with the first stage's importance "
               f"maps, but no {kind} carries one in metadata[{IMPORTANCE_KEY!r}]: every visual token is used "
               f"(retrieve with MiniRerankRetriever to prune)")
        warnings.warn(msg, UnprunedWarning, stacklevel=4)
        logger.info(msg)
        return
    raise ConfigError(
        f"the reranker prunes visual tokens (keep_ratio={keep:g}) with the first stage's importance maps, but "
        f"{len(missing)} of {len(ids)} {kind}(s) carry none in metadata[{IMPORTANCE_KEY!r}] (e.g. {missing[0]!r}); "
        f"retrieve them with MiniRerankRetriever, or rerank them with a reranker built with keep_ratio=1.0"
    )


def importance_array(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    return arr if arr.size else None


# --- scoring ----------------------------------------------------------------------------------------------
_EXECUTORS: "weakref.WeakKeyDictionary[Any, ThreadPoolExecutor]" = weakref.WeakKeyDictionary()
_EXECUTORS_LOCK = threading.Lock()


def _model_executor(reranker: Any) -> ThreadPoolExecutor:
    """One worker thread per reranker instance: concurrent async queries on one model queue up instead of
    running the model in parallel threads that would fight over the same CPU cores / GPU."""
    with _EXECUTORS_LOCK:
        ex = _EXECUTORS.get(reranker)
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minirerank-model")
            _EXECUTORS[reranker] = ex
            weakref.finalize(reranker, ex.shutdown, wait=False)
        return ex


class Scorer:
    """Ranks candidate pages for one query: a MiniReranker scores them in batches of ``batch_size`` (scores are
    point-wise, so batching never changes them); a ListwiseReranker ranks the whole list in one call (its
    sliding windows span the list, so splitting it would change the ranking) and its order is kept as is."""

    def __init__(self, reranker: Any, mode: Mode, batch_size: int | None = None) -> None:
        self.reranker = reranker
        self.mode = mode
        self.batch_size = batch_size

    def _chunks(self, n: int) -> list[slice]:
        if self.mode == "listwise" or self.batch_size is None:
            return [slice(0, n)]
        return [slice(s, min(n, s + self.batch_size)) for s in range(0, n, self.batch_size)]

    def _run(self, query: str, pages: list[Page], importance: list[Any] | None) -> list[tuple[int, float]]:
        """(position in ``pages``, score) pairs: best first for listwise, in input order for point-wise."""
        imp = importance if importance is not None and any(x is not None for x in importance) else None
        if self.mode == "listwise":
            return [(r.index, float(r.score)) for r in self.reranker.rerank(query, pages, importance=imp)]
        pruning = float(getattr(getattr(self.reranker, "config", None), "keep_ratio", 1.0)) < 1.0
        # no maps at all: attend to every visual token (see check_importance)
        extra = {"keep_ratio": 1.0} if imp is None and pruning else {}
        return list(enumerate(float(s) for s in self.reranker.score(query, pages, importance=imp, **extra)))

    def _merge(self, parts: list[tuple[slice, list[tuple[int, float]]]]) -> list[tuple[int, float]]:
        if self.mode == "listwise":
            return parts[0][1]
        out = [(sl.start + i, s) for sl, part in parts for i, s in part]
        return sorted(out, key=lambda x: -x[1])  # stable: ties keep input order

    def rank(self, query: str, pages: list[Page], importance: list[Any] | None = None) -> list[tuple[int, float]]:
        """(position in ``pages``, score), best first."""
        parts = []
        for sl in self._chunks(len(pages)):
            parts.append((sl, self._run(query, pages[sl], importance[sl] if importance is not None else None)))
        return self._merge(parts)

    async def arank(self, query: str, pages: list[Page], importance: list[Any] | None = None) -> list[tuple[int, float]]:
        """:meth:`rank` without blocking the event loop: page files are read and hashed concurrently in worker
        threads, then the model runs batch by batch on this reranker's single model thread. A cancelled task
        stops at the next batch boundary (the model itself is synchronous PyTorch)."""
        await asyncio.gather(*(asyncio.to_thread(_content_hash, p) for p in pages))
        loop = asyncio.get_running_loop()
        executor = _model_executor(self.reranker)
        parts = []
        for sl in self._chunks(len(pages)):
            imp = importance[sl] if importance is not None else None
            parts.append((sl, await loop.run_in_executor(executor, functools.partial(self._run, query, pages[sl], imp))))
        return self._merge(parts)


def _content_hash(page: Page) -> None:
    try:
        page.content_hash  # reads the file once; the reranker's cache lookup then reuses the hash
    except Exception:  # noqa: BLE001 - the scoring call reports read errors with their full context
        pass


def select(ranked: list[tuple[int, float]], top_n: int | None, score_threshold: float | None) -> list[tuple[int, float]]:
    """The ranked (position, score) pairs above ``score_threshold``, at most ``top_n``."""
    if score_threshold is not None:
        ranked = [x for x in ranked if x[1] >= score_threshold]
    return ranked[:top_n] if top_n is not None else ranked


# --- first stage over a RerankPipeline (the retrievers) ---------------------------------------------------
@dataclass
class Candidate:
    """One first-stage hit: the page, its MaxSim score and rank, its index metadata, and the query's
    importance map on the reranker's visual-token grid (for pruning in the second stage)."""

    page_id: str
    page: Page
    score: float
    rank: int
    metadata: dict[str, Any] = field(default_factory=dict)
    importance: list[float] | None = None


def check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{name} must be a positive int, got {k!r}")
    return k


def check_pipeline(pipeline: Any) -> Any:
    missing = [a for a in ("embedder", "index", "reranker") if not hasattr(pipeline, a)]
    if missing:
        raise ConfigError(
            f"pipeline must be a minirerank_core.pipeline.RerankPipeline, got {type(pipeline).__name__} (no {', '.join(missing)})"
        )
    return pipeline


def search_first_stage(pipeline: Any, query: str, k: int, with_importance: bool = True) -> tuple[list[Candidate], list[Any]]:
    """The top ``k`` pages of the pipeline's index for ``query`` (exact MaxSim over FAISS candidates), with
    importance maps; also the index-time maps the reranker must be given when it prunes at index time."""
    from minirerank_core.retrieval.importance import page_importance, query_importances

    if not isinstance(query, str) or not query.strip():
        raise InvalidQueryError(f"query must be a non-empty string, got {query!r}")
    check_k(k)
    if len(pipeline.index) == 0:
        return [], []
    q = pipeline.embedder.encode_query(query)
    hits = pipeline.index.search(q, k)
    # the pipeline's own page / grid caches: pages added in this process (even from bytes) are found there,
    # others are reloaded from the index metadata (image file, or the PDF page rendered again)
    pages = [pipeline.page(h) for h in hits]
    need_maps = with_importance or _index_keep_ratio(pipeline.reranker) < 1.0
    grids = [pipeline.grid(p) for p in pages] if need_maps else []
    embeddings = [pipeline.index.embedding(h.page_id) for h in hits] if need_maps else []
    maps = query_importances(q, embeddings, grids) if with_importance else [None] * len(hits)
    index_maps: list[Any] = []
    if _index_keep_ratio(pipeline.reranker) < 1.0:
        index_maps = [page_importance(e, g) for e, g in zip(embeddings, grids)]
    out = [
        Candidate(
            page_id=h.page_id, page=p, score=float(h.score), rank=int(h.rank), metadata=dict(h.metadata),
            importance=None if m is None else [float(x) for x in m.reshape(-1).tolist()],  # exact float32 values
        )
        for h, p, m in zip(hits, pages, maps)
    ]
    return out, index_maps


def prepare_reranker(pipeline: Any, candidates: list[Candidate], index_maps: list[Any]) -> None:
    """With index-time pruning the reranker must know each page's query-independent map before it scores
    the page (a fresh process's reranker does not); RerankPipeline.search does the same."""
    if index_maps:
        pipeline.reranker.index([c.page for c in candidates], importance=index_maps)


def first_stage(pipeline: Any, query: str, k: int, with_importance: bool = True) -> list[Candidate]:
    candidates, index_maps = search_first_stage(pipeline, query, k, with_importance)
    prepare_reranker(pipeline, candidates, index_maps)
    return candidates


async def afirst_stage(pipeline: Any, query: str, k: int, with_importance: bool = True) -> list[Candidate]:
    """:func:`first_stage` off the event loop: the query encoding and search run on the embedder's model
    thread, any page prefill on the reranker's."""
    loop = asyncio.get_running_loop()
    candidates, index_maps = await loop.run_in_executor(
        _model_executor(pipeline.embedder), functools.partial(search_first_stage, pipeline, query, k, with_importance)
    )
    if index_maps:
        await loop.run_in_executor(
            _model_executor(pipeline.reranker), functools.partial(prepare_reranker, pipeline, candidates, index_maps)
        )
    return candidates


def _index_keep_ratio(reranker: Any) -> float:
    return float(getattr(getattr(reranker, "config", None), "index_keep_ratio", 1.0))


class Base64Cache:
    """PNG base64 of pages that have no image file (PDF pages kept in memory), so a retrieved node or
    document can carry its image; bounded LRU so repeated queries do not re-encode the same pages."""

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
    return f"{name}, page {c.metadata['page']}" if c.metadata.get("page") else name
