"""LangChain retriever over a RerankPipeline (langchain_minirerank.MiniRerankRetriever): alone, against
langchain-tests' standard retriever suite, and with the MiniRerank compressor inside langchain_classic's
ContextualCompressionRetriever, where it must give exactly what RerankPipeline.search gives."""

from __future__ import annotations

import asyncio
import functools

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("colpali_engine")

from langchain_core.documents import Document  # noqa: E402
from langchain_minirerank import IMPORTANCE_KEY, MiniRerank, MiniRerankRetriever, UnprunedWarning  # noqa: E402
from langchain_tests.integration_tests import RetrieversIntegrationTests  # noqa: E402

from minirerank_core import ConfigError, InvalidQueryError, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import PageIndex  # noqa: E402
from minirerank_core.retrieval.importance import query_importance  # noqa: E402

QUERY = "revenue growth"


def build_pipeline(docs, config=None, **kw) -> RerankPipeline:
    """Tiny random ColQwen3 embedder + Qwen3-VL reranker sharing a pixel budget (one grid), docs indexed."""
    import torch
    from colpali_engine.models import ColQwen3, ColQwen3Processor

    from minirerank_core import MiniReranker
    from minirerank_core.retrieval.embedder import PageEmbedder

    tok = T.build_tokenizer()
    torch.manual_seed(0)
    colqwen = ColQwen3(T.tiny_config("qwen3_vl", tok)).eval()
    hp = T.build_processor("qwen3_vl", tok, max_pixels=32 * 32 * 40)
    proc = ColQwen3Processor(image_processor=hp.image_processor, tokenizer=hp.tokenizer, video_processor=hp.video_processor)
    model, rproc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 12)
    reranker = MiniReranker(model, rproc, config)
    pipe = RerankPipeline(PageEmbedder(colqwen, proc, pixel_budget=reranker.pixel_budget), reranker, PageIndex(),
                          dpi=40, show_progress=False, **kw)
    pipe.add(docs)
    return pipe


@functools.cache
def shared_pipeline() -> RerankPipeline:
    """Built once per session (the standard suite constructs retrievers from plain parameters)."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="lc_ret_docs"))
    imgs = [T.random_page_image(w, h, seed=80 + i) for i, (w, h) in enumerate([(200, 300), (300, 200), (240, 240)])]
    imgs[0].save(d / "report.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 100, seed=90).save(d / "scan.png")
    T.random_page_image(120, 160, seed=91).save(d / "photo.png")
    return build_pipeline([d], RerankConfig(keep_ratio=0.5), page_dir=d / "pages")


@pytest.fixture(scope="module")
def pipe():
    return shared_pipeline()


class TestStandardRetriever(RetrieversIntegrationTests):
    """langchain-tests' standard retriever tests (k in the constructor and in invoke, sync and async)."""

    # The suite's one async test carries no marker (langchain's own repos run pytest-asyncio in auto mode);
    # here it runs in strict mode, so mark the class and silence the notice on the suite's sync tests.
    pytestmark = [
        pytest.mark.asyncio,
        pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
    ]

    @property
    def retriever_constructor(self):
        return MiniRerankRetriever

    @property
    def retriever_constructor_params(self):
        return {"pipeline": shared_pipeline(), "k": 4}

    @property
    def retriever_query_example(self) -> str:
        return QUERY


def test_documents_are_the_first_stage_hits(pipe):
    docs = MiniRerankRetriever(pipeline=pipe, k=4).invoke(QUERY)
    q = pipe.embedder.encode_query(QUERY)
    hits = pipe.index.search(q, 4)
    assert [d.id for d in docs] == [h.page_id for h in hits]
    for d, h in zip(docs, hits):
        assert d.metadata["retrieval_score"] == pytest.approx(h.score) and d.metadata["retrieval_rank"] == h.rank
        assert d.metadata["image_path"]  # page_dir: every page has a file, referenced by path
        assert "image" not in d.metadata
        page = pipe.page(h)
        want = query_importance(q, pipe.index.embedding(h.page_id), pipe.reranker.visual_grid(page))
        assert d.metadata[IMPORTANCE_KEY] == pytest.approx(want.tolist())
        assert "page" in d.page_content or d.page_content.endswith(".png")
    assert [d.id for d in MiniRerankRetriever(pipeline=pipe, k=4).invoke(QUERY, k=2)] == [h.page_id for h in hits[:2]]


def test_in_memory_pages_carry_base64(docs_in_memory):
    docs = MiniRerankRetriever(pipeline=docs_in_memory, k=5).invoke(QUERY)
    assert any("image" in d.metadata and "image_path" not in d.metadata for d in docs)
    out = MiniRerank(docs_in_memory.reranker, top_n=None).compress_documents(docs, QUERY)
    assert len(out) == 5


@pytest.fixture(scope="module")
def docs_in_memory(tmp_path_factory):
    d = tmp_path_factory.mktemp("lc_mem")
    imgs = [T.random_page_image(200, 260, seed=95 + i) for i in range(3)]
    imgs[0].save(d / "mem.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 100, seed=99).save(d / "a.png")
    T.random_page_image(100, 150, seed=98).save(d / "b.png")
    return build_pipeline([d], RerankConfig(keep_ratio=0.5))  # no page_dir: PDF pages stay in memory


def test_contextual_compression_equals_pipeline_search(pipe):
    from langchain_classic.retrievers import ContextualCompressionRetriever

    want = pipe.search(QUERY, k=5, top_n=3)
    retriever = ContextualCompressionRetriever(
        base_compressor=MiniRerank(pipe.reranker, top_n=3), base_retriever=MiniRerankRetriever(pipeline=pipe, k=5)
    )
    got = retriever.invoke(QUERY)
    assert [d.id for d in got] == [r.page_id for r in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert [d.metadata["retrieval_score"] for d in got] == pytest.approx([r.first_stage_score for r in want])
    assert all(IMPORTANCE_KEY not in d.metadata for d in got)
    agot = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.id for d in agot] == [r.page_id for r in want]
    # maps missing -> the pruning reranker attends to every token (with a warning) and scores differently: the
    # compressor really used the retriever's maps above
    bare = ContextualCompressionRetriever(
        base_compressor=MiniRerank(pipe.reranker, top_n=3),
        base_retriever=MiniRerankRetriever(pipeline=pipe, k=5, include_importance=False),
    )
    with pytest.warns(UnprunedWarning):
        unpruned = bare.invoke(QUERY)
    assert [d.metadata["relevance_score"] for d in unpruned] != pytest.approx([r.score for r in want], abs=1e-5)


def test_bad_inputs(pipe):
    with pytest.raises(InvalidQueryError):
        MiniRerankRetriever(pipeline=pipe).invoke(" ")
    with pytest.raises(ValueError, match="k must be"):
        MiniRerankRetriever(pipeline=pipe, k=0)
    with pytest.raises(ConfigError, match="k must be"):
        MiniRerankRetriever(pipeline=pipe).invoke(QUERY, k=0)
    with pytest.raises(ValueError, match="RerankPipeline"):
        MiniRerankRetriever(pipeline="not a pipeline")
    empty = RerankPipeline(pipe.embedder, pipe.reranker, PageIndex(), show_progress=False)
    assert MiniRerankRetriever(pipeline=empty).invoke(QUERY) == []
    assert all(isinstance(d, Document) for d in MiniRerankRetriever(pipeline=pipe, k=99).invoke(QUERY))
