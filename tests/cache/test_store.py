"""Tests for minirerank_core.cache: keys, memory LRU, atomic/validated disk files, tiering.

All disk tests use real files under tmp_path; the crash and concurrency tests use real processes.
The helpers ``kv_entry`` and ``KEY`` are also imported by the child processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from minirerank_core.cache import CacheEntry, CacheKey, CacheStore, DiskStore, MemoryStore, TieredStore, read_entry
from minirerank_core.errors import CacheCorruptError, ConfigError

REPO = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parent
LOGGER = "minirerank.cache"
IMG = hashlib.sha256(b"page-1").hexdigest()
KEY = CacheKey(IMG, "model-a@v1", {"band": [0, 4], "dtype": "bfloat16", "prune": 0.5})


def kv_entry(tag: int, n: int = 256) -> CacheEntry:
    """Deterministic mixed-dtype entry; different tags give different bytes everywhere."""
    g = torch.Generator().manual_seed(tag)
    return CacheEntry(
        tensors={
            "keys": torch.randn(2, n, 8, generator=g),
            "values": torch.randn(2, n, 8, generator=g).to(torch.bfloat16),
            "positions": torch.arange(n, dtype=torch.int64) + tag,
            "mask": torch.randint(-128, 127, (n,), dtype=torch.int8, generator=g),
        },
        meta={"tag": tag, "n_tokens": n, "layers": [0, 1], "note": "ünïcode"},
    )


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(entry: CacheEntry) -> str:
    """Bit-level identity of an entry: names, dtypes, shapes, bytes and meta."""
    h = hashlib.sha256(json.dumps(entry.meta, sort_keys=True).encode())
    for name in sorted(entry.tensors):
        t = entry.tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode() + raw(t))
    return h.hexdigest()


def assert_identical(got: CacheEntry | None, want: CacheEntry) -> None:
    assert got is not None
    assert got.meta == want.meta
    assert sorted(got.tensors) == sorted(want.tensors)
    for name, t in want.tensors.items():
        g = got.tensors[name]
        assert (g.dtype, g.shape, g.device.type) == (t.dtype, t.shape, "cpu"), name
        assert raw(g) == raw(t), name


def tmp_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/.*.tmp"))


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed safetensors header and write the file back, data untouched."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n :])


# --------------------------------------------------------------------------- keys


def test_digest_is_canonical_sha256_and_stable() -> None:
    fields = {"image_hash": KEY.image_hash, "model_fingerprint": KEY.model_fingerprint, "settings": dict(KEY.settings)}
    expected = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert KEY.digest == expected
    # Pinned literal: a change here orphans every cache already on disk.
    assert KEY.digest == "103469d9c78258c0d25a79c7fc8a0f2229c1e104fab855aa430bef8dfca2f711"


def test_digest_changes_with_every_field_but_not_with_setting_order() -> None:
    reordered = CacheKey(IMG, "model-a@v1", {"prune": 0.5, "dtype": "bfloat16", "band": [0, 4]})
    assert reordered.digest == KEY.digest and reordered == KEY and hash(reordered) == hash(KEY)
    variants = [
        CacheKey(hashlib.sha256(b"page-2").hexdigest(), "model-a@v1", dict(KEY.settings)),
        CacheKey(IMG, "model-a@v2", dict(KEY.settings)),
        CacheKey(IMG, "model-a@v1", {**KEY.settings, "prune": 0.25}),
        CacheKey(IMG, "model-a@v1", {**KEY.settings, "band": [0, 5]}),
        CacheKey(IMG, "model-a@v1", {**KEY.settings, "extra": None}),
    ]
    digests = {v.digest for v in variants} | {KEY.digest}
    assert len(digests) == len(variants) + 1
    assert all(v != KEY for v in variants)


def test_key_is_validated_snapshotted_and_picklable() -> None:
    settings = {"band": 1}
    key = CacheKey(IMG, "fp", settings)
    settings["band"] = 2  # the caller's later mutation must not move the key
    assert key.settings == {"band": 1}
    assert pickle.loads(pickle.dumps(key)) == key  # keys travel to worker processes
    with pytest.raises(ConfigError, match="JSON"):
        CacheKey(IMG, "fp", {"x": object()})
    with pytest.raises(ConfigError, match="JSON"):
        CacheKey(IMG, "fp", {"x": float("nan")})
    with pytest.raises(ConfigError, match="keys must be str"):
        CacheKey(IMG, "fp", {1: "a"})
    with pytest.raises(ConfigError, match="model_fingerprint"):
        CacheKey(IMG, "", {})


# --------------------------------------------------------------------------- disk: round trip


def test_disk_round_trip_mixed_dtypes_bit_identical(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    entry = kv_entry(7)
    entry.tensors["scalar"] = torch.tensor(3.5, dtype=torch.float16)
    entry.tensors["empty"] = torch.zeros(0, 4, dtype=torch.int64)
    store.put(KEY, entry)
    path = tmp_path / KEY.digest[:2] / f"{KEY.digest}.safetensors"
    assert path.is_file() and not tmp_files(tmp_path)
    assert KEY in store and len(store) == 1
    assert_identical(store.get(KEY), entry)
    assert isinstance(store, CacheStore)
    assert store.stats["hits"] == 1 and store.stats["writes"] == 1
    # Header carries the documented fields.
    fields, again = read_entry(path)
    assert CacheKey(**fields) == KEY
    assert_identical(again, entry)


def test_disk_put_accepts_views_shared_storage_and_noncontiguous(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    kv = torch.randn(2, 5, 3)
    entry = CacheEntry({"k": kv[0], "v": kv[1], "k_again": kv[0], "t": kv[1].t()}, {})
    store.put(KEY, entry)
    assert_identical(store.get(KEY), CacheEntry({n: t.contiguous() for n, t in entry.tensors.items()}, {}))


def test_returned_entry_is_independent_of_later_file_changes(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    got = store.get(KEY)
    store.put(KEY, kv_entry(2))  # replaces the file a lazy mmap would still be reading
    store.delete(KEY)
    assert_identical(got, kv_entry(1))
    got.tensors["keys"].add_(1)  # and it is a private, writable copy


def test_no_pickle_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise AssertionError("pickle/torch.load must not be used")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(mod, name, boom)
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(3))
    assert_identical(store.get(KEY), kv_entry(3))


# --------------------------------------------------------------------------- disk: corruption


@pytest.mark.parametrize("size", ["half", 5, 0])
def test_truncated_file_is_a_logged_miss_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture, size) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    path = store.path_for(KEY)
    cut = path.stat().st_size // 2 if size == "half" else size
    os.truncate(path, cut)
    with pytest.raises(CacheCorruptError, match="truncated cache file"):
        read_entry(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(KEY) is None
    assert not path.exists()
    assert any("truncated cache file" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert store.stats["corrupt"] == 1 and store.stats["misses"] == 1
    assert len(store) == 0 and KEY not in store


def test_flipped_data_byte_fails_checksum(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    path = store.path_for(KEY)
    data = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    data[data_start + (len(data) - data_start) // 2] ^= 0x01  # same size, still parseable
    path.write_bytes(bytes(data))
    assert KEY in store  # the cheap header check cannot see it ...
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(KEY) is None  # ... but get() verifies the checksum
    assert "checksum mismatch" in caplog.text and not path.exists()


def test_renamed_tensor_in_header_fails_checksum(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    rewrite_header(store.path_for(KEY), lambda h: h.__setitem__("keyz", h.pop("keys")))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(KEY) is None
    assert "checksum mismatch" in caplog.text


def test_file_copied_to_another_keys_path_is_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskStore(tmp_path)
    other = CacheKey(IMG, "model-b@v1", dict(KEY.settings))
    store.put(KEY, kv_entry(1))
    dst = store.path_for(other)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store.path_for(KEY), dst)
    assert other not in store
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(other) is None
    assert "stale cache file" in caplog.text and not dst.exists()
    assert_identical(store.get(KEY), kv_entry(1))  # the genuine entry is untouched


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h["__metadata__"].__setitem__("format", "minirerank-kv/999"), "cache format"),
        (lambda h: h.pop("__metadata__"), "unreadable cache header"),
        (lambda h: h["__metadata__"].__setitem__("meta", "{not json"), "corrupt cache file"),
    ],
    ids=["wrong-format", "no-metadata", "bad-meta-json"],
)
def test_bad_header_is_a_logged_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture, edit, message: str) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    path = store.path_for(KEY)
    rewrite_header(path, edit)
    with pytest.raises(CacheCorruptError, match=message):
        read_entry(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(KEY) is None
    assert message in caplog.text and not path.exists()


def test_garbage_file_is_a_logged_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskStore(tmp_path)
    path = store.path_for(KEY)
    path.parent.mkdir(parents=True)
    path.write_bytes((20).to_bytes(8, "little") + b"this is not json !!!")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(KEY) is None
    assert "unreadable cache header" in caplog.text and not path.exists()


def test_changed_model_fingerprint_is_a_plain_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DiskStore(tmp_path)
    store.put(KEY, kv_entry(1))
    new_model = CacheKey(KEY.image_hash, "model-a@v2", dict(KEY.settings))
    assert new_model.digest != KEY.digest
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(new_model) is None
    assert not caplog.records  # an ordinary miss, nothing to warn about
    assert_identical(store.get(KEY), kv_entry(1))
    assert store.stats["misses"] == 1 and store.stats["corrupt"] == 0


def test_delete_clear_and_len_ignore_foreign_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    keys = [CacheKey(IMG, f"fp{i}", {}) for i in range(3)]
    for i, k in enumerate(keys):
        store.put(k, kv_entry(i, n=4))
    (tmp_path / "README.txt").write_text("not ours")
    shard = store.path_for(keys[0]).parent
    (shard / "notes.safetensors").write_text("not a digest name")
    (shard / f".{keys[0].digest}.123.abcd.tmp").write_bytes(b"partial")
    assert len(store) == 3  # neither the temp file nor foreign names count
    store.delete(keys[1])
    store.delete(keys[1])  # idempotent
    assert len(store) == 2 and keys[1] not in store
    store.clear()
    assert len(store) == 0 and not tmp_files(tmp_path)
    assert (tmp_path / "README.txt").exists() and (shard / "notes.safetensors").exists()


# --------------------------------------------------------------------------- disk: processes


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from test_store import KEY, kv_entry
    from minirerank_core.cache import store as S
    from minirerank_core import fileio as F  # the one atomic writer every store uses

    root, mode = sys.argv[1], sys.argv[2]
    if mode == "mid-write":
        real_open = open

        class HalfWriter:  # writes half the file, flushes, then hangs until killed
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): return self.f.__exit__(*exc)
            def fileno(self): return self.f.fileno()
            def flush(self): self.f.flush()
            def write(self, b):
                self.f.write(b[: len(b) // 2]); self.f.flush(); time.sleep(120)

        F.open = lambda p, m="r", *a, **k: HalfWriter(real_open(p, m, *a, **k)) if "x" in m else real_open(p, m, *a, **k)
    else:  # complete, fsynced temp file; killed before the rename
        F.os.replace = lambda *a, **k: time.sleep(120)
    S.DiskStore(root).put(KEY, kv_entry(2, n=4096))
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize(("mode", "previous"), [("mid-write", True), ("before-rename", False)])
def test_killed_writer_leaves_no_partial_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str, previous: bool
) -> None:
    root = tmp_path / "cache"
    store = DiskStore(root)
    if previous:
        store.put(KEY, kv_entry(1, n=4096))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(root), mode],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300  # generous: a busy machine starts processes slowly
        while not any(p.stat().st_size > 0 for p in tmp_files(root)):  # temp file exists and holds data
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "writer never started"
            time.sleep(0.02)
        time.sleep(0.1)  # let the child reach its hang point
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    assert len(tmp_files(root)) == 1
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = store.get(KEY)
    assert not caplog.records  # nothing corrupt was ever visible under the final name
    if previous:
        assert_identical(got, kv_entry(1, n=4096))
    else:
        assert got is None
    assert len(store) == int(previous)
    assert store.sweep(max_age_s=3600) == 0  # too young: could belong to a live writer
    assert store.sweep(max_age_s=0) == 1 and not tmp_files(root)


_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from test_store import KEY, kv_entry
    from minirerank_core.cache import DiskStore

    root, tag, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    store, entry = DiskStore(root), kv_entry(tag, n=16384)
    open(ready, "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    end, n = time.monotonic() + 1.0, 0
    while time.monotonic() < end or n < 5:
        store.put(KEY, entry)
        n += 1
    print(n)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="os.replace over an open file fails on Windows")
def test_concurrent_writers_never_expose_a_torn_entry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "cache"
    store = DiskStore(root)
    want = {fingerprint(kv_entry(tag, n=16384)): tag for tag in (1, 2)}
    store.put(KEY, kv_entry(1, n=16384))  # seeded: from here on a read must always find a full entry
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(tag), str(tmp_path / f"ready{tag}"), str(go)],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in (1, 2)
    ]
    try:
        deadline = time.monotonic() + 300  # generous: a busy machine starts processes slowly
        while not all((tmp_path / f"ready{tag}").exists() for tag in (1, 2)):
            assert all(p.poll() is None for p in procs), [p.communicate()[1] for p in procs]
            assert time.monotonic() < deadline, "writers never became ready"
            time.sleep(0.02)
        seen = {1: 0, 2: 0}
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            go.touch()
            while any(p.poll() is None for p in procs):
                got = store.get(KEY)
                assert got is not None, "a reader saw no file while writers replaced it"
                seen[want[fingerprint(got)]] += 1  # KeyError = a torn or foreign entry
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert all(int(out) >= 5 for out, _ in outs)
    assert sum(seen.values()) > 0 and not caplog.records and store.stats["corrupt"] == 0
    fields, final = read_entry(store.path_for(KEY))
    assert CacheKey(**fields) == KEY and fingerprint(final) in want
    assert len(store) == 1 and not tmp_files(root)


# --------------------------------------------------------------------------- memory


def mem_entry(nbytes: int, fill: int = 0) -> CacheEntry:
    e = CacheEntry({"x": torch.full((nbytes,), fill, dtype=torch.int8)}, {})
    return e


def test_memory_lru_eviction_refresh_and_stats() -> None:
    a, b, c, d = (CacheKey(IMG, f"fp-{n}", {}) for n in "abcd")
    size = mem_entry(1000).nbytes
    assert size >= 1000
    store = MemoryStore(max_bytes=3 * size)
    for i, k in enumerate((a, b, c)):
        store.put(k, mem_entry(1000, i))
    assert store.nbytes == 3 * size and len(store) == 3
    assert store.get(a) is not None  # a becomes most recent; b is now the oldest
    store.put(d, mem_entry(1000, 3))
    assert b not in store and all(k in store for k in (a, c, d))
    assert store.nbytes == 3 * size <= store.max_bytes
    assert store.get(b) is None
    store.put(b, mem_entry(1000, 1))  # evicts c (a was refreshed before c was ever read)
    assert c not in store and a in store
    assert store.stats == {"hits": 1, "misses": 1, "evictions": 2}
    assert isinstance(store, CacheStore)


def test_memory_replace_oversize_delete_clear() -> None:
    k1, k2 = CacheKey(IMG, "fp1", {}), CacheKey(IMG, "fp2", {})
    store = MemoryStore(max_bytes=5000)
    store.put(k1, mem_entry(1000))
    store.put(k1, mem_entry(2000))  # replacing re-accounts, does not double count
    assert store.nbytes == mem_entry(2000).nbytes and len(store) == 1
    store.put(k2, mem_entry(1000))
    store.put(k1, mem_entry(6000))  # larger than the whole bound: silently not stored ...
    assert k1 not in store and k2 in store  # ... and the older value does not linger or evict others
    assert store.stats["evictions"] == 0 and store.nbytes == mem_entry(1000).nbytes
    store.delete(k2)
    assert len(store) == 0 and store.nbytes == 0
    store.put(k1, mem_entry(10))
    store.clear()
    assert len(store) == 0 and store.nbytes == 0 and store.get(k1) is None


def test_memory_store_is_thread_safe() -> None:
    keys = [CacheKey(IMG, f"fp{i}", {}) for i in range(20)]
    size = mem_entry(100).nbytes
    store = MemoryStore(max_bytes=7 * size)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(500):
            k = keys[int(torch.randint(0, len(keys), (1,), generator=g))]
            store.put(k, mem_entry(100)) if seed % 2 else store.get(k)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    present = [k for k in keys if k in store]
    assert store.nbytes == len(present) * size == len(store) * size <= store.max_bytes


# --------------------------------------------------------------------------- tiered


def test_tiered_promotes_disk_hits_and_writes_both(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path)
    disk.put(KEY, kv_entry(1))
    tiered = TieredStore(MemoryStore(max_bytes=10 * 1024**2), disk)
    assert KEY in tiered and KEY not in tiered.memory
    assert_identical(tiered.get(KEY), kv_entry(1))
    assert KEY in tiered.memory and disk.stats["hits"] == 1
    assert_identical(tiered.get(KEY), kv_entry(1))
    assert disk.stats["hits"] == 1 and tiered.memory.stats["hits"] == 1  # second read never touched disk

    other = CacheKey(IMG, "model-b", {})
    tiered.put(other, kv_entry(2))
    assert other in tiered.memory and other in disk and len(tiered) == 2
    assert_identical(disk.get(other), kv_entry(2))
    tiered.delete(other)
    assert other not in tiered.memory and other not in disk
    tiered.clear()
    assert len(tiered) == 0 and len(tiered.memory) == 0 and tiered.get(KEY) is None


def test_tiered_without_disk() -> None:
    tiered = TieredStore(MemoryStore(), None)
    assert tiered.get(KEY) is None
    tiered.put(KEY, kv_entry(1))
    assert_identical(tiered.get(KEY), kv_entry(1))
    assert KEY in tiered and len(tiered) == 1 and isinstance(tiered, CacheStore)
