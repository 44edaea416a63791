"""`minirerank demo` (the README's main command) runs the whole pipeline and reports what it used."""

import json

from minirerank_core.demo import run_demo


def test_demo_runs_end_to_end_and_says_which_models(capsys):
    assert run_demo(json_output=True, k=4, top_n=2) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout is pure JSON; any banner goes to stderr
    assert report["n_pages"] >= 2 and report["queries"]
    for q in report["queries"]:
        assert 1 <= len(q["results"]) <= 2
        assert [r["rank"] for r in q["results"]] == list(range(1, len(q["results"]) + 1))
        scores = [r["score"] for r in q["results"]]
        assert scores == sorted(scores, reverse=True)
    if not report["trained_models"]:
        assert "TINY RANDOM" in captured.err
