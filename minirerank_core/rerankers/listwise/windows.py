"""Sliding windows (RankGPT / rank_llm, as ZipRerank uses them) and the merge into one ranking with scores.

A list longer than the window is ranked by windows of `window` candidates, from the back of the current order
to the front, each `stride` earlier than the last: 45 candidates, window 20, stride 10 → [25, 45), [15, 35),
[5, 25), [0, 15). Each window is reordered by its label logits (stable: ties keep the current order); its top
`window - stride` pages are carried into the next window, so relevant pages bubble up from the back, and the top
of the list is settled by the last window. Windows of one list depend on each other and run in sequence; windows of different
lists (rerank_batch) are independent and are scored together.

Scores. After the pass, the final order splits into runs of pages whose last window was the same; each run is
sorted by that window's logits. A page's score is its logit in its last window, shifted per run (back to front)
by the least amount that puts the run above every page behind it. So scores are the real logits within a run,
never increase along the final order, and sorting by score gives the final order back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_GAP = 1e-3  # strict margin between consecutive runs


@dataclass(frozen=True)
class Window:
    list_index: int  # which list (query) of the batch
    items: tuple[int, ...]  # candidate indices of that list, in prompt (label) order


@dataclass
class Ranking:
    order: list[int]  # candidate indices, best first
    scores: list[float]  # per candidate index (aligned with the input list), non-increasing along `order`


WindowScorer = Callable[[list[Window]], list[torch.Tensor]]  # logits aligned with each window's items


def window_schedule(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of each window, back to front; the last one starts at 0."""
    spans, end = [], n
    while True:
        start = max(0, end - window)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= stride


def sliding_rerank(sizes: list[int], score_windows: WindowScorer, window: int, stride: int) -> list[Ranking]:
    """Rank lists of `sizes[k]` candidates; step s scores the s-th window of every list that has one in one call."""
    orders = [list(range(n)) for n in sizes]
    logit = [[0.0] * n for n in sizes]  # logit of each candidate in its latest window
    last = [[-1] * n for n in sizes]  # step of that window
    schedules = [window_schedule(n, window, stride) for n in sizes]
    for step in range(max(len(s) for s in schedules)):
        jobs = [(k, *s[step]) for k, s in enumerate(schedules) if step < len(s)]
        windows = [Window(k, tuple(orders[k][a:b])) for k, a, b in jobs]
        for (k, a, b), w, lg in zip(jobs, windows, score_windows(windows)):
            lg = [float(x) for x in lg]
            if len(lg) != len(w.items):
                raise ValueError(f"window scorer returned {len(lg)} logits for {len(w.items)} candidates")
            orders[k][a:b] = [w.items[j] for j in sorted(range(len(lg)), key=lambda j: -lg[j])]
            for c, x in zip(w.items, lg):
                logit[k][c], last[k][c] = x, step
    return [Ranking(o, merged_scores(o, lg, st)) for o, lg, st in zip(orders, logit, last)]


def merged_scores(order: list[int], logit: list[float], last: list[int]) -> list[float]:
    """Per-candidate scores, monotone with `order` (see the module docstring)."""
    scores = [0.0] * len(order)
    ceiling, end = -math.inf, len(order)
    while end > 0:
        start = end - 1
        while start > 0 and last[order[start - 1]] == last[order[end - 1]]:
            start -= 1
        run = order[start:end]
        shift = max(0.0, ceiling + _GAP - min(logit[c] for c in run))
        for c in run:
            scores[c] = logit[c] + shift
        ceiling = max(ceiling, max(scores[c] for c in run))
        end = start
    return scores
