"""MiniReranker: point-wise reranking with a per-page KV cache, early exit, an interaction band and pruning.

    reranker = MiniReranker.from_pretrained("path/to/qwen3-vl-checkpoint", config=RerankConfig(exit_layer=16, band=(8, 12)))
    reranker.index(pages)                      # offline: page prefill → cache
    results = reranker.rerank("query", pages, top_n=5)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cache import CacheStore
from ..candidates import Candidate, CandidateLike, MapsLike, as_candidates
from ..engine.config import RerankConfig
from ..engine.kv import PageKV
from ..engine.prefill import query_ids
from ..engine.prompt import DEFAULT_TEMPLATE, TEMPLATES, PromptTemplate, YesNoHead, label_token_id
from ..engine.reference import dense_scores
from ..engine.scorer import score_cached
from ..engine.settings import write_settings
from ..errors import ConfigError
from ..pages import as_pages
from ..validation import check_query
from .base import Pruning, Reranker
from .loading import load_checkpoint
from .page_side import PageSide, num_layers


class MiniReranker(Reranker):
    """Point-wise MLLM page reranker with a per-page KV cache, early exit, interaction band and pruning."""

    kind = "pointwise"

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        config: RerankConfig | None = None,
        *,
        template: PromptTemplate | str = DEFAULT_TEMPLATE,
        head: torch.nn.Module | None = None,
        cache_dir: str | Path | CacheStore | None = None,
        memory_cache_bytes: int = 2 * 1024**3,
        max_visual_tokens: int | None = None,
        name: str | None = None,
    ):
        self.template = TEMPLATES[template] if isinstance(template, str) else template
        if not getattr(self.template, "vision_first", True):
            raise ConfigError(self.template.cache_error())  # query-first: its page KV depends on the query
        config = (config or RerankConfig()).resolve(num_layers(model))
        self.pages = PageSide(
            model, processor, prefix=self.template.prefix, band=config.band, dtype=config.dtype, device=config.device,
            index_keep_ratio=config.index_keep_ratio, batch_size=config.batch_size, cache_dir=cache_dir,
            memory_cache_bytes=memory_cache_bytes, max_visual_tokens=max_visual_tokens, name=name,
            kv_dtype=config.kv_dtype,
        )
        if config.query_positions == "shared" and config.shared_offset is None:
            # Any page's query start is <= |P| + 2 + max(h, w) <= |P| + 2 + max visual tokens.
            config = config.replace(shared_offset=len(self.pages.prefix_ids) + 2 + self.pages.max_visual_tokens)
        self.config = config
        self.head = head if head is not None else YesNoHead(
            self.model.lm_head,
            label_token_id(self.tokenizer, self.template.positive),
            label_token_id(self.tokenizer, self.template.negative),
        )
        self.prefix_cache = self.pages.prefix_kv(config.exit_layer)

    # --- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike[str] | None = None,
        config: RerankConfig | None = None,
        *,
        template: PromptTemplate | str | None = None,
        settings: str | os.PathLike[str] | None = None,
        local_files_only: bool | None = None,
        device_map: Any = None,
        quantization_config: Any = None,
        revision: str | None = None,
        token: str | bool | None = None,
        trust_remote_code: bool | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> MiniReranker:
        """Load a Qwen-VL checkpoint by local path or hub id (a local path never touches the network); with no
        path, the small default model shipped in the package. A checkpoint saved by `save_pretrained` carries
        `minirerank_config.json` (the exit layer, band and positions it was trained with, and its prompt); it is
        used unless `config` / `template` are given, or a `settings` file (e.g. from `minirerank calibrate`).

        `device_map`, `quantization_config` (bitsandbytes 4/8-bit, where installed), `revision`, `token`,
        `trust_remote_code` and `attn_implementation` go to transformers when given."""
        if settings is not None and config is None:
            config, template = _settings_file(settings, template)
        ckpt = load_checkpoint(path_or_id, dtype=config.dtype if config else None, device=config.device if config else None,
                               local_files_only=local_files_only, device_map=device_map,
                               quantization_config=quantization_config, revision=revision, token=token,
                               trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        config = config or ckpt.settings.config or RerankConfig()
        template = template or ckpt.template  # its saved or published prompt, else the default
        if ckpt.head is not None:  # a published score head (jina-reranker-m0) instead of yes/no logits
            kwargs.setdefault("head", ckpt.head)
        kwargs.setdefault("name", ckpt.name)
        return cls(ckpt.model, ckpt.processor, config, template=template, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Model, processor and `minirerank_config.json` (config + template), reloadable by from_pretrained."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_settings(path, self.config, self.template)

    @property
    def pruning(self) -> Pruning:
        return Pruning(self.config.keep_ratio, self.config.index_keep_ratio, needs_maps=True)

    # --- index and score ----------------------------------------------------------------------------
    def index(self, pages: Sequence[CandidateLike], importance: MapsLike = None, *,
              show_progress: bool = False) -> list[PageKV]:
        """Compute (or load) each page's cached KV. ``importance``: each page's query-independent map on its grid
        (needed when ``config.index_keep_ratio < 1``; Candidates may carry it as ``index_importance``)."""
        cands = [self._on_grid(c) for c in as_candidates(pages, index_importance=importance)]
        return self.pages.kv([c.page for c in cands], [c.index_importance for c in cands], show_progress=show_progress)

    def _rank(self, query: str, cands: list[Candidate], keep_ratio: float) -> tuple[list[int], list[float]]:
        kvs = self.pages.kv([c.page for c in cands], [c.index_importance for c in cands])
        cfg = self.config.replace(keep_ratio=keep_ratio)
        if cfg.query_positions == "shared":
            worst = max(kv.next_position for kv in kvs)
            if worst > cfg.shared_offset:
                raise ConfigError(f"shared_offset={cfg.shared_offset} is below a page's extent ({worst})")
        q_ids = query_ids(self.tokenizer, self.template, query)
        imps = [None if c.importance is None else c.importance.flat() for c in cands]
        scores, bs = [], _batch_size(kvs, cfg, self.adapter.dtype)
        for s in range(0, len(kvs), bs):
            with torch.inference_mode():
                scores.append(score_cached(self.adapter, self.prefix_cache, q_ids, kvs[s : s + bs], cfg, self.head,
                                           imps[s : s + bs]))
        flat = torch.cat(scores).tolist()
        return sorted(range(len(flat)), key=lambda i: -flat[i]), flat

    def dense_scores(self, query: str, pages: Sequence[CandidateLike], batch_size: int = 4) -> list[float]:
        """The baseline: a plain HF forward of P ⊕ V ⊕ Q per pair, no cache, no sparsity."""
        query = check_query(query)
        pages = as_pages([p.page if isinstance(p, Candidate) else p for p in pages])
        imgs = [p.image() for p in pages]
        return dense_scores(self.model, self.processor, self.template, self.head, query, imgs, batch_size).tolist()


def _batch_size(kvs: Sequence[PageKV], cfg: RerankConfig, dtype: torch.dtype) -> int:
    """Candidates per scorer call: ``cfg.batch_size``, fewer when their gathered band K/V (the scorer's largest
    allocation) would not fit a quarter of the free GPU memory, or 1 GiB on the CPU."""
    kv = max(kvs, key=lambda x: x.k.shape[2])
    per = 2 * kv.k.shape[0] * kv.k.shape[1] * kv.k.shape[2] * kv.k.shape[3] * torch.finfo(dtype).bits // 8
    device = torch.device(cfg.device)
    budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 1 << 30
    return max(1, min(cfg.batch_size, budget // max(1, per)))


def _settings_file(path: str | os.PathLike[str], template: PromptTemplate | str | None):
    """(config, template) from a settings file or a directory holding ``minirerank_config.json``."""
    from ..engine.settings import read_settings

    saved = read_settings(path)
    if saved.config is None:
        raise ConfigError(f"{path}: no minirerank settings found")
    return saved.config, template or saved.template


__all__ = ["MiniReranker"]
