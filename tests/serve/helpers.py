"""Small helpers of the server tests (importable as tests.serve.helpers)."""

from __future__ import annotations

import base64
import io
import time

QUERY = "revenue growth"
N_PAGES = 4


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate``: orders events between threads (not a speed assertion)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def in_process(pipeline, query: str, images: list[bytes], keep_ratio: float | None = None):
    """What the server should answer, computed here: the pages through an in-memory FirstStage with the
    pipeline's embedder (maps on the reranker's grid), reranked by the pipeline's reranker. [(position, score)]."""
    from minirerank_core.pages import Page
    from minirerank_core.retrieval import FirstStage, PageIndex

    pages = [Page.from_bytes(b) for b in images]
    first_stage = FirstStage(pipeline.embedder, PageIndex())
    first_stage.add(pages, show_progress=False)
    cands = first_stage.candidates(query, len(pages), pipeline.reranker, exact=True)
    pos = {p.id: i for i, p in enumerate(pages)}
    results = pipeline.reranker.rerank(query, cands, keep_ratio=keep_ratio)
    return [(pos[r.page_id], r.score) for r in results]


def sigmoid(x: float) -> float:
    import math

    return 1.0 / (1.0 + math.exp(-x))
