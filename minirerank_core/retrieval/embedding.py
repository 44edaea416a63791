"""PageEmbedding: one page's multi-vector embedding plus where its image patches sit."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class PageEmbedding:
    """All output vectors of one page, and which of them are image patches on which grid.

    vectors: (N, D) float32 -- every row the model's MaxSim uses (prompt tokens included, padding excluded),
        as the model emits them (L2-normalised for colpali models).
    patch_rows: (h*w,) int64 -- ``vectors[patch_rows[i * w + j]]`` is the patch at grid row i, column j.
    grid: (h, w) patch grid of the page (for ColQwen: the merged grid, ``image_grid_thw[1:] // merge``).
    content_hash: sha256 hex of the page image, when known (duplicate detection in the index).
    metadata: JSON-serialisable page metadata (source file, page number, ...).
    """

    page_id: str
    vectors: torch.Tensor
    patch_rows: torch.Tensor
    grid: tuple[int, int]
    content_hash: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.page_id, str) or not self.page_id:
            raise ValueError(f"page_id must be a non-empty str, got {self.page_id!r}")
        v = torch.as_tensor(self.vectors)
        if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
            raise ValueError(f"page {self.page_id!r}: vectors must be a non-empty (N, D) tensor, got {tuple(v.shape)}")
        v = v.detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(v).all():
            raise ValueError(f"page {self.page_id!r}: vectors contain NaN or inf")
        rows = torch.as_tensor(self.patch_rows).detach().to("cpu", torch.int64).reshape(-1)
        h, w = (int(x) for x in self.grid)
        if h < 0 or w < 0 or h * w != rows.numel():
            raise ValueError(f"page {self.page_id!r}: grid {self.grid} does not match {rows.numel()} patch rows")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= v.shape[0]):
            raise ValueError(f"page {self.page_id!r}: patch_rows out of range for {v.shape[0]} vectors")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"page {self.page_id!r}: metadata must be a dict, got {type(self.metadata).__name__}")
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"page {self.page_id!r}: metadata must be JSON-serialisable ({exc})") from exc
        self.vectors, self.patch_rows, self.grid = v, rows, (h, w)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def patch_vectors(self) -> torch.Tensor:
        """(h, w, D) image-patch vectors laid out on the page grid."""
        h, w = self.grid
        return self.vectors[self.patch_rows].reshape(h, w, self.dim)
