"""PageSide: everything about pages for one loaded model, shared by the point-wise and listwise rerankers.

It holds the model and its family adapter, the pixel budget and each page's visual grid, the prompt prefix P and
its KV, the model fingerprint, the page-KV cache stores and the page prefill (P ⊕ V through the band layers,
optionally pruned at index time with a query-independent map). A reranker adds only its query side.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache import CacheEntry, CacheKey, CacheStore, open_store
from ..candidates import ImportanceMap
from ..engine.config import check_kv_dtype
from ..engine.devices import DTYPES, resolve_device, resolve_dtype
from ..engine.families import FamilyAdapter, adapter_for
from ..engine.kv import KV_FORMAT, KV_SCALE_AXES, QUANT_KV_FORMAT, PageKV
from ..engine.prefill import prefill_pages, prefix_kv, tokenize
from ..errors import ConfigError
from ..fileio import canonical_json
from ..pages import Page, PixelBudget, as_pages, smart_resize
from ..validation import check_positive_int

logger = logging.getLogger("minirerank")

_NOT_MODEL_IDENTITY = {"_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                       "_attn_implementation", "_attn_implementation_autoset", "use_cache", "return_dict", "output_attentions",
                       "output_hidden_states"}
# Image-processor fields that never change pixel values (names, bookkeeping).
_NOT_PIXEL_IDENTITY = {"processor_class", "image_processor_type", "_processor_class", "auto_map"}
_GRID_CACHE_SIZE = 100_000


def _strip(d: Any, drop: set[str]) -> Any:
    if isinstance(d, dict):
        return {k: _strip(v, drop) for k, v in d.items() if k not in drop}
    return d


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 256) -> str:
    """Identifies config and weights without hashing gigabytes: every tensor's name, shape, dtype and an evenly
    strided sample of its values. A fine-tune saved over the same path changes it."""
    h = hashlib.sha256(json.dumps(_strip(model.config.to_dict(), _NOT_MODEL_IDENTITY), sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].float().cpu().numpy()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def _ensure_mask_capable_attention(model: torch.nn.Module) -> None:
    """The engine feeds its decoder layers explicit 4-D masks (bands, pruning, padded candidates). Kernels that
    take only a causal or padding mask (flash-attention) cannot honour them, so the language model runs on sdpa."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in (None, "sdpa", "eager"):
        return
    logger.warning("minirerank: %s attention takes no explicit masks; the reranker's layers run on sdpa", impl)
    model.set_attn_implementation("sdpa")


def num_layers(model: torch.nn.Module) -> int:
    """LM decoder layers of a supported model (raises UnsupportedModelError for other models)."""
    return adapter_for(model).num_layers


def pixel_fingerprint(image_processor: Any) -> str:
    """Everything of the image processor that changes pixel values or the grid (mean/std, rescale, resample,
    patch and merge sizes, the pixel budget...): two processors that differ there must not share cache entries."""
    d = image_processor.to_dict() if hasattr(image_processor, "to_dict") else vars(image_processor)
    return hashlib.sha256(json.dumps(_strip(d, _NOT_PIXEL_IDENTITY), sort_keys=True, default=str).encode()).hexdigest()[:16]


class PageSide:
    """The page half of a reranker for one model (see the module docstring).

    band: the layers whose KV is cached (None: this reranker keeps no page cache, e.g. listwise single pass).
    kv_dtype: None (the model's values) or "int8" / "fp8": pages are cached compressed (RerankConfig.kv_dtype).
    cache_dir: a directory, an fsspec URL (``s3://bucket/prefix``: write-once entries shared by every machine) or a
    store object; memory (``memory_cache_bytes``) is always in front (see ``cache.open_store``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        *,
        prefix: str,
        band: tuple[int, int] | None,
        dtype: str = "float32",
        device: str = "cpu",
        index_keep_ratio: float = 1.0,
        batch_size: int = 32,
        cache_dir: str | Path | CacheStore | None = None,
        memory_cache_bytes: int = 2 * 1024**3,
        max_visual_tokens: int | None = None,
        name: str | None = None,
        kv_dtype: str | None = None,
    ) -> None:
        self.adapter: FamilyAdapter = adapter_for(model)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        check_kv_dtype(kv_dtype)
        self.kv_dtype = kv_dtype
        self.model = model.eval()
        # A model dispatched over devices (device_map) or quantized (bitsandbytes) stays where and as it was loaded.
        if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_quantized", False):
            self.model.to(device=device, dtype=DTYPES[dtype])
        _ensure_mask_capable_attention(self.model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.band = band
        self.dtype = dtype
        self.index_keep_ratio = index_keep_ratio
        self.batch_size = check_positive_int("batch_size", batch_size)
        if max_visual_tokens is not None:
            self._set_max_visual_tokens(check_positive_int("max_visual_tokens", max_visual_tokens))
        self.prefix_ids = tokenize(self.tokenizer, prefix)
        self.fingerprint = model_fingerprint(self.model)
        self.pixel_fingerprint = pixel_fingerprint(self.processor.image_processor)
        # A directory, an fsspec URL (s3://bucket/prefix: write-once, shared by every machine) or a store object.
        self.store: CacheStore = open_store(cache_dir, memory_bytes=memory_cache_bytes)
        self._lock = threading.Lock()
        self._prefix_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._index_maps: dict[str, ImportanceMap] = {}  # content hash -> index-time map (for later cache keys)
        self._grids: OrderedDict[str, tuple[int, int]] = OrderedDict()

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

    def visual_grid(self, page: Page | Any) -> tuple[int, int]:
        """The merged visual-token grid (h, w) of ``page`` (remembered per page content)."""
        page = page if isinstance(page, Page) else as_pages([page])[0]
        key = page.content_hash
        grid = self._grids.get(key)
        if grid is None:
            img = page.image()
            b, f = self.pixel_budget, self.patch_factor
            h, w = smart_resize(img.height, img.width, factor=f, min_pixels=b.min_pixels, max_pixels=b.max_pixels)
            grid = (h // f, w // f)
            with self._lock:
                self._grids[key] = grid
                while len(self._grids) > _GRID_CACHE_SIZE:
                    self._grids.popitem(last=False)
        return grid

    def _set_max_visual_tokens(self, n: int) -> None:
        ip = self.processor.image_processor
        budget = PixelBudget.from_visual_tokens(n, patch_size=self.adapter.patch_size, merge_size=self.adapter.merge_size)
        # transformers 5 keeps the budget in `size` (a SizeDict); older processors in max_pixels/min_pixels.
        if getattr(ip, "size", None) is not None:
            ip.size["longest_edge"] = budget.max_pixels
            ip.size["shortest_edge"] = min(budget.min_pixels, ip.size["shortest_edge"] or budget.min_pixels)
        ip.max_pixels = budget.max_pixels

    # --- the prompt prefix ----------------------------------------------------------------------------
    def prefix_kv(self, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV of the prefix P in layers < n_layers (computed once per model and prefix)."""
        with self._lock:
            kv = self._prefix_kv.get(n_layers)
            if kv is None:
                with torch.inference_mode():
                    kv = self._prefix_kv[n_layers] = prefix_kv(self.adapter, self.prefix_ids, n_layers)
        return kv

    # --- the page cache -------------------------------------------------------------------------------
    def key(self, page: Page, index_map: ImportanceMap | None) -> CacheKey:
        """The cache key of a page's KV: its content, the model, and every setting that changes the KV."""
        b = self.pixel_budget
        settings: dict[str, Any] = {
            "format": KV_FORMAT,
            "band": list(self.band),
            "dtype": self.dtype,
            "prefix": hashlib.sha256(self.prefix_ids.numpy().tobytes()).hexdigest()[:16],
            "pixels": [b.min_pixels, b.max_pixels],
            "image_processor": self.pixel_fingerprint,
            "index_keep_ratio": self.index_keep_ratio,
        }
        if self.kv_dtype is not None:
            # Only compressed keys gain fields: the digests of unquantized entries (caches on disk) are unchanged.
            settings.update(format=QUANT_KV_FORMAT, kv_dtype=self.kv_dtype, kv_scale_axes=list(KV_SCALE_AXES[self.kv_dtype]))
        if self.index_keep_ratio < 1.0:
            digest = hashlib.sha256(canonical_json([list(index_map.grid), index_map.flat().tolist()]).encode())
            settings["index_importance"] = digest.hexdigest()[:16]
        return CacheKey(image_hash=page.content_hash, model_fingerprint=self.fingerprint, settings=settings)

    def index_maps(self, pages: Sequence[Page], maps: Sequence[ImportanceMap | None] | None) -> list[ImportanceMap | None]:
        """The index-time map of each page: the one given, else the one remembered from an earlier call.
        Required for every page when pruning at index time."""
        maps = list(maps) if maps is not None else [None] * len(pages)
        if self.index_keep_ratio >= 1.0:
            return [None] * len(pages)
        out = [self._index_maps.get(p.content_hash) if m is None else m for p, m in zip(pages, maps)]
        missing = [p.id for p, m in zip(pages, out) if m is None]
        if missing:
            raise ConfigError(f"index_keep_ratio < 1 needs a query-independent importance map for every page; none "
                              f"for {missing[:3]} (FirstStage.candidates and RerankPipeline give them)")
        for p, m in zip(pages, out):
            self._index_maps[p.content_hash] = m
        return out

    def knows_index_map(self, page: Page) -> bool:
        """Whether an index-time map of this page content was given earlier (so it can be scored without one)."""
        return page.content_hash in self._index_maps

    def fill(self, pages: Sequence[Page], index_maps: Sequence[ImportanceMap | None] | None = None, *,
             show_progress: bool = False) -> int:
        """Prefill the pages whose KV is not cached yet (checked without reading the entries); returns how many.
        A no-op for a side without a page cache."""
        if self.band is None:
            return 0
        pages = list(pages)
        maps = self.index_maps(pages, index_maps)
        todo = [i for i, (p, m) in enumerate(zip(pages, maps)) if self.key(p, m) not in self.store]
        if todo:
            self.kv([pages[i] for i in todo], [maps[i] for i in todo], show_progress=show_progress)
        return len(todo)

    def kv(self, pages: Sequence[Page], index_maps: Sequence[ImportanceMap | None] | None = None, *,
           show_progress: bool = False) -> list[PageKV]:
        """Each page's band KV, from the cache or computed (and stored)."""
        if self.band is None:
            raise ConfigError("this reranker keeps no page cache")
        pages = list(pages)
        maps = self.index_maps(pages, index_maps)
        keys = [self.key(p, m) for p, m in zip(pages, maps)]
        out: list[PageKV | None] = []
        missing = []
        for i, key in enumerate(keys):
            entry = self.store.get(key)
            kv = None
            if entry is not None:
                try:
                    kv = PageKV.from_tensors(entry.tensors, entry.meta)
                    if kv.kv_dtype != self.kv_dtype:  # the key says so too; never score another setting's KV
                        raise ValueError(f"entry holds kv_dtype={kv.kv_dtype}, this reranker uses {self.kv_dtype}")
                except (KeyError, ValueError) as e:  # a valid file with content we cannot use: recompute
                    kv = None
                    logger.warning("unusable cache entry for page %s (%s); recomputing", pages[i].id, e)
            out.append(kv)
            if kv is None:
                missing.append(i)
        bar = tqdm(total=len(missing), desc="prefill pages", unit="page", disable=not show_progress or not missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            images = [pages[i].image() for i in chunk]
            with torch.inference_mode():
                kvs = prefill_pages(
                    self.adapter, self.processor.image_processor, self.prefix_ids, images, self.band,
                    index_importance=[None if maps[i] is None else maps[i].flat() for i in chunk],
                    index_keep_ratio=self.index_keep_ratio,
                )
            for i, kv in zip(chunk, kvs):
                kv = PageKV(kv.k.cpu(), kv.v.cpu(), kv.visual_index, kv.grid, kv.next_position, kv.band)
                if self.kv_dtype is not None:  # fresh and cached pages score the same compressed values
                    kv = kv.quantized(self.kv_dtype)
                tensors, meta = kv.to_tensors()
                self.store.put(keys[i], CacheEntry(tensors=tensors, meta=meta))
                out[i] = kv
            bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


__all__ = ["PageSide", "model_fingerprint", "num_layers", "pixel_fingerprint"]
