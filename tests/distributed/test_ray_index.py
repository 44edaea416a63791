"""Distributed indexing on a real local Ray cluster (2 CPUs) that the fixture starts as its own processes: the result
equals the single-process pipeline, through the Python API and the CLI, and a killed job resumes without redoing
committed pages."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra): pip install -e '.[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed (the [ray] extra): pip install -e '.[ray]'")

from minirerank_core import MiniReranker, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402
from minirerank_core.cache import read_entry  # noqa: E402
from minirerank_core.cli import main  # noqa: E402
from minirerank_core.pipeline import RerankPipeline  # noqa: E402
from minirerank_core.retrieval import PageIndex  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
QUERIES = ["revenue growth", "quarterly table of expenses"]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
    """A 2-CPU Ray head on this machine (`ray start --head --block`, stopped by terminating that process)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="mr-ray-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
         "--include-dashboard=false", "--object-store-memory=150000000", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    import ray

    deadline = time.monotonic() + 120
    while True:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            ray.shutdown()
            break
        except Exception as exc:  # not up yet
            if head.poll() is not None or time.monotonic() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"the local Ray cluster did not start in 120 s ({exc}): {head.stdout.read().decode()[-3000:]}")
            time.sleep(1)
    yield address
    os.killpg(head.pid, signal.SIGTERM)  # the head's process group: only what this fixture started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A pruning reranker checkpoint (index-time maps travel through the prefill stage) and a ColQwen3 embedder."""

    root = tmp_path_factory.mktemp("ray_models")
    model, proc = tiny("qwen3_vl")
    ckpt = root / "reranker"
    MiniReranker(model, proc, RerankConfig(exit_layer=5, band=(2, 4), keep_ratio=0.5, index_keep_ratio=0.5)).save_pretrained(ckpt)
    emb, emb_proc = T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    emb_dir = root / "embedder"
    emb.save_pretrained(emb_dir)
    emb_proc.save_pretrained(emb_dir)
    return ckpt, emb_dir


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """A 3-page PDF, two images, a copy of one image (a duplicate across documents) and a broken PDF."""
    d = tmp_path_factory.mktemp("ray_docs")
    imgs = [T.random_page_image(170, 220, seed=60 + i) for i in range(3)]
    imgs[0].save(d / "a_report.pdf", save_all=True, append_images=imgs[1:])
    T.random_page_image(150, 200, seed=70).save(d / "b_scan.png")
    T.random_page_image(200, 150, seed=71).save(d / "c_scan.png")
    shutil.copyfile(d / "b_scan.png", d / "d_copy.png")
    (d / "e_broken.pdf").write_bytes(b"%PDF-1.4 nothing")
    return d


@pytest.fixture(scope="module")
def single(models, docs, tmp_path_factory):
    """The single-process reference: RerankPipeline.add over the same documents."""
    ckpt, emb = models
    ws = tmp_path_factory.mktemp("ray_single") / "ws"
    reranker = MiniReranker.from_pretrained(ckpt, cache_dir=ws / "cache")
    pipe = RerankPipeline.open(ws, reranker=reranker, embedder=emb, create=True, show_progress=False)
    report = pipe.add([docs])
    return ws, report


def cache_entries(ws: Path) -> dict[str, tuple[dict, dict]]:
    out = {}
    for f in sorted((ws / "cache").rglob("*.safetensors")):
        fields, entry = read_entry(f)
        out[f.name] = (fields, entry)
    return out


def assert_same_workspace(got: Path, want: Path) -> None:
    a, b = PageIndex.open(got / "index"), PageIndex.open(want / "index")
    assert sorted(a.page_ids()) == sorted(b.page_ids())
    for page_id in b.page_ids():
        ea, eb = a.embedding(page_id), b.embedding(page_id)
        assert (ea.grid, ea.content_hash) == (eb.grid, eb.content_hash)
        torch.testing.assert_close(ea.vectors, eb.vectors, rtol=1e-4, atol=1e-5)
        assert torch.equal(ea.patch_rows, eb.patch_rows)
        ma, mb = a.metadata(page_id), b.metadata(page_id)
        # rendered pages live in each workspace's own pages/ folder: same file name, same bytes
        pa, pb = Path(ma.pop("image_path")), Path(mb.pop("image_path"))
        assert pa.name == pb.name and pa.read_bytes() == pb.read_bytes()
        assert ma == mb
    ca, cb = cache_entries(got), cache_entries(want)
    assert sorted(ca) == sorted(cb) and len(cb) == len(b)  # the same keys: one entry per page
    for name, (fields, entry) in cb.items():
        assert ca[name][0] == fields
        assert ca[name][1].meta == entry.meta
        for t, v in entry.tensors.items():
            torch.testing.assert_close(ca[name][1].tensors[t], v, rtol=1e-4, atol=1e-5)
    pa, pb = (RerankPipeline.open(w, show_progress=False, reranker=MiniReranker.from_pretrained(
        json.loads((w / "minirerank.json").read_text())["reranker"], cache_dir=w / "cache")) for w in (got, want))
    for q in QUERIES:
        ra, rb = pa.search(q, k=4, top_n=4), pb.search(q, k=4, top_n=4)
        assert [r.page_id for r in ra] == [r.page_id for r in rb]
        assert [r.score for r in ra] == pytest.approx([r.score for r in rb], rel=1e-4, abs=1e-5)
        assert [r.first_stage_rank for r in ra] == [r.first_stage_rank for r in rb]
    assert not (got / ".ray-staging").exists()  # no debris
    assert sorted(p.name for p in (got / "pages").iterdir()) == sorted(p.name for p in (want / "pages").iterdir())


def test_python_api_equals_the_single_process_pipeline(ray_address, models, docs, single, tmp_path):
    from minirerank_core.distributed import index_with_ray

    ckpt, emb = models
    want_ws, want = single
    ws = tmp_path / "ws"
    report = index_with_ray([docs], ws, reranker=ckpt, embedder=emb, address=ray_address, workers=1,
                            cpus_per_worker=0.5, segment_pages=2, commit_pages=2, show_progress=False)
    assert sorted(report.pages_added) == sorted(p.id for p in want.pages)
    assert len(report.duplicates) == len(want.duplicates) == 1
    assert {(d.content_hash, d.duplicate_of) for d in report.duplicates} == {(d.content_hash, d.duplicate_of) for d in want.duplicates}
    assert [e.source for e in report.errors] == [e.source for e in want.errors]
    assert report.commits >= 2 and report.pages_total == len(want.pages) == 5
    assert json.loads((ws / "minirerank.json").read_text())["embedder"] == str(emb)
    assert_same_workspace(ws, want_ws)

    again = index_with_ray([docs], ws, reranker=ckpt, embedder=emb, address=ray_address, cpus_per_worker=0.5,
                           show_progress=False)  # everything is indexed already
    assert again.pages_added == [] and again.pages_embedded == 0 and len(again.duplicates) == 6


def test_cli_ray_equals_cli_single_process(ray_address, models, docs, single, tmp_path, capsys):
    ckpt, emb = models
    want_ws, want = single
    ws = tmp_path / "ws"
    code = main([str(a) for a in ("index", docs, "--index", ws, "--embedder", emb, "--model", ckpt, "--ray",
                                  "--ray-address", ray_address, "--workers", 1, "--cpus-per-worker", 0.5, "--json", "-q")])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0
    assert payload["pages_added"] == 5 and payload["duplicates_skipped"] == 1 and len(payload["errors"]) == 1
    assert payload["ray"]["workers"] == 1
    assert_same_workspace(ws, want_ws)
    code = main(["search", QUERIES[0], "--index", str(ws), "-k", "4", "-n", "3", "--json", "-q"])
    got = json.loads(capsys.readouterr().out)
    main(["search", QUERIES[0], "--index", str(want_ws), "-k", "4", "-n", "3", "--json", "-q"])
    ref = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["page_id"] for r in got["results"]] == [r["page_id"] for r in ref["results"]]


def test_ray_flags_are_checked_before_any_work(tmp_path, capsys, docs):
    code = main(["index", str(docs), "--index", str(tmp_path / "ws"), "--ray", "--workers", "0", "-q"])
    assert code != 0 and "workers" in capsys.readouterr().err
    assert not (tmp_path / "ws" / "index").exists()


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from minirerank_core.distributed import ray_index
    from minirerank_core.retrieval import PageIndex
    real = PageIndex.adopt
    def commit_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # the driver dies right after its first commit
    PageIndex.adopt = commit_then_die
    docs, ws, ckpt, emb, address = sys.argv[1:6]
    ray_index.index_with_ray([docs], ws, reranker=ckpt, embedder=emb, address=address, cpus_per_worker=0.5,
                             segment_pages=1, commit_pages=2, show_progress=False)
    """
)


def test_killed_job_resumes_without_redoing_committed_pages(ray_address, models, docs, single, tmp_path):
    from minirerank_core.distributed import index_with_ray

    ckpt, emb = models
    want_ws, want = single
    ws = tmp_path / "ws"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED, str(docs), str(ws), str(ckpt), str(emb), ray_address],
                          env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    committed = PageIndex.open(ws / "index").page_ids()
    assert 2 <= len(committed) < len(want.pages)
    assert (ws / ".ray-staging").exists()  # the dead job's staged segments are still there
    report = index_with_ray([docs], ws, reranker=ckpt, embedder=emb, address=ray_address, cpus_per_worker=0.5,
                            show_progress=False)
    assert report.pages_embedded == len(want.pages) - len(committed)  # committed pages were not done again
    assert sorted(report.pages_added) == sorted(set(p.id for p in want.pages) - set(committed))
    assert_same_workspace(ws, want_ws)
