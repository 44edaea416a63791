"""LangChain over ColPali vectors that already live in Qdrant: a collection written with qdrant-client alone into a
local-mode directory (the user's own payload field names, mapped with QdrantFields), reopened from disk as the
pipeline's index; MiniRerankRetriever and the MiniRerank compressor (ContextualCompressionRetriever) then prune with
the first stage's maps exactly as over the FAISS index.

The reference is the same pipeline over its own PageIndex (exact, all flat): document ids, ranks and metadata
equal, scores and maps within float tolerance."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("colpali_engine")
pytest.importorskip("qdrant_client")

from langchain_minirerank import IMPORTANCE_KEY, MiniRerank, MiniRerankRetriever  # noqa: E402
from qdrant_client import QdrantClient, models  # noqa: E402

from minirerank_core import RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval.qdrant import QdrantFields, QdrantPageIndex  # noqa: E402

QUERY = "revenue growth"
COLLECTION = "scans"
FIELDS = QdrantFields(page_id="doc_page", grid="patch_grid", patch_start="first_patch_row")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    d = tmp_path_factory.mktemp("lc_qdrant_docs")
    imgs = [T.random_page_image(w, h, seed=80 + i) for i, (w, h) in enumerate([(200, 300), (300, 200), (240, 240)])]
    imgs[0].save(d / "report.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 100, seed=90).save(d / "scan.png")
    T.random_page_image(120, 160, seed=91).save(d / "photo.png")
    return T.tiny_pipeline([d], RerankConfig(keep_ratio=0.5), page_dir=d / "pages")


@pytest.fixture(scope="module")
def qdrant_dir(ref, tmp_path_factory):
    """The user's collection on disk (qdrant-client local mode), written without minirerank."""
    path = tmp_path_factory.mktemp("qdrant") / "db"
    client = QdrantClient(path=str(path))
    client.create_collection(COLLECTION, vectors_config={"colqwen": models.VectorParams(
        size=ref.embedder.dim, distance=models.Distance.DOT,
        multivector_config=models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM))})
    points = []
    for n, page_id in enumerate(sorted(ref.index.page_ids())):
        emb = ref.index.embedding(page_id)
        points.append(models.PointStruct(id=100 + n, vector={"colqwen": emb.vectors.tolist()}, payload={
            "doc_page": page_id, "patch_grid": list(emb.grid), "first_patch_row": int(emb.patch_rows[0]),
            **ref.index.metadata(page_id)}))
    client.upsert(COLLECTION, points)
    client.close()
    return path


@pytest.fixture(scope="module")
def qpipe(ref, qdrant_dir):
    index = QdrantPageIndex.open(str(qdrant_dir), COLLECTION, fields=FIELDS)  # the one multivector, found
    yield RerankPipeline(ref.embedder, ref.reranker, index, dpi=40, show_progress=False)
    index.close()


def test_documents_over_qdrant_are_the_documents_over_faiss_with_their_maps(ref, qpipe):
    want = MiniRerankRetriever(pipeline=ref, k=4).invoke(QUERY)
    got = MiniRerankRetriever(pipeline=qpipe, k=4).invoke(QUERY)
    assert [d.id for d in got] == [d.id for d in want]
    for g, w in zip(got, want):
        gm, wm = dict(g.metadata), dict(w.metadata)
        assert gm.pop("retrieval_score") == pytest.approx(wm.pop("retrieval_score"), rel=1e-5)
        g_map, w_map = gm.pop(IMPORTANCE_KEY), wm.pop(IMPORTANCE_KEY)
        assert g_map["grid"] == w_map["grid"] == list(ref.reranker.visual_grid(ref.page(g.id)))
        assert g_map["values"] == pytest.approx(w_map["values"], rel=1e-5, abs=1e-6)
        assert gm == wm  # rank, image_path, source, page...: the layout fields are not metadata
        assert not set(gm) & {"doc_page", "patch_grid", "first_patch_row"}
        assert g.page_content == w.page_content


def test_compression_retriever_over_qdrant_equals_pipeline_search(ref, qpipe):
    from langchain_classic.retrievers import ContextualCompressionRetriever

    want = ref.search(QUERY, k=5, top_n=3)
    retriever = ContextualCompressionRetriever(
        base_compressor=MiniRerank(qpipe.reranker, top_n=3), base_retriever=MiniRerankRetriever(pipeline=qpipe, k=5)
    )
    got = retriever.invoke(QUERY)
    assert [d.id for d in got] == [r.page_id for r in want]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx([r.probability for r in want], abs=1e-5)
    assert [d.metadata["retrieval_score"] for d in got] == pytest.approx([r.first_stage_score for r in want],
                                                                           rel=1e-5)
    agot = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.id for d in agot] == [r.page_id for r in want]


def test_new_pages_go_into_the_users_collection(ref, qpipe, tmp_path):
    """The pipeline adds pages to the collection with the user's field names; they are found and pruned like the
    rest."""
    extra = tmp_path / "extra.png"
    T.random_page_image(180, 140, seed=93).save(extra)
    before = len(qpipe.index)
    report = qpipe.add([str(extra)])
    assert len(report.pages) == 1 and len(qpipe.index) == before + 1
    page_id = report.pages[0].id
    record = qpipe.index._find([page_id])[page_id]
    assert record.payload["doc_page"] == page_id and "patch_grid" in record.payload
    docs = MiniRerankRetriever(pipeline=qpipe, k=before + 1).invoke(QUERY)
    assert page_id in [d.id for d in docs]
    mine = next(d for d in docs if d.id == page_id)
    assert mine.metadata[IMPORTANCE_KEY]["grid"] == list(qpipe.reranker.visual_grid(qpipe.page(page_id)))
    assert qpipe.delete([page_id]) == 1 and len(qpipe.index) == before
