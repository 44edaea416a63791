"""FsspecStore (the page cache on any fsspec filesystem) on real filesystems: fsspec's in-memory one, the local disk,
and S3 through s3fs against a local S3 server (moto's, started by the fixture as its own process)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from minirerank_core.cache import (
    CacheKey,
    CacheRemoteWarning,
    DiskStore,
    FsspecStore,
    MemoryStore,
    TieredStore,
    open_store,
)
from minirerank_core.errors import ConfigError

from tests.cache.test_store import KEY, assert_identical, fingerprint, kv_entry

REPO = Path(__file__).resolve().parents[2]
LOGGER = "minirerank.cache"
S3_CREDENTIALS = {"key": "testing", "secret": "testing"}


def other_key(n: int) -> CacheKey:
    return CacheKey(hashlib.sha256(f"page-{n}".encode()).hexdigest(), "model-a@v1", {"band": [0, 4]})


# --------------------------------------------------------------------------- filesystems
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 server (moto) in its own process; skipped where moto[server] or s3fs is not installed."""
    pytest.importorskip("s3fs", reason="s3fs (the fsspec S3 backend) is not installed: pip install -e '.[dev]'")
    pytest.importorskip("moto.server", reason="moto[server] (a local S3 server) is not installed: pip install -e '.[dev]'")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the local S3 server did not start in 60 s: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    url = f"http://127.0.0.1:{port}"
    try:
        fsspec.filesystem("s3", **s3_options(url)).mkdir("minirerank-test")
        yield url
    finally:  # also when the bucket cannot be made: never leave the server running
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_options(endpoint: str) -> dict:
    # skip_instance_cache: each store gets its own client, as another machine would
    return {**S3_CREDENTIALS, "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
            "skip_instance_cache": True}


@pytest.fixture(params=["memory", "local", "s3"])
def location(request, tmp_path):
    """(url, storage_options) of a fresh, empty cache root on each kind of filesystem."""
    if request.param == "memory":
        path = f"minirerank-test-{uuid.uuid4().hex}"
        yield f"memory://{path}", {}
        memory = fsspec.filesystem("memory")  # one per process: leave nothing behind for other tests
        if memory.exists(path):
            memory.rm(path, recursive=True)
    elif request.param == "local":
        yield f"file://{tmp_path / 'shared-cache'}", {}
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        yield f"s3://minirerank-test/{uuid.uuid4().hex}", s3_options(endpoint)


def store_at(location) -> FsspecStore:
    url, options = location
    return FsspecStore(url, storage_options=options)


def raw_object(store: FsspecStore, key: CacheKey) -> bytes:
    return store.fs.cat_file(store.path_for(key))


def upload(store: FsspecStore, path: str, data: bytes) -> None:
    """Write an object as another tool would (directories first where the filesystem has them)."""
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


# --------------------------------------------------------------------------- the store
def test_round_trip_is_bit_identical_and_the_same_file_as_disk_store(location, tmp_path):
    writer = store_at(location)
    entry = kv_entry(1)
    writer.put(KEY, entry)
    reader = store_at(location)  # another client of the same root
    assert KEY in reader and len(reader) == 1
    assert_identical(reader.get(KEY), entry)
    assert reader.stats["hits"] == 1
    # One format: an object copied to a DiskStore's path is read there, and a DiskStore file uploaded is read here.
    disk = DiskStore(tmp_path / "disk")
    disk.path_for(KEY).parent.mkdir(parents=True)
    disk.path_for(KEY).write_bytes(raw_object(reader, KEY))
    assert_identical(disk.get(KEY), entry)
    disk.put(other_key(1), kv_entry(2))
    upload(reader, reader.path_for(other_key(1)), disk.path_for(other_key(1)).read_bytes())
    assert_identical(reader.get(other_key(1)), kv_entry(2))


def test_put_of_an_existing_key_is_a_no_op(location):
    store = store_at(location)
    store.put(KEY, kv_entry(1))
    store_at(location).put(KEY, kv_entry(2))  # same name: the first object stays
    assert fingerprint(store.get(KEY)) == fingerprint(kv_entry(1))
    assert len(store) == 1


def test_missing_is_a_plain_miss(location):
    store = store_at(location)
    assert store.get(KEY) is None and KEY not in store and len(store) == 0
    assert store.stats["misses"] == 1 and store.stats["corrupt"] == 0


def test_corrupt_object_is_a_logged_miss_removed_and_rewritten(location, caplog):
    store = store_at(location)
    store.put(KEY, kv_entry(1))
    data = bytearray(raw_object(store, KEY))
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    upload(store, store.path_for(KEY), bytes(data))
    reader = store_at(location)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert reader.get(KEY) is None
    assert "checksum mismatch" in caplog.text and reader.stats["corrupt"] == 1
    assert KEY not in reader  # removed, so that the next put (a no-op for existing names) repairs it
    reader.put(KEY, kv_entry(1))
    assert_identical(store_at(location).get(KEY), kv_entry(1))


def test_object_under_another_keys_name_is_a_miss(location, caplog):
    store = store_at(location)
    store.put(KEY, kv_entry(1))
    other = other_key(2)
    upload(store, store.path_for(other), raw_object(store, KEY))  # valid file, wrong name
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.get(other) is None
    assert "another key" in caplog.text
    assert_identical(store.get(KEY), kv_entry(1))


def test_delete_clear_and_len_leave_foreign_objects(location):
    store = store_at(location)
    for n in range(3):
        store.put(other_key(n), kv_entry(n, n=8))
    foreign = [f"{store.root}/README.txt", f"{store.root}/ab/not-an-entry.safetensors"]
    for path in foreign:
        upload(store, path, b"keep me")
    assert len(store) == 3
    store.delete(other_key(0))
    store.delete(other_key(0))  # deleting a missing entry is fine
    assert len(store) == 2 and other_key(0) not in store
    store.clear()
    assert len(store) == 0
    assert all(store.fs.cat_file(p) == b"keep me" for p in foreign)


WRITER = textwrap.dedent(
    """
    import hashlib, json, sys
    from minirerank_core.cache import CacheKey, FsspecStore
    from tests.cache.test_store import kv_entry
    url, options, tag, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = FsspecStore(url, storage_options=options)
    keys = [CacheKey(hashlib.sha256(f"page-{n}".encode()).hexdigest(), "model-a@v1", {"band": [0, 4]}) for n in range(3)]
    seen = []
    for r in range(rounds):
        for n, key in enumerate(keys):
            store.put(key, kv_entry(tag * 10 + n, n=64))
            got = store.get(key)
            assert got is not None, "a key that was just written must be readable"
            seen.append(got.meta["tag"])
    print(json.dumps(seen))
    """
)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_many_writer_processes_leave_one_complete_entry_per_key(kind, tmp_path, request):
    """Writers on several processes put the same names (each its own content, so a mix would show) and read
    them back at once: every read is one writer's whole entry, and the final objects pass their checksums."""
    import json

    if kind == "local":
        url, options = f"file://{tmp_path / 'shared'}", {}
    else:
        url, options = f"s3://minirerank-test/{uuid.uuid4().hex}", s3_options(request.getfixturevalue("s3_endpoint"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(options), str(tag), "5"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tag in (1, 2, 3)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-3000:]
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    store = FsspecStore(url, storage_options=options)
    assert len(store) == 3
    for n in range(3):
        got = store.get(other_key(n))
        assert got is not None and got.meta["tag"] in {10 + n, 20 + n, 30 + n}
        assert fingerprint(got) == fingerprint(kv_entry(got.meta["tag"], n=64))  # whole, not a mix
    for seen in outs:
        assert all(t % 10 in (0, 1, 2) and t // 10 in (1, 2, 3) for t in seen)
    if kind == "local":
        assert not list((tmp_path / "shared").rglob("*.tmp"))  # no writer left debris


def test_failed_local_write_leaves_no_debris_and_the_previous_entries(tmp_path, monkeypatch):
    store = FsspecStore(f"file://{tmp_path / 'c'}")
    store.put(KEY, kv_entry(1))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.fs, "mv", full)
    with pytest.raises(OSError, match="No space left"):
        store.put(other_key(1), kv_entry(2))
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "c").rglob("*") if p.is_file()) == [store.path_for(KEY).rsplit("/", 1)[1]]
    assert_identical(store.get(KEY), kv_entry(1))
    assert other_key(1) not in store


def test_failed_object_store_write_is_an_oserror_and_nothing_appears(location, monkeypatch):
    store = store_at(location)
    if not store.atomic_put:
        pytest.skip("written through a temporary name: covered by the local test above")

    def refuse(*args, **kwargs):
        raise RuntimeError("503 Slow Down")  # backends raise their own types

    monkeypatch.setattr(store.fs, "pipe_file", refuse)
    with pytest.raises(OSError, match="Slow Down"):
        store.put(KEY, kv_entry(1))
    monkeypatch.undo()
    assert KEY not in store and len(store) == 0


def test_s3_bucket_that_does_not_exist_is_an_oserror(s3_endpoint):
    store = FsspecStore(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", storage_options=s3_options(s3_endpoint))
    with pytest.raises(OSError):
        store.put(KEY, kv_entry(1))
    assert store.get(KEY) is None


def test_sweep_removes_only_old_temp_files(tmp_path):
    store = FsspecStore(f"file://{tmp_path / 'c'}")
    store.put(KEY, kv_entry(1))
    shard = tmp_path / "c" / KEY.digest[:2]
    old = shard / f".{KEY.digest}.123.abcdef.tmp"
    young = shard / f".{KEY.digest}.456.abcdef.tmp"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.sweep(max_age_s=3600) == 1
    assert not old.exists() and young.exists() and KEY in store


# --------------------------------------------------------------------------- tiers
def test_tiers_promote_remote_hits_into_disk_and_memory(location, tmp_path):
    first = TieredStore(MemoryStore(), DiskStore(tmp_path / "a"), store_at(location))
    first.put(KEY, kv_entry(1))
    assert KEY in first.memory and KEY in first.disk and KEY in first.remote
    replica = open_store(location[0], local_dir=tmp_path / "b", storage_options=location[1])  # another machine
    assert KEY not in replica.memory and KEY not in replica.disk and KEY in replica
    assert_identical(replica.get(KEY), kv_entry(1))
    assert KEY in replica.memory and KEY in replica.disk  # later reads stay local
    assert replica.remote.stats["hits"] == 1
    replica.get(KEY)
    assert replica.remote.stats["hits"] == 1


class FailingRemote:
    def __init__(self) -> None:
        self.puts = 0

    def get(self, key):
        return None

    def put(self, key, entry):
        self.puts += 1
        raise OSError("connection reset by peer")

    def __contains__(self, key):
        return False

    def delete(self, key):
        pass

    def clear(self):
        pass

    def __len__(self):
        return 0


def test_remote_that_cannot_be_written_warns_once_and_keeps_serving(tmp_path, recwarn):
    remote = FailingRemote()
    tiers = TieredStore(MemoryStore(), DiskStore(tmp_path), remote)
    tiers.put(KEY, kv_entry(1))
    tiers.put(other_key(1), kv_entry(2))
    assert remote.puts == 1  # stopped trying after the first failure
    assert [w.category for w in recwarn if issubclass(w.category, CacheRemoteWarning)] == [CacheRemoteWarning]
    assert_identical(tiers.get(KEY), kv_entry(1))
    assert_identical(tiers.disk.get(other_key(1)), kv_entry(2))


def test_open_store_forms_and_errors(tmp_path):
    assert open_store(None).disk is None and open_store(None).remote is None
    assert open_store(tmp_path / "d").disk.root == tmp_path / "d"
    remote = open_store(f"memory://minirerank-test-{uuid.uuid4().hex}", local_dir=tmp_path / "l")
    assert isinstance(remote.remote, FsspecStore) and remote.disk.root == tmp_path / "l"
    tiers = TieredStore(MemoryStore())
    assert open_store(tiers) is tiers
    with pytest.raises(ConfigError, match="nosuchproto"):
        open_store("nosuchproto://bucket/x")
    with pytest.raises(ConfigError, match="cache store"):
        open_store(42)
    with pytest.raises(ConfigError, match="local_dir"):
        open_store(tmp_path / "d", local_dir=tmp_path / "l")


# --------------------------------------------------------------------------- the reranker over a shared cache
def test_reranker_replicas_share_pages_through_the_remote_cache(location, tiny, page_images, tmp_path, monkeypatch):
    import minirerank_core.rerankers.page_side as page_side
    from minirerank_core import MiniReranker, RerankConfig

    calls = []
    real = page_side.prefill_pages
    monkeypatch.setattr(page_side, "prefill_pages", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    model, proc = tiny("qwen3_vl")
    url, options = location
    for kv_dtype in (None, "int8"):
        cfg = RerankConfig(exit_layer=5, band=(2, 4), kv_dtype=kv_dtype)
        indexer = MiniReranker(model, proc, cfg, cache_dir=open_store(url, storage_options=options))
        want = indexer.score("quarterly revenue table", page_images)
        before = sum(calls)
        replica = MiniReranker(model, proc, cfg, cache_dir=open_store(url, local_dir=tmp_path / f"local-{kv_dtype}",
                                                                      storage_options=options))
        assert replica.score("quarterly revenue table", page_images) == want  # bit for bit
        assert sum(calls) == before  # nothing recomputed on the replica
        assert len(list((tmp_path / f"local-{kv_dtype}").rglob("*.safetensors"))) == len(page_images)
    assert len(store_at(location)) == 2 * len(page_images)  # one object per page and setting
    if url.startswith("memory://"):  # a plain URL string works as cache_dir too
        r = MiniReranker(model, proc, RerankConfig(exit_layer=5, band=(2, 4)), cache_dir=url)
        assert isinstance(r.store.remote, FsspecStore)
        before = sum(calls)
        r.score("quarterly revenue table", page_images)
        assert sum(calls) == before
