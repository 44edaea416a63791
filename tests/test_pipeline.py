"""RerankPipeline end to end on tiny random models: ingest -> embed -> index -> rerank with importance maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from minirerank_core.engine.config import RerankConfig
from minirerank_core.errors import InvalidQueryError
from minirerank_core.pages import Page
from minirerank_core.pipeline import RerankPipeline
from minirerank_core.rerankers import MiniReranker
from minirerank_core.retrieval import PageIndex
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core.retrieval.importance import query_importance
from minirerank_core.testing import make_pdf, random_page_image, tiny_embedder, tiny_model_and_processor

MAX_PIXELS = 32 * 32 * 12


@pytest.fixture(scope="module")
def models():
    colqwen, proc = tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    rr_model, rr_proc = tiny_model_and_processor("qwen3_vl", max_pixels=MAX_PIXELS)
    return colqwen, proc, rr_model, rr_proc


def make_pipeline(models, tmp_path, config=None, index=None):
    colqwen, proc, rr_model, rr_proc = models
    reranker = MiniReranker(rr_model, rr_proc, config)
    embedder = PageEmbedder(colqwen, proc, pixel_budget=reranker.pixel_budget)  # shared tower: same grid
    return RerankPipeline(embedder, reranker, index if index is not None else PageIndex.create(tmp_path / "ix"),
                          page_dir=tmp_path / "pages", dpi=40, show_progress=False)


@pytest.fixture()
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    make_pdf(d / "a.pdf", [(200, 300), (300, 200)])
    random_page_image(150, 100, seed=5).save(d / "scan.png")
    (d / "bad.pdf").write_bytes(b"%PDF-1.4 nonsense")
    return d


def test_add_search_rerank_with_importance(models, tmp_path, docs):
    pipe = make_pipeline(models, tmp_path)
    assert pipe.search("revenue growth") == []  # empty index
    extra = Page(random_page_image(120, 120, seed=9), id="extra", metadata={"tag": "x"})
    report = pipe.add([docs, extra])
    assert [e.source.endswith("bad.pdf") for e in report.errors] == [True]
    assert len(report.pages) == len(pipe.index) == 4
    again = pipe.add([docs / "a.pdf"])  # same content: reported, not re-added
    assert again.pages == [] and len(again.duplicates) == 2 and len(pipe.index) == 4

    seen = {}
    rerank = pipe.reranker.rerank

    def spy(query, candidates, top_n=None, **kwargs):
        seen.update(candidates=candidates, kwargs=kwargs)
        return rerank(query, candidates, top_n=top_n, **kwargs)

    pipe.reranker.rerank = spy
    results = pipe.search("revenue growth", k=3, top_n=2)
    first = pipe.index.search(pipe.embedder.encode_query("revenue growth"), k=3)
    assert len(results) == 2 and [r.rank for r in results] == [1, 2]
    cands = seen["candidates"]
    assert [c.page_id for c in cands] == [h.page_id for h in first] and not seen["kwargs"]
    q = pipe.embedder.encode_query("revenue growth")
    for c in cands:
        h, w = pipe.reranker.visual_grid(c.page)
        assert c.importance.grid == (h, w)  # on the reranker's grid...
        emb = pipe.index.embedding(c.page_id)
        assert emb.grid == (h, w)  # ...which is the embedder's own grid here (shared tower + budget)
        torch.testing.assert_close(c.importance.values, query_importance(q, emb).values)
        assert c.index_importance is None  # this reranker does not prune at index time
    by_id = {h.page_id: h for h in first}
    pages, maps = [c.page for c in cands], [c.importance.flat() for c in cands]
    direct = {r.page_id: r.score for r in rerank("revenue growth", pages, importance=maps)}
    for r in results:
        assert r.first_stage_score == by_id[r.page_id].score and r.first_stage_rank == by_id[r.page_id].rank
        assert r.score == pytest.approx(direct[r.page_id], abs=1e-5)
        assert r.metadata == by_id[r.page_id].metadata and r.page is not None
    plain = pipe.search("revenue growth", k=3, top_n=3, rerank=False)
    assert [(r.page_id, r.score) for r in plain] == [(h.page_id, h.score) for h in first]
    with pytest.raises(InvalidQueryError):
        pipe.search("  ")


def test_reopened_index_with_pruning_reranker(models, tmp_path, docs):
    pipe = make_pipeline(models, tmp_path)
    pipe.add([docs / "a.pdf", docs / "scan.png"])
    # A new process's view: the index from disk, a fresh reranker that prunes (query and index time).
    config = RerankConfig(keep_ratio=0.5, index_keep_ratio=0.75)
    fresh = make_pipeline(models, tmp_path, config, index=PageIndex.open(tmp_path / "ix"))
    results = fresh.search("table figure", k=3, top_n=3)
    assert sorted(r.page_id for r in results) == sorted(pipe.index.page_ids())
    assert all(r.page.content_hash == pipe.page(r.page_id).content_hash for r in results)  # same pages reloaded
    assert all(r.index_importance is not None for r in results)  # index-time maps came from the first stage
    assert fresh.delete([results[0].page_id]) == 1 and len(fresh.index) == 2


# --- workspaces and operators' failure modes ------------------------------------------------------------------------
def open_workspace(models, root, config=None, **kw):
    colqwen, proc, rr_model, rr_proc = models
    reranker = MiniReranker(rr_model, rr_proc, config, cache_dir=root / "cache")
    embedder = PageEmbedder(colqwen, proc, pixel_budget=reranker.pixel_budget)
    kw.setdefault("show_progress", False)
    return RerankPipeline.open(root, reranker=reranker, embedder=embedder, dpi=40, **kw)


def test_one_odd_page_is_reported_and_the_batch_goes_on(models, tmp_path, docs):
    from PIL import Image

    Image.new("RGB", (2, 500), "white").save(docs / "strip.png")
    pipe = make_pipeline(models, tmp_path)
    report = pipe.add([docs, Page(Image.new("RGB", (600, 2)), id="mem-strip")])
    errors = {e.source: str(e) for e in report.errors}
    assert any(s.endswith("strip.png") and "aspect ratio" in m for s, m in errors.items())
    assert any("aspect ratio" in m for s, m in errors.items() if not s.endswith(".png") and not s.endswith(".pdf"))
    assert len(pipe.index) == 3  # the two PDF pages and scan.png


def test_limits_and_argument_errors_in_search(models, tmp_path, docs):
    from minirerank_core.errors import ConfigError

    pipe = make_pipeline(models, tmp_path)
    pipe.add([docs / "scan.png"])
    calls = []
    pipe.embedder.encode_queries = lambda qs, **kw: calls.append(qs)  # must not be reached
    with pytest.raises(InvalidQueryError, match="max_query_tokens"):
        pipe.search("revenue " * 2000)
    assert calls == []  # refused before any model work
    with pytest.raises(ConfigError, match="top_n"):
        pipe.search("revenue", top_n=0)
    del pipe.embedder.encode_queries
    assert len(pipe.search("revenue", top_n=np.int64(1))) == 1  # numpy integers are integers


def test_workspace_is_usable_after_a_killed_first_run_and_reindex_fills_the_cache(models, tmp_path, docs):
    root = tmp_path / "ws"
    pipe = open_workspace(models, root, create=True)

    def killed(*args, **kwargs):  # the process dies after the index commit, before the page cache is filled
        raise KeyboardInterrupt

    pipe.reranker.index = killed
    with pytest.raises(KeyboardInterrupt):
        pipe.add([docs / "a.pdf", docs / "scan.png"])
    assert (root / "minirerank.json").is_file()  # written with the first commit
    again = open_workspace(models, root)  # "search says there is no index" no more
    assert len(again.index) == 3
    assert not list((root / "cache").rglob("*.safetensors"))
    report = again.add([docs / "a.pdf", docs / "scan.png"])  # re-running the same command...
    assert report.pages == [] and len(report.duplicates) == 3
    assert len(list((root / "cache").rglob("*.safetensors"))) == 3  # ...fills the missing cache entries
    assert len(again.search("revenue", k=3, top_n=3)) == 3


def test_two_writers_one_waits_then_fails_before_any_work(models, tmp_path, docs):
    import multiprocessing as mp

    from minirerank_core.errors import LockTimeoutError
    from minirerank_core.fileio import writer_lock

    root = tmp_path / "ws"
    pipe = open_workspace(models, root, create=True, lock_timeout=0.5)
    ready, release = mp.Event(), mp.Event()
    holder = mp.get_context("fork").Process(target=_hold_lock, args=(str(root), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        embedded = []
        real = pipe.embedder.encode_pages
        pipe.embedder.encode_pages = lambda *a, **k: embedded.append(1) or real(*a, **k)
        with pytest.raises(LockTimeoutError, match="another process"):
            pipe.add([docs / "scan.png"])
        assert embedded == [] and len(pipe.index) == 0  # failed before the work, not after it
    finally:
        release.set()
        holder.join(30)
    with writer_lock(root, timeout=1):
        pass
    assert len(pipe.add([docs / "scan.png"]).pages) == 1


def _hold_lock(path, ready, release):
    from minirerank_core.fileio import writer_lock

    with writer_lock(path):
        ready.set()
        release.wait(30)


def test_relative_workspace_path_works_from_another_directory(models, tmp_path, docs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipe = open_workspace(models, tmp_path / "ws", create=True)
    pipe.add([docs / "a.pdf"])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = open_workspace(models, Path("..") / "ws")
    results = again.search("revenue", k=2, top_n=2)
    assert len(results) == 2 and all(Path(r.page.source).is_absolute() for r in results)
