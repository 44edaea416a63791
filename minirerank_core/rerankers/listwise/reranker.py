"""ListwiseReranker: ZipRerank-style listwise page reranking on the same core as MiniReranker.

    reranker = ListwiseReranker(model, processor)                        # ZipRerank single pass
    reranker = ListwiseReranker(model, processor, ListwiseConfig(mode="cached", exit_layer=16, band=(8, 12)))
    results = reranker.rerank("query", pages, top_n=5)                   # same call and results as MiniReranker
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...candidates import Candidate, CandidateLike, MapsLike, as_candidates
from ...engine.families import VisualFeatures
from ...engine.kv import PageKV
from ...engine.scorer import kept_rows
from ...errors import ConfigError, EmptyCandidatesError, UntrainedLayoutWarning
from ...validation import check_top_n
from ..base import Pruning, Reranker, RerankResult, result
from ..loading import load_checkpoint
from ..page_side import PageSide, num_layers
from .cached import cached_logits, cached_window
from .config import ListwiseConfig
from .prompt import DEFAULT_LISTWISE_TEMPLATE, LabelHead, ListwiseTemplate, single_token_ids
from .settings import ListwiseSettings, listwise_settings, read_listwise_settings, write_listwise_settings
from .single_pass import encode_pages, single_pass_logits, window_sequence
from .windows import Ranking, Window, sliding_rerank


@dataclass
class _Candidates:
    """One query's candidates, prepared once for all of its windows."""

    query: str
    cands: list[Candidate]
    keep_ratio: float
    feats: list[VisualFeatures] | None = None  # single_pass: vision tower output per page
    grid_thw: torch.Tensor | None = None
    kvs: list[PageKV] | None = None  # cached: page band KV
    rows: list[torch.Tensor] | None = None  # cached: rows of each page the query may see

    @property
    def importance(self) -> list[torch.Tensor | None]:
        return [None if c.importance is None else c.importance.flat() for c in self.cands]


class ListwiseReranker(Reranker):
    """Listwise MLLM page reranker: one forward pass scores a window of up to 20 labelled pages."""

    kind = "listwise"

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        config: ListwiseConfig | None = None,
        *,
        template: ListwiseTemplate = DEFAULT_LISTWISE_TEMPLATE,
        cache_dir: str | Path | None = None,
        memory_cache_bytes: int = 2 * 1024**3,
        max_visual_tokens: int | None = None,
        name: str | None = None,
    ):
        self.config = (config or ListwiseConfig()).resolve(num_layers(model))
        cached = self.config.mode == "cached"
        # The page side holds the listwise prefix P; single pass keeps no page cache (band None).
        self.pages = PageSide(
            model, processor, prefix=template.prefix, band=self.config.band if cached else None, dtype=self.config.dtype,
            device=self.config.device, batch_size=self.config.image_batch, cache_dir=cache_dir,
            memory_cache_bytes=memory_cache_bytes, max_visual_tokens=max_visual_tokens, name=name,
        )
        self.template = template
        self.head = LabelHead(self.model.lm_head, single_token_ids(self.tokenizer, self.config.labels, "labels"))
        self.answer_id = single_token_ids(self.tokenizer, [template.answer], "the answer prefix")[0]
        if cached:
            self.pages.prefix_kv(self.config.exit_layer)  # computed once, up front

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike[str] | None = None, config: ListwiseConfig | None = None,
                        *, mode: str | None = None, local_files_only: bool | None = None, device_map: Any = None,
                        quantization_config: Any = None, revision: str | None = None, token: str | bool | None = None,
                        trust_remote_code: bool | None = None, attn_implementation: str | None = None,
                        **kwargs) -> ListwiseReranker:
        """Load a Qwen-VL checkpoint (by path, hub id, or None: the listwise model shipped in the package for
        `mode`) like MiniReranker (the same loading arguments go to transformers when given).

        A checkpoint saved with listwise settings (`save_pretrained`, the listwise training stage, the shipped
        model) runs the config it was trained with for `mode` ("single_pass" / "cached"; default: its saved mode)
        and its prompt, unless `config` / `template=` are given; otherwise ListwiseConfig(mode=mode) defaults."""
        name = default_listwise_path(mode or (config.mode if config else None)) if path_or_id is None else path_or_id
        saved = read_listwise_settings(name)
        if config is None:
            config = saved.config(mode) if saved is not None else ListwiseConfig(mode=mode or "single_pass")
        elif mode is not None and config.mode != mode:
            raise ConfigError(f"mode={mode!r} but the config given has mode={config.mode!r}")
        if saved is not None:
            kwargs.setdefault("template", saved.template)
            if saved.configs and config.mode not in saved.configs:
                warnings.warn(f"minirerank: {name} was trained for the listwise layouts {sorted(saved.configs)} only, "
                              f"not mode={config.mode!r}, which may rank no better than chance with it",
                              UntrainedLayoutWarning, stacklevel=2)
        ckpt = load_checkpoint(name, dtype=config.dtype, device=config.device, local_files_only=local_files_only,
                               device_map=device_map, quantization_config=quantization_config, revision=revision,
                               token=token, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
        kwargs.setdefault("name", ckpt.name)
        return cls(ckpt.model, ckpt.processor, config, **kwargs)

    def save_pretrained(self, path: str | Path, *, also: Sequence[ListwiseConfig] = (), **extra) -> None:
        """Model, processor and the listwise settings (this config, plus configs of other layouts in `also`, e.g.
        the cached layout the same weights were trained for), reloadable by from_pretrained."""
        path = Path(path)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        write_listwise_settings(path, self.settings(also), **extra)

    def settings(self, also: Sequence[ListwiseConfig] = ()) -> ListwiseSettings:
        """This reranker's listwise settings (its config is the default mode)."""
        return listwise_settings([self.config, *also], self.template, mode=self.config.mode)

    @property
    def pruning(self) -> Pruning:
        # single pass prunes by QI-EI when a page has no first-stage map; cached mode needs the maps
        return Pruning(self.config.keep_ratio, 1.0, needs_maps=self.config.mode == "cached")

    # --- the interface ----------------------------------------------------------------------------
    def index(self, pages: Sequence[CandidateLike], importance: MapsLike = None, *,
              show_progress: bool = False) -> list[PageKV] | None:
        """Cached mode: prefill (or load) every page's band KV ahead of queries and return it. Single pass keeps no
        page cache: nothing to do (None). The listwise page cache is never pruned at index time (``importance``
        unused)."""
        if self.config.mode != "cached":
            return None
        return self.pages.kv([c.page for c in as_candidates(pages)], show_progress=show_progress)

    def _rank(self, query: str, cands: list[Candidate], keep_ratio: float) -> tuple[list[int], list[float]]:
        ranking = self._rank_lists([_Candidates(query, cands, keep_ratio)])[0]
        return list(ranking.order), list(ranking.scores)

    def rerank_batch(self, queries: Sequence[str], candidates: Sequence[Sequence[CandidateLike]], top_n: int | None = None,
                     importance: Sequence[MapsLike] | None = None) -> list[list[RerankResult]]:
        """Several queries at once: their windows of the same sliding step run together (window_batch per forward)."""
        top_n = check_top_n(top_n)
        if len(queries) != len(candidates):
            raise ConfigError(f"{len(queries)} queries for {len(candidates)} candidate lists")
        importance = [None] * len(queries) if importance is None else list(importance)
        lists = []
        for query, items, imp in zip(queries, candidates, importance):
            q, cands, keep = self.prepare(query, items, imp)
            lists.append(_Candidates(q, cands, keep))
        out = []
        for c, ranking in zip(lists, self._rank_lists(lists)):
            out.append([result(c.cands[i], i, ranking.scores[i], r + 1) for r, i in enumerate(ranking.order[:top_n])])
        return out

    # --- internals --------------------------------------------------------------------------------------
    def _rank_lists(self, lists: list[_Candidates]) -> list[Ranking]:
        with torch.inference_mode():
            for c in lists:
                if not c.cands:
                    raise EmptyCandidatesError("rerank() needs at least one candidate page")
                self._prepare_pages(c)

            def score_windows(windows: list[Window]) -> list[torch.Tensor]:
                out = []
                for s in range(0, len(windows), self.config.window_batch):
                    chunk = windows[s : s + self.config.window_batch]
                    logits = self._window_logits([lists[w.list_index] for w in chunk], chunk)
                    out += [row[: len(w.items)].cpu() for row, w in zip(logits, chunk)]
                return out

            return sliding_rerank([len(c.cands) for c in lists], score_windows, self.config.window, self.config.stride)

    def _prepare_pages(self, c: _Candidates) -> None:
        if self.config.mode == "cached":
            c.kvs = self.pages.kv([x.page for x in c.cands])
            c.rows = [kept_rows(kv, imp, c.keep_ratio) for kv, imp in zip(c.kvs, c.importance)]
            return
        c.feats, c.grid_thw = encode_pages(self.adapter, self.processor.image_processor,
                                           [x.page.image() for x in c.cands], self.config.image_batch)

    def _window_logits(self, lists: list[_Candidates], windows: list[Window]) -> torch.Tensor:
        cfg, a = self.config, self.adapter
        if cfg.mode == "cached":
            batch = [cached_window(self.tokenizer, self.template, cfg.labels, self.answer_id, c.query,
                                   [c.kvs[i] for i in w.items], [c.rows[i] for i in w.items]) for c, w in zip(lists, windows)]
            return cached_logits(a, self.pages.prefix_kv(cfg.exit_layer), batch, cfg.exit_layer, cfg.band, self.head,
                                 cfg.readout)
        seqs = []
        for c, w in zip(lists, windows):
            items = list(w.items)
            imps = c.importance if cfg.prune_by == "maps" else [None] * len(c.cands)  # "qiei": maps ignored
            seqs.append(window_sequence(a, self.tokenizer, self.template, cfg.labels, self.answer_id, c.query,
                                        [c.feats[i] for i in items], c.grid_thw[items], c.keep_ratio, [imps[i] for i in items]))
        return single_pass_logits(a, seqs, self.head, cfg.readout)


def default_listwise_path(mode: str | None = None) -> str | None:
    """The listwise model shipped in the package for `mode` when it is installed (for "single_pass" the single-pass
    model, else the cached-layout one), else None (the default point-wise model)."""
    from ...defaults import DEFAULT_LISTWISE_DIR, DEFAULT_LISTWISE_SINGLE_PASS_DIR

    if mode == "single_pass" and (DEFAULT_LISTWISE_SINGLE_PASS_DIR / "config.json").is_file():
        return str(DEFAULT_LISTWISE_SINGLE_PASS_DIR)

    return str(DEFAULT_LISTWISE_DIR) if (DEFAULT_LISTWISE_DIR / "config.json").is_file() else None
