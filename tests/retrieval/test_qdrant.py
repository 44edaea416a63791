"""QdrantPageIndex (qdrant-client local mode, the real client): the PageIndex interface over a multivector collection,
its results against exact MaxSim, persistence, collections made by someone else, and the first stage over it."""

from __future__ import annotations

import pytest
import torch

qdrant_client = pytest.importorskip("qdrant_client")
from qdrant_client import QdrantClient, models  # noqa: E402

from minirerank_core import ConfigError, MiniReranker, Page, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.errors import DuplicatePageIdError, IndexStateError, InvalidQueryError  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import FirstStage, PageEmbedding, PageIndex, PageIndexBackend  # noqa: E402
from minirerank_core.retrieval.embedder import PageEmbedder  # noqa: E402
from minirerank_core.retrieval.importance import page_importance, query_importance  # noqa: E402
from minirerank_core.retrieval.qdrant import QdrantFields, QdrantPageIndex, point_id  # noqa: E402
from tests.helpers import D, assert_same_hits, ids, make_pages, make_query  # noqa: E402

QUERY = "annual revenue"


def reference(pages):
    ref = PageIndex(index_type="flat")
    ref.add(pages)
    return ref


def test_same_interface_and_results_as_the_exact_page_index():
    pages = make_pages(80)
    ref = reference(pages)
    index = QdrantPageIndex.create(":memory:", "pages")
    assert isinstance(index, PageIndexBackend) and isinstance(ref, PageIndexBackend)
    assert len(index) == 0 and index.search(make_query(), 5) == [] and index.dim is None  # made at the first add
    assert index.add(pages) == [p.page_id for p in pages]
    assert len(index) == 80 and index.dim == D and "p3" in index and "nope" not in index
    for seed in range(3):
        q = make_query(seed)
        assert_same_hits(index.search(q, 15), ref.search(q, 15))
        assert_same_hits(index.search(q, 15, exact=True), ref.search(q, 15))
    assert sorted(index.page_ids()) == sorted(ref.page_ids())
    assert index.content_hashes() == ref.content_hashes()
    assert index.metadata("p7") == ref.metadata("p7") == {"n": 7, "source": "doc1.pdf"}
    got, want = index.embedding("p7"), ref.embedding("p7")
    assert (got.page_id, got.grid, got.content_hash, got.metadata) == (want.page_id, want.grid, want.content_hash,
                                                                        want.metadata)
    torch.testing.assert_close(got.vectors, want.vectors)
    assert torch.equal(got.patch_rows, want.patch_rows)
    hits = index.search(make_query(), 4, with_embeddings=True)  # the patch vectors come back with the hits
    for h in hits:
        torch.testing.assert_close(h.embedding.vectors, ref.embedding(h.page_id).vectors)
        assert torch.equal(h.embedding.patch_rows, ref.embedding(h.page_id).patch_rows)
    assert all(h.embedding is None for h in index.search(make_query(), 4))


def test_add_and_delete_follow_page_index_rules():
    pages = make_pages(10)
    index = QdrantPageIndex.create(":memory:", "pages", upsert_batch_vectors=50)  # several requests per add
    index.add(pages[:6])
    assert index.add(pages[:6]) == []  # same ids, same content: a no-op
    clash = PageEmbedding("p2", pages[8].vectors, pages[8].patch_rows, (3, 4), content_hash="other")
    with pytest.raises(DuplicatePageIdError):
        index.add([*pages[6:], clash])
    assert len(index) == 6  # refused before anything was written
    with pytest.raises(DuplicatePageIdError):  # the same id twice in one call, other content
        index.add([pages[7], PageEmbedding("p7", pages[7].vectors, pages[7].patch_rows, (3, 4), content_hash="x")])
    assert index.add(pages[6:], [{"extra": i} for i in range(4)]) == ["p6", "p7", "p8", "p9"]
    assert index.metadata("p9") == {"n": 9, "source": "doc0.pdf", "extra": 3}
    with pytest.raises(ValueError, match="payload fields"):
        index.add([PageEmbedding("z", pages[0].vectors, pages[0].patch_rows, (3, 4), metadata={"grid": 1})])
    with pytest.raises(ValueError, match="dim"):
        index.add(make_pages(1, prefix="w", dim=D + 1))
    with pytest.raises(KeyError, match="nope"):
        index.delete(["p1", "nope"])
    assert len(index) == 10
    assert index.delete(["p1", "nope"], missing_ok=True) == 1
    assert index.delete("p2") == 1 and "p2" not in index and len(index) == 8
    with pytest.raises(KeyError):
        index.embedding("p1")
    assert "p1" not in ids(index.search(make_query(), 10, exact=True))


def test_persistence_in_local_mode(tmp_path):
    pages = make_pages(40)
    q = make_query()
    with QdrantPageIndex.create(str(tmp_path / "qd"), "pages") as index:
        index.add(pages)
        before = index.search(q, 10)
    reopened = QdrantPageIndex.open(str(tmp_path / "qd"), "pages")
    assert reopened.vector_name == "colpali" and len(reopened) == 40
    assert_same_hits(reopened.search(q, 10), before)
    assert_same_hits(reopened.search(q, 10), reference(pages).search(q, 10))
    reopened.close()
    with pytest.raises(IndexStateError, match="already exists"):
        QdrantPageIndex.create(str(tmp_path / "qd"), "pages").close()


def test_float16_collection_scores_within_tolerance():
    pages = make_pages(60)
    index = QdrantPageIndex.create(":memory:", "pages", datatype="float16", hnsw_m=0)
    index.add(pages)
    q = make_query()
    got, want = index.search(q, 10), reference(pages).search(q, 10)
    assert len(set(ids(got)) & set(ids(want))) >= 9
    assert [h.score for h in got] == pytest.approx(
        [{h.page_id: h.score for h in reference(pages).search(q, 60)}[h.page_id] for h in got], rel=2e-3)


def test_bad_arguments_are_named_errors():
    index = QdrantPageIndex.create(":memory:", "pages")
    index.add(make_pages(5))
    for name in ("k_prime", "nprobe", "rescore"):
        with pytest.raises(ConfigError, match=name):
            index.search(make_query(), 3, **{name: 8})
    with pytest.raises(InvalidQueryError):
        index.search("text", 3)
    with pytest.raises(InvalidQueryError, match="dim"):
        index.search(torch.ones(2, D + 1), 3)
    with pytest.raises(ConfigError, match="k must"):
        index.search(make_query(), 0)
    with pytest.raises(ConfigError, match="distance"):
        QdrantPageIndex.create(":memory:", "x", distance="euclid")
    with pytest.raises(ConfigError, match="upsert_batch_vectors"):
        QdrantPageIndex.create(":memory:", "x", upsert_batch_vectors=0)
    with pytest.raises(IndexStateError, match="no Qdrant collection"):
        QdrantPageIndex.open(":memory:", "missing")
    with pytest.raises(ConfigError, match="QdrantClient"):
        QdrantPageIndex.open(42, "pages")


# --- a collection someone else made ---------------------------------------------------------------------------
def multivector(distance=models.Distance.DOT, size=D, comparator=models.MultiVectorComparator.MAX_SIM):
    return models.VectorParams(size=size, distance=distance,
                               multivector_config=models.MultiVectorConfig(comparator=comparator))


def existing_collection(client, pages, *, name="docs", vector="original", page_field="page_id", extra_vectors=True):
    """What a user with ColPali vectors already in Qdrant has: their own point ids, a named multivector among others
    (a mean-pooled one, as in Qdrant's ColPali guide), our payload fields beside their own."""
    config = {vector: multivector()}
    if extra_vectors:
        config["mean_pooled"] = multivector()
    client.create_collection(name, vectors_config=config)
    points = []
    for n, p in enumerate(pages):
        vec = {vector: p.vectors.tolist()}
        if extra_vectors:
            h, w = p.grid
            vec["mean_pooled"] = p.patch_vectors.mean(dim=1).tolist()  # one row vector per patch row
        payload = {"grid": list(p.grid), "patch_start": int(p.patch_rows[0]), "title": f"doc {n}", **p.metadata}
        if page_field:
            payload[page_field] = p.page_id
        points.append(models.PointStruct(id=1000 + n, vector=vec, payload=payload))
    client.upsert(name, points)


def test_open_an_existing_collection_with_its_own_ids_and_vectors():
    pages = make_pages(30)
    client = QdrantClient(":memory:")
    existing_collection(client, pages)
    with pytest.raises(ConfigError, match="multivectors"):
        QdrantPageIndex.open(client, "docs")  # two multivectors: which one is the page's?
    index = QdrantPageIndex.open(client, "docs", vector_name="original")
    ref = reference(pages)
    q = make_query()
    got, want = index.search(q, 10), ref.search(q, 10)
    assert [(h.page_id, h.rank) for h in got] == [(h.page_id, h.rank) for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5)
    hit = index.search(q, 1, with_embeddings=True)[0]
    assert hit.metadata == {**ref.metadata(hit.page_id), "title": f"doc {int(hit.page_id[1:])}"}
    torch.testing.assert_close(hit.embedding.vectors, ref.embedding(hit.page_id).vectors)
    assert torch.equal(hit.embedding.patch_rows, ref.embedding(hit.page_id).patch_rows)  # from patch_start
    # prefetch through the pooled vectors (Qdrant's ColPali layout) narrows the candidates, then full MaxSim
    pre = QdrantPageIndex.open(client, "docs", vector_name="original", prefetch=["mean_pooled"], prefetch_limit=25)
    assert ids(pre.search(q, 10)) == ids(index.search(q, 10))
    assert "p4" in index and index.delete(["p4"]) == 1 and "p4" not in index and len(index) == 29
    added = make_pages(1, seed=9, prefix="new")
    assert index.add(added) == ["new0"]  # new pages go in with uuid5 ids
    assert client.retrieve("docs", [point_id("new0")])[0].payload["page_id"] == "new0"
    # a page added without its prefetch vectors could never be a prefetch candidate: add() needs the recipe
    with pytest.raises(ConfigError, match="prefetch_vectors"):
        pre.add(make_pages(1, seed=10, prefix="pre"))
    pre.prefetch_vectors = lambda p: {"mean_pooled": p.patch_vectors.mean(dim=1)}
    pre.add(make_pages(1, seed=10, prefix="pre"))
    assert len(client.retrieve("docs", [point_id("pre0")], with_vectors=True)[0].vector["mean_pooled"]) == 3
    index.delete(["new0"])
    assert ids(pre.search(q, 10)) == ids(index.search(q, 10))


def test_point_ids_as_page_ids_and_an_unnamed_vector():
    pages = make_pages(12)
    client = QdrantClient(":memory:")
    client.create_collection("plain", vectors_config=multivector())
    client.upsert("plain", [models.PointStruct(id=i, vector=p.vectors.tolist(),
                                               payload={"grid": list(p.grid), "patch_rows": p.patch_rows.tolist()})
                            for i, p in enumerate(pages)])
    index = QdrantPageIndex.open(client, "plain", fields=QdrantFields(page_id=None))
    assert index.vector_name is None and sorted(index.page_ids(), key=int) == [str(i) for i in range(12)]
    renamed = [PageEmbedding(str(i), p.vectors, p.patch_rows, p.grid) for i, p in enumerate(pages)]
    q = make_query()
    assert_same_hits(index.search(q, 5), reference(renamed).search(q, 5))
    assert torch.equal(index.embedding("3").patch_rows, pages[3].patch_rows)
    with pytest.raises(ValueError, match="point id"):
        index.add(make_pages(1, prefix="x"))


def test_collections_that_cannot_serve_are_refused_or_explained():
    client = QdrantClient(":memory:")
    client.create_collection("single", vectors_config={"v": models.VectorParams(size=D, distance=models.Distance.DOT)})
    with pytest.raises(ConfigError, match="MAX_SIM"):
        QdrantPageIndex.open(client, "single", vector_name="v")
    client.create_collection("euclid", vectors_config={"v": multivector(models.Distance.EUCLID)})
    with pytest.raises(ConfigError, match="Dot"):
        QdrantPageIndex.open(client, "euclid")
    with pytest.raises(ConfigError, match="no vector named"):
        QdrantPageIndex.open(client, "euclid", vector_name="other")
    # a collection without the layout fields searches, but cannot give the maps their grid
    pages = make_pages(5)
    client.create_collection("bare", vectors_config={"colpali": multivector()})
    client.upsert("bare", [models.PointStruct(id=i, vector={"colpali": p.vectors.tolist()},
                                              payload={"page_id": p.page_id})
                           for i, p in enumerate(pages)])
    bare = QdrantPageIndex.open(client, "bare")
    assert len(bare.search(make_query(), 3)) == 3
    with pytest.raises(IndexStateError, match="'grid'"):
        bare.search(make_query(), 3, with_embeddings=True)
    client.create_collection("noid", vectors_config={"colpali": multivector()})
    client.upsert("noid", [models.PointStruct(id=1, vector={"colpali": pages[0].vectors.tolist()}, payload={})])
    with pytest.raises(IndexStateError, match="page_id"):
        QdrantPageIndex.open(client, "noid").search(make_query(), 1)


# --- the first stage and the pipeline over Qdrant -------------------------------------------------------------------
@pytest.fixture(scope="module")
def page_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdrant_pages")
    files = []
    for i, (w, h) in enumerate([(200, 150), (120, 260), (160, 160), (90, 140), (150, 120)]):
        f = d / f"page{i}.png"
        T.random_page_image(w, h, seed=30 + i).save(f)
        files.append(f)
    return files


def test_first_stage_candidates_over_qdrant_equal_those_over_faiss(page_files):
    model, proc = T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    r_model, r_proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 12)
    reranker = MiniReranker(r_model, r_proc, RerankConfig(keep_ratio=0.5, index_keep_ratio=0.5))
    embedder = PageEmbedder(model, proc, pixel_budget=reranker.pixel_budget)
    faiss_stage = FirstStage(embedder, PageIndex())
    faiss_stage.add([Page(f) for f in page_files])
    # another process, whose first stage only knows the collection (pages reload from their image_path)
    client = QdrantClient(":memory:")
    qd = QdrantPageIndex.create(client, "pages")
    qd.add([faiss_stage.index.embedding(i) for i in faiss_stage.index.page_ids()],
           [faiss_stage.index.metadata(i) for i in faiss_stage.index.page_ids()])
    q_stage = FirstStage(embedder, QdrantPageIndex.open(client, "pages"))
    want = faiss_stage.candidates(QUERY, 4, reranker)
    got = q_stage.candidates(QUERY, 4, reranker)
    assert [(c.page_id, c.first_stage_rank) for c in got] == [(c.page_id, c.first_stage_rank) for c in want]
    assert [c.first_stage_score for c in got] == pytest.approx([c.first_stage_score for c in want], rel=1e-5)
    q = embedder.encode_query(QUERY)
    for g, w in zip(got, want):
        grid = reranker.visual_grid(g.page)
        assert g.page.source == w.page.source and g.importance.grid == grid and g.index_importance.grid == grid
        torch.testing.assert_close(g.importance.values, w.importance.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.index_importance.values, w.index_importance.values, rtol=1e-5, atol=1e-6)
        emb = q_stage.index.embedding(g.page_id)
        torch.testing.assert_close(g.importance.values, query_importance(q, emb, grid).values)
        torch.testing.assert_close(g.index_importance.values, page_importance(emb, grid).values)
    r_got, r_want = reranker.rerank(QUERY, got), reranker.rerank(QUERY, want)
    assert [r.page_id for r in r_got] == [r.page_id for r in r_want]
    assert [r.score for r in r_got] == pytest.approx([r.score for r in r_want], rel=1e-4, abs=1e-5)


def test_rerank_pipeline_indexes_into_qdrant(page_files, tmp_path):
    ref = T.tiny_pipeline(config=RerankConfig(keep_ratio=0.5))
    pipe = RerankPipeline(ref.embedder, ref.reranker, QdrantPageIndex.create(":memory:", "pages"), dpi=40,
                          show_progress=False)
    assert isinstance(pipe.index, QdrantPageIndex)
    report = pipe.add([str(f) for f in page_files])
    ref.add([str(f) for f in page_files])
    assert len(report.pages) == 5 and len(pipe.index) == 5
    again = pipe.add([str(page_files[0])])  # same content: a duplicate, found through content_hashes()
    assert len(again.pages) == 0 and len(again.duplicates) == 1
    got, want = pipe.search(QUERY, k=4, top_n=3), ref.search(QUERY, k=4, top_n=3)
    assert [r.page_id for r in got] == [r.page_id for r in want]
    assert [r.score for r in got] == pytest.approx([r.score for r in want], rel=1e-4, abs=1e-5)
    with pytest.raises(ConfigError, match="nprobe"):
        pipe.search(QUERY, k=4, nprobe=8)
    assert pipe.delete([got[0].page_id]) == 1 and got[0].page_id not in pipe.index
