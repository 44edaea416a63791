"""LlamaIndex retriever over a RerankPipeline (llama_index.retrievers.minirerank.MiniRerankRetriever), alone and
with the MiniRerank postprocessor in a RetrieverQueryEngine, on tiny random models (ColQwen3 + Qwen3-VL).

The reference is the core pipeline itself: retriever + postprocessor must give exactly what
RerankPipeline.search gives, pruning maps included."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("colpali_engine")

import torch  # noqa: E402
from colpali_engine.models import ColQwen3, ColQwen3Processor  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.schema import ImageNode, MetadataMode, QueryBundle  # noqa: E402
from llama_index.postprocessor.minirerank import IMPORTANCE_KEY, MiniRerank, UnprunedWarning  # noqa: E402
from llama_index.retrievers.minirerank import MiniRerankRetriever  # noqa: E402

from minirerank_core import ConfigError, InvalidQueryError, MiniReranker, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import PageIndex  # noqa: E402
from minirerank_core.retrieval.embedder import PageEmbedder  # noqa: E402
from minirerank_core.retrieval.importance import query_importance  # noqa: E402

QUERY = "revenue growth"
MAX_PIXELS = 32 * 32 * 12


def build_pipeline(docs, config=None, **kw) -> RerankPipeline:
    tok = T.build_tokenizer()
    torch.manual_seed(0)
    colqwen = ColQwen3(T.tiny_config("qwen3_vl", tok)).eval()
    hp = T.build_processor("qwen3_vl", tok, max_pixels=32 * 32 * 40)
    proc = ColQwen3Processor(image_processor=hp.image_processor, tokenizer=hp.tokenizer, video_processor=hp.video_processor)
    model, rproc = T.tiny_model_and_processor("qwen3_vl", max_pixels=MAX_PIXELS)
    reranker = MiniReranker(model, rproc, config)
    embedder = PageEmbedder(colqwen, proc, pixel_budget=reranker.pixel_budget)
    pipe = RerankPipeline(embedder, reranker, PageIndex(), dpi=40, show_progress=False, **kw)
    pipe.add(docs)
    return pipe


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
    return build_pipeline(docs, RerankConfig(keep_ratio=0.5))


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
        page = pipe.page(h)
        if page.source:  # image files: referenced by path
            assert node.image_path == page.source and node.image is None
        else:  # PDF pages kept in memory: base64 PNG of the same pixels
            assert node.image and node.image_path is None
        grid = pipe.reranker.visual_grid(page)
        want = query_importance(q, pipe.index.embedding(h.page_id), grid)
        assert node.metadata[IMPORTANCE_KEY] == pytest.approx(want.tolist())
        # the map and file paths are hidden from what the LLM reads
        llm_text = node.get_content(metadata_mode=MetadataMode.LLM)
        assert IMPORTANCE_KEY not in llm_text and "image_path" not in llm_text
    assert any(n.node.image for n in nodes) and any(n.node.image_path for n in nodes)


def test_ids_are_stable_across_pipelines(pipe, docs):
    again = build_pipeline(docs, RerankConfig(keep_ratio=0.5))
    a = [n.node.node_id for n in MiniRerankRetriever(pipe, 5).retrieve(QUERY)]
    b = [n.node.node_id for n in MiniRerankRetriever(again, 5).retrieve(QUERY)]
    assert a == b and len(set(a)) == 5


def test_retriever_plus_postprocessor_equals_pipeline_search(pipe):
    want = pipe.search(QUERY, k=5, top_n=3)
    engine = RetrieverQueryEngine.from_args(
        MiniRerankRetriever(pipe, similarity_top_k=5), llm=MockLLM(), node_postprocessors=[MiniRerank(pipe.reranker, top_n=3)]
    )
    response = engine.query(QUERY)
    got = response.source_nodes
    assert [n.node.node_id for n in got] == [r.page_id for r in want]
    assert [n.score for n in got] == pytest.approx([r.score for r in want], abs=1e-5)
    assert [n.node.metadata["retrieval_score"] for n in got] == pytest.approx([r.first_stage_score for r in want])
    assert all(IMPORTANCE_KEY not in n.node.metadata for n in got)
    # without the maps the pruning reranker attends to every token (with a warning) and scores differently: the
    # postprocessor really used the retriever's maps above
    bare = MiniRerankRetriever(pipe, similarity_top_k=5, include_importance=False)
    with pytest.warns(UnprunedWarning):
        unpruned = RetrieverQueryEngine.from_args(
            bare, llm=MockLLM(), node_postprocessors=[MiniRerank(pipe.reranker, top_n=3)]).query(QUERY)
    assert [n.score for n in unpruned.source_nodes] != pytest.approx([r.score for r in want], abs=1e-5)

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
    fresh._pages.update(pipe._pages)  # same process: the in-memory PDF pages are known
    want = fresh.search(QUERY, k=4, top_n=4)
    other = MiniReranker(pipe.reranker.model, pipe.reranker.processor, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.75))
    fresh2 = RerankPipeline(pipe.embedder, other, pipe.index, dpi=40, show_progress=False)
    fresh2._pages.update(pipe._pages)
    nodes = MiniRerankRetriever(fresh2, similarity_top_k=4).retrieve(QUERY)
    out = MiniRerank(other, top_n=4).postprocess_nodes(nodes, query_str=QUERY)
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
