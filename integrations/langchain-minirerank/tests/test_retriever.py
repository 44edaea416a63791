"""LangChain retriever over a RerankPipeline (langchain_minirerank.MiniRerankRetriever): alone, against
langchain-tests' standard retriever suite, and with the MiniRerank compressor inside langchain_classic's
ContextualCompressionRetriever, where it must give exactly what RerankPipeline.search gives (scores through
sigmoid: the compressor's default scale); then the reranked pages reaching a chat model as images."""

from __future__ import annotations

import asyncio
import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("langchain_core")
pytest.importorskip("colpali_engine")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_minirerank import (  # noqa: E402
    IMPORTANCE_KEY,
    MiniRerank,
    MiniRerankRetriever,
    UnprunedWarning,
    documents_to_messages,
)
from langchain_tests.integration_tests import RetrieversIntegrationTests  # noqa: E402

from minirerank_core import ConfigError, InvalidQueryError, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import PageIndex  # noqa: E402
from minirerank_core.retrieval.importance import query_importance  # noqa: E402

QUERY = "revenue growth"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> RerankPipeline:
    """A PDF of three pages and two images, indexed with their pages stored in page_dir (path-backed), and a
    pruning reranker (query-time keep ratio 0.5) so the importance maps change the scores."""
    d = tmp_path_factory.mktemp("lc_ret_docs")
    imgs = [T.random_page_image(w, h, seed=80 + i) for i, (w, h) in enumerate([(200, 300), (300, 200), (240, 240)])]
    imgs[0].save(d / "report.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 100, seed=90).save(d / "scan.png")
    T.random_page_image(120, 160, seed=91).save(d / "photo.png")
    return T.tiny_pipeline([d], RerankConfig(keep_ratio=0.5), page_dir=d / "pages")


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

    @pytest.fixture(autouse=True)
    def _pipeline(self, pipe):
        # the suite builds retrievers from retriever_constructor_params, outside any fixture: hand it the pipeline
        self._pipe = pipe

    @property
    def retriever_constructor_params(self):
        return {"pipeline": self._pipe, "k": 4}

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
        page = pipe.page(h.page_id)
        want = query_importance(q, pipe.index.embedding(h.page_id), pipe.reranker.visual_grid(page))
        got = d.metadata[IMPORTANCE_KEY]  # the map with its grid, as JSON
        assert set(got) == {"grid", "values"} and got["grid"] == list(want.grid)
        assert got["values"] == pytest.approx(want.flat().tolist())
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
    return T.tiny_pipeline([d], RerankConfig(keep_ratio=0.5))  # no page_dir: PDF pages stay in memory


def test_contextual_compression_equals_pipeline_search(pipe):
    from langchain_classic.retrievers import ContextualCompressionRetriever

    want = pipe.search(QUERY, k=5, top_n=3)
    retriever = ContextualCompressionRetriever(
        base_compressor=MiniRerank(pipe.reranker, top_n=3), base_retriever=MiniRerankRetriever(pipeline=pipe, k=5)
    )
    got = retriever.invoke(QUERY)
    assert [d.id for d in got] == [r.page_id for r in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([r.probability for r in want], abs=1e-5)
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
    assert [d.metadata["relevance_score"] for d in unpruned] != pytest.approx([r.probability for r in want], abs=1e-5)


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


# --- the reranked pages reach a chat model as images ---------------------------------------------------
def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def expected_label(r) -> str:
    name = os.path.basename(r.metadata["source"])
    return f"{name}, page {r.metadata['page']}" if r.metadata.get("page") is not None else name


@pytest.mark.parametrize("which", ["files", "in_memory"])
def test_pages_reach_the_chat_model_as_images_in_rank_order(which, pipe, docs_in_memory, recording_chat_model):
    """MiniRerankRetriever -> MiniRerank (ContextualCompressionRetriever) -> documents_to_messages -> chat model in
    one chain: the model gets one HumanMessage with "[i] file, page n" and then the page as an image block, best
    first, then the question. Pages stored as files and PDF pages kept in memory (base64) alike."""
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    pipeline = pipe if which == "files" else docs_in_memory
    want = pipeline.search(QUERY, k=5, top_n=5)  # every page of the index
    # page_dir: every page is a file; without it the PDF pages are held in memory and travel as base64
    assert {bool(pipeline.page(r.page_id).source) for r in want} == ({True} if which == "files" else {True, False})
    retriever = ContextualCompressionRetriever(base_compressor=MiniRerank(pipeline.reranker, top_n=5),
                                               base_retriever=MiniRerankRetriever(pipeline=pipeline, k=5))
    chain = ({"docs": retriever, "question": RunnablePassthrough()}
             | RunnableLambda(lambda x: documents_to_messages(x["question"], x["docs"])) | recording_chat_model)
    assert chain.invoke(QUERY).content == "received 5 page images"
    (message,) = recording_chat_model.received[0]
    assert isinstance(message, HumanMessage)
    content = message.content
    assert [b["type"] for b in content] == ["text"] + ["text", "image"] * 5 + ["text"]
    for n, r in enumerate(want, start=1):
        label, image = content[2 * n - 1], content[2 * n]
        assert label["text"] == f"[{n}] {expected_label(r)}"
        assert image["mime_type"] == "image/png"
        np.testing.assert_array_equal(pixels(base64.b64decode(image["base64"], validate=True)),
                                      np.asarray(pipeline.page(r.page_id).image()))
    assert content[-1] == {"type": "text", "text": f"Question: {QUERY}"}
    text = " ".join(b["text"] for b in content if b["type"] == "text")
    assert "relevance_score" not in text and "retrieval_score" not in text
    asyncio.run(chain.ainvoke(QUERY))
    assert recording_chat_model.received[1][0].content == content
