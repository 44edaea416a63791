"""Exact late-interaction (MaxSim): the one definition of the first stage's score.

score(q, page) = sum over query tokens t of max over the page's vectors v of <q_t, v> -- the same quantity
colpali-engine's ``score_multi_vector`` computes. Not divided by the query length: a query's ranking does not
depend on it, and raw sums stay comparable with colpali's tools. Two kernels compute it: ``maxsim_scores`` over the
index's unpadded, concatenated vectors (numpy, chunked, memory-mapped) and ``maxsim_padded`` over padded batches
(torch, differentiable: the embedder's training, whose contrastive loss divides by the query length as a
per-query temperature, see train/embedder.py).
"""

from __future__ import annotations

import numpy as np
import torch

# Rows of page vectors scored per matmul: bounds the (Tq, rows) similarity block to a few tens of MB.
_CHUNK_ROWS = 1 << 17


def maxsim_scores(query: np.ndarray, vectors: np.ndarray, offsets: np.ndarray, *, chunk_rows: int = _CHUNK_ROWS) -> np.ndarray:
    """MaxSim score of ``query`` (Tq, D) against every page; page i owns ``vectors[offsets[i]:offsets[i+1]]``.

    ``offsets`` is non-decreasing with ``offsets[0] == 0`` relative to ``vectors`` and no empty page. ``vectors``
    may be a read-only memmap: it is read once, in chunks of whole pages.
    """
    n_pages = len(offsets) - 1
    out = np.empty(n_pages, dtype=np.float32)
    p = 0
    while p < n_pages:
        # Pages [p, q): as many whole pages as fit in chunk_rows, at least one.
        q = int(np.searchsorted(offsets, offsets[p] + chunk_rows, side="right")) - 1
        q = min(max(q, p + 1), n_pages)
        lo, hi = int(offsets[p]), int(offsets[q])
        sims = query @ np.asarray(vectors[lo:hi], dtype=np.float32).T  # (Tq, rows)
        out[p:q] = np.maximum.reduceat(sims, offsets[p:q] - lo, axis=1).sum(axis=0)
        p = q
    return out


def maxsim_padded(q: torch.Tensor, qmask: torch.Tensor, d: torch.Tensor, dmask: torch.Tensor) -> torch.Tensor:
    """(Bq, Bd) MaxSim of padded batches: q (Bq, Tq, D) with qmask (Bq, Tq), d (Bd, S, D) with dmask (Bd, S)."""
    sims = torch.einsum("qtd,psd->qpts", q.float(), d.float())
    sims = sims.masked_fill(~dmask[None, :, None, :], float("-inf")).max(-1).values  # (Bq, Bd, Tq)
    return (sims * qmask[:, None, :]).nan_to_num(0.0, neginf=0.0).sum(-1)


def gather_pages(rows_of: np.ndarray, offsets: np.ndarray, pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``pages`` (sorted page numbers) of a per-page concatenated array, with their own offsets."""
    starts = offsets[pages]
    lengths = offsets[pages + 1] - starts
    sub_offsets = np.zeros(len(pages) + 1, dtype=np.int64)
    np.cumsum(lengths, out=sub_offsets[1:])
    # Row r of the output comes from starts[page(r)] + (r - sub_offsets[page(r)]).
    rows = np.repeat(starts - sub_offsets[:-1], lengths) + np.arange(sub_offsets[-1], dtype=np.int64)
    return np.asarray(rows_of[rows]), sub_offsets


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first; ties keep the lower index first (deterministic)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k < len(scores):
        part = np.argpartition(-scores, k - 1)[:k]
        # argpartition is not stable: pull in every index tied with the k-th score before ordering.
        kth = scores[part].min()
        part = np.flatnonzero(scores >= kth)
    else:
        part = np.arange(len(scores))
    order = np.lexsort((part, -scores[part]))
    return part[order][:k]
