"""Queueing, the request time limit, admission and graceful shutdown, on real uvicorn servers. The reranker's model
thread is held busy by a job the test releases, so a request is provably in flight or queued (no sleeps, no
wall-clock assertions)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from minirerank_core import testing as T
from minirerank_core.glue import model_executor
from minirerank_core.serve import BackgroundServer, Limits, create_app
from tests.serve.helpers import QUERY, data_url, in_process, png_bytes, sigmoid, wait_until

REPO = Path(__file__).resolve().parents[2]


def fresh_image(seed: int) -> bytes:
    return png_bytes(T.random_page_image(150, 180, seed=seed))


def send_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def go() -> None:
        try:
            box["response"] = httpx.post(url + "/v1/rerank", json=body, timeout=300)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, box


def test_shutdown_finishes_the_request_in_flight(pipeline, blocked):
    image = fresh_image(200)
    bg = BackgroundServer(create_app(pipeline)).start()
    service = bg.server.config.app.state.service
    sender, box = send_in_thread(bg.url, {"query": QUERY, "documents": [data_url(image)]})
    wait_until(lambda: service.pending == 1, what="the request to be admitted")
    stopper = threading.Thread(target=bg.stop, daemon=True)
    stopper.start()  # what SIGTERM does: stop accepting, wait for the request in flight

    def refused() -> bool:
        try:
            httpx.get(bg.url + "/health", timeout=5)
            return False
        except httpx.TransportError:
            return True

    wait_until(refused, what="the listening socket to close")
    assert service.draining and sender.is_alive() and bg.running
    blocked.set()  # the model thread is free: the request runs to the end
    sender.join(300)
    stopper.join(300)
    assert "error" not in box, box.get("error")
    r = box["response"]
    assert r.status_code == 200, r.text
    (_, score), = in_process(pipeline, QUERY, [image])
    assert r.json()["results"][0]["relevance_score"] == pytest.approx(sigmoid(score), abs=1e-5)
    assert not bg.running


def test_request_time_limit_gives_504_and_the_queued_job_never_runs(pipeline, blocked):
    store = pipeline.reranker.pages.store
    with BackgroundServer(create_app(pipeline, limits=Limits(request_timeout_s=0.5))) as s:
        before = len(store.memory)
        r = httpx.post(s.url + "/v1/rerank", json={"query": QUERY, "documents": [data_url(fresh_image(201))]}, timeout=300)
        assert r.status_code == 504 and r.json()["type"] == "RequestTimeoutError"
        assert "request_timeout_s" in r.json()["message"]
        blocked.set()
        model_executor(pipeline.reranker).submit(lambda: None).result(timeout=300)  # the queue has drained
        assert len(store.memory) == before  # the timed-out request's page was never prefilled
        assert s.server.config.app.state.service.pending == 0


def test_admission_limit_gives_503_with_retry_after(pipeline, blocked):
    with BackgroundServer(create_app(pipeline, limits=Limits(max_pending=1))) as s:
        service = s.server.config.app.state.service
        body = {"query": QUERY, "documents": [data_url(fresh_image(202))]}
        sender, box = send_in_thread(s.url, body)
        wait_until(lambda: service.pending == 1, what="the first request to be admitted")
        r = httpx.post(s.url + "/v1/rerank", json=body, timeout=300)
        assert r.status_code == 503 and r.json()["type"] == "ServerBusyError" and r.headers["retry-after"] == "1"
        assert "max_pending" in r.json()["message"]
        assert httpx.get(s.url + "/ready").status_code == 200  # busy is not unready
        blocked.set()
        sender.join(300)
        assert box["response"].status_code == 200


def test_ready_is_503_while_draining(pipeline):
    with BackgroundServer(create_app(pipeline)) as s:
        service = s.server.config.app.state.service
        assert httpx.get(s.url + "/ready").status_code == 200
        service.draining = True  # as the shutdown signal handler sets it
        r = httpx.get(s.url + "/ready")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        r = httpx.post(s.url + "/v1/rerank", json={"query": QUERY, "documents": [data_url(fresh_image(203))]})
        assert r.status_code == 503 and r.json()["type"] == "ServerBusyError"
        service.draining = False


def test_without_an_embedder_pages_are_not_pruned(pipeline):
    image = fresh_image(204)
    with BackgroundServer(create_app(pipeline.reranker)) as s:  # a Reranker alone: no maps
        r = httpx.post(s.url + "/v1/rerank", json={"query": QUERY, "documents": [data_url(image)]}, timeout=300)
    assert r.status_code == 200, r.text
    (_, dense), = in_process(pipeline, QUERY, [image], keep_ratio=1.0)
    (_, pruned), = in_process(pipeline, QUERY, [image])
    got = r.json()["results"][0]["score"]
    assert got == pytest.approx(dense, abs=1e-4) and got != pytest.approx(pruned, abs=1e-4)
    assert "every visual token" in r.json()["meta"]["warnings"][0]


def test_index_time_pruning_needs_an_embedder(tiny):
    from minirerank_core import ConfigError, MiniReranker, RerankConfig

    model, proc = tiny("qwen3_vl")
    with pytest.raises(ConfigError, match="index_keep_ratio"):
        create_app(MiniReranker(model, proc, RerankConfig(index_keep_ratio=0.5)))
    with pytest.raises(ConfigError, match="RerankPipeline or a Reranker"):
        create_app("not a model")


def test_the_serve_command_answers_and_exits_cleanly_on_sigterm(ckpt, page_dir):
    """`minirerank serve` in its own process: port 0, a request, then SIGTERM -> exit status 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "minirerank_core.cli", "serve", "--model", str(ckpt), "--port", "0", "-q",
           "--root", str(page_dir), "--api-key", "k"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("serving on" in x for x in lines) or proc.poll() is not None, timeout=300,
                   what="the server to start")
        assert proc.poll() is None, "".join(lines)
        url = next(x for x in lines if "serving on" in x).split("serving on", 1)[1].strip()
        assert "every visual token is used" in "".join(lines)  # no embedder: said once, at start
        r = httpx.post(url + "/v1/rerank", json={"query": QUERY, "documents": ["page-0.png", "page-1.png"]},
                       headers={"Authorization": "Bearer k"}, timeout=300)
        assert r.status_code == 200, r.text
        assert sorted(x["index"] for x in r.json()["results"]) == [0, 1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
