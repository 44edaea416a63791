"""PageEmbedder: ColPali-family multi-vector embeddings of pages and queries (colpali-engine models).

Which output rows are kept, and which of them are image patches in what order:

* Every row the processor did not pad (attention mask 1) is kept -- prompt tokens included, as colpali's
  MaxSim uses them. Padding rows are dropped (colpali multiplies them by 0, but a 0/0 normalisation can
  leave NaN there). With ``mask_non_image_embeddings`` only image rows are kept (the others are zeros).
* Image rows are the processor's ``get_image_mask`` positions. Their order:
  - ColQwen2 / 2.5 / 3 (Qwen-VL): the image processor lays patches out as
    (h/merge, w/merge, merge, merge) and the merger fuses each merge x merge window into one token, so image
    token i is merged cell (i // w', i % w') with (h', w') = image_grid_thw[1:] // merge -- row-major.
  - ColPali (PaliGemma): a fixed square SigLIP grid, row-major (1024 tokens = 32 x 32 at 448 px).
  - ColIdefics3: sub-images tile by tile (each a square grid), then one global image; the tiles are
    re-assembled into one row-major grid and the global view is left out of the grid (it stays in the
    MaxSim vectors). An unsplit page uses its single (global) view as the grid.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..validation import check_positive_int, check_query
from ..engine.devices import DTYPES, resolve_device, resolve_dtype
from ..errors import ConfigError, InvalidQueryError, UnsupportedModelError
from ..pages import Page, PixelBudget, as_pages, fit_to_budget
from .embedding import PageEmbedding
from .pooling import pool_embedding

# model_type in config.json -> (model class, processor class) names in colpali_engine.models
_FAMILIES: dict[str, tuple[str, str]] = {
    "qwen3_vl": ("ColQwen3", "ColQwen3Processor"),
    "qwen2_vl": ("ColQwen2", "ColQwen2Processor"),
    "qwen2_5_vl": ("ColQwen2_5", "ColQwen2_5_Processor"),
    "paligemma": ("ColPali", "ColPaliProcessor"),
    "idefics3": ("ColIdefics3", "ColIdefics3Processor"),
}


_QWEN_FAMILIES = ("qwen3_vl", "qwen2_vl", "qwen2_5_vl")


class PageEmbedder:
    """Encodes pages and queries with a colpali-engine model (ColQwen3, ColQwen2/2.5, ColPali, ColIdefics3).

    ``pixel_budget`` (Qwen-VL models only): pages are resized with :func:`fit_to_budget` before the
    processor, and the processor is set to the same budget, so a reranker with the same vision tower and
    budget sees the identical resized page and the identical visual-token grid.

    ``pool_factor`` (index-time token pooling, see :mod:`.pooling`): page embeddings keep at most 1/f of their
    patch vectors (colpali-engine's hierarchical pooling); queries are unchanged and the maps stay on the page's
    grid. 1 = no pooling.
    """

    def __init__(self, model: torch.nn.Module, processor: Any, pixel_budget: PixelBudget | None = None,
                 name: str | None = None, max_query_tokens: int = 512, pool_factor: int = 1) -> None:
        self.model = model.eval()
        self.max_query_tokens = check_positive_int("max_query_tokens", max_query_tokens)
        self.pool_factor = check_positive_int("pool_factor", pool_factor)
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.processor = processor
        ip = processor.image_processor
        # Qwen-VL processors resize with smart_resize to multiples of patch * merge and report image_grid_thw.
        self._qwen = hasattr(ip, "merge_size") and hasattr(ip, "patch_size") and hasattr(ip, "temporal_patch_size")
        self.pixel_budget = pixel_budget
        if pixel_budget is not None:
            if not self._qwen:
                raise ConfigError(
                    f"pixel_budget needs a Qwen-VL-based embedder (ColQwen2/2.5/3); {type(processor).__name__} "
                    "resizes pages its own way (importance maps are resampled onto the reranker's grid instead)"
                )
            self.processor = _with_budget(processor, pixel_budget)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        pixel_budget: PixelBudget | None = None,
        local_files_only: bool | None = None,
        pool_factor: int = 1,
        **model_kwargs: Any,
    ) -> PageEmbedder:
        """Load a colpali-engine checkpoint by local path (never touches the network) or hub id.

        Layouts: a full checkpoint (``config.json``; e.g. a merged ColQwen2 / ColQwen3) or a PEFT LoRA adapter
        (``adapter_config.json`` + ``adapter_model.safetensors``, as vidore publishes ColQwen2 / 2.5, ColPali and
        ColSmol), whose base (``base_model_name_or_path``) transformers loads and adapts through peft; the
        processor comes from the adapter folder, or from the base when the adapter has none. The family comes from
        the checkpoint's (or the base's) ``config.json`` (``model_type``). ``device="auto"``: cuda, then mps, then cpu;
        ``dtype`` (a torch dtype or a name; None or "auto": float32 on the CPU, bfloat16 on a GPU that supports it). A hub id that cannot be fetched (offline and not cached, no such repository) raises
        ModelNotFoundError naming it.
        """
        import colpali_engine.models as cm

        name = os.fspath(path_or_id)
        model_type, base = _model_type(name, local_files_only)
        if model_type not in _FAMILIES:
            raise UnsupportedModelError(
                f"{name}: model_type {model_type!r} is not a supported embedder family "
                f"({', '.join(sorted(_FAMILIES))})"
            )
        model_name, processor_name = _FAMILIES[model_type]
        device = resolve_device(device)
        if dtype is None or isinstance(dtype, str):
            dtype = DTYPES[resolve_dtype(dtype, device)]
        offline = _offline(name, local_files_only) and (base is None or _offline(base, local_files_only))
        model = getattr(cm, model_name).from_pretrained(name, dtype=dtype, local_files_only=offline, **model_kwargs)
        source = _processor_source(name, base, local_files_only)
        processor = getattr(cm, processor_name).from_pretrained(source, local_files_only=_offline(source, local_files_only))
        return cls(model.to(device), processor, pixel_budget=pixel_budget, name=name, pool_factor=pool_factor)

    @classmethod
    def for_reranker(cls, path_or_id: str | os.PathLike[str], reranker: Any = None, **kwargs: Any) -> PageEmbedder:
        """:meth:`from_pretrained`; a Qwen-VL embedder (ColQwen2/2.5/3) gets ``reranker``'s pixel budget, so when
        both share a vision tower its patch grid is the reranker's visual-token grid. Other families resize pages
        their own way and their maps are resampled onto the reranker's grid."""
        if reranker is not None:
            # the same device and precision as the reranker, unless asked otherwise (the CLI's --device / --dtype)
            kwargs.setdefault("device", reranker.config.device)
            kwargs.setdefault("dtype", reranker.config.dtype)
            if kwargs.get("pixel_budget") is None and \
                    _model_type(os.fspath(path_or_id), kwargs.get("local_files_only"))[0] in _QWEN_FAMILIES:
                kwargs["pixel_budget"] = reranker.pixel_budget
        return cls.from_pretrained(path_or_id, **kwargs)

    # --- properties -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    @property
    def patch_factor(self) -> int | None:
        """Pixels per merged visual token side (patch_size * merge_size) for Qwen-VL models, else None."""
        ip = self.processor.image_processor
        return int(ip.patch_size * ip.merge_size) if self._qwen else None

    def prepare_image(self, page: Page):
        """The page image exactly as the processor receives it (resized into the pixel budget if one is set)."""
        img = page.image()
        if self.pixel_budget is not None:
            img = fit_to_budget(img, self.pixel_budget, factor=self.patch_factor)
        return img

    # --- encoding -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_pages(self, pages: Sequence[Any], batch_size: int = 4, show_progress: bool = True) -> list[PageEmbedding]:
        """One PageEmbedding per page (Page objects, paths, bytes, PIL images...), in input order."""
        batch_size = check_positive_int("batch_size", batch_size)
        pages = as_pages(pages)
        out: list[PageEmbedding] = []
        bar = tqdm(total=len(pages), desc="embed pages", unit="page", disable=not show_progress or not pages)
        for start in range(0, len(pages), batch_size):
            chunk = pages[start : start + batch_size]
            images = [self.prepare_image(p) for p in chunk]
            batch = self.processor.process_images(images)
            emb = self.model(**batch.to(self.device))
            image_mask = self.processor.get_image_mask(batch).cpu()
            keep = batch["attention_mask"].cpu().bool()
            if getattr(self.model, "mask_non_image_embeddings", False):
                keep &= image_mask
            for i, page in enumerate(chunk):
                rows = keep[i].nonzero().squeeze(1)
                image_rows = (image_mask[i][rows]).nonzero().squeeze(1)  # image token positions among kept rows
                patch_rows, grid = self._patch_layout(image_rows, batch, i, images[i])
                embedding = PageEmbedding(
                    page.id,
                    emb[i, rows.to(emb.device)].float().cpu(),
                    patch_rows,
                    grid,
                    content_hash=page.content_hash,
                    metadata=dict(page.metadata),
                )
                out.append(pool_embedding(embedding, self.pool_factor) if self.pool_factor > 1 else embedding)
            bar.update(len(chunk))
        bar.close()
        return out

    @torch.inference_mode()
    def encode_queries(self, queries: Sequence[str], batch_size: int = 16) -> list[torch.Tensor]:
        """One (Tq, D) float32 tensor per query (colpali's query prompt and augmentation tokens included)."""
        if isinstance(queries, str):
            raise TypeError("encode_queries takes a list of strings; use encode_query for one")
        queries = list(queries)
        for q in queries:
            self._check_length(check_query(q))
        out: list[torch.Tensor] = []
        for start in range(0, len(queries), batch_size):
            batch = self.processor.process_queries(queries=queries[start : start + batch_size])
            emb = self.model(**batch.to(self.device))
            keep = batch["attention_mask"].bool().to(emb.device)
            out.extend(emb[i, keep[i]].float().cpu() for i in range(emb.shape[0]))
        return out

    def _check_length(self, query: str) -> None:
        """Refuse a query over ``max_query_tokens`` before anything is allocated for it (InvalidQueryError)."""
        n = len(query) if len(query) > 64 * self.max_query_tokens else len(self.processor.tokenizer(query)["input_ids"])
        if n > self.max_query_tokens:
            unit = "characters" if len(query) > 64 * self.max_query_tokens else "tokens"
            raise InvalidQueryError(f"query is {n:,} {unit}, over the embedder's limit of {self.max_query_tokens} tokens "
                                    "(max_query_tokens); shorten it")

    def encode_query(self, query: str) -> torch.Tensor:
        return self.encode_queries([query])[0]

    # --- layout of image rows -------------------------------------------------------------------------
    def _patch_layout(self, image_rows: torch.Tensor, batch: Any, i: int, image) -> tuple[torch.Tensor, tuple[int, int]]:
        n = image_rows.numel()
        if "image_grid_thw" in batch:
            t, h, w = (int(x) for x in batch["image_grid_thw"][i])
            merge = int(self.processor.image_processor.merge_size)
            grid = (h // merge, w // merge)
            if t != 1 or grid[0] * grid[1] != n:
                raise UnsupportedModelError(f"{n} image tokens do not match image_grid_thw {(t, h, w)}")
            return image_rows, grid
        seq_len = getattr(self.processor, "image_seq_len", None)
        if seq_len is not None and hasattr(self.processor.image_processor, "get_number_of_image_patches"):
            return _tiled_layout(image_rows, seq_len, self.processor.image_processor, image)
        side = math.isqrt(n)
        if side * side != n:
            raise UnsupportedModelError(f"{n} image tokens do not form a square grid ({type(self.processor).__name__})")
        return image_rows, (side, side)


def _tiled_layout(image_rows: torch.Tensor, seq_len: int, image_processor: Any, image) -> tuple[torch.Tensor, tuple[int, int]]:
    """Idefics3-style tiles (row by row, each tile a square grid) + a global view last -> one page grid."""
    side = math.isqrt(seq_len)
    _, rows, cols = image_processor.get_number_of_image_patches(image.height, image.width, {})
    n = image_rows.numel()
    if rows * cols and n == (rows * cols + 1) * seq_len and side * side == seq_len:
        local = image_rows[: rows * cols * seq_len].reshape(rows, cols, side, side)
        return local.permute(0, 2, 1, 3).reshape(-1), (rows * side, cols * side)
    # Unsplit page (or an unexpected layout): the global view covers the whole page.
    if n < seq_len or side * side != seq_len:
        raise UnsupportedModelError(f"{n} image tokens do not match image_seq_len={seq_len}")
    return image_rows[-seq_len:], (side, side)


def _with_budget(processor: Any, budget: PixelBudget) -> Any:
    """A copy of ``processor`` whose image processor resizes into ``budget`` (the caller's stays unchanged)."""
    processor = copy.copy(processor)
    ip = copy.deepcopy(processor.image_processor)
    ip.size["shortest_edge"] = budget.min_pixels
    ip.size["longest_edge"] = budget.max_pixels
    for name, value in (("min_pixels", budget.min_pixels), ("max_pixels", budget.max_pixels)):
        if getattr(ip, name, None) is not None:
            setattr(ip, name, value)
    processor.image_processor = ip
    return processor


def _offline(name: str, local_files_only: bool | None) -> bool:
    return Path(name).exists() if local_files_only is None else local_files_only


def _model_type(name: str, local_files_only: bool | None) -> tuple[str | None, str | None]:
    """``model_type`` of a checkpoint and, for a PEFT adapter, its base (the base's model_type). Raises
    ModelNotFoundError when the checkpoint or the adapter's base cannot be found."""
    from ..rerankers.loading import adapter_base, hub_files

    files = hub_files(name, ("config.json", "adapter_config.json"), _offline(name, local_files_only),
                      what="embedder checkpoint")
    base = None
    config = files["config.json"]
    if config is None:
        base = adapter_base(name, files["adapter_config.json"], local_files_only)
        config = hub_files(base, ("config.json",), _offline(base, local_files_only), what="base model")["config.json"]
    try:
        return json.loads(Path(config).read_text()).get("model_type"), base
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{name}: cannot read the model config ({exc})") from exc


def _processor_source(name: str, base: str | None, local_files_only: bool | None) -> str:
    """Where the processor is: the checkpoint, or an adapter's base when the adapter folder has no processor."""
    from ..rerankers.loading import hub_files

    if base is None:
        return name
    files = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")
    has = hub_files(name, files, _offline(name, local_files_only), required=False)
    return name if any(has.values()) else base
