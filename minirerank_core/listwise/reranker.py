"""ListwiseReranker: ZipRerank-style listwise page reranking on the same core as MiniReranker.

    reranker = ListwiseReranker(model, processor)                        # ZipRerank single pass
    reranker = ListwiseReranker(model, processor, ListwiseConfig(mode="cached", exit_layer=16, band=(8, 12)))
    results = reranker.rerank("query", pages, top_n=5)                   # same call and results as MiniReranker
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.families import VisualFeatures, adapter_for
from ..engine.kv import PageKV
from ..engine.prompt import PromptTemplate
from ..engine.scorer import kept_rows
from ..errors import ConfigError, EmptyCandidatesError
from ..pages import Page, as_pages
from ..reranker import Importance, MiniReranker, PageInput, RerankResult, check_query, check_top_n, importance_list
from .cached import CachedWindow, cached_logits
from .config import ListwiseConfig
from .prompt import DEFAULT_LISTWISE_TEMPLATE, LabelHead, ListwiseTemplate, cached_query, single_pass_prompt, single_token_ids
from .single_pass import encode_pages, pruned_sequence, single_pass_logits
from .windows import Ranking, Window, sliding_rerank


@dataclass
class _Candidates:
    """One query's candidates, prepared once for all of its windows."""

    query: str
    pages: list[Page]
    importance: list[torch.Tensor | None]
    feats: list[VisualFeatures] | None = None  # single_pass: vision tower output per page
    grid_thw: torch.Tensor | None = None
    kvs: list[PageKV] | None = None  # cached: page band KV
    rows: list[torch.Tensor] | None = None  # cached: rows of each page the query may see


class ListwiseReranker:
    """Listwise MLLM page reranker: one forward pass scores a window of up to 20 labelled pages."""

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
    ):
        self.config = (config or ListwiseConfig()).resolve(adapter_for(model).num_layers)
        # The page side is the point-wise reranker's: adapter, pixel budget, page prefill and KV cache stores.
        # Its prefix is the listwise prefix P; its yes/no head is never used (Identity skips the label check).
        self.core = MiniReranker(
            model, processor, self.config.page_config(), template=PromptTemplate(prefix=template.prefix, query="{query}"),
            head=torch.nn.Identity(), cache_dir=cache_dir, memory_cache_bytes=memory_cache_bytes,
            max_visual_tokens=max_visual_tokens,
        )
        self.adapter = self.core.adapter
        self.model, self.processor, self.tokenizer = self.core.model, processor, processor.tokenizer
        self.template = template
        self.head = LabelHead(self.model.lm_head, single_token_ids(self.tokenizer, self.config.labels, "labels"))
        self.answer_id = single_token_ids(self.tokenizer, [template.answer], "the answer prefix")[0]

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path | None = None, config: ListwiseConfig | None = None,
                        *, local_files_only: bool | None = None, **kwargs) -> "ListwiseReranker":
        """Load a Qwen3-VL / Qwen2-VL checkpoint (by path, hub id, or the installed default) like MiniReranker."""
        config = config or ListwiseConfig()
        core = MiniReranker.from_pretrained(path_or_id, config.page_config(), local_files_only=local_files_only,
                                            head=torch.nn.Identity())
        return cls(core.model, core.processor, config, **kwargs)

    # --- public API (same calls and results as MiniReranker) -----------------------------------------
    def score(self, query: str, pages: Sequence[PageInput], importance: Importance = None) -> list[float]:
        """Scores aligned with `pages`: label logits, shifted per window run so they never increase along the
        final ranking (equal to the raw label logits when all pages fit in one window)."""
        return self._rank([query], [pages], [importance])[0][1].scores

    def rerank(self, query: str, pages: Sequence[PageInput], top_n: int | None = None,
               importance: Importance = None) -> list[RerankResult]:
        """Pages in the listwise order (best first), at most `top_n` of them."""
        return self.rerank_batch([query], [pages], top_n, [importance])[0]

    def rerank_batch(self, queries: Sequence[str], candidates: Sequence[Sequence[PageInput]], top_n: int | None = None,
                     importance: Sequence[Importance] | None = None) -> list[list[RerankResult]]:
        """Several queries at once: their windows of the same sliding step run together (window_batch per forward)."""
        check_top_n(top_n)
        out = []
        for pages, ranking in self._rank(queries, candidates, importance):
            out.append([RerankResult(pages[i].id, ranking.scores[i], r + 1, i, pages[i])
                        for r, i in enumerate(ranking.order[:top_n])])
        return out

    def index(self, pages: Sequence[PageInput], importance: Importance = None, *, show_progress: bool = False) -> list[PageKV]:
        """Cached mode: prefill (or load) every page's band KV ahead of queries (as MiniReranker.index; the
        listwise page cache is never pruned at index time, so `importance` changes nothing here)."""
        if self.config.mode != "cached":
            raise ConfigError("index() builds the page cache of mode='cached'; single_pass has no page cache")
        return self.core.index(pages, importance, show_progress=show_progress)

    def visual_grid(self, page: PageInput) -> tuple[int, int]:
        return self.core.visual_grid(page)

    @property
    def pixel_budget(self):
        return self.core.pixel_budget

    # --- internals --------------------------------------------------------------------------------------
    def _rank(self, queries, candidates, importance) -> list[tuple[list[Page], Ranking]]:
        if len(queries) != len(candidates):
            raise ValueError(f"{len(queries)} queries for {len(candidates)} candidate lists")
        importance = [None] * len(queries) if importance is None else list(importance)
        lists = []
        for query, pages, imp in zip(queries, candidates, importance):
            query = check_query(query)
            pages = as_pages(pages)
            if not pages:
                raise EmptyCandidatesError("rerank() needs at least one candidate page")
            lists.append(_Candidates(query, pages, importance_list(pages, imp)))
        with torch.inference_mode():
            for c in lists:
                self._prepare(c)

            def score_windows(windows: list[Window]) -> list[torch.Tensor]:
                out = []
                for s in range(0, len(windows), self.config.window_batch):
                    chunk = windows[s : s + self.config.window_batch]
                    logits = self._window_logits([lists[w.list_index] for w in chunk], chunk)
                    out += [row[: len(w.items)].cpu() for row, w in zip(logits, chunk)]
                return out

            rankings = sliding_rerank([len(c.pages) for c in lists], score_windows, self.config.window, self.config.stride)
        return [(c.pages, r) for c, r in zip(lists, rankings)]

    def _prepare(self, c: _Candidates) -> None:
        cfg = self.config
        if cfg.mode == "cached":
            if cfg.keep_ratio < 1.0 and any(i is None for i in c.importance):
                raise ConfigError("mode='cached' with keep_ratio < 1 prunes with the first stage's importance maps: "
                                  "pass importance=... for every page, or set keep_ratio=1.0")
            c.kvs = self.core.index(c.pages)
            c.rows = [kept_rows(kv, imp, cfg.keep_ratio) for kv, imp in zip(c.kvs, c.importance)]
            return
        c.feats, c.grid_thw = encode_pages(self.adapter, self.processor.image_processor, [p.image() for p in c.pages], cfg.image_batch)

    def _window_logits(self, lists: list[_Candidates], windows: list[Window]) -> torch.Tensor:
        cfg, a = self.config, self.adapter
        if cfg.mode == "cached":
            batch = [CachedWindow(cached_query(self.tokenizer, self.template, c.query, cfg.labels[: len(w.items)], self.answer_id),
                                  [c.kvs[i] for i in w.items], [c.rows[i] for i in w.items]) for c, w in zip(lists, windows)]
            return cached_logits(a, self.core.prefix_cache, batch, cfg.exit_layer, cfg.band, self.head)
        seqs = []
        for c, w in zip(lists, windows):
            items = list(w.items)
            prompt = single_pass_prompt(self.tokenizer, self.template, c.query, cfg.labels[: len(items)], c.grid_thw[items],
                                        a.merge_size, self.answer_id, a.image_token_id)
            seqs.append(pruned_sequence(a, prompt, [c.feats[i] for i in items], cfg.keep_ratio, [c.importance[i] for i in items]))
        return single_pass_logits(a, seqs, self.head)
