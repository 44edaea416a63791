"""LlamaIndex retriever over a RerankPipeline (llama_index.retrievers.minirerank.MiniRerankRetriever), alone and
with the MiniRerank postprocessor in a RetrieverQueryEngine, on tiny random models (ColQwen3 + Qwen3-VL), and the
reranked pages reaching a multimodal LLM as images (a recording stand-in LLM, conftest.py).

The reference is the core pipeline itself: retriever + postprocessor must give exactly what
RerankPipeline.search gives (scores through sigmoid: the postprocessor's default scale), pruning maps included."""

from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("llama_index.core")
pytest.importorskip("colpali_engine")

from llama_index.core.base.llms.types import ImageBlock, MessageRole, TextBlock  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import ImageNode, MetadataMode, QueryBundle  # noqa: E402
from llama_index.postprocessor.minirerank import IMPORTANCE_KEY, MiniRerank, UnprunedWarning, nodes_to_messages  # noqa: E402
from llama_index.retrievers.minirerank import MiniRerankRetriever  # noqa: E402

from minirerank_core import ConfigError, InvalidQueryError, MiniReranker, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import PageIndex  # noqa: E402
from minirerank_core.retrieval.importance import query_importance  # noqa: E402

QUERY = "revenue growth"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    d = tmp_path_factory.mktemp("li_ret_docs")
    imgs = [T.random_page_image(w, h, seed=60 + i) for i, (w, h) in enumerate([(200, 300), (300, 200), (240, 240)])]
    imgs[0].save(d / "report.pdf", save_all=True, append_images=imgs[1:])  # PDF pages: kept in memory (no page_dir)
    T.random_page_image(150, 100, seed=70).save(d / "scan.png")  # an image file: path-backed
    T.random_page_image(120, 160, seed=71).save(d / "photo.png")
    return [d / "report.pdf", d / "scan.png", d / "photo.png"]


@pytest.fixture(scope="module")
def pipe(docs):
    """A pruning reranker (query-time keep ratio 0.5), so the importance maps change the scores."""
    return T.tiny_pipeline(docs, RerankConfig(keep_ratio=0.5))


def test_nodes_are_the_first_stage_hits(pipe):
    nodes = MiniRerankRetriever(pipe, similarity_top_k=4).retrieve(QUERY)
    q = pipe.embedder.encode_query(QUERY)
    hits = pipe.index.search(q, 4)
    assert [n.node.node_id for n in nodes] == [h.page_id for h in hits]
    assert [n.score for n in nodes] == pytest.approx([h.score for h in hits])
    for n, h in zip(nodes, hits):
        node = n.node
        assert isinstance(node, ImageNode)
        assert node.metadata["retrieval_rank"] == h.rank and node.metadata["page_id"] == h.page_id
        for key, value in h.metadata.items():
            assert node.metadata[key] == value
        page = pipe.page(h.page_id)
        if page.source:  # image files: referenced by path
            assert node.image_path == page.source and node.image is None
        else:  # PDF pages kept in memory: base64 PNG of the same pixels
            assert node.image and node.image_path is None
        grid = pipe.reranker.visual_grid(page)
        want = query_importance(q, pipe.index.embedding(h.page_id), grid)
        got = node.metadata[IMPORTANCE_KEY]  # the map with its grid, as JSON
        assert set(got) == {"grid", "values"} and got["grid"] == list(grid)
        assert got["values"] == pytest.approx(want.flat().tolist())
        # the map and file paths are hidden from what the LLM reads
        llm_text = node.get_content(metadata_mode=MetadataMode.LLM)
        assert IMPORTANCE_KEY not in llm_text and "image_path" not in llm_text
    assert any(n.node.image for n in nodes) and any(n.node.image_path for n in nodes)


def test_ids_are_stable_across_pipelines(pipe, docs):
    again = T.tiny_pipeline(docs, RerankConfig(keep_ratio=0.5))
    a = [n.node.node_id for n in MiniRerankRetriever(pipe, 5).retrieve(QUERY)]
    b = [n.node.node_id for n in MiniRerankRetriever(again, 5).retrieve(QUERY)]
    assert a == b and len(set(a)) == 5


def test_retriever_plus_postprocessor_equals_pipeline_search(pipe):
    want = pipe.search(QUERY, k=5, top_n=3)
    engine = RetrieverQueryEngine.from_args(
        MiniRerankRetriever(pipe, similarity_top_k=5), llm=MockLLM(),
        node_postprocessors=[MiniRerank(pipe.reranker, top_n=3, keep_retrieval_score=True)],
    )
    response = engine.query(QUERY)
    got = response.source_nodes
    assert [n.node.node_id for n in got] == [r.page_id for r in want]
    assert [n.score for n in got] == pytest.approx([r.probability for r in want], abs=1e-5)
    assert [n.node.metadata["retrieval_score"] for n in got] == pytest.approx([r.first_stage_score for r in want])
    assert all(IMPORTANCE_KEY not in n.node.metadata for n in got)
    # without the maps the pruning reranker attends to every token (with a warning) and scores differently: the
    # postprocessor really used the retriever's maps above
    bare = MiniRerankRetriever(pipe, similarity_top_k=5, include_importance=False)
    with pytest.warns(UnprunedWarning):
        unpruned = RetrieverQueryEngine.from_args(
            bare, llm=MockLLM(), node_postprocessors=[MiniRerank(pipe.reranker, top_n=3)]).query(QUERY)
    assert [n.score for n in unpruned.source_nodes] != pytest.approx([r.probability for r in want], abs=1e-5)

    async_response = asyncio.run(engine.aquery(QUERY))
    assert [n.node.node_id for n in async_response.source_nodes] == [r.page_id for r in want]


def test_async_retrieve(pipe):
    retriever = MiniRerankRetriever(pipe, similarity_top_k=3)
    sync = retriever.retrieve(QUERY)
    nodes = asyncio.run(retriever.aretrieve(QUERY))
    assert [n.node.node_id for n in nodes] == [n.node.node_id for n in sync]
    assert [n.node.metadata[IMPORTANCE_KEY] for n in nodes] == [n.node.metadata[IMPORTANCE_KEY] for n in sync]


def test_index_time_pruning_reranker_from_a_fresh_process_view(pipe, docs):
    """A reranker that prunes before the prefill needs each page's query-independent map; the retriever hands
    it over like RerankPipeline.search does."""
    fresh_reranker = MiniReranker(pipe.reranker.model, pipe.reranker.processor, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.75))
    fresh = RerankPipeline(pipe.embedder, fresh_reranker, pipe.index, dpi=40, show_progress=False)
    fresh.first_stage._pages.update(pipe.first_stage._pages)  # same process: the in-memory PDF pages are known
    want = fresh.search(QUERY, k=4, top_n=4)
    other = MiniReranker(pipe.reranker.model, pipe.reranker.processor, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.75))
    fresh2 = RerankPipeline(pipe.embedder, other, pipe.index, dpi=40, show_progress=False)
    fresh2.first_stage._pages.update(pipe.first_stage._pages)
    nodes = MiniRerankRetriever(fresh2, similarity_top_k=4).retrieve(QUERY)
    out = MiniRerank(other, top_n=4, score="logit").postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == [r.page_id for r in want]
    assert [n.score for n in out] == pytest.approx([r.score for r in want], abs=1e-5)


def test_bad_inputs(pipe):
    with pytest.raises(InvalidQueryError):
        MiniRerankRetriever(pipe).retrieve(QueryBundle("  "))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="similarity_top_k"):
            MiniRerankRetriever(pipe, similarity_top_k=bad)
    with pytest.raises(ConfigError, match="RerankPipeline"):
        MiniRerankRetriever(object())
    big = MiniRerankRetriever(pipe, similarity_top_k=50).retrieve(QUERY)
    assert len(big) == len(pipe.index) == 5


def test_empty_index(pipe):
    empty = RerankPipeline(pipe.embedder, pipe.reranker, PageIndex(), show_progress=False)
    assert MiniRerankRetriever(empty).retrieve(QUERY) == []
    engine = RetrieverQueryEngine.from_args(MiniRerankRetriever(empty), llm=MockLLM(), node_postprocessors=[MiniRerank(pipe.reranker)])
    assert engine.query(QUERY).source_nodes == []


# --- the reranked pages reach a multimodal LLM as images ---------------------------------------------------
def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def user_turn(messages) -> list:
    """The last user message's blocks as ("text", str) / ("image", pixels)."""
    user = [m for m in messages if m.role == MessageRole.USER][-1]
    out = []
    for block in user.blocks:
        if isinstance(block, ImageBlock):
            out.append(("image", pixels(block.resolve_image().read())))
        else:
            assert isinstance(block, TextBlock)
            out.append(("text", block.text))
    return out


def expected_label(r) -> str:
    name = os.path.basename(r.metadata["source"])
    return f"{name}, page {r.metadata['page']}" if r.metadata.get("page") is not None else name


def test_multimodal_query_engine_sends_the_reranked_pages_as_images(pipe, recording_llm):
    """retriever -> MiniRerank -> llama-index-core's multimodal synthesis (multimodal=True) -> a chat LLM: one call
    whose user turn holds each page's metadata (source, page) and then its image, in rank order; no scores."""
    want = pipe.search(QUERY, k=5, top_n=5)  # every page: image files and in-memory PDF pages (base64 nodes)
    assert {bool(pipe.page(r.page_id).source) for r in want} == {True, False}
    engine = RetrieverQueryEngine.from_args(
        MiniRerankRetriever(pipe, similarity_top_k=5), llm=recording_llm, multimodal=True,
        node_postprocessors=[MiniRerank(pipe.reranker, top_n=5)],
    )
    response = engine.query(QUERY)
    assert [n.node.node_id for n in response.source_nodes] == [r.page_id for r in want]
    assert str(response) == "received 5 page images"  # the stand-in's answer
    assert len(recording_llm.received) == 1
    turn = user_turn(recording_llm.received[0])
    images = [i for i, (k, _) in enumerate(turn) if k == "image"]
    assert len(images) == 5
    for i, r in zip(images, want):
        np.testing.assert_array_equal(turn[i][1], np.asarray(pipe.page(r.page_id).image()))  # the page, in rank order
        label = turn[i - 1][1]  # the text block right before the image: the node's metadata as the LLM sees it
        assert f"source: {r.metadata['source']}" in label and f"page_id: {r.page_id}" in label
        if r.metadata.get("page") is not None:
            assert f"page: {r.metadata['page']}" in label
    text = "\n".join(v for k, v in turn if k == "text")
    assert f"Query: {QUERY}" in text
    for hidden in ("retrieval_score", "retrieval_rank", IMPORTANCE_KEY, "image_path"):
        assert hidden not in text

    recording_llm.received.clear()
    async_response = asyncio.run(engine.aquery(QUERY))
    assert [n.node.node_id for n in async_response.source_nodes] == [r.page_id for r in want]
    assert [k for k, _ in user_turn(recording_llm.received[0])] == [k for k, _ in turn]


def test_nodes_to_messages_hands_the_reranked_pages_to_the_llm(pipe, recording_llm):
    """retriever -> MiniRerank -> nodes_to_messages -> llm.chat: labels "[i] file, page n" then the image, in rank
    order, then the question."""
    want = pipe.search(QUERY, k=5, top_n=5)
    nodes = MiniRerank(pipe.reranker, top_n=5).postprocess_nodes(
        MiniRerankRetriever(pipe, similarity_top_k=5).retrieve(QUERY), query_str=QUERY)
    assert str(recording_llm.chat(nodes_to_messages(QUERY, nodes)).message.content) == "received 5 page images"
    turn = user_turn(recording_llm.received[0])
    assert [k for k, _ in turn] == ["text"] + ["text", "image"] * 5 + ["text"]
    for n, r in enumerate(want, start=1):
        label, image = turn[2 * n - 1][1], turn[2 * n][1]
        assert label == f"[{n}] {expected_label(r)}"
        assert label == f"[{n}] {nodes[n - 1].node.text}"  # the retriever's own label of the page
        np.testing.assert_array_equal(image, np.asarray(pipe.page(r.page_id).image()))
    assert turn[-1] == ("text", f"Question: {QUERY}")
    # async chat gets the same turn
    asyncio.run(recording_llm.achat(nodes_to_messages(QUERY, nodes)))
    assert [v for k, v in user_turn(recording_llm.received[1]) if k == "text"] == [v for k, v in turn if k == "text"]
