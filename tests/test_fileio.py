"""The one atomic writer: old or new content, never half; no debris after a failure; one JSON spelling."""

import errno
import json
import os

import pytest

from minirerank_core import fileio
from minirerank_core.errors import ConfigError, DiskFullError


def test_write_json_is_canonical_and_tagged(tmp_path):
    path = fileio.write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "é"]}, format=fileio.format_tag("thing", 3))
    text = path.read_text()
    assert json.loads(text) == {"format": "minirerank-thing/3", "a": [1.5, "é"], "b": 1}
    assert text.index('"a"') < text.index('"b"')  # sorted keys: one spelling per document
    assert fileio.read_json(path, format="minirerank-thing/3")["b"] == 1
    with pytest.raises(ConfigError, match="a.json is not a minirerank-other/1 file"):
        fileio.read_json(path, format="minirerank-other/1")
    with pytest.raises(ValueError):
        fileio.canonical_json({"x": float("nan")})
    assert os.listdir(tmp_path) == ["a.json"]


def test_read_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json"):
        fileio.read_json(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="missing.json does not exist"):
        fileio.read_json(tmp_path / "missing.json")


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    fileio.write_bytes(target, b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", full)
    with pytest.raises(DiskFullError, match="no space left"):
        fileio.write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]  # no debris
    monkeypatch.setattr(fileio.os, "replace", lambda *a: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):  # other errors are not dressed up as a full disk
        fileio.write_bytes(target, b"new")
    assert os.listdir(tmp_path) == ["data.bin"]


def test_replace_dir_and_recover(tmp_path):
    final, new = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    final.mkdir()
    (final / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    fileio.replace_dir(new, final)
    assert (final / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["ckpt"]
    os.replace(final, tmp_path / "ckpt.old")  # a crash between the two renames
    fileio.recover_dir(final)
    assert (final / "v").read_text() == "2"


def test_writer_lock_times_out_with_a_named_error(tmp_path):
    import multiprocessing as mp

    from minirerank_core.errors import LockTimeoutError

    ready, release = mp.Event(), mp.Event()
    holder = mp.get_context("fork").Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(LockTimeoutError, match="another process"):
            with fileio.writer_lock(tmp_path, timeout=0.3):
                pass
    finally:
        release.set()
        holder.join(30)
    with fileio.writer_lock(tmp_path, timeout=5):  # free again
        pass


def _hold(path, ready, release):
    with fileio.writer_lock(path):
        ready.set()
        release.wait(30)
