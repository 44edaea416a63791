"""Ranking metrics for queries with one or more relevant pages (binary relevance)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    dcg = sum(1.0 / math.log2(i + 2) for i, pid in enumerate(ranked[:k]) if pid in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


def mrr(ranked: Sequence[str], relevant: set[str]) -> float:
    for i, pid in enumerate(ranked):
        if pid in relevant:
            return 1.0 / (i + 1)
    return 0.0


def summarize(rankings: Sequence[Sequence[str]], relevants: Sequence[set[str]]) -> dict[str, float]:
    n = max(1, len(rankings))
    return {
        "ndcg5": sum(ndcg_at(r, rel, 5) for r, rel in zip(rankings, relevants)) / n,
        "recall1": sum(recall_at(r, rel, 1) for r, rel in zip(rankings, relevants)) / n,
        "recall5": sum(recall_at(r, rel, 5) for r, rel in zip(rankings, relevants)) / n,
        "mrr": sum(mrr(r, rel) for r, rel in zip(rankings, relevants)) / n,
    }
