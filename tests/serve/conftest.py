"""Shared fixtures of the server tests: a tiny pruning checkpoint and a tiny ColQwen3 embedder saved to disk, page
images under a directory (the server's --root), a workspace built from them by `minirerank index`, the pipeline
over it, and a real uvicorn server on a free localhost port."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest

from minirerank_core import MiniReranker, RerankConfig
from minirerank_core import testing as T
from tests.serve.helpers import N_PAGES, png_bytes


@pytest.fixture(scope="session")
def ckpt(tiny, tmp_path_factory) -> Path:
    """A tiny Qwen3-VL miniReranker that prunes at query time (keep_ratio 0.5): maps change its scores."""
    model, proc = tiny("qwen3_vl")
    path = tmp_path_factory.mktemp("serve_ckpt") / "tiny"
    MiniReranker(model, proc, RerankConfig(keep_ratio=0.5)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def embedder_ckpt(tmp_path_factory) -> Path:
    model, proc = T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    path = tmp_path_factory.mktemp("serve_emb") / "colqwen3"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def page_dir(tmp_path_factory) -> Path:
    """PNG pages; also the server's --root."""
    d = tmp_path_factory.mktemp("serve_pages")
    for i in range(N_PAGES):
        (d / f"page-{i}.png").write_bytes(png_bytes(T.random_page_image(170, 220, seed=60 + i)))
    return d


@pytest.fixture(scope="session")
def workspace(ckpt, embedder_ckpt, page_dir, tmp_path_factory) -> Path:
    import contextlib

    from minirerank_core.cli import main

    ws = tmp_path_factory.mktemp("serve_ws") / "ws"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in ("index", page_dir, "--index", ws, "--embedder", embedder_ckpt, "--model", ckpt,
                                      "--json", "-q")])
    assert code == 0 and json.loads(out.getvalue())["pages_added"] == N_PAGES
    return ws


@pytest.fixture(scope="session")
def pipeline(workspace):
    from minirerank_core.pipeline import RerankPipeline

    return RerankPipeline.open(workspace, show_progress=False)


@pytest.fixture(scope="session")
def server(pipeline, page_dir):
    """The workspace's pipeline served with --root page_dir."""
    from minirerank_core.serve import BackgroundServer, create_app

    with BackgroundServer(create_app(pipeline, root=page_dir)) as s:
        yield s


@pytest.fixture()
def blocked(pipeline):
    """The reranker's model thread held busy until the test releases it: requests queue behind it."""
    from minirerank_core.glue import model_executor

    gate = threading.Event()
    model_executor(pipeline.reranker).submit(gate.wait)
    try:
        yield gate
    finally:
        gate.set()
        model_executor(pipeline.reranker).submit(lambda: None).result(timeout=60)  # drained
