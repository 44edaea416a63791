"""PageIndex options for large collections: float16 storage, OPQ, an HNSW coarse quantizer, approximate pre-ranking
(rescore), segments built on disk from a generator (never all in RAM), hits that carry their embeddings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minirerank_core import ConfigError
from minirerank_core.errors import DuplicatePageIdError, DiskFullError
from minirerank_core.retrieval import AnnConfig, PageEmbedding, PageIndex, SearchParams
from minirerank_core.retrieval import segment as seg_mod
from tests.helpers import D, assert_same_hits, ids, unit

REPO = Path(__file__).resolve().parents[2]


def planted(n: int = 600, seed: int = 3, tokens: int = 24):
    """n pages of ``tokens`` unit vectors, and a query whose planted pages (every 29th) hold near-copies of some of
    its tokens, of graded strength: the exact top ranks are the planted pages, in order."""
    g = torch.Generator().manual_seed(seed)
    q = unit(torch.randn(8, D, generator=g))
    pages = []
    for i in range(n):
        v = unit(torch.randn(tokens, D, generator=g))
        if i % 29 == 0:
            j = i // 29
            s = 0.97 - 0.02 * j
            v[:3] = unit(s * q[j % 6 : j % 6 + 3] + (1 - s) * unit(torch.randn(3, D, generator=g)))
        pages.append(PageEmbedding(f"p{i}", v, torch.arange(tokens - 12, tokens), (3, 4), content_hash=f"h{i}",
                                   metadata={"n": i}))
    return pages, q


@pytest.fixture(scope="module")
def collection():
    return planted()


def exact_ref(pages, q, k=10):
    ref = PageIndex(index_type="flat")
    ref.add(pages)
    return ref.search(q, k)


def test_float16_storage_rescoring_error_is_bounded(collection, tmp_path):
    pages, q = collection
    want = exact_ref(pages, q)
    index = PageIndex.create(tmp_path / "ix", ann=AnnConfig(index_type="flat", vector_dtype="float16"))
    index.add(pages)
    seg_dir = next((tmp_path / "ix").glob("seg-*"))
    stored = np.load(seg_dir / "vectors.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (sum(p.vectors.shape[0] for p in pages), D)
    got = index.search(q, 10)
    assert ids(got) == ids(want)
    # 11 mantissa bits: each stored value moves by <= 2^-11 relative; a MaxSim sum of 8 dot products by ~1e-3
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=2e-3)
    assert [h.score for h in got] != [h.score for h in want]  # it did go through float16
    emb = index.embedding("p29")
    assert emb.vectors.dtype == torch.float32
    torch.testing.assert_close(emb.vectors, pages[29].vectors, atol=1e-3, rtol=0)
    reopened = PageIndex.open(tmp_path / "ix", verify=True)
    assert reopened.ann_config.vector_dtype == "float16"
    assert_same_hits(reopened.search(q, 10), got)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """FAISS training (OPQ above all) runs many tiny OpenMP loops: on a busy 2-core machine two threads (what the
    root conftest gives torch, and so the shared OpenMP runtime) make it up to ~20x slower. One thread here."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("ann", [
    AnnConfig(index_type="ivfpq", nlist=16, opq=True),
    AnnConfig(index_type="ivfpq", nlist=16, quantizer="hnsw"),
    AnnConfig(index_type="ivf", nlist=16, quantizer="hnsw"),
    AnnConfig(index_type="ivfpq", nlist=16, opq=True, quantizer="hnsw", vector_dtype="float16"),
], ids=["opq", "hnsw-quantizer", "ivf-hnsw-quantizer", "opq-hnsw-fp16"])
def test_compressed_candidate_search_finds_the_exact_top(collection, tmp_path, ann):
    pages, q = collection
    want = exact_ref(pages, q)
    index = PageIndex.create(tmp_path / "ix", ann=ann)
    index.add(pages)
    assert index.stats()["segments"][0]["kind"] == ann.index_type
    got = index.search(q, 10, k_prime=64, nprobe=16)
    assert len(set(ids(got)) & set(ids(want))) >= 9
    rel = 2e-3 if ann.vector_dtype == "float16" else 1e-5
    exact = {h.page_id: h.score for h in index.search(q, len(pages), exact=True)}
    for h in got:  # whatever generated the candidate, its score is exact MaxSim over the stored vectors
        assert h.score == pytest.approx(exact[h.page_id], rel=1e-5)
    reopened = PageIndex.open(tmp_path / "ix", verify=True)  # the FAISS file (OPQ, HNSW quantizer) reads back
    assert_same_hits(reopened.search(q, 10, k_prime=64, nprobe=16), got, rel=rel)
    # nprobe reaches FAISS through the OPQ wrapper and the HNSW quantizer: one list gives other candidates
    few = reopened.search(q, len(pages), k_prime=64, nprobe=1)
    assert set(ids(few)) != set(ids(reopened.search(q, len(pages), k_prime=64, nprobe=16)))


def test_rescore_limits_exact_rescoring_to_the_best_approximate_candidates(collection, monkeypatch):
    pages, q = collection
    want = exact_ref(pages, q)
    index = PageIndex(ann=AnnConfig(index_type="ivfpq", nlist=16))
    index.add(pages)
    full = index.search(q, len(pages), k_prime=64, nprobe=16)  # every candidate re-scored
    assert len(full) > 200
    # a limit above the number of candidates changes nothing
    assert_same_hits(index.search(q, len(pages), k_prime=64, nprobe=16, rescore=10_000), full)
    scored = []
    real = seg_mod.Segment.scores

    def spy(self, query, pages=None):
        scored.append(self.n_pages if pages is None else len(pages))
        return real(self, query, pages)

    monkeypatch.setattr(seg_mod.Segment, "scores", spy)
    cut = index.search(q, 10, k_prime=64, nprobe=16, rescore=40)
    assert sum(scored) == 40  # only the best 40 by the approximate MaxSim were read and scored exactly
    assert len(set(ids(cut)) & set(ids(want))) >= 9  # the planted pages lead the approximate ranking too
    scores = {h.page_id: h.score for h in full}
    assert [h.score for h in cut] == pytest.approx([scores[h.page_id] for h in cut], rel=1e-6)  # exact scores
    scored.clear()
    assert len(index.search(q, 30, k_prime=64, nprobe=16, rescore=5)) == 30 and sum(scored) == 30  # max(rescore, k)
    index.search_params = SearchParams(k_prime=64, nprobe=16, rescore=40)  # as a default
    assert_same_hits(index.search(q, 10), cut)
    with pytest.raises(ValueError, match="rescore"):
        SearchParams(rescore=0)


def test_rescore_is_persisted_only_when_set(tmp_path, collection):
    pages, q = collection
    PageIndex.create(tmp_path / "a", search_params=SearchParams(rescore=50)).add(pages[:50])
    assert PageIndex.open(tmp_path / "a").search_params.rescore == 50
    PageIndex.create(tmp_path / "b").add(pages[:50])
    import json

    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "rescore" not in manifest["search"]  # earlier versions read this manifest


def test_hits_carry_their_embeddings_from_the_same_snapshot(collection):
    pages, q = collection
    index = PageIndex(ann=AnnConfig(index_type="ivfpq", nlist=16))
    index.add(pages)
    plain = index.search(q, 5)
    hits = index.search(q, 5, with_embeddings=True)
    assert hits == plain and all(h.embedding is None for h in plain)  # the embedding is not part of equality
    for h in hits:
        e = index.embedding(h.page_id)
        assert h.embedding.page_id == h.page_id and h.embedding.grid == e.grid
        torch.testing.assert_close(h.embedding.vectors, e.vectors, rtol=0, atol=0)
        assert torch.equal(h.embedding.patch_rows, e.patch_rows)


# --- segments built on disk ---------------------------------------------------------------------------------------
def _generator(pages, probe=None, at=None):
    for i, p in enumerate(pages):
        if probe is not None and i == at:
            probe()
        yield p


def test_a_generator_larger_than_the_build_memory_is_built_on_disk(collection, tmp_path):
    pages, q = collection
    want = exact_ref(pages, q)
    budget = 20 * 24 * D * 4  # 20 pages of vectors: the rest spill to the staging directory
    index = PageIndex.create(tmp_path / "ix", ann=AnnConfig(index_type="ivfpq", nlist=16), build_memory_bytes=budget)
    seen = {}

    def probe():
        staging = [p for p in (tmp_path / "ix").iterdir() if p.name.startswith(".tmp-seg-")]
        seen["staging"] = staging
        seen["live"] = [seg_mod.build_in_progress(p) for p in staging]
        seen["bytes"] = [(p / "vectors.npy").stat().st_size for p in staging]
        # another process opening the index sweeps debris: it must leave a live build alone
        code = f"from minirerank_core.retrieval import PageIndex; PageIndex.open({str(tmp_path / 'ix')!r})"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)
        seen["after_sweep"] = [p.exists() for p in staging]

    added = index.add(_generator(pages, probe, at=300))
    assert len(added) == len(pages)
    assert len(seen["staging"]) == 1 and seen["live"] == [True] and seen["after_sweep"] == [True]
    assert seen["bytes"][0] >= 280 * 24 * D * 4  # vectors of the pages read so far are on disk, not in RAM
    assert not [p for p in (tmp_path / "ix").iterdir() if p.name.startswith(".tmp-")]  # renamed into place
    reopened = PageIndex.open(tmp_path / "ix", verify=True)  # the header written last is a valid .npy
    ref = PageIndex(ann=AnnConfig(index_type="ivfpq", nlist=16))
    ref.add(pages)
    assert_same_hits(reopened.search(q, 10, exact=True), want)
    assert_same_hits(reopened.search(q, 10, k_prime=64, nprobe=16), ref.search(q, 10, k_prime=64, nprobe=16))
    for pid in ("p0", "p311", "p599"):
        torch.testing.assert_close(reopened.embedding(pid).vectors, pages[int(pid[1:])].vectors, rtol=0, atol=0)


def test_a_failed_streamed_add_leaves_nothing(collection, tmp_path):
    pages, q = collection
    index = PageIndex.create(tmp_path / "ix", build_memory_bytes=1024)
    index.add(pages[:10])
    clash = PageEmbedding("p3", pages[500].vectors, pages[500].patch_rows, (3, 4), content_hash="other")
    with pytest.raises(DuplicatePageIdError):
        index.add(_generator([*pages[100:300], clash]))  # spilled 200 pages before the clash
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith(".")) == [".lock"]
    assert len(index) == 10 and len(PageIndex.open(tmp_path / "ix")) == 10


def test_disk_full_while_spilling_says_so(collection, tmp_path, monkeypatch):
    pages, _ = collection
    index = PageIndex.create(tmp_path / "ix", build_memory_bytes=1024)
    real = seg_mod._NpyAppender.append
    calls = []

    def full(self, block):
        calls.append(1)
        if len(calls) > 5:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, block)

    monkeypatch.setattr(seg_mod._NpyAppender, "append", full)
    with pytest.raises(DiskFullError, match="no space left"):
        index.add(pages[:50])
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith(".")) == [".lock"]
    monkeypatch.setattr(seg_mod._NpyAppender, "append", real)
    assert len(index.add(pages[:50])) == 50


def test_merges_and_compaction_stream_through_disk(collection, tmp_path):
    pages, q = collection
    index = PageIndex.create(tmp_path / "ix", ann=AnnConfig(index_type="ivfpq", nlist=16, vector_dtype="float16"),
                             max_segments=2, build_memory_bytes=4096)
    for start in range(0, 600, 150):
        index.add(pages[start : start + 150])
    index.delete(["p29", "p400"])
    index.compact()
    assert len(index.stats()["segments"]) == 1 and len(index) == 598
    ref = PageIndex(index_type="flat", ann=AnnConfig(vector_dtype="float16"))
    ref.add([p for p in pages if p.page_id not in ("p29", "p400")])
    assert_same_hits(index.search(q, 10, exact=True), ref.search(q, 10), rel=1e-6)
    assert_same_hits(PageIndex.open(tmp_path / "ix", verify=True).search(q, 10, exact=True), ref.search(q, 10),
                     rel=1e-6)


def test_bad_settings_are_named_errors():
    with pytest.raises(ValueError, match="vector_dtype"):
        AnnConfig(vector_dtype="int8")
    with pytest.raises(ValueError, match="quantizer"):
        AnnConfig(quantizer="pq")
    with pytest.raises(ConfigError, match="build_memory_bytes"):
        PageIndex(build_memory_bytes=0)


def test_npy_appender_header_reads_back(tmp_path):
    w = seg_mod._NpyAppender(tmp_path / "v.npy", 3, np.dtype(np.float16))
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    w.append(rows[:1])
    w.append(rows[1:])
    w.close()
    got = np.load(tmp_path / "v.npy", mmap_mode="r")
    assert got.shape == (4, 3) and got.dtype == np.float16
    np.testing.assert_array_equal(got, rows.astype(np.float16))
