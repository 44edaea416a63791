"""MiniReranker: the facade. Index pages once (their band KV is cached), then rerank many queries cheaply.

    reranker = MiniReranker.from_pretrained("path/to/qwen3-vl-checkpoint", config=RerankConfig(exit_layer=16, band=(8, 12)))
    reranker.index(pages)                      # offline: page prefill → cache
    results = reranker.rerank("query", pages, top_n=5)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import CacheEntry, CacheKey, CacheStore, DiskStore, MemoryStore, TieredStore
from .engine.config import RerankConfig
from .engine.families import FamilyAdapter, adapter_for
from .engine.kv import KV_FORMAT, PageKV
from .engine.prefill import prefill_pages, prefix_kv, query_ids, tokenize
from .engine.prompt import DEFAULT_TEMPLATE, TEMPLATES, PromptTemplate, YesNoHead, label_token_id
from .engine.reference import dense_scores
from .engine.scorer import score_cached
from .engine.settings import SavedSettings, read_settings, write_settings
from .errors import ConfigError, EmptyCandidatesError, InvalidQueryError
from .pages import Page, PixelBudget, as_pages

logger = logging.getLogger("minirerank")

PageInput = Page | str | Path | bytes | Any
Importance = Sequence[Any] | Mapping[str, Any] | None


@dataclass
class RerankResult:
    """One reranked page. `index` is its position in the candidate list given to rerank()."""

    page_id: str
    score: float
    rank: int
    index: int
    page: Page | None = field(default=None, repr=False)

    @property
    def probability(self) -> float:
        """sigmoid(score): P(positive label) against the negative one for a yes/no head."""
        return 1.0 / (1.0 + math.exp(-self.score))


_NOT_MODEL_IDENTITY = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                       "_attn_implementation", "_attn_implementation_autoset", "use_cache", "return_dict", "output_attentions",
                       "output_hidden_states"}


def _canonical_config(d: Any) -> str:
    """Config JSON without bookkeeping that save/load or dtype casts change (dtype is a separate cache setting)."""

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in _NOT_MODEL_IDENTITY}
        return x

    return json.dumps(strip(d), sort_keys=True, default=str)


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 256) -> str:
    """Identifies config and weights without hashing gigabytes: every tensor's name, shape, dtype and an evenly
    strided sample of its values. A fine-tune saved over the same path changes it."""
    h = hashlib.sha256(_canonical_config(model.config.to_dict()).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].float().cpu().numpy()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def check_query(query: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InvalidQueryError(f"query must be a non-empty string, got {query!r}")
    return query


def check_top_n(top_n: int | None) -> None:
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise ConfigError(f"top_n must be a positive int or None, got {top_n!r}")


def importance_list(pages: list[Page], importance: Importance) -> list[torch.Tensor | None]:
    """One flat float32 map (or None) per page, from a sequence aligned with `pages` or a mapping by page id."""
    if importance is None:
        return [None] * len(pages)
    if isinstance(importance, Mapping):
        seq = [importance.get(p.id) for p in pages]
    else:
        seq = list(importance)
        if len(seq) != len(pages):
            raise ValueError(f"importance has {len(seq)} entries for {len(pages)} pages")
    return [None if x is None else torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1) for x in seq]


def _default_reranker_dir() -> Path:
    try:
        from .defaults import DEFAULT_RERANKER_DIR
    except ImportError:
        DEFAULT_RERANKER_DIR = None
    if DEFAULT_RERANKER_DIR is None or not Path(DEFAULT_RERANKER_DIR).exists():
        raise ConfigError(
            "no trained default model is installed with this package; pass a checkpoint path or hub id, "
            "or use minirerank_core.testing.tiny_model_and_processor() for a random toy model"
        )
    return Path(DEFAULT_RERANKER_DIR)


class MiniReranker:
    """Point-wise MLLM page reranker with a per-page KV cache, early exit, interaction band and pruning."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        config: RerankConfig | None = None,
        *,
        template: PromptTemplate | str = DEFAULT_TEMPLATE,
        head: torch.nn.Module | None = None,
        cache_dir: str | Path | None = None,
        memory_cache_bytes: int = 2 * 1024**3,
        max_visual_tokens: int | None = None,
    ):
        self.adapter: FamilyAdapter = adapter_for(model)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = TEMPLATES[template] if isinstance(template, str) else template
        if max_visual_tokens is not None:
            self._set_max_visual_tokens(max_visual_tokens)
        self.config = (config or RerankConfig()).resolve(self.adapter.num_layers)
        self.model.to(device=self.config.device, dtype=self.config.torch_dtype)
        self.head = head if head is not None else YesNoHead(
            model.lm_head,
            label_token_id(self.tokenizer, self.template.positive),
            label_token_id(self.tokenizer, self.template.negative),
        )
        self._prefix_ids = tokenize(self.tokenizer, self.template.prefix)
        if self.config.query_positions == "shared" and self.config.shared_offset is None:
            # Any page's query start is <= |P| + 2 + max(h, w) <= |P| + 2 + max visual tokens.
            self.config = self.config.replace(shared_offset=len(self._prefix_ids) + 2 + self.max_visual_tokens)
        self.fingerprint = model_fingerprint(self.model)
        memory = MemoryStore(max_bytes=memory_cache_bytes)
        self.store: CacheStore = TieredStore(memory, DiskStore(cache_dir) if cache_dir is not None else None)
        with torch.inference_mode():
            self.prefix_cache = prefix_kv(self.adapter, self._prefix_ids, self.config.exit_layer)
        self._index_importance_by_hash: dict[str, torch.Tensor] = {}  # for index-time pruning at rerank time

    # --- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        config: RerankConfig | None = None,
        *,
        template: PromptTemplate | str | None = None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> "MiniReranker":
        """Load a Qwen3-VL / Qwen2-VL checkpoint by local path or hub id (a local path never touches the network).

        With no path, the small default model shipped in the package. A checkpoint saved by `save_pretrained`
        carries `minirerank_config.json` (the exit layer, band and positions it was trained with, and its
        prompt); it is used unless `config` / `template` are given.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if path_or_id is None:
            path_or_id = _default_reranker_dir()
        local = Path(path_or_id).exists()
        offline = local if local_files_only is None else local_files_only
        saved = read_settings(path_or_id) if local else SavedSettings()
        config = config or saved.config or RerankConfig()
        template = template or saved.template
        processor = AutoProcessor.from_pretrained(str(path_or_id), local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(
            str(path_or_id), dtype=config.torch_dtype, local_files_only=offline
        )
        return cls(model, processor, config, template=template or DEFAULT_TEMPLATE, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Model, processor and `minirerank_config.json` (config + template), reloadable by from_pretrained."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_settings(path, self.config, self.template)

    def _set_max_visual_tokens(self, n: int) -> None:
        ip = self.processor.image_processor
        budget = PixelBudget.from_visual_tokens(n, patch_size=self.adapter.patch_size, merge_size=self.adapter.merge_size)
        # transformers 5 keeps the budget in `size` (a SizeDict); older processors in max_pixels/min_pixels.
        if getattr(ip, "size", None) is not None:
            ip.size["longest_edge"] = budget.max_pixels
            ip.size["shortest_edge"] = min(budget.min_pixels, ip.size["shortest_edge"] or budget.min_pixels)
        ip.max_pixels = budget.max_pixels

    # --- what the first stage needs to know -----------------------------------------------------------
    @property
    def patch_factor(self) -> int:
        return self.adapter.patch_size * self.adapter.merge_size

    @property
    def pixel_budget(self) -> PixelBudget:
        ip = self.processor.image_processor
        size = getattr(ip, "size", None) or {}
        max_pixels = size.get("longest_edge") or getattr(ip, "max_pixels")
        min_pixels = size.get("shortest_edge") or getattr(ip, "min_pixels")
        return PixelBudget(max_pixels=int(max_pixels), min_pixels=int(min_pixels))

    @property
    def max_visual_tokens(self) -> int:
        return self.pixel_budget.max_pixels // self.patch_factor**2

    def visual_grid(self, page: PageInput) -> tuple[int, int]:
        """The merged visual-token grid (h, w) of `page` in this model; visual tokens are in row-major order."""
        from .pages import smart_resize

        img = as_pages([page])[0].image()
        b = self.pixel_budget
        h, w = smart_resize(img.height, img.width, factor=self.patch_factor, min_pixels=b.min_pixels, max_pixels=b.max_pixels)
        return h // self.patch_factor, w // self.patch_factor

    # --- cache ----------------------------------------------------------------------------------------
    def _key(self, page: Page, index_importance: torch.Tensor | None) -> CacheKey:
        b = self.pixel_budget
        settings: dict[str, Any] = {
            "format": KV_FORMAT,
            "band": list(self.config.band),
            "dtype": self.config.dtype,
            "prefix": hashlib.sha256(self._prefix_ids.numpy().tobytes()).hexdigest()[:16],
            "pixels": [b.min_pixels, b.max_pixels],
            "index_keep_ratio": self.config.index_keep_ratio,
        }
        if self.config.index_keep_ratio < 1.0:
            settings["index_importance"] = hashlib.sha256(index_importance.float().numpy().tobytes()).hexdigest()[:16]
        return CacheKey(image_hash=page.content_hash, model_fingerprint=self.fingerprint, settings=settings)

    def index(
        self,
        pages: Sequence[PageInput],
        importance: Importance = None,
        *,
        batch_size: int | None = None,
        show_progress: bool = False,
    ) -> list[PageKV]:
        """Compute (or load) each page's cached KV. `importance` (query-independent, on each page's grid) is
        needed when config.index_keep_ratio < 1."""
        pages = as_pages(pages)
        imps = importance_list(pages, importance)
        if self.config.index_keep_ratio < 1.0:
            imps = [self._index_importance_by_hash.get(p.content_hash) if i is None else i for p, i in zip(pages, imps)]
            missing_imp = [p.id for p, i in zip(pages, imps) if i is None]
            if missing_imp:
                raise ConfigError(
                    f"index_keep_ratio < 1 needs a query-independent importance map for every page; none for {missing_imp[:3]}"
                )
            self._index_importance_by_hash.update({p.content_hash: i for p, i in zip(pages, imps)})
        keys = [self._key(p, imp) for p, imp in zip(pages, imps)]
        out: list[PageKV | None] = []
        missing = []
        for i, key in enumerate(keys):
            entry = self.store.get(key)
            kv = None
            if entry is not None:
                try:
                    kv = PageKV.from_tensors(entry.tensors, entry.meta)
                except (KeyError, ValueError) as e:  # a valid file with content we cannot use: recompute
                    logger.warning("unusable cache entry for page %s (%s); recomputing", pages[i].id, e)
            out.append(kv)
            if kv is None:
                missing.append(i)
        bs = batch_size or self.config.batch_size
        bar = tqdm(total=len(missing), desc="prefill pages", unit="page", disable=not show_progress or not missing)
        for start in range(0, len(missing), bs):
            chunk = missing[start : start + bs]
            images = [pages[i].image() for i in chunk]
            with torch.inference_mode():
                kvs = prefill_pages(
                    self.adapter, self.processor.image_processor, self._prefix_ids, images, self.config.band,
                    index_importance=[imps[i] for i in chunk], index_keep_ratio=self.config.index_keep_ratio,
                )
            for i, kv in zip(chunk, kvs):
                kv = PageKV(kv.k.cpu(), kv.v.cpu(), kv.visual_index, kv.grid, kv.next_position, kv.band)
                tensors, meta = kv.to_tensors()
                self.store.put(keys[i], CacheEntry(tensors=tensors, meta=meta))
                out[i] = kv
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    # --- scoring --------------------------------------------------------------------------------------
    def score(
        self, query: str, pages: Sequence[PageInput], importance: Importance = None, *, keep_ratio: float | None = None
    ) -> list[float]:
        """Relevance scores aligned with `pages` (logit(yes) − logit(no) for the default head).

        `keep_ratio` overrides the configured query-time keep ratio for this call (1.0: no pruning, e.g. when no
        first-stage maps are at hand); the page cache does not depend on it."""
        query = check_query(query)
        pages = as_pages(pages)
        if not pages:
            raise EmptyCandidatesError("rerank() needs at least one candidate page")
        cfg = self.config
        if keep_ratio is not None:
            if not 0.0 < float(keep_ratio) <= 1.0:
                raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
            cfg = cfg.replace(keep_ratio=float(keep_ratio))
        imps = importance_list(pages, importance)
        if cfg.keep_ratio < 1.0 and any(i is None for i in imps):
            raise ConfigError(
                "keep_ratio < 1 prunes with the first stage's importance maps: pass importance=... for every page "
                "(RerankPipeline does this), or set keep_ratio=1.0"
            )
        kvs = self.index(pages)
        if self.config.query_positions == "shared":
            worst = max(kv.next_position for kv in kvs)
            if worst > self.config.shared_offset:
                raise ConfigError(f"shared_offset={self.config.shared_offset} is below a page's extent ({worst})")
        q_ids = query_ids(self.tokenizer, self.template, query)
        scores = []
        bs = self.config.batch_size
        for s in range(0, len(kvs), bs):
            with torch.inference_mode():
                scores.append(score_cached(self.adapter, self.prefix_cache, q_ids, kvs[s : s + bs], cfg, self.head, imps[s : s + bs]))
        return torch.cat(scores).tolist()

    def rerank(
        self,
        query: str,
        pages: Sequence[PageInput],
        top_n: int | None = None,
        importance: Importance = None,
        *,
        keep_ratio: float | None = None,
    ) -> list[RerankResult]:
        """Pages sorted by relevance (best first), at most `top_n` of them (`keep_ratio`: see `score`)."""
        check_top_n(top_n)
        pages = as_pages(pages)
        scores = self.score(query, pages, importance, keep_ratio=keep_ratio)
        order = sorted(range(len(pages)), key=lambda i: -scores[i])[:top_n]
        return [RerankResult(pages[i].id, float(scores[i]), r + 1, i, pages[i]) for r, i in enumerate(order)]

    def dense_scores(self, query: str, pages: Sequence[PageInput], batch_size: int = 4) -> list[float]:
        """The baseline: a plain HF forward of P ⊕ V ⊕ Q per pair, no cache, no sparsity."""
        query = check_query(query)
        pages = as_pages(pages)
        imgs = [p.image() for p in pages]
        return dense_scores(self.model, self.processor, self.template, self.head, query, imgs, batch_size).tolist()

    # --- helpers --------------------------------------------------------------------------------------
