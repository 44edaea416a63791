"""The page cache as the reranker uses it: reuse across processes, and every way an entry can go bad."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import minirerank_core.rerankers.page_side as reranker_mod
from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core.cache import read_entry

from tests.helpers import MAX_PIXELS, PAGE_SIZES

QUERY = "quarterly revenue table"
ROOT = Path(__file__).resolve().parents[2]


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
            disk.put(r.pages.key(page, None), CacheEntry(tensors=tensors, meta=meta))
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


# --- keys cover everything that changes the KV; the disk is never required ---------------------------------------
def test_other_image_preprocessing_is_a_miss_not_a_stale_hit(tiny, page_images, tmp_path, count_prefills):
    """Two processors that differ only in image_mean/std share a cache directory: each scores with its own KV."""
    import copy

    model, proc = tiny("qwen3_vl")
    first = MiniReranker(model, proc, cache_dir=tmp_path)
    first.index(page_images)
    other = copy.deepcopy(proc)
    other.image_processor.image_mean = [0.4, 0.45, 0.5]
    other.image_processor.image_std = [0.25, 0.3, 0.35]
    second = MiniReranker(model, other, cache_dir=tmp_path)
    before = sum(count_prefills)
    got = second.score(QUERY, page_images)
    assert sum(count_prefills) - before == len(page_images)  # recomputed, not served from the other processor's KV
    assert got == pytest.approx(second.dense_scores(QUERY, page_images), rel=1e-4)
    assert got != pytest.approx(first.score(QUERY, page_images), rel=1e-4)  # the preprocessing does matter
    assert len(cache_files(tmp_path)) == 2 * len(page_images)


def test_edited_cache_header_is_detected_and_recomputed(tiny, page_images, tmp_path, count_prefills):
    """The checksum covers the header's metadata: a file edited to next_position + 1 is not scored."""
    import json
    import struct

    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, cache_dir=tmp_path)
    want = r.score(QUERY, page_images[:1])
    (path,) = cache_files(tmp_path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["meta"])
    meta["next_position"] += 1
    header["__metadata__"]["meta"] = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data offsets aligned as safetensors writes them
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    fresh = MiniReranker(model, proc, cache_dir=tmp_path)
    before = sum(count_prefills)
    assert fresh.score(QUERY, page_images[:1]) == pytest.approx(want, rel=1e-5)
    assert sum(count_prefills) - before == 1  # the edited entry was discarded and recomputed


def test_unusable_cache_dir_falls_back_to_memory(tiny, page_images, tmp_path):
    from minirerank_core.errors import CacheDiskWarning

    model, proc = tiny("qwen3_vl")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.warns(CacheDiskWarning, match="memory"):
        r = MiniReranker(model, proc, cache_dir=not_a_dir)
    assert r.score(QUERY, page_images) == pytest.approx(r.dense_scores(QUERY, page_images), rel=1e-4)


def test_full_cache_disk_warns_once_and_keeps_serving(tiny, page_images, tmp_path, monkeypatch, recwarn, count_prefills):
    import errno

    from minirerank_core import fileio
    from minirerank_core.errors import CacheDiskWarning

    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, cache_dir=tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full)
    first = r.score(QUERY, page_images)
    again = r.score(QUERY, page_images)  # served from memory: no second prefill
    assert first == again == pytest.approx(r.dense_scores(QUERY, page_images), rel=1e-4)
    assert sum(count_prefills) == len(page_images)
    warned = [w for w in recwarn if issubclass(w.category, CacheDiskWarning)]
    assert len(warned) == 1 and "no space left" in str(warned[0].message).lower()
    assert cache_files(tmp_path) == [] and not [p for p in tmp_path.rglob("*") if p.is_file()]  # no debris
