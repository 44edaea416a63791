"""What every reranker is: the one interface the pipeline, integrations, CLI and server program against.

A reranker owns a :class:`PageSide` (the page half: model, pixel budget, visual grid, page KV cache) and ranks
:class:`Candidate` pages for a query. Subclasses say how they prune (``pruning``), how they prepare pages ahead
of queries (``index``) and how they rank (``_rank``); checking the query, the candidates and their maps, the
unpruned fallback and building results happen here, once.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..candidates import Candidate, CandidateLike, ImportanceMap, MapsLike, as_candidates
from ..errors import ConfigError, EmptyCandidatesError, InvalidQueryError, QueryTruncatedWarning, UnprunedWarning
from ..pages import Page, PixelBudget
from ..validation import check_choice, check_query, check_ratio, check_top_n
from .page_side import PageSide

logger = logging.getLogger("minirerank")

MissingMaps = Literal["raise", "unpruned"]
DEFAULT_MAX_QUERY_TOKENS = 512
_CHARS_PER_TOKEN = 64  # no tokenizer maps more characters than this to one token


@dataclass
class RerankResult:
    """One reranked page. ``index``: its position in the candidates given; the first stage's score, rank and
    metadata when the candidate came from it; the maps the reranker pruned with (None: no pruning map)."""

    page_id: str
    score: float
    rank: int
    index: int
    page: Page | None = field(default=None, repr=False)
    first_stage_score: float | None = None
    first_stage_rank: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)
    importance: ImportanceMap | None = field(default=None, repr=False)
    index_importance: ImportanceMap | None = field(default=None, repr=False)

    @property
    def probability(self) -> float:
        """sigmoid(score): P(positive label) against the negative one for a yes/no head."""
        s = self.score
        return 1.0 / (1.0 + math.exp(-s)) if s > -700 else 0.0


@dataclass(frozen=True)
class Pruning:
    """How a reranker prunes visual tokens. ``keep_ratio``: at query time, by the query's map;
    ``index_keep_ratio``: before the page prefill, by the page's query-independent map; ``needs_maps``: whether
    query-time pruning requires the first stage's maps (listwise single pass falls back to QI-EI)."""

    keep_ratio: float = 1.0
    index_keep_ratio: float = 1.0
    needs_maps: bool = False

    @property
    def prunes_at_query_time(self) -> bool:
        return self.keep_ratio < 1.0

    @property
    def prunes_at_index_time(self) -> bool:
        return self.index_keep_ratio < 1.0


class Reranker(ABC):
    """Ranks candidate pages for a query; ``rerank`` and ``score`` take pages, page-likes or Candidates."""

    kind: ClassVar[str]
    pages: PageSide
    config: Any  # RerankConfig or ListwiseConfig: device, dtype, max_query_tokens, query_overflow, ...

    # --- the model's pieces, held by the page side ----------------------------------------------------
    @property
    def model(self) -> Any:
        return self.pages.model

    @property
    def processor(self) -> Any:
        return self.pages.processor

    @property
    def tokenizer(self) -> Any:
        return self.pages.tokenizer

    @property
    def adapter(self) -> Any:
        return self.pages.adapter

    @property
    def store(self) -> Any:
        return self.pages.store

    @property
    def fingerprint(self) -> str:
        return self.pages.fingerprint

    @property
    def max_visual_tokens(self) -> int:
        return self.pages.max_visual_tokens

    @property
    def name(self) -> str:
        """The checkpoint this reranker was loaded from (for events and traces)."""
        return self.pages.name

    @property
    def pixel_budget(self) -> PixelBudget:
        return self.pages.pixel_budget

    def visual_grid(self, page: CandidateLike) -> tuple[int, int]:
        """The merged visual-token grid (h, w) of ``page`` in this model (visual tokens are row-major)."""
        return self.pages.visual_grid(page.page if isinstance(page, Candidate) else page)

    @property
    @abstractmethod
    def pruning(self) -> Pruning: ...

    @abstractmethod
    def index(self, pages: Sequence[CandidateLike], importance: MapsLike = None, *, show_progress: bool = False) -> Any:
        """Prepare pages ahead of queries: fill the page cache (returning the pages' KV), or nothing for a reranker
        without one. ``importance``: query-independent maps (or Candidates' ``index_importance``), needed for
        index-time pruning."""

    @abstractmethod
    def _rank(self, query: str, cands: list[Candidate], keep_ratio: float) -> tuple[list[int], list[float]]:
        """(positions best first, scores aligned with ``cands``); maps are already on the grid."""

    # --- the public calls ---------------------------------------------------------------------------
    def score(self, query: str, candidates: Sequence[CandidateLike], importance: MapsLike = None, *,
              keep_ratio: float | None = None, missing_maps: MissingMaps = "raise") -> list[float]:
        """Scores aligned with ``candidates``. ``importance``: the query's maps (aligned, or by page id) for
        candidates that carry none. ``keep_ratio`` overrides the query-time keep ratio for this call.
        ``missing_maps="unpruned"``: with no map at all, attend to every visual token (UnprunedWarning)."""
        query, cands, keep = self.prepare(query, candidates, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)
        return self._rank(query, cands, keep)[1]

    def rerank(self, query: str, candidates: Sequence[CandidateLike], top_n: int | None = None,
               importance: MapsLike = None, *, keep_ratio: float | None = None,
               missing_maps: MissingMaps = "raise") -> list[RerankResult]:
        """The candidates best first, at most ``top_n`` (arguments as in :meth:`score`)."""
        top_n = check_top_n(top_n)
        query, cands, keep = self.prepare(query, candidates, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)
        order, scores = self._rank(query, cands, keep)
        return [result(cands[i], i, scores[i], r + 1) for r, i in enumerate(order[:top_n])]

    # --- shared checks ----------------------------------------------------------------------------
    @property
    def query_token_limit(self) -> int:
        """The longest query accepted, in tokens: ``config.max_query_tokens``, else min(512, 1/8 of the
        model's context). Checked before anything is allocated for the query."""
        limit = self.config.max_query_tokens
        if limit is None:
            context = getattr(self.pages.adapter.text_model.config, "max_position_embeddings", None) or 4096
            limit = max(1, min(DEFAULT_MAX_QUERY_TOKENS, int(context) // 8))
        return int(limit)

    def check_query(self, query: Any) -> str:
        """A usable query: a non-blank string of at most ``query_token_limit`` tokens. A longer one raises
        InvalidQueryError, or with ``config.query_overflow="truncate"`` is cut to the limit with a
        QueryTruncatedWarning."""
        query = check_query(query)
        limit, truncate = self.query_token_limit, self.config.query_overflow == "truncate"
        if len(query) > _CHARS_PER_TOKEN * limit:  # refused or cut before tokenising megabytes of text
            if not truncate:
                raise InvalidQueryError(
                    f"query is {len(query):,} characters, far over the limit of {limit} tokens (max_query_tokens); "
                    "shorten it, or set query_overflow='truncate'")
            query = query[: _CHARS_PER_TOKEN * limit]
        ids = self.pages.tokenizer(query, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            if not truncate:
                raise InvalidQueryError(f"query is {len(ids)} tokens, over the limit of {limit} (max_query_tokens); "
                                        "shorten it, or set query_overflow='truncate'")
            query = self.pages.tokenizer.decode(ids[:limit])
            warnings.warn(f"minirerank: the query was {len(ids)} tokens; cut to the first {limit} (max_query_tokens)",
                          QueryTruncatedWarning, stacklevel=3)
        return query

    def prepare(self, query: Any, candidates: Sequence[CandidateLike], importance: MapsLike = None, *,
                keep_ratio: float | None = None, missing_maps: MissingMaps = "raise") -> tuple[str, list[Candidate], float]:
        """Checked query, candidates with their maps on this reranker's grid, and the keep ratio to run with."""
        query = self.check_query(query)
        check_choice("missing_maps", missing_maps, ("raise", "unpruned"))
        cands = as_candidates(candidates, importance)
        if not cands:
            raise EmptyCandidatesError("rerank() needs at least one candidate page")
        cands = [self._on_grid(c) for c in cands]
        if self.pruning.prunes_at_index_time:  # the cache key needs each page's index-time map: no fallback
            lacking = [c.page_id for c in cands if c.index_importance is None and not self.pages.knows_index_map(c.page)]
            if lacking:
                raise ConfigError(
                    f"index_keep_ratio={self.pruning.index_keep_ratio:g} prunes pages before the prefill with a "
                    f"query-independent map, but {len(lacking)} candidates have none (e.g. {lacking[0]!r}); get them "
                    "from FirstStage.candidates / RerankPipeline / the minirerank retrievers, or index the pages first"
                )
        keep = self.pruning.keep_ratio if keep_ratio is None else check_ratio("keep_ratio", keep_ratio)
        if keep < 1.0 and self.pruning.needs_maps:
            missing = [c.page_id for c in cands if c.importance is None]
            if missing and len(missing) == len(cands) and missing_maps == "unpruned":
                msg = (f"minirerank: the reranker prunes visual tokens (keep_ratio={keep:g}) with the first stage's "
                       "importance maps, but no candidate carries one: every visual token is used")
                warnings.warn(msg, UnprunedWarning, stacklevel=3)
                logger.info(msg)
                keep = 1.0
            elif missing:
                raise ConfigError(
                    f"keep_ratio={keep:g} prunes with the first stage's importance maps, but {len(missing)} of "
                    f"{len(cands)} candidates have none (e.g. {missing[0]!r}); pass importance=... for every page "
                    "(FirstStage.candidates and RerankPipeline do this), or set keep_ratio=1.0"
                )
        return query, cands, keep

    def _on_grid(self, c: Candidate) -> Candidate:
        if c.importance is None and c.index_importance is None:
            return c
        grid = self.visual_grid(c.page)
        maps = {name: None if m is None else ImportanceMap.coerce(m, grid, page=f"page {c.page_id!r}")
                for name, m in (("importance", c.importance), ("index_importance", c.index_importance))}
        return Candidate(c.page, c.first_stage_score, c.first_stage_rank, maps["importance"], maps["index_importance"],
                         c.metadata)


def result(c: Candidate, index: int, score: float, rank: int) -> RerankResult:
    return RerankResult(c.page_id, float(score), rank, index, c.page, c.first_stage_score, c.first_stage_rank,
                        dict(c.metadata), c.importance, c.index_importance)


__all__ = ["MissingMaps", "Pruning", "RerankResult", "Reranker", "result"]
