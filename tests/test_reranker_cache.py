"""The page cache as the reranker uses it: reuse across processes, and every way an entry can go bad."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minirerank_core.reranker as reranker_mod
from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core.cache import read_entry

from .conftest import MAX_PIXELS, PAGE_SIZES

QUERY = "quarterly revenue table"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def count_prefills(monkeypatch):
    """Counts pages that go through the (expensive) prefill."""
    calls = []
    real = reranker_mod.prefill_pages

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(reranker_mod, "prefill_pages", counting)
    return calls


def cache_files(d):
    return sorted(Path(d).rglob("*.safetensors"))


def test_disk_cache_round_trip_gives_identical_scores(tiny, page_images, tmp_path, count_prefills):
    model, proc = tiny("qwen3_vl")
    pages = [Page(im, id=f"p{i}") for i, im in enumerate(page_images)]
    first = MiniReranker(model, proc, cache_dir=tmp_path).score(QUERY, pages)
    assert sum(count_prefills) == 3 and len(cache_files(tmp_path)) == 3
    again = MiniReranker(model, proc, cache_dir=tmp_path).score(QUERY, pages)  # fresh memory, same disk
    assert sum(count_prefills) == 3  # nothing recomputed
    assert again == first  # bit-identical


def test_truncated_cache_file_is_detected_and_recomputed(tiny, page_images, tmp_path, count_prefills):
    model, proc = tiny("qwen3_vl")
    first = MiniReranker(model, proc, cache_dir=tmp_path).score(QUERY, page_images)
    victim = cache_files(tmp_path)[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    again = MiniReranker(model, proc, cache_dir=tmp_path).score(QUERY, page_images)
    assert sum(count_prefills) == 3 + 1  # exactly the damaged page recomputed
    assert again == pytest.approx(first, rel=1e-6)
    read_entry(victim)  # rewritten as a valid entry


def test_changed_model_is_a_miss_not_a_stale_hit(tiny, page_images, tmp_path, count_prefills):
    model_a, proc = tiny("qwen3_vl", seed=0)
    model_b, _ = tiny("qwen3_vl", seed=1)
    MiniReranker(model_a, proc, cache_dir=tmp_path).score(QUERY, page_images)
    rb = MiniReranker(model_b, proc, cache_dir=tmp_path)
    scores_b = rb.score(QUERY, page_images)
    assert sum(count_prefills) == 6  # model B recomputed every page
    assert scores_b == pytest.approx(rb.dense_scores(QUERY, page_images), rel=1e-4)
    assert len(cache_files(tmp_path)) == 6  # model A's entries are untouched


def test_changed_kv_setting_is_a_miss(tiny, page_images, tmp_path, count_prefills):
    model, proc = tiny("qwen3_vl")
    MiniReranker(model, proc, cache_dir=tmp_path).score(QUERY, page_images)
    MiniReranker(model, proc, RerankConfig(exit_layer=6, band=(2, 4)), cache_dir=tmp_path).score(QUERY, page_images)
    assert sum(count_prefills) == 6
    # Exit layer and keep ratio do not change the KV: no recompute.
    MiniReranker(model, proc, RerankConfig(exit_layer=5, band=(2, 4)), cache_dir=tmp_path).score(QUERY, page_images)
    assert sum(count_prefills) == 6


def test_byte_bounded_memory_cache_still_scores(tiny, page_images):
    model, proc = tiny("qwen2_vl")
    r = MiniReranker(model, proc, memory_cache_bytes=1)  # nothing fits: every call recomputes
    assert r.score(QUERY, page_images) == pytest.approx(r.dense_scores(QUERY, page_images), rel=1e-4)
    assert len(r.store.memory) == 0


WRITER = textwrap.dedent(
    """
    import sys
    from minirerank_core import MiniReranker
    from minirerank_core import testing as T
    from minirerank_core.cache import CacheEntry, DiskStore
    from minirerank_core.pages import as_pages
    sizes, max_pixels, cache = eval(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    model, proc = T.tiny_model_and_processor("qwen3_vl", seed=0, max_pixels=max_pixels)
    pages = as_pages([T.random_page_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)])
    r = MiniReranker(model, proc)
    kvs = r.index(pages)
    disk = DiskStore(cache)
    for _ in range(20):  # keep rewriting the same entries while the other process does too
        for page, kv in zip(pages, kvs):
            tensors, meta = kv.to_tensors()
            disk.put(r._key(page, None), CacheEntry(tensors=tensors, meta=meta))
    """
)


def test_concurrent_writers_of_the_same_entries_leave_valid_entries(tiny, page_images, tmp_path, count_prefills):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", WRITER, repr(PAGE_SIZES), str(MAX_PIXELS), str(tmp_path)]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    files = cache_files(tmp_path)
    assert len(files) == 3
    for f in files:
        read_entry(f)  # each is complete and passes its checksum
    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, cache_dir=tmp_path)
    scores = r.score(QUERY, page_images)
    assert sum(count_prefills) == 0  # served from what the writers left
    assert scores == pytest.approx(r.dense_scores(QUERY, page_images), rel=1e-4)


def test_save_and_from_pretrained_round_trip_offline(tiny, page_images, tmp_path):
    model, proc = tiny("qwen2_vl")
    cfg = RerankConfig(exit_layer=5, band=(1, 4), query_positions="shared")
    r = MiniReranker(model, proc, cfg)
    r.save_pretrained(tmp_path / "ckpt")
    loaded = MiniReranker.from_pretrained(tmp_path / "ckpt")  # config and template come from the checkpoint
    assert loaded.config == r.config
    assert loaded.template == r.template
    assert loaded.fingerprint == r.fingerprint
    assert loaded.score(QUERY, page_images) == pytest.approx(r.score(QUERY, page_images), rel=1e-6)
