"""Compressed entries in the reranker's page cache: never served to another kv_dtype, and as small as the formula."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

import minirerank_core.rerankers.page_side as page_side
from minirerank_core import MiniReranker, Page, RerankConfig
from minirerank_core.cache import CacheEntry, read_entry
from minirerank_core.engine.kv import KV_SCALE_AXES, fp8_supported

QUERY = "quarterly revenue table"
DTYPES = [None, "int8"] + (["fp8"] if fp8_supported() else [])


@pytest.fixture
def prefills(monkeypatch):
    calls = []
    real = page_side.prefill_pages

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(page_side, "prefill_pages", counting)
    return calls


def files(d: Path) -> list[Path]:
    return sorted(d.rglob("*.safetensors"))


def test_each_kv_dtype_has_its_own_entries_in_one_directory(tiny, page_images, tmp_path, prefills):
    model, proc = tiny("qwen3_vl")
    first = {}
    for n, kv_dtype in enumerate(DTYPES, start=1):
        first[kv_dtype] = MiniReranker(model, proc, RerankConfig(kv_dtype=kv_dtype), cache_dir=tmp_path).score(QUERY, page_images)
        assert sum(prefills) == 3 * n  # a miss: another setting's entries are never served
        assert len(files(tmp_path)) == 3 * n
    for kv_dtype in DTYPES:  # each setting finds its own entries again, bit for bit
        again = MiniReranker(model, proc, RerankConfig(kv_dtype=kv_dtype), cache_dir=tmp_path).score(QUERY, page_images)
        assert again == first[kv_dtype]
    assert sum(prefills) == 3 * len(DTYPES)
    assert first["int8"] != first[None]  # the settings do differ, so serving one for the other would show
    dtypes = {}
    for f in files(tmp_path):
        fields, entry = read_entry(f)
        dtypes.setdefault(fields["settings"].get("kv_dtype"), set()).add(entry.tensors["k"].dtype)
    assert dtypes[None] == {torch.float32} and dtypes["int8"] == {torch.int8}
    if fp8_supported():
        assert dtypes["fp8"] == {torch.float8_e4m3fn}


class OneEntryStore:
    """A shared tier that answers every key with the same entry: what a broken or hostile store could do."""

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry

    def get(self, key):
        return self.entry

    def put(self, key, entry):
        pass

    def __contains__(self, key):
        return True

    def delete(self, key):
        pass

    def clear(self):
        pass

    def __len__(self):
        return 1


@pytest.mark.parametrize("stored, wanted", [("int8", None), (None, "int8")])
def test_an_entry_of_another_kv_dtype_is_refused_even_under_the_right_key(tiny, page_images, caplog, stored, wanted):
    model, proc = tiny("qwen3_vl")
    page = Page(page_images[0])
    kv = MiniReranker(model, proc, RerankConfig(kv_dtype=stored)).index([page])[0]
    tensors, meta = kv.to_tensors()
    r = MiniReranker(model, proc, RerankConfig(kv_dtype=wanted), cache_dir=OneEntryStore(CacheEntry(tensors, meta)))
    with caplog.at_level(logging.WARNING, logger="minirerank"):
        got = r.score(QUERY, [page])
    assert "unusable cache entry" in caplog.text
    want = MiniReranker(model, proc, RerankConfig(kv_dtype=wanted)).score(QUERY, [page])
    assert got == want  # recomputed under its own setting


def test_a_quantized_file_moved_to_an_unquantized_name_is_rejected(tiny, page_images, tmp_path, prefills):
    model, proc = tiny("qwen3_vl")
    page = Page(page_images[0])
    exact_dir, q_dir = tmp_path / "exact", tmp_path / "q"
    want = MiniReranker(model, proc, cache_dir=exact_dir).score(QUERY, [page])
    MiniReranker(model, proc, RerankConfig(kv_dtype="int8"), cache_dir=q_dir).score(QUERY, [page])
    (exact_file,), (q_file,) = files(exact_dir), files(q_dir)
    shutil.copyfile(q_file, exact_file)  # the checksum is fine; the key in its header is not this name's
    before = sum(prefills)
    assert MiniReranker(model, proc, cache_dir=exact_dir).score(QUERY, [page]) == want
    assert sum(prefills) - before == 1


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_entry_bytes_follow_the_formula(tiny, page_images, tmp_path, kv_dtype):
    """layers x 2 x kv_heads x head_dim x rows x bytes + int64 visual index (+ float32 scales, per channel or per
    row as KV_SCALE_AXES says); the file adds only its JSON header."""
    model, proc = tiny("qwen3_vl")
    r = MiniReranker(model, proc, RerankConfig(exit_layer=5, band=(1, 4), kv_dtype=kv_dtype), cache_dir=tmp_path)
    kv = r.index([Page(page_images[0])])[0]
    text = model.config.text_config
    layers, heads, dim, rows = 3, text.num_key_value_heads, text.head_dim, kv.n_visual + 2
    elem = 4 if kv_dtype is None else 1
    want = layers * 2 * heads * dim * rows * elem + kv.n_visual * 8
    if kv_dtype is not None:
        want += sum(layers * heads * (dim if axis == "channel" else rows) * 4 for axis in KV_SCALE_AXES[kv_dtype])
    assert kv.nbytes == want
    (f,) = files(tmp_path)
    assert want < f.stat().st_size < want + 2048
