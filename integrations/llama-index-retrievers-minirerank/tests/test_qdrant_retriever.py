"""LlamaIndex over ColPali vectors that already live in Qdrant: a collection made with qdrant-client alone (a named
multivector among others, the user's own point ids and payload, plus the layout fields QdrantPageIndex reads), opened
as the pipeline's index; MiniRerankRetriever and the MiniRerank postprocessor then prune with the first stage's maps
exactly as over the FAISS index.

The reference is the same pipeline over its own PageIndex (an exact, all-flat index): node ids, ranks and metadata
equal, scores and maps within float tolerance."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("colpali_engine")
pytest.importorskip("qdrant_client")

from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.postprocessor.minirerank import IMPORTANCE_KEY, MiniRerank  # noqa: E402
from llama_index.retrievers.minirerank import MiniRerankRetriever  # noqa: E402
from qdrant_client import QdrantClient, models  # noqa: E402

from minirerank_core import RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval.qdrant import QdrantPageIndex  # noqa: E402

QUERY = "revenue growth"
COLLECTION = "colpali_pages"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference pipeline: a PDF and two images, PDF pages stored as PNG files (so any process can load them)."""
    d = tmp_path_factory.mktemp("li_qdrant_docs")
    imgs = [T.random_page_image(w, h, seed=60 + i) for i, (w, h) in enumerate([(200, 300), (300, 200), (240, 240)])]
    imgs[0].save(d / "report.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 100, seed=70).save(d / "scan.png")
    T.random_page_image(120, 160, seed=71).save(d / "photo.png")
    return T.tiny_pipeline([d], RerankConfig(keep_ratio=0.5), page_dir=d / "pages")


def users_collection(client: QdrantClient, ref: RerankPipeline) -> None:
    """What a user whose ColPali vectors already live in Qdrant has: their point ids and fields, a mean-pooled
    multivector beside the full one, and the payload fields the backend needs (page_id, grid, patch_start)."""
    mv = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    client.create_collection(COLLECTION, vectors_config={
        "original": models.VectorParams(size=ref.embedder.dim, distance=models.Distance.COSINE, multivector_config=mv),
        "mean_pooling_rows": models.VectorParams(size=ref.embedder.dim, distance=models.Distance.COSINE,
                                                 multivector_config=mv),
    })
    points = []
    for n, page_id in enumerate(sorted(ref.index.page_ids())):
        emb = ref.index.embedding(page_id)
        start = int(emb.patch_rows[0])
        assert emb.patch_rows.tolist() == list(range(start, start + emb.patch_rows.numel()))  # one run of image rows
        points.append(models.PointStruct(
            id=n,
            vector={"original": emb.vectors.tolist(), "mean_pooling_rows": emb.patch_vectors.mean(dim=1).tolist()},
            payload={"page_id": page_id, "grid": list(emb.grid), "patch_start": start, "tenant": "acme",
                     **ref.index.metadata(page_id)},
        ))
    client.upsert(COLLECTION, points)


@pytest.fixture(scope="module")
def qpipe(ref):
    client = QdrantClient(":memory:")
    users_collection(client, ref)
    index = QdrantPageIndex.open(client, COLLECTION, vector_name="original")
    # a pipeline in "another process": it knows the pages only through the collection's payload (image_path)
    return RerankPipeline(ref.embedder, ref.reranker, index, dpi=40, show_progress=False)


def test_nodes_over_qdrant_are_the_nodes_over_faiss_with_their_maps(ref, qpipe):
    want = MiniRerankRetriever(ref, similarity_top_k=4).retrieve(QUERY)
    got = MiniRerankRetriever(qpipe, similarity_top_k=4).retrieve(QUERY)
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want], rel=1e-5)
    for g, w in zip(got, want):
        gm, wm = dict(g.node.metadata), dict(w.node.metadata)
        assert gm.pop("tenant") == "acme"  # the user's own payload travels as metadata
        g_map, w_map = gm.pop(IMPORTANCE_KEY), wm.pop(IMPORTANCE_KEY)
        assert g_map["grid"] == w_map["grid"] == list(ref.reranker.visual_grid(ref.page(g.node.node_id)))
        assert g_map["values"] == pytest.approx(w_map["values"], rel=1e-5, abs=1e-6)
        assert gm == wm
        assert g.node.image_path == ref.page(g.node.node_id).source  # reloaded from the payload's image_path


def test_retriever_plus_postprocessor_over_qdrant_equals_pipeline_search(ref, qpipe):
    want = ref.search(QUERY, k=5, top_n=3)
    engine = RetrieverQueryEngine.from_args(
        MiniRerankRetriever(qpipe, similarity_top_k=5), llm=MockLLM(),
        node_postprocessors=[MiniRerank(qpipe.reranker, top_n=3)],
    )
    got = engine.query(QUERY).source_nodes
    assert [n.node.node_id for n in got] == [r.page_id for r in want]
    assert [n.score for n in got] == pytest.approx([r.probability for r in want], abs=1e-5)
    assert [r.page_id for r in qpipe.search(QUERY, k=5, top_n=3)] == [r.page_id for r in want]
    async_got = asyncio.run(engine.aquery(QUERY)).source_nodes
    assert [n.node.node_id for n in async_got] == [r.page_id for r in want]


def test_prefetch_through_the_pooled_vectors(ref, qpipe):
    """Qdrant's ColPali layout: candidates from the mean-pooled multivector, then MaxSim over the full one."""
    index = QdrantPageIndex.open(qpipe.index.client, COLLECTION, vector_name="original",
                                 prefetch=["mean_pooling_rows"], prefetch_limit=5)
    pre = RerankPipeline(ref.embedder, ref.reranker, index, dpi=40, show_progress=False)
    got = MiniRerankRetriever(pre, similarity_top_k=3).retrieve(QUERY)
    want = MiniRerankRetriever(qpipe, similarity_top_k=3).retrieve(QUERY)
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.node.metadata[IMPORTANCE_KEY] for n in got] == [n.node.metadata[IMPORTANCE_KEY] for n in want]
