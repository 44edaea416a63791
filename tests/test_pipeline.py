"""RerankPipeline end to end on tiny random models: ingest -> embed -> index -> rerank with importance maps."""

from __future__ import annotations

import pytest
import torch
from colpali_engine.models import ColQwen3, ColQwen3Processor

from minirerank_core.engine.config import RerankConfig
from minirerank_core.errors import InvalidQueryError
from minirerank_core.pages import Page
from minirerank_core.pipeline import RerankPipeline
from minirerank_core.reranker import MiniReranker
from minirerank_core.retrieval import PageIndex
from minirerank_core.retrieval.embedder import PageEmbedder
from minirerank_core.retrieval.importance import query_importance
from minirerank_core.testing import build_processor, build_tokenizer, random_page_image, tiny_config, tiny_model_and_processor
from tests.test_ingest import make_pdf

MAX_PIXELS = 32 * 32 * 12


@pytest.fixture(scope="module")
def models():
    tok = build_tokenizer()
    torch.manual_seed(0)
    colqwen = ColQwen3(tiny_config("qwen3_vl", tok)).eval()
    hp = build_processor("qwen3_vl", tok, max_pixels=32 * 32 * 40)
    proc = ColQwen3Processor(image_processor=hp.image_processor, tokenizer=hp.tokenizer, video_processor=hp.video_processor)
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

    def spy(query, pages, top_n=None, importance=None):
        seen.update(pages=pages, importance=importance)
        return rerank(query, pages, top_n=top_n, importance=importance)

    pipe.reranker.rerank = spy
    results = pipe.search("revenue growth", k=3, top_n=2)
    first = pipe.index.search(pipe.embedder.encode_query("revenue growth"), k=3)
    assert len(results) == 2 and [r.rank for r in results] == [1, 2]
    assert [p.id for p in seen["pages"]] == [h.page_id for h in first]
    q = pipe.embedder.encode_query("revenue growth")
    for page, imp in zip(seen["pages"], seen["importance"]):
        h, w = pipe.reranker.visual_grid(page)
        assert imp.shape == (h * w,)  # on the reranker's grid...
        emb = pipe.index.embedding(page.id)
        assert emb.grid == (h, w)  # ...which is the embedder's own grid here (shared tower + budget)
        torch.testing.assert_close(imp, query_importance(q, emb))
    by_id = {h.page_id: h for h in first}
    direct = {r.page_id: r.score for r in rerank("revenue growth", seen["pages"], importance=seen["importance"])}
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
    assert all(r.page.content_hash == pipe._pages[r.page_id].content_hash for r in results)  # same pages reloaded
    assert fresh.delete([results[0].page_id]) == 1 and len(fresh.index) == 2
