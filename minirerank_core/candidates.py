"""The first stage → reranker handoff types: an importance map that carries its grid, and a candidate page.

The first stage (``retrieval.FirstStage``) produces Candidates; every reranker consumes them. A candidate's maps
are on the *reranker's* visual-token grid, so the reranker uses them as they are. A map is validated once, where
it is made or received: finite values, and a 2-D shape equal to the page's grid (a flat sequence is accepted
only with exactly ``h * w`` values, read row-major).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InvalidImportanceError
from .pages import Page, as_pages

Grid = tuple[int, int]


@dataclass(frozen=True, eq=False)
class ImportanceMap:
    """Importance of each visual token of one page on a reranker's grid: ``values`` (h, w), float32, finite.
    Higher means keep. Row-major, like the visual tokens."""

    values: torch.Tensor

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.values).detach().to("cpu", torch.float32)
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
            raise InvalidImportanceError(f"an importance map must be 2-D (h, w), got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise InvalidImportanceError("an importance map must be finite (it contains NaN or inf)")
        object.__setattr__(self, "values", v.contiguous())

    @property
    def grid(self) -> Grid:
        return int(self.values.shape[0]), int(self.values.shape[1])

    def flat(self) -> torch.Tensor:
        """(h * w,) row-major."""
        return self.values.reshape(-1)

    @classmethod
    def coerce(cls, value: Any, grid: Grid, *, page: str = "page") -> ImportanceMap:
        """``value`` as a map on ``grid``: an ImportanceMap or 2-D array of exactly that shape, or a flat
        sequence of exactly ``h * w`` values. Anything else raises InvalidImportanceError naming ``page``."""
        h, w = int(grid[0]), int(grid[1])
        if isinstance(value, ImportanceMap):
            if value.grid != (h, w):
                raise InvalidImportanceError(f"{page}: importance map is {value.grid[0]}x{value.grid[1]} but the "
                                             f"reranker's visual grid of this page is {h}x{w}")
            return value
        if isinstance(value, torch.Tensor):
            arr = value.detach().to("cpu", torch.float32)
        else:
            try:
                arr = torch.from_numpy(np.asarray(value, dtype=np.float32))
            except (TypeError, ValueError) as exc:
                raise InvalidImportanceError(f"{page}: importance map is not numeric ({exc})") from None
        if arr.ndim == 1:
            if arr.numel() != h * w:
                raise InvalidImportanceError(f"{page}: a flat importance map needs {h * w} values ({h}x{w} grid), "
                                             f"got {arr.numel()}")
            arr = arr.reshape(h, w)
        elif arr.ndim != 2 or tuple(arr.shape) != (h, w):
            raise InvalidImportanceError(f"{page}: importance map has shape {tuple(arr.shape)} but the reranker's "
                                         f"visual grid of this page is ({h}, {w})")
        try:
            return cls(arr)
        except InvalidImportanceError as exc:
            raise InvalidImportanceError(f"{page}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """``{"grid": [h, w], "values": [...]}`` (exact float32 values as Python floats)."""
        return {"grid": list(self.grid), "values": [float(x) for x in self.flat().tolist()]}

    @classmethod
    def from_json(cls, obj: Any, *, page: str = "page") -> ImportanceMap:
        if isinstance(obj, ImportanceMap):
            return obj
        if not isinstance(obj, Mapping) or "grid" not in obj or "values" not in obj:
            raise InvalidImportanceError(f"{page}: expected an importance map {{'grid': [h, w], 'values': [...]}}, "
                                         f"got {type(obj).__name__}")
        grid = obj["grid"]
        if not isinstance(grid, Sequence) or len(grid) != 2:
            raise InvalidImportanceError(f"{page}: importance map grid must be [h, w], got {grid!r}")
        return cls.coerce(obj["values"], (int(grid[0]), int(grid[1])), page=page)


@dataclass
class Candidate:
    """One page to rerank, with what the first stage knows of it.

    importance: the query's map on the reranker's grid (query-time pruning); index_importance: the page's
    query-independent map (index-time pruning, needed when the reranker's ``index_keep_ratio < 1``).
    """

    page: Page
    first_stage_score: float | None = None
    first_stage_rank: int | None = None
    importance: ImportanceMap | None = None
    index_importance: ImportanceMap | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def page_id(self) -> str:
        return self.page.id


CandidateLike = Candidate | Page | Any
MapsLike = Sequence[Any] | Mapping[str, Any] | None


def as_candidates(items: Sequence[CandidateLike], importance: MapsLike = None,
                  index_importance: MapsLike = None) -> list[Candidate]:
    """Candidates from pages, page-likes (path, bytes, base64, PIL) or Candidates; ``importance`` /
    ``index_importance`` (aligned with ``items``, or a mapping by page id) fill in the maps a candidate lacks.
    Maps are checked against the grid later, by the reranker (it knows the grid)."""
    cands = []
    pages = as_pages([c.page if isinstance(c, Candidate) else c for c in items])
    for item, page in zip(items, pages):
        cands.append(Candidate(page=page) if not isinstance(item, Candidate) else item)
    for attr, maps in (("importance", importance), ("index_importance", index_importance)):
        if maps is None:
            continue
        if isinstance(maps, Mapping):
            values = [maps.get(c.page_id) for c in cands]
        else:
            values = list(maps)
            if len(values) != len(cands):
                raise InvalidImportanceError(f"{attr} has {len(values)} maps for {len(cands)} pages")
        cands = [c if v is None or getattr(c, attr) is not None else _with(c, attr, v) for c, v in zip(cands, values)]
    return cands


def _with(c: Candidate, attr: str, value: Any) -> Candidate:
    return Candidate(**{**c.__dict__, attr: value})


__all__ = ["Candidate", "CandidateLike", "Grid", "ImportanceMap", "MapsLike", "as_candidates"]
