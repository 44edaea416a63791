"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, one latency histogram and the page
cache's gauges. One ``Metrics`` per app, so several apps in one process (tests) never share a registry."""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a cache hit on a small page (ms) to a cold batch of large pages on a CPU (tens of seconds)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


class Metrics:
    """Request counts by route, method and status; latency by route; documents reranked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._hist: dict[str, list[int]] = {}
        self._sum: dict[str, float] = defaultdict(float)
        self.documents = 0

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, str(status))] += 1
            counts = self._hist.setdefault(route, [0] * len(BUCKETS))
            for i, upper in enumerate(BUCKETS):
                if seconds <= upper:
                    counts[i] += 1  # cumulative, as Prometheus buckets are
            self._sum[route] += seconds

    def add_documents(self, n: int) -> None:
        with self._lock:
            self.documents += n

    def render(self, gauges: dict[str, tuple[str, str, float]]) -> str:
        """The exposition text; ``gauges``: name -> (type, help, value) read from the service at scrape time."""
        out: list[str] = []
        with self._lock:
            out += ["# HELP minirerank_requests_total HTTP requests answered, by route, method and status.",
                    "# TYPE minirerank_requests_total counter"]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'minirerank_requests_total{{route="{_label(route)}",method="{method}",status="{status}"}} {n}')
            out += ["# HELP minirerank_request_duration_seconds Time from request to response, by route.",
                    "# TYPE minirerank_request_duration_seconds histogram"]
            for route, counts in sorted(self._hist.items()):
                r = _label(route)
                for upper, n in zip(BUCKETS, counts):
                    out.append(f'minirerank_request_duration_seconds_bucket{{route="{r}",le="{_num(upper)}"}} {n}')
                out.append(f'minirerank_request_duration_seconds_sum{{route="{r}"}} {self._sum[route]!r}')
                out.append(f'minirerank_request_duration_seconds_count{{route="{r}"}} {counts[-1]}')
            out += ["# HELP minirerank_documents_total Documents (pages) reranked.",
                    "# TYPE minirerank_documents_total counter", f"minirerank_documents_total {self.documents}"]
        for name, (kind, help_text, value) in sorted(gauges.items()):
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
        return "\n".join(out) + "\n"


def cache_gauges(store: Any) -> dict[str, tuple[str, str, float]]:
    """Hits, misses and entries of a reranker's page store (a TieredStore: memory in front of an optional disk)."""
    memory = getattr(store, "memory", store)
    disk = getattr(store, "disk", None)
    mstats: dict[str, int] = dict(getattr(memory, "stats", {}) or {})
    dstats: dict[str, int] = dict(getattr(disk, "stats", {}) or {}) if disk is not None else {}
    out = {
        "minirerank_page_cache_hits_total": ("counter", "Page-KV lookups answered from memory or disk.",
                                             mstats.get("hits", 0) + dstats.get("hits", 0)),
        # a memory miss that the disk answers is a hit, not a miss: count the misses of the last tier asked
        "minirerank_page_cache_misses_total": ("counter", "Page-KV lookups that needed a page prefill.",
                                               dstats.get("misses", 0) if disk is not None else mstats.get("misses", 0)),
        "minirerank_page_cache_memory_pages": ("gauge", "Pages whose KV is held in memory.", len(memory)),
        "minirerank_page_cache_memory_bytes": ("gauge", "Bytes of page KV held in memory.",
                                               int(getattr(memory, "nbytes", 0) or 0)),
    }
    if disk is not None:
        out["minirerank_page_cache_disk_writes_total"] = ("counter", "Page-KV entries written to the disk cache.",
                                                          dstats.get("writes", 0))
    return out


__all__ = ["BUCKETS", "CONTENT_TYPE", "Metrics", "cache_gauges"]
