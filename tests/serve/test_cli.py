"""The command line's side of the service: `minirerank serve --index DIR` in its own process, and
`minirerank search --server URL` printing what `minirerank search --index DIR` prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from minirerank_core.cli import main
from tests.serve.helpers import QUERY, wait_until

REPO = Path(__file__).resolve().parents[2]
KEY = "cli-key"


@pytest.fixture(scope="module")
def served(workspace):
    """`minirerank serve --index WS --port 0 --api-key KEY` in a subprocess; its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MINIRERANK_API_KEY", None)
    cmd = [sys.executable, "-m", "minirerank_core.cli", "serve", "--index", str(workspace), "--port", "0", "-q",
           "--api-key", KEY]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    try:
        wait_until(lambda: any("serving on" in x for x in lines) or proc.poll() is not None, timeout=300,
                   what="the server to start")
        assert proc.poll() is None, "".join(lines)
        yield next(x for x in lines if "serving on" in x).split("serving on", 1)[1].strip()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, "".join(lines)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra", [(), ("--no-rerank", "-n", 4)])
def test_search_through_the_server_prints_what_a_local_search_prints(capsys, served, workspace, extra):
    code, out, _ = run(capsys, "search", QUERY, "--index", workspace, "-k", 4, "-n", 3, *extra, "--json", "-q")
    assert code == 0
    local = json.loads(out)
    code, out, _ = run(capsys, "search", QUERY, "--server", served, "--api-key", KEY, "-k", 4, "-n", 3, *extra, "--json")
    assert code == 0
    remote = json.loads(out)
    assert list(remote) == list(local)
    for key in ("query", "index", "pages_in_index", "candidates", "reranked", "report"):
        assert remote[key] == local[key]
    assert len(remote["results"]) == len(local["results"]) > 0
    for got, want in zip(remote["results"], local["results"]):
        assert list(got) == list(want)
        assert {k: got[k] for k in ("rank", "page_id", "first_stage_rank", "source", "page")} == \
               {k: want[k] for k in ("rank", "page_id", "first_stage_rank", "source", "page")}
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert got["first_stage_score"] == pytest.approx(want["first_stage_score"], rel=1e-5)


def test_search_table_through_the_server(capsys, served, workspace):
    code, local, _ = run(capsys, "search", QUERY, "--index", workspace, "-k", 4, "-n", 2, "-q")
    code2, remote, _ = run(capsys, "search", QUERY, "--server", served, "--api-key", KEY, "-k", 4, "-n", 2)
    assert code == code2 == 0
    table = lambda text: [line.split()[3:] for line in text.splitlines()[2:]]  # first-stage ranks, ids, sources
    assert table(remote) == table(local) and len(table(remote)) == 4
    assert remote.splitlines()[0].rsplit(";", 1)[0] == local.splitlines()[0].rsplit(";", 1)[0]  # all but the time


def test_search_server_errors(capsys, served, workspace, tmp_path):
    code, _, err = run(capsys, "search", QUERY, "--server", served, "-q")  # no key
    assert code == 1 and "API key" in err and "401" in err
    code, _, err = run(capsys, "search", " ", "--server", served, "--api-key", KEY)
    assert code == 1 and "query" in err and "400" in err
    code, _, err = run(capsys, "search", QUERY, "--server", served, "--api-key", KEY, "--model", tmp_path)
    assert code == 1 and "--model" in err
    code, _, err = run(capsys, "search", QUERY, "--server", served, "--index", workspace)
    assert code == 1 and "--index" in err
    code, _, err = run(capsys, "search", QUERY, "--server", "http://127.0.0.1:9", "-q")
    assert code == 1 and "cannot reach" in err
    code, _, err = run(capsys, "search", QUERY)
    assert code == 1 and "--index" in err


def test_serve_help(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--index", "--model", "--embedder", "--host", "--port", "--api-key", "--root", "--max-documents",
                 "--timeout"):
        assert flag in out
