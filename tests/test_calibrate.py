"""calibrate: a checkpoint as it is, swept against its own dense ranking; queries from the PDFs' text layer."""

from __future__ import annotations

import json

import pytest

from minirerank_core import MiniReranker, RerankConfig
from minirerank_core import testing as T
from minirerank_core.calibrate import (
    CalibrationQuery,
    Setting,
    calibrate,
    default_grid,
    queries_from_pdfs,
    queries_from_text,
    read_queries,
)
from minirerank_core.cli import main
from minirerank_core.pages.ingest import ingest

TOPICS = [
    ("Quarterly Revenue Report", "Revenue grew by twelve percent in the northern region while shipping costs fell."),
    ("Network Protocol Design", "Packets are retransmitted after a timeout; congestion windows shrink on loss."),
    ("Garden Plant Care", "Tomatoes need full sun, deep watering and stakes before the flowering season."),
]


def text_pdf(path):
    """A real PDF with a text layer (TrueType fonts embedded by matplotlib), one page per topic."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["pdf.fonttype"] = 42
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for title, body in TOPICS:
            fig = plt.figure(figsize=(3, 4))
            fig.text(0.05, 0.9, title, fontsize=10)
            for i, chunk in enumerate([body[j : j + 38] for j in range(0, len(body), 38)]):
                fig.text(0.05, 0.8 - 0.06 * i, chunk, fontsize=6)
            pdf.savefig(fig)
            plt.close(fig)
    return path


@pytest.fixture(scope="module")
def reranker():
    model, proc = T.tiny_model_and_processor("qwen3_vl", max_pixels=32 * 32 * 12)
    return MiniReranker(model, proc)


def test_queries_come_from_the_text_layer_tied_to_their_page(tmp_path):
    pdf = text_pdf(tmp_path / "docs.pdf")
    pages = ingest([pdf], dpi=40, show_progress=False).pages
    queries = queries_from_pdfs([pdf], pages, per_page=2)
    by_page = {}
    for q in queries:
        by_page.setdefault(q.page_id, []).append(q.query)
    assert set(by_page) == {p.id for p in pages}
    for (title, body), page in zip(TOPICS, pages):
        got = by_page[page.id]
        assert got[0] == title  # the heading-like line
        assert all(w in (title + " " + body).lower() for q in got[1:] for w in q.split())  # phrases of that page


def test_distinctive_phrases_prefer_words_other_pages_lack():
    qs = queries_from_text([("a", "common words shared here\nthe zebra quokka axolotl narwhal swim"),
                            ("b", "common words shared here\nplain text again")], per_page=2)
    assert any("zebra" in q.query or "quokka" in q.query for q in qs if q.page_id == "a")


def test_sweep_agrees_with_itself_and_chooses_within_target(reranker, tmp_path):
    pages = [T.random_page_image(120 + 10 * i, 150, seed=i) for i in range(5)]
    from minirerank_core import Page

    pages = [Page(p, id=f"p{i}") for i, p in enumerate(pages)]
    L = reranker.adapter.num_layers
    grid = [Setting(L, (0, L)), Setting(L - 1, (1, 3)), Setting(2, (0, 1))]
    cal = calibrate(reranker, pages, ["revenue table", "network timeout", "garden"], grid=grid, target=0.97)
    exact = next(r for r in cal.rows if r.exact)
    assert exact.ndcg5 == pytest.approx(1.0) and exact.top1 == 1.0  # the reference agrees with itself
    assert cal.chosen.ndcg5 >= 0.97 and cal.chosen in cal.rows
    assert min(r.ndcg5 for r in cal.rows) < 1.0  # the sweep can tell settings apart (random weights)
    assert cal.dense_seconds_per_query > 0 and all(r.seconds_per_query > 0 for r in cal.rows)
    path = cal.save(tmp_path / "cal.json")
    again = MiniReranker.from_pretrained(_save(reranker, tmp_path / "ckpt"), settings=path)
    assert (again.config.exit_layer, again.config.band) == (cal.chosen.setting.exit_layer, cal.chosen.setting.band)
    assert again.config.query_positions == "exact"
    assert "exit" in cal.table() and json.loads(json.dumps(cal.to_json()))["chosen"]


def _save(r, path):
    r.save_pretrained(path)
    return path


def test_default_grid_is_valid_for_the_model():
    for L in (6, 8, 28):
        grid = default_grid(L)
        assert Setting(L, (0, L), 1.0) in grid
        for s in grid:
            RerankConfig(exit_layer=s.exit_layer, band=s.band, keep_ratio=s.keep_ratio).resolve(L)


def test_read_queries_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", {"query": "two", "page": "p1"}]))
    (tmp_path / "b.txt").write_text("one\n\ntwo\n")
    assert read_queries(tmp_path / "a.json") == [CalibrationQuery("one"), CalibrationQuery("two", "p1")]
    assert [q.query for q in read_queries(tmp_path / "b.txt")] == ["one", "two"]


def test_cli_calibrate_saves_settings_the_cli_accepts(reranker, tmp_path, capsys):
    pdf = text_pdf(tmp_path / "docs.pdf")
    ckpt = _save(reranker, tmp_path / "ckpt")
    out_file = tmp_path / "calibrated.json"
    code = main(["calibrate", "--model", str(ckpt), "--pages", str(pdf), "--save", str(out_file), "--json", "-q",
                 "--target", "0.9"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["saved"] == str(out_file) and payload["queries"]
    assert payload["ndcg5"] >= 0.9 and len(payload["rows"]) == len(default_grid(reranker.adapter.num_layers, (1.0,)))
    code = main(["rerank", "revenue", str(pdf), "--model", str(ckpt), "--settings", str(out_file), "--json", "-q"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["results"]) == 3
