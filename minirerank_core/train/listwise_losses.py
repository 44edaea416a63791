"""Training losses of the listwise reranker (ZipRerank): scores are the label logits of one window, (B, n).

Stage 1, RankNet: for every ordered pair (i, j) with relevance_i > relevance_j,

    loss_ij = log(1 + exp(-(s_i - s_j)))          (binary cross-entropy of σ(s_i - s_j) against 1)
    weighted: w_ij = 1 / (r_i + r_j),  r = 1-based rank of the candidate when sorted by relevance
              (descending; ties by position), so pairs near the top count more
    loss = mean over all such pairs of the batch of w_ij · loss_ij   (w = 1 unweighted)

Stage 2, soft-ranking distillation: the target ranking puts the ground-truth positives first (in the given
order), then the other candidates in the teacher's order; the candidate at position k gets weight decay^k
(0.5 by default), normalised to a distribution q; loss = −Σ_i q_i log softmax(s)_i, averaged over the batch.
Candidates named by neither get target 0. Padded candidates are excluded with `mask` (False = padding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _valid(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def ranknet_loss(scores: torch.Tensor, relevance: torch.Tensor, *, weighted: bool = True,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet over (B, n) scores and graded relevance (higher = more relevant)."""
    if scores.shape != relevance.shape or scores.dim() != 2:
        raise ValueError(f"scores and relevance must both be (B, n), got {tuple(scores.shape)} and {tuple(relevance.shape)}")
    valid = _valid(scores, mask)
    rel = relevance.to(scores.dtype)
    pairs = (rel[:, :, None] > rel[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, i, j): i above j
    if not pairs.any():
        return scores.sum() * 0.0  # nothing to order; keeps the graph
    diff = scores[:, :, None] - scores[:, None, :]
    loss = F.softplus(-diff)
    if weighted:
        # Rank by relevance, descending, ties by position (a stable sort); padding sorts last.
        key = torch.where(valid, rel, torch.full_like(rel, -torch.inf))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, rel.shape[1] + 1, device=rel.device).expand_as(order))
        loss = loss / (rank[:, :, None] + rank[:, None, :]).to(scores.dtype)
    return loss[pairs].mean()


def soft_ranking_loss(scores: torch.Tensor, teacher_order: Sequence[Sequence[int]], positives: Sequence[Sequence[int]],
                      *, decay: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of softmax(scores) against the position-decayed target built from positives + teacher order."""
    if scores.dim() != 2 or len(teacher_order) != scores.shape[0] or len(positives) != scores.shape[0]:
        raise ValueError("scores must be (B, n) with one teacher order and one positive list per row")
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    valid = _valid(scores, mask)
    losses = []
    for b in range(scores.shape[0]):
        ranking: list[int] = []
        for i in [*positives[b], *teacher_order[b]]:  # positives first, then the teacher's order; each once
            if valid[b, i] and i not in ranking:
                ranking.append(i)
        if not ranking:
            continue
        target = torch.zeros(scores.shape[1], dtype=scores.dtype, device=scores.device)
        target[ranking] = torch.tensor([decay**k for k in range(len(ranking))], dtype=scores.dtype, device=scores.device)
        target = target / target.sum()
        log_p = F.log_softmax(scores[b].masked_fill(~valid[b], -torch.inf), dim=0)
        losses.append(-(target[valid[b]] * log_p[valid[b]]).sum())
    if not losses:
        return scores.sum() * 0.0
    return torch.stack(losses).mean()
