"""Smoke test of benchmarks/retrieval.py --quick: it runs, and its final JSON line has the promised fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmark_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "retrieval.py"), "--quick", "--queries", "3", "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("n_pages", "build_seconds", "bytes_per_page", "exact_ms_per_query", "ann_ms_per_query",
                "ann_recall_at_20", "index_type"):
        assert key in result
    assert result["index_type"] == "ivfpq" and result["ann_recall_at_20"] >= 0.9
    assert list(tmp_path.iterdir()) == []  # the temporary index is cleaned up
