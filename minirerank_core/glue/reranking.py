"""The reranking half of the integrations: which reranker, and ranking a framework's items with it.

``RerankAdapter`` is the small base the LlamaIndex postprocessor and the LangChain compressor share: the fields
(``model``, ``top_n``, ``score_threshold``, ``score``, ``mode``, ``batch_size``, ``device``, ``on_missing_image``,
and ``config`` / ``cache_dir`` so that a dump rebuilds the same reranker), building the reranker, and the steps
between the framework's items and the reranker (``_rank_items`` / ``_arank_items``: read each item's page and
maps, rank, put the scores on the chosen scale, keep the best ``top_n`` above the threshold). A framework
adapter maps its items to pages and builds its output from (item, score) pairs; nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..candidates import Candidate
from ..engine.config import RerankConfig
from ..errors import ConfigError
from ..pages import Page
from ..rerankers import ListwiseConfig, ListwiseReranker, MiniReranker, Reranker
from ..rerankers.loading import checkpoint_path
from ..engine.settings import read_settings
from ..validation import check_choice, check_optional_float, check_optional_positive_int, check_query, check_top_n
from .images import MissingImagePolicy, collect_pages
from .retrieval import maps_from_metadata

Mode = Literal["pointwise", "listwise"]
MODES = ("pointwise", "listwise")
POLICIES = ("raise", "skip")
#: The scale of the scores the framework rerankers return and threshold: "probability" = sigmoid(score) (as
#: ``RerankResult.probability``), "logit" = the reranker's raw score.
ScoreScale = Literal["probability", "logit"]
SCORE_SCALES = ("probability", "logit")


def build_reranker(
    reranker: Reranker | None = None,
    model: str | os.PathLike[str] | None = None,
    *,
    mode: Mode | None = None,
    device: str | None = None,
    config: RerankConfig | ListwiseConfig | Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Reranker:
    """``reranker`` (an instance), else one loaded from ``model`` (a local checkpoint path or hub id; None: the
    default model shipped with minirerank), point-wise or listwise by ``mode``. ``config`` is a RerankConfig or a
    ListwiseConfig (or its ``to_dict()``, as a dump stores it); ``device`` overrides its device (keeping the
    settings the checkpoint was saved with)."""
    if mode is not None:
        check_choice("mode", mode, MODES)
    if isinstance(config, Mapping):
        config = config_from_dict(config, mode or "pointwise")
    if reranker is not None:
        if model is not None:
            raise ConfigError("give either reranker= (an instance) or model= (a checkpoint path), not both")
        if not isinstance(reranker, Reranker):
            raise ConfigError(f"reranker must be a minirerank Reranker (MiniReranker or ListwiseReranker), got "
                              f"{type(reranker).__name__}")
        if mode is not None and mode != reranker.kind:
            raise ConfigError(f"mode={mode!r} but the reranker given is a {type(reranker).__name__} ({reranker.kind})")
        current = reranker.config.device
        if device is not None and str(device) != str(current):
            raise ConfigError(f"device={device!r} but the reranker given runs on {current!r}; build it with "
                              f"device={device!r} in its config, or leave device unset")
        if config is not None or cache_dir is not None:
            raise ConfigError("config= and cache_dir= apply when loading from model=; configure the reranker instance instead")
        return reranker
    if (mode or "pointwise") == "listwise":
        if config is not None and not isinstance(config, ListwiseConfig):
            raise ConfigError(f"mode='listwise' takes a ListwiseConfig, got {type(config).__name__}")
        if device is not None:
            config = (config or ListwiseConfig()).replace(device=str(device))
        return ListwiseReranker.from_pretrained(model, config, cache_dir=cache_dir)
    if config is not None and not isinstance(config, RerankConfig):
        raise ConfigError(f"mode='pointwise' takes a RerankConfig, got {type(config).__name__}")
    if device is not None:
        # keep the settings the checkpoint was trained with (minirerank_config.json); only the device changes
        config = (config or read_settings(checkpoint_path(model)).config or RerankConfig()).replace(device=str(device))
    return MiniReranker.from_pretrained(model, config, cache_dir=cache_dir)


def config_from_dict(data: Mapping[str, Any], mode: str) -> RerankConfig | ListwiseConfig:
    """The reranker settings a dump stores (``config.to_dict()``) back as a RerankConfig / ListwiseConfig."""
    if mode == "listwise":
        known = set(ListwiseConfig.__dataclass_fields__)
        if set(data) - known:
            raise ConfigError(f"unknown ListwiseConfig fields {sorted(set(data) - known)}")
        d = dict(data)
        if d.get("labels") is not None:
            d["labels"] = tuple(d["labels"])
        if d.get("band") is not None:
            d["band"] = tuple(d["band"])
        return ListwiseConfig(**d)
    return RerankConfig.from_dict(dict(data))


def checkpoint_dir(reranker: Reranker) -> str | None:
    """The local directory (absolute) of the checkpoint ``reranker`` was loaded from: its name when that is a
    directory, or, for a hub id, its snapshot in the local Hugging Face cache (nothing is downloaded). None for a
    reranker built in code from a model object: it has no checkpoint to reload."""
    name = reranker.name
    if Path(name).is_dir():
        return os.path.abspath(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("config.json", "adapter_config.json"):  # a full checkpoint or a PEFT adapter
            found = try_to_load_from_cache(name, filename)
            if isinstance(found, str):
                return os.path.dirname(found)
    except (ImportError, ValueError):  # not a valid hub id (e.g. a class name): no checkpoint
        pass
    return None


def require_checkpoint_dir(model: Any, owner: str) -> str | None:
    """``model`` from a dump, checked to be a checkpoint directory on this machine (None: the shipped default).
    A dump is reloaded by path only: a name that is not a directory is never looked up as a hub id."""
    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        return os.fspath(model)
    raise ConfigError(
        f"{owner}.from_dict: model={model!r} is not a checkpoint directory on this machine, and a dump is reloaded "
        "by path only. A reranker built in code from a model object has no checkpoint to reload: save it "
        "(reranker.save_pretrained(dir)) and build the reranker with model=dir, or pass the instance: "
        f"{owner}.from_dict(data, reranker=reranker)"
    )


def to_scale(score: float, scale: str) -> float:
    """``score`` on the chosen scale: sigmoid(score) for "probability" (exactly RerankResult.probability)."""
    if scale == "logit":
        return float(score)
    return 1.0 / (1.0 + math.exp(-score)) if score > -700 else 0.0


def check_score_threshold(score_threshold: Any, scale: str) -> float | None:
    """A threshold on the chosen scale; a probability threshold outside [0, 1] is a mistake (likely a logit)."""
    threshold = check_optional_float("score_threshold", score_threshold)
    if threshold is not None and scale == "probability" and not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"score_threshold={threshold!r} is not a probability: with score='probability' (the default) scores are "
            "sigmoid(logit) in [0, 1]; give a threshold in [0, 1], or score='logit' to threshold the raw score"
        )
    return threshold


# --- running the model off the event loop ------------------------------------------------------------------
_EXECUTORS: weakref.WeakKeyDictionary[Any, ThreadPoolExecutor] = weakref.WeakKeyDictionary()
_EXECUTORS_LOCK = threading.Lock()


def model_executor(owner: Any) -> ThreadPoolExecutor:
    """One worker thread per model (reranker or embedder): concurrent async calls on one model queue up instead of
    running it in parallel threads that would fight over the same CPU cores / GPU."""
    with _EXECUTORS_LOCK:
        ex = _EXECUTORS.get(owner)
        if ex is None:
            ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minirerank-model")
            _EXECUTORS[owner] = ex
            weakref.finalize(owner, ex.shutdown, wait=False)
        return ex


def _chunks(reranker: Reranker, n: int, batch_size: int | None) -> list[slice]:
    # listwise: one call for the whole list (its sliding windows span it; splitting would change the ranking)
    if reranker.kind == "listwise" or batch_size is None:
        return [slice(0, n)]
    return [slice(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def _run(reranker: Reranker, query: str, cands: list[Candidate], keep: float) -> list[tuple[int, float]]:
    """(position in ``cands``, score): best first for listwise, in input order for point-wise."""
    if reranker.kind == "listwise":
        return [(r.index, r.score) for r in reranker.rerank(query, cands, keep_ratio=keep)]
    return list(enumerate(reranker.score(query, cands, keep_ratio=keep)))


def _merge(reranker: Reranker, parts: list[tuple[slice, list[tuple[int, float]]]]) -> list[tuple[int, float]]:
    if reranker.kind == "listwise":
        return parts[0][1]
    out = [(sl.start + i, s) for sl, part in parts for i, s in part]
    return sorted(out, key=lambda x: -x[1])  # stable: ties keep input order


def rank(reranker: Reranker, query: str, cands: list[Candidate], batch_size: int | None = None) -> list[tuple[int, float]]:
    """(position in ``cands``, score), best first. Point-wise candidates are scored in batches of ``batch_size``
    (batching never changes point-wise scores). With no map at all, a pruning reranker attends to every visual
    token (UnprunedWarning); some maps missing is an error (pruned and unpruned scores are not comparable)."""
    query, cands, keep = reranker.prepare(query, cands, missing_maps="unpruned")
    return _merge(reranker, [(sl, _run(reranker, query, cands[sl], keep)) for sl in _chunks(reranker, len(cands), batch_size)])


async def arank(reranker: Reranker, query: str, cands: list[Candidate], batch_size: int | None = None) -> list[tuple[int, float]]:
    """:func:`rank` without blocking the event loop: page files are read and hashed in worker threads, then the
    model runs batch by batch on this reranker's model thread. A cancelled task stops at the next batch boundary."""
    await asyncio.gather(*(asyncio.to_thread(_read, c.page) for c in cands))
    loop = asyncio.get_running_loop()
    executor = model_executor(reranker)
    query, cands, keep = await loop.run_in_executor(
        executor, functools.partial(reranker.prepare, query, cands, missing_maps="unpruned"))
    parts = []
    for sl in _chunks(reranker, len(cands), batch_size):
        parts.append((sl, await loop.run_in_executor(executor, functools.partial(_run, reranker, query, cands[sl], keep))))
    return _merge(reranker, parts)


def _read(page: Page) -> None:
    try:
        page.content_hash  # reads the file once; the reranker's cache lookup then reuses the hash
    except Exception:  # noqa: BLE001 - the scoring call reports read errors with their full context
        pass


def select(ranked: list[tuple[int, float]], top_n: int | None, score_threshold: float | None) -> list[tuple[int, float]]:
    """The ranked (position, score) pairs above ``score_threshold``, at most ``top_n``."""
    if score_threshold is not None:
        ranked = [x for x in ranked if x[1] >= score_threshold]
    return ranked[:top_n] if top_n is not None else ranked


# --- the shared base of the framework rerankers ---------------------------------------------------------
class RerankAdapter(BaseModel):
    """Fields and steps shared by ``llama_index.postprocessor.minirerank.MiniRerank`` and
    ``langchain_minirerank.MiniRerank`` (a pydantic mixin placed before the framework's base class).

    ``model``, ``mode``, ``device``, ``config`` and ``cache_dir`` describe the reranker so that a dump
    (``model_dump`` / LlamaIndex ``to_dict``) rebuilds the same one: ``model`` is the checkpoint directory it was
    loaded from (see :func:`checkpoint_dir`), or only its name when it was built in code from a model object."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    model: str = Field(description="The reranker's checkpoint directory (absolute), or its name when it was built in "
                                   "code from a model object (then a dump cannot be reloaded).")
    top_n: Optional[int] = Field(default=5, description="Number of items to return (None = all).")
    score: str = Field(default="probability", description="Scale of the returned scores and of score_threshold: "
                       "'probability' (sigmoid of the reranker's score, in [0, 1]) or 'logit' (the raw score).")
    score_threshold: Optional[float] = Field(default=None, description="Drop items scoring below this (on the score scale).")
    mode: str = Field(default="pointwise", description="'pointwise' (MiniReranker) or 'listwise' (ListwiseReranker).")
    batch_size: Optional[int] = Field(
        default=None, description="Candidates per model call in point-wise mode (None = all at once; the model batches internally).")
    device: Optional[str] = Field(default=None, description="Device of the reranker ('cpu', 'cuda', 'cuda:1', ...).")
    on_missing_image: str = Field(default="raise", description="An item without a readable page image: 'raise' or 'skip' (with a warning).")
    config: Optional[dict] = Field(default=None, description="The reranker's settings (RerankConfig / ListwiseConfig as a dict).")
    cache_dir: Optional[str] = Field(default=None, description="The reranker's on-disk page cache (None = memory only).")

    _reranker: Reranker = PrivateAttr()

    @staticmethod
    def _fields(reranker: Reranker | None, model: str | os.PathLike[str] | None, *, top_n: Any, score: Any,
                score_threshold: Any, mode: str | None, batch_size: Any, device: str | None, config: Any,
                cache_dir: Any, on_missing_image: str) -> tuple[Reranker, dict[str, Any]]:
        """The reranker and the checked field values (for the framework class's ``__init__``)."""
        scale = check_choice("score", score, SCORE_SCALES)
        fields = dict(top_n=check_top_n(top_n), score=scale, score_threshold=check_score_threshold(score_threshold, scale),
                      batch_size=check_optional_positive_int("batch_size", batch_size),
                      on_missing_image=check_choice("on_missing_image", on_missing_image, POLICIES))
        instance = build_reranker(reranker, model, mode=mode, device=device, config=config, cache_dir=cache_dir)  # type: ignore[arg-type]
        disk = instance.pages.store.disk
        fields.update(model=checkpoint_dir(instance) or instance.name, mode=instance.kind, device=str(instance.config.device),
                      config=instance.config.to_dict(), cache_dir=None if disk is None else os.path.abspath(disk.root))
        return instance, fields

    @classmethod
    def _stored_fields(cls, data: Mapping[str, Any], owner: str) -> dict[str, Any]:
        """Constructor arguments from a dump: the checkpoint is reloaded by path only; a ``reranker`` instance given
        instead replaces the stored checkpoint and its settings."""
        data = dict(data)
        data.pop("class_name", None)
        if data.get("reranker") is not None:
            for key in ("model", "mode", "device", "config", "cache_dir"):
                data.pop(key, None)
        else:
            data["model"] = require_checkpoint_dir(data.get("model"), owner)
        return data

    @property
    def reranker(self) -> Reranker:
        """The underlying MiniReranker / ListwiseReranker."""
        return self._reranker

    def _candidates(self, items: Sequence[Any], to_page: Callable[[Any, str], Page], item_id: Callable[[Any, int], str],
                    metadata: Callable[[Any], dict], kind: str) -> tuple[list[Candidate], list[int]]:
        check_top_n(self.top_n)
        check_optional_positive_int("batch_size", self.batch_size)
        policy: MissingImagePolicy = check_choice("on_missing_image", self.on_missing_image, POLICIES)  # type: ignore[assignment]
        pages, kept = collect_pages(items, to_page, item_id, policy, kind)
        cands = []
        for page, i in zip(pages, kept):
            imp, idx = maps_from_metadata(metadata(items[i]), item=f"{kind} {item_id(items[i], i)!r}")
            cands.append(Candidate(page, importance=imp, index_importance=idx))
        return cands, kept

    def _select(self, ranked: list[tuple[int, float]], kept: list[int]) -> list[tuple[int, float]]:
        """(position in the items, score on the chosen scale) of the best ``top_n`` above the threshold. The fields
        are checked again here: they are plain attributes and may have been reassigned since construction."""
        scale = check_choice("score", self.score, SCORE_SCALES)
        threshold = check_score_threshold(self.score_threshold, scale)
        scaled = [(j, to_scale(s, scale)) for j, s in ranked]  # sigmoid is monotonic: the order is unchanged
        return [(kept[j], s) for j, s in select(scaled, self.top_n, threshold)]

    def _rank_items(self, query: str, items: Sequence[Any], to_page: Callable[[Any, str], Page],
                    item_id: Callable[[Any, int], str], metadata: Callable[[Any], dict], kind: str) -> list[tuple[int, float]]:
        """(position in ``items``, score) of the kept items, best first."""
        query = check_query(query)
        cands, kept = self._candidates(items, to_page, item_id, metadata, kind)
        ranked = rank(self._reranker, query, cands, self.batch_size) if cands else []
        return self._select(ranked, kept)

    async def _arank_items(self, query: str, items: Sequence[Any], to_page: Callable[[Any, str], Page],
                           item_id: Callable[[Any, int], str], metadata: Callable[[Any], dict], kind: str) -> list[tuple[int, float]]:
        """:meth:`_rank_items` without blocking the event loop."""
        query = check_query(query)
        cands, kept = self._candidates(items, to_page, item_id, metadata, kind)
        ranked = await arank(self._reranker, query, cands, self.batch_size) if cands else []
        return self._select(ranked, kept)


__all__ = ["MODES", "POLICIES", "SCORE_SCALES", "Mode", "RerankAdapter", "ScoreScale", "arank", "build_reranker",
           "check_score_threshold", "checkpoint_dir", "config_from_dict", "model_executor", "rank",
           "require_checkpoint_dir", "select", "to_scale"]
