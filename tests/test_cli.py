"""The `minirerank` command line, run in-process through cli.main() on a tiny random checkpoint saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from minirerank_core import MiniReranker, RerankConfig
from minirerank_core import testing as T
from minirerank_core.cli import build_parser, main
from minirerank_core.pages.ingest import ingest

QUERY = "revenue growth"


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory) -> Path:
    model, proc = tiny("qwen3_vl")
    path = tmp_path_factory.mktemp("cli_ckpt") / "tiny"
    MiniReranker(model, proc).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("cli_docs")
    imgs = [T.random_page_image(170, 220, seed=30 + i) for i in range(3)]
    pdf = d / "report.pdf"
    imgs[0].save(pdf, save_all=True, append_images=imgs[1:])
    png = d / "scan.png"
    T.random_page_image(150, 200, seed=40).save(png)
    return [pdf, png]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def core_ranking(ckpt, docs, config=None):
    pages = ingest([str(d) for d in docs], show_progress=False).pages
    reranker = MiniReranker.from_pretrained(ckpt, config)
    return [(r.page_id, r.score) for r in reranker.rerank(QUERY, pages)]


def test_rerank_json_matches_the_core(capsys, ckpt, docs, tmp_path):
    missing = tmp_path / "missing.png"
    code, out, _ = run(capsys, "rerank", QUERY, *docs, missing, "--model", ckpt, "--json", "-q")
    assert code == 0
    payload = json.loads(out)
    want = core_ranking(ckpt, docs)
    assert [r["page_id"] for r in payload["results"]] == [i for i, _ in want]
    assert [r["score"] for r in payload["results"]] == pytest.approx([s for _, s in want], abs=1e-5)
    assert [r["rank"] for r in payload["results"]] == [1, 2, 3, 4]
    assert payload["candidates"] == 4 and payload["query"] == QUERY
    assert payload["skipped"] and "missing.png" in payload["skipped"][0]["source"]
    pdf_rows = [r for r in payload["results"] if r["source"] == str(docs[0])]
    assert sorted(r["page"] for r in pdf_rows) == [1, 2, 3]


def test_rerank_table_and_top_n(capsys, ckpt, docs):
    code, out, err = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "-n", "2")
    assert code == 0
    want = core_ranking(ckpt, docs)
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    rows = lines[header + 2 :]
    assert len(rows) == 2
    assert [r.split()[2] for r in rows] == [want[0][0], want[1][0]]
    assert "prefill pages" in err  # progress bar on stderr, never on stdout


def test_rerank_config_overrides(capsys, ckpt, docs):
    code, out, _ = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "--exit-layer", "3", "--band", "1", "3", "--json", "-q")
    assert code == 0
    got = [(r["page_id"], r["score"]) for r in json.loads(out)["results"]]
    want = core_ranking(ckpt, docs, RerankConfig(exit_layer=3, band=(1, 3)))
    dense = core_ranking(ckpt, docs)
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-5)
    assert [g[1] for g in got] != pytest.approx(sorted([d[1] for d in dense], reverse=True), abs=1e-5)


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_rerank_report(capsys, ckpt, docs, tmp_path, suffix):
    target = tmp_path / f"out{suffix}"
    code, out, _ = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "-n", "3", "--report", target, "--json", "-q")
    assert code == 0
    payload = json.loads(out)
    assert payload["report"] == str(target)
    if suffix == ".png":
        with Image.open(target) as im:
            assert im.format == "PNG" and im.width >= 3 * 250 and im.height > 200
    else:
        text = target.read_text()
        for r in payload["results"]:
            assert r["page_id"] in text
        assert "data:image/png;base64," in text


def test_rerank_listwise(capsys, ckpt, docs):
    from minirerank_core.rerankers.listwise import ListwiseReranker

    code, out, _ = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "--listwise", "--json", "-q")
    assert code == 0
    pages = ingest([str(d) for d in docs], show_progress=False).pages
    want = ListwiseReranker.from_pretrained(ckpt).rerank(QUERY, pages)
    assert [r["page_id"] for r in json.loads(out)["results"]] == [r.page_id for r in want]


def test_rerank_errors(capsys, ckpt, docs, tmp_path):
    code, _, err = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "-n", "0", "-q")
    assert code == 1 and "--top-n" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "rerank", QUERY, empty, "--model", ckpt, "-q")
    assert code == 1 and "no readable pages" in err
    code, _, err = run(capsys, "rerank", QUERY, *docs, "--model", tmp_path / "no-such-model", "-q")
    assert code == 1 and "error" in err
    code, _, err = run(capsys, "rerank", " ", *docs, "--model", ckpt, "-q")
    assert code == 1 and "query" in err
    code, _, err = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "--band", "4", "2", "-q")
    assert code == 1 and "band" in err
    code, _, err = run(capsys, "rerank", QUERY, *docs, "--model", ckpt, "--report", tmp_path / "r.jpg", "-q")
    assert code == 1 and ".png or .html" in err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["rerank"])
    args = build_parser().parse_args(["demo", "--json"])
    assert args.command == "demo" and args.json is True


def test_bench_quick_json(capsys):
    code, out, _ = run(capsys, "bench", "--json", "--", "--quick", "--candidates", "4")
    assert code == 0
    result = json.loads(out)
    assert result["quick"] is True and result["mini_seconds"] > 0 and result["dense_seconds"] > 0


# --- index / search over a workspace ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedder_ckpt(tmp_path_factory) -> Path:
    model, proc = T.tiny_embedder("qwen3_vl", max_pixels=32 * 32 * 40)
    path = tmp_path_factory.mktemp("cli_emb") / "colqwen3"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pruning_ckpt(tiny, tmp_path_factory) -> Path:
    model, proc = tiny("qwen3_vl")
    path = tmp_path_factory.mktemp("cli_ckpt_prune") / "tiny"
    MiniReranker(model, proc, RerankConfig(keep_ratio=0.5)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(embedder_ckpt, pruning_ckpt, docs, tmp_path_factory):
    ws = tmp_path_factory.mktemp("cli_ws") / "ws"
    bad = docs[0].parent / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4 nothing")
    code = main([str(a) for a in ("index", *docs, bad, "--index", ws, "--embedder", embedder_ckpt, "--model", pruning_ckpt, "--json", "-q")])
    bad.unlink()
    return ws, code


def test_index_builds_a_workspace(capsys, workspace, embedder_ckpt, pruning_ckpt, docs):
    ws, code = workspace
    capsys.readouterr()
    assert code == 0
    assert (ws / "index" / "manifest.json").is_file() and (ws / "pages").is_dir() and (ws / "cache").is_dir()
    info = json.loads((ws / "minirerank.json").read_text())
    assert info["embedder"] == str(embedder_ckpt) and info["reranker"] == str(pruning_ckpt)
    # again: nothing new, every page reported as a duplicate
    code, out, _ = run(capsys, "index", *docs, "--index", ws, "--json", "-q")
    payload = json.loads(out)
    assert code == 0 and payload["pages_added"] == 0 and payload["duplicates_skipped"] == 4 and payload["pages_total"] == 4


def test_search_matches_the_pipeline(capsys, workspace, embedder_ckpt, pruning_ckpt):
    from minirerank_core.pipeline import RerankPipeline
    from minirerank_core.retrieval import PageIndex
    from minirerank_core.retrieval.embedder import PageEmbedder

    ws, _ = workspace
    code, out, _ = run(capsys, "search", QUERY, "--index", ws, "-k", 4, "-n", 3, "--json", "-q")
    assert code == 0
    payload = json.loads(out)
    reranker = MiniReranker.from_pretrained(pruning_ckpt)
    pipe = RerankPipeline(
        PageEmbedder.from_pretrained(embedder_ckpt, pixel_budget=reranker.pixel_budget), reranker,
        PageIndex.open(ws / "index"), show_progress=False,
    )
    want = pipe.search(QUERY, k=4, top_n=3)
    assert [r["page_id"] for r in payload["results"]] == [r.page_id for r in want]
    assert [r["score"] for r in payload["results"]] == pytest.approx([r.score for r in want], abs=1e-5)
    assert [r["first_stage_rank"] for r in payload["results"]] == [r.first_stage_rank for r in want]
    assert payload["pages_in_index"] == 4 and payload["reranked"] is True

    code, out, _ = run(capsys, "search", QUERY, "--index", ws, "-n", 4, "--no-rerank", "--json", "-q")
    plain = json.loads(out)["results"]
    assert [r["first_stage_rank"] for r in plain] == [1, 2, 3, 4]
    assert [r["score"] for r in plain] == [r["first_stage_score"] for r in plain]


def test_search_table_and_report(capsys, workspace, tmp_path):
    ws, _ = workspace
    target = tmp_path / "search.html"
    code, out, _ = run(capsys, "search", QUERY, "--index", ws, "-n", 2, "--report", target, "-q")
    assert code == 0
    assert "1st stage" in out and f"report written to {target}" in out
    html = target.read_text()
    assert "visual tokens kept" in html and html.count("<tr>") == 3


def test_index_and_search_errors(capsys, workspace, tmp_path, embedder_ckpt, docs):
    ws, _ = workspace
    code, _, err = run(capsys, "search", QUERY, "--index", tmp_path / "nowhere", "-q")
    assert code == 1 and "no minirerank index" in err
    code, _, err = run(capsys, "search", QUERY, "--index", ws, "--no-rerank", "--report", tmp_path / "r.png", "-q")
    assert code == 1 and "--no-rerank" in err
    code, _, err = run(capsys, "search", QUERY, "--index", ws, "-k", 0, "-q")
    assert code == 1 and "--candidates" in err
    other = tmp_path / "other-embedder"
    other.mkdir()
    code, _, err = run(capsys, "index", *docs, "--index", ws, "--embedder", other, "-q")
    assert code == 1 and "mix embedding spaces" in err


def test_rerank_with_a_pruning_checkpoint(capsys, pruning_ckpt, embedder_ckpt, docs, tmp_path):
    """Without --embedder there are no maps: every token is used (and said so); with it, pruning applies."""
    code, out, err = run(capsys, "rerank", QUERY, *docs, "--model", pruning_ckpt, "--json", "-q")
    assert code == 0 and "every visual token is used" in err
    dense = core_ranking(pruning_ckpt, docs, RerankConfig())
    assert [r["score"] for r in json.loads(out)["results"]] == pytest.approx([s for _, s in dense], abs=1e-5)

    code, _, err = run(capsys, "rerank", QUERY, *docs, "--model", pruning_ckpt, "--keep-ratio", "0.3", "-q")
    assert code == 1 and "--embedder" in err

    target = tmp_path / "pruned.png"
    code, out, _ = run(capsys, "rerank", QUERY, *docs, "--model", pruning_ckpt, "--embedder", embedder_ckpt, "--json", "-q", "--report", target)
    assert code == 0 and target.is_file()
    pruned = json.loads(out)["results"]
    from minirerank_core.retrieval.embedder import PageEmbedder
    from minirerank_core.retrieval.importance import query_importances

    reranker = MiniReranker.from_pretrained(pruning_ckpt)
    pages = ingest([str(d) for d in docs], show_progress=False).pages
    emb = PageEmbedder.from_pretrained(embedder_ckpt, pixel_budget=reranker.pixel_budget)
    maps = query_importances(emb.encode_query(QUERY), emb.encode_pages(pages, show_progress=False), [reranker.visual_grid(p) for p in pages])
    want = reranker.rerank(QUERY, pages, importance=maps)
    assert [r["page_id"] for r in pruned] == [r.page_id for r in want]
    assert [r["score"] for r in pruned] == pytest.approx([r.score for r in want], abs=1e-5)


def test_search_listwise(capsys, workspace, embedder_ckpt, pruning_ckpt, docs):
    from minirerank_core.rerankers.listwise import ListwiseReranker
    from minirerank_core.pipeline import RerankPipeline
    from minirerank_core.retrieval import PageIndex
    from minirerank_core.retrieval.embedder import PageEmbedder

    ws, _ = workspace
    code, out, _ = run(capsys, "search", QUERY, "--index", ws, "-k", 4, "-n", 4, "--listwise", "--json", "-q")
    assert code == 0
    lw = ListwiseReranker.from_pretrained(pruning_ckpt)
    pipe = RerankPipeline(PageEmbedder.from_pretrained(embedder_ckpt, pixel_budget=lw.pixel_budget), lw,
                          PageIndex.open(ws / "index"), show_progress=False)
    want = pipe.search(QUERY, k=4, top_n=4)
    assert [r["page_id"] for r in json.loads(out)["results"]] == [r.page_id for r in want]
    # the listwise reranker indexes through the same interface (single pass keeps no page cache: nothing to fill)
    code, out, _ = run(capsys, "index", *docs, "--index", ws, "--listwise", "--json", "-q")
    assert code == 0 and json.loads(out)["pages_added"] == 0 and json.loads(out)["duplicates_skipped"] == 4


def test_bench_unknown_suite(capsys):
    code, _, err = run(capsys, "bench", "--suite", "nope")
    assert code == 1 and "available:" in err and "engine" in err


def test_too_long_query_is_refused_with_a_clear_message(capsys, ckpt, docs, workspace):
    long_query = "revenue " * 3000
    code, _, err = run(capsys, "rerank", long_query, *docs, "--model", ckpt, "-q")
    assert code == 1 and "max_query_tokens" in err
    ws, _ = workspace
    code, _, err = run(capsys, "search", long_query, "--index", ws, "-q")
    assert code == 1 and "max_query_tokens" in err
    code, out, err = run(capsys, "rerank", long_query, *docs, "--model", ckpt, "--truncate-query", "--max-query-tokens", 16,
                         "--json", "-q")
    assert code == 0 and len(json.loads(out)["results"]) == 4


def test_index_help_states_the_one_writer_rule(capsys):
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    assert "One writer at a time per workspace" in " ".join(capsys.readouterr().out.split())
