"""`minirerank demo` (the README's main command) runs the whole pipeline and reports its true accuracy."""

import json

from minirerank_core import defaults
from minirerank_core.demo import run_demo


def test_demo_runs_end_to_end_and_reports_its_true_accuracy(capsys):
    assert run_demo(json_output=True, top_n=2) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is pure JSON; the note about the toy models goes to stderr
    assert "toys" in captured.err and "real checkpoint" in captured.err
    recorded = json.loads((defaults.SAMPLE_CORPUS_DIR / "queries.json").read_text())
    assert report["n_pages"] == recorded["accuracy"]["n_pages"]
    assert len(report["queries"]) == recorded["accuracy"]["n_queries"]  # every query, not only the good ones
    for q in report["queries"]:
        assert 1 <= len(q["results"]) <= 2
        assert [r["rank"] for r in q["results"]] == list(range(1, len(q["results"]) + 1))
        scores = [r["score"] for r in q["results"]]
        assert scores == sorted(scores, reverse=True)
    # measured in this run, and equal to what export recorded for the same pipeline
    acc = report["accuracy"]
    assert acc["first_stage_top1"] == recorded["accuracy"]["first_stage_top1_accuracy"]
    assert acc["mini_top1"] == recorded["accuracy"]["mini_top1_accuracy"]
    assert sum(not q["top1_correct"] for q in report["queries"]) > 0  # the misses are reported too
