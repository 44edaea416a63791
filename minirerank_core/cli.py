"""The `minirerank` command line.

    minirerank demo                                   index a small sample corpus and answer a few queries
    minirerank index DOCS... --index DIR              PDFs / images / folders -> first-stage index (+ page cache)
    minirerank search "query" --index DIR [--report]  first stage + rerank over an index
    minirerank rerank "query" DOCS...                 rerank the pages of PDFs / images directly
    minirerank bench [--suite S] [-- ARGS]            run a benchmark from benchmarks/ (e.g. -- --quick)

Human-readable tables by default, one JSON object on stdout with --json (progress bars go to stderr).
`search` and `rerank` write a visual report (pages, pruning heatmaps, scores) with --report out.png|out.html.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, MiniRerankError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


# --- output helpers --------------------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}"
        return "" if v is None else str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in rows) and rows != [] for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(human)


def _error(message: str) -> int:
    print(f"minirerank: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# --- shared options ----------------------------------------------------------------------------------------
def _add_reranker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reranker")
    g.add_argument("--model", help="reranker checkpoint (local path or hub id); default: the model shipped with minirerank")
    g.add_argument("--listwise", action="store_true", help="listwise ranking (ListwiseReranker) instead of point-wise")
    g.add_argument("--exit-layer", type=int, help="score from this layer (early exit)")
    g.add_argument("--band", type=int, nargs=2, metavar=("B0", "B1"), help="query sees the page in layers [B0, B1)")
    g.add_argument("--keep-ratio", type=float, help="fraction of visual tokens the query attends to (pruned by the first stage's maps)")
    g.add_argument("--index-keep-ratio", type=float, help="fraction of visual tokens kept in the page cache (pruned before the prefill)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the model's saved setting, else cpu)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--batch-size", type=int, help="pages per model batch")
    g.add_argument("--cache-dir", help="directory of the on-disk page KV cache (reused across runs)")


def _config_changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.exit_layer is not None:
        changes["exit_layer"] = args.exit_layer
    if args.band is not None:
        changes["band"] = tuple(args.band)
    if args.keep_ratio is not None:
        changes["keep_ratio"] = args.keep_ratio
    if getattr(args, "index_keep_ratio", None) is not None:
        changes["index_keep_ratio"] = args.index_keep_ratio
    if args.device is not None:
        changes["device"] = args.device
    if args.dtype is not None:
        changes["dtype"] = args.dtype
    if args.batch_size is not None:
        changes["batch_size" if not args.listwise else "image_batch"] = args.batch_size
    return changes


def load_reranker(args: argparse.Namespace):
    """The reranker the options ask for: --model (or the shipped default), --listwise, config overrides."""
    import dataclasses

    changes = _config_changes(args)
    cache_dir = args.cache_dir
    if args.listwise:
        from .listwise import ListwiseConfig, ListwiseReranker

        if "index_keep_ratio" in changes:
            raise ConfigError("--index-keep-ratio applies to the point-wise reranker, not --listwise")
        if "keep_ratio" in changes or "exit_layer" in changes or "band" in changes:
            changes.setdefault("mode", "cached" if ("exit_layer" in changes or "band" in changes) else "single_pass")
        return ListwiseReranker.from_pretrained(args.model, ListwiseConfig(**changes) if changes else None, cache_dir=cache_dir)
    from .engine.config import RerankConfig
    from .engine.settings import saved_config
    from .reranker import MiniReranker

    config = None
    if changes:
        saved = saved_config(args.model)
        base = saved if saved is not None else RerankConfig()
        config = dataclasses.replace(base, **changes)
    return MiniReranker.from_pretrained(args.model, config, cache_dir=cache_dir)


def _default_dir(name: str) -> str | None:
    """A shipped default model directory from minirerank_core.defaults, when it is installed."""
    try:
        from . import defaults
    except ImportError:
        return None
    path = getattr(defaults, name, None)
    return str(path) if path is not None and Path(path).exists() else None


def _ingest(paths: Sequence[str], args: argparse.Namespace, image_dir: str | None = None):
    from .pages.ingest import ingest

    report = ingest(list(paths), image_dir=image_dir, show_progress=not args.quiet)
    for err in report.errors:
        print(f"minirerank: warning: skipped {err.source}: {err}", file=sys.stderr)
    return report


def _result_rows(results):
    rows = []
    for r in results:
        meta = r.page.metadata if r.page is not None else {}
        rows.append({"rank": r.rank, "page_id": r.page_id, "score": float(r.score), "source": meta.get("source"), "page": meta.get("page")})
    return rows


# --- commands ----------------------------------------------------------------------------------------------
def _check_report_path(args: argparse.Namespace) -> str | None:
    if getattr(args, "report", None) and Path(args.report).suffix.lower() not in (".png", ".html", ".htm"):
        return f"--report must end in .png or .html, got {args.report!r}"
    return None


def _no_first_stage_pruning(args: argparse.Namespace) -> None:
    """`rerank` without --embedder has no first-stage maps to prune with: attend to every visual token (say so)
    when the checkpoint's own settings prune; an explicit --keep-ratio < 1 is an error."""
    if args.listwise or args.embedder:
        return
    for flag, value in (("--keep-ratio", args.keep_ratio), ("--index-keep-ratio", args.index_keep_ratio)):
        if value is not None and value < 1.0:
            raise ConfigError(f"{flag} < 1 prunes with the first stage's similarity maps: also pass --embedder PATH")
    from .engine.settings import saved_config

    saved = saved_config(args.model)
    if saved is not None and (saved.keep_ratio < 1.0 or saved.index_keep_ratio < 1.0):
        print(
            "minirerank: note: no first stage here (--embedder not given), so every visual token is used "
            "(keep_ratio=1, index_keep_ratio=1); `minirerank search` prunes with the index's maps",
            file=sys.stderr,
        )
        args.keep_ratio = 1.0
        args.index_keep_ratio = 1.0


def _pixel_budget(reranker):
    """The reranker's pixel budget (a ListwiseReranker keeps its page side in .core)."""
    budget = getattr(reranker, "pixel_budget", None)
    return budget if budget is not None else reranker.core.pixel_budget


def _maps_for(args: argparse.Namespace, reranker, query: str, pages):
    """(query maps, page maps) on the reranker's grid from --embedder, or (None, None)."""
    if not args.embedder:
        return None, None
    from .retrieval.embedder import PageEmbedder
    from .retrieval.importance import page_importance, query_importances

    try:
        embedder = PageEmbedder.from_pretrained(args.embedder, pixel_budget=_pixel_budget(reranker))
    except ConfigError:  # not a Qwen-VL embedder: maps are resampled onto the reranker's grid
        embedder = PageEmbedder.from_pretrained(args.embedder)
    embeddings = embedder.encode_pages(pages, show_progress=not args.quiet)
    grids = [tuple(reranker.visual_grid(p)) for p in pages]
    page_maps = [page_importance(e, g) for e, g in zip(embeddings, grids)]
    return query_importances(embedder.encode_query(query), embeddings, grids), page_maps


def cmd_rerank(args: argparse.Namespace) -> int:
    import time

    if args.top_n is not None and args.top_n < 1:
        return _error(f"--top-n must be a positive int, got {args.top_n}")
    if (problem := _check_report_path(args)) is not None:
        return _error(problem)
    _no_first_stage_pruning(args)
    report = _ingest(args.docs, args)
    if not report.pages:
        return _error("no readable pages in " + ", ".join(args.docs))
    pages = report.pages
    reranker = load_reranker(args)
    maps, page_maps = _maps_for(args, reranker, args.query, pages)
    t0 = time.perf_counter()
    if not args.listwise:
        index_maps = page_maps if reranker.config.index_keep_ratio < 1.0 else None
        reranker.index(pages, importance=index_maps, show_progress=not args.quiet)  # page prefill (offline part)
    elif getattr(reranker.config, "mode", None) == "cached":
        reranker.index(pages, show_progress=not args.quiet)
    t1 = time.perf_counter()
    results = reranker.rerank(args.query, pages, top_n=args.top_n, importance=maps)
    t2 = time.perf_counter()
    rows = _result_rows(results)
    report_path = None
    if args.report:
        from .report import build_report

        by_pos = {p.id: m for p, m in zip(pages, maps)} if maps is not None else None
        report_path = str(build_report(reranker, args.query, results, importance=by_pos).save(args.report))
    payload = {
        "query": args.query,
        "candidates": len(pages),
        "results": rows,
        "timing_s": {"page_prefill": round(t1 - t0, 4), "rerank": round(t2 - t1, 4)},
        "skipped": [{"source": e.source, "error": str(e)} for e in report.errors],
        "report": report_path,
    }
    human = (
        f'query: "{args.query}"  ({len(pages)} pages; prefill {t1 - t0:.2f}s, rerank {t2 - t1:.2f}s)\n\n'
        + _table(["rank", "score", "page", "source", "p."], [[r["rank"], r["score"], r["page_id"], r["source"], r["page"]] for r in rows])
        + (f"\n\nreport written to {report_path}" if report_path else "")
    )
    _emit(args, payload, human)
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    suites = sorted(p.stem for p in bench_dir.glob("*.py") if not p.name.startswith("_"))
    if not suites:
        return _error(f"no benchmarks in {bench_dir}; `minirerank bench` runs from a source checkout of minirerank")
    if args.suite not in suites:
        return _error(f"unknown benchmark suite {args.suite!r}; available: {', '.join(suites)}")
    script = bench_dir / f"{args.suite}.py"
    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    import contextlib
    import io

    captured = io.StringIO()
    argv, sys.argv = sys.argv, [str(script), *extra]
    sys.path.insert(0, str(script.parent))
    code = EXIT_OK
    try:
        # the benchmarks print a human summary, then their results as one JSON line
        with contextlib.redirect_stdout(captured) if args.json else contextlib.nullcontext():
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:  # the benchmark's own argparse / exit status
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else _error(str(exc.code)))
    finally:
        sys.argv = argv
        sys.path.remove(str(script.parent))
    if args.json:
        for line in reversed(captured.getvalue().splitlines()):
            try:
                print(json.dumps(json.loads(line), indent=2))
                break
            except json.JSONDecodeError:
                continue
        else:
            return _error("the benchmark printed no JSON result")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minirerank",
        description="Fast multimodal page reranking for RAG.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="index a small sample corpus and answer a few queries")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of tables")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    rr = sub.add_parser("rerank", parents=[common], help="rerank the pages of PDFs / images for a query")
    rr.add_argument("query")
    rr.add_argument("docs", nargs="+", help="PDFs, page images or folders of them")
    rr.add_argument("-n", "--top-n", type=int, help="show the best N pages (default: all)")
    rr.add_argument("--report", help="write a visual report (.png or .html)")
    rr.add_argument("--embedder", help="colpali-engine embedder checkpoint: its similarity maps let the reranker prune")
    _add_reranker_options(rr)
    rr.set_defaults(func=cmd_rerank)

    _add_index_commands(sub, common)

    bench = sub.add_parser("bench", help="run a benchmark script (benchmarks/<suite>.py) and print its results")
    bench.add_argument("--suite", default="engine", help="which benchmarks/<suite>.py to run: engine (default), retrieval, listwise, ...")
    bench.add_argument("--json", action="store_true", help="ask the benchmark for JSON output")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (after --), e.g. -- --quick")
    bench.set_defaults(func=cmd_bench)
    return parser


def _add_index_commands(sub, common) -> None:
    ix = sub.add_parser(
        "index", parents=[common], help="ingest PDFs / images into a first-stage page index (and the reranker's page cache)",
        description="Ingest PDFs / page images / folders into the workspace DIR: DIR/index (FAISS multi-vector page "
        "index), DIR/pages (rendered PDF pages), DIR/cache (the reranker's page KV cache) and DIR/minirerank.json "
        "(which models built it). Running it again adds new pages; already indexed pages are skipped.",
    )
    ix.add_argument("docs", nargs="+", help="PDFs, page images or folders of them")
    ix.add_argument("--index", required=True, metavar="DIR", help="workspace directory (created or extended)")
    ix.add_argument("--embedder", help="colpali-engine embedder checkpoint (default: the workspace's, else the shipped one)")
    _add_reranker_options(ix)
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", parents=[common], help="search an index and rerank the candidates")
    se.add_argument("query")
    se.add_argument("--index", required=True, metavar="DIR", help="workspace directory made by `minirerank index`")
    se.add_argument("-k", "--candidates", type=int, default=20, help="first-stage candidates to rerank (default 20)")
    se.add_argument("-n", "--top-n", type=int, default=5, help="pages to show (default 5)")
    se.add_argument("--no-rerank", action="store_true", help="first stage only")
    se.add_argument("--embedder", help="embedder checkpoint (default: the one the index was built with)")
    se.add_argument("--report", help="write a visual report (.png or .html)")
    _add_reranker_options(se)
    se.set_defaults(func=cmd_search)


WORKSPACE_FILE = "minirerank.json"


def _workspace(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    root = Path(args.index)
    f = root / WORKSPACE_FILE
    saved: dict[str, Any] = {}
    if f.is_file():
        try:
            saved = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise OSError(f"{f} is not valid JSON ({exc}); remove the workspace or fix the file") from exc
    return root, saved


def _default_embedder() -> str | None:
    return _default_dir("DEFAULT_EMBEDDER_DIR")


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def _open_pipeline(args: argparse.Namespace, root: Path, saved: dict[str, Any], create: bool):
    from .errors import ConfigError
    from .pipeline import RerankPipeline
    from .retrieval import PageIndex
    from .retrieval.embedder import PageEmbedder

    embedder_path = args.embedder or saved.get("embedder") or _default_embedder()
    if embedder_path is None:
        raise ConfigError("no embedder: pass --embedder PATH (a colpali-engine checkpoint); no default one is installed")
    if saved.get("embedder") and args.embedder and _abs(args.embedder) != saved["embedder"] and create:
        raise ConfigError(
            f"{root} was indexed with the embedder {saved['embedder']}; adding pages embedded by another model would "
            "mix embedding spaces. Use a new --index directory"
        )
    if args.model is None and saved.get("reranker"):
        args.model = saved["reranker"]
    if args.cache_dir is None:
        args.cache_dir = str(root / "cache")
    reranker = load_reranker(args)
    try:  # shared vision tower (ColQwen + Qwen-VL reranker): the same budget puts both on one grid
        embedder = PageEmbedder.from_pretrained(embedder_path, pixel_budget=_pixel_budget(reranker))
    except ConfigError:  # not a Qwen-VL embedder: its maps are resampled onto the reranker's grid
        embedder = PageEmbedder.from_pretrained(embedder_path)
    index_dir = root / "index"
    if (index_dir / "manifest.json").exists():
        index = PageIndex.open(index_dir)
    elif create:
        index = PageIndex.create(index_dir)
    else:
        raise ConfigError(f"no index in {root}; build one with `minirerank index DOCS --index {root}`")
    pipeline = RerankPipeline(embedder, reranker, index, page_dir=root / "pages", show_progress=not args.quiet)
    return pipeline, embedder_path


def cmd_index(args: argparse.Namespace) -> int:
    import time

    if args.listwise:
        return _error("`index` prefills the point-wise reranker's page cache; use --listwise with `search` instead")
    root, saved = _workspace(args)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipeline, embedder_path = _open_pipeline(args, root, saved, create=True)
    before = len(pipeline.index)
    report = pipeline.add(list(args.docs))
    elapsed = time.perf_counter() - t0
    info = {
        "format": "minirerank-cli-workspace", "version": 1,
        "embedder": _abs(embedder_path), "reranker": _abs(args.model),
    }
    tmp = root / (WORKSPACE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, root / WORKSPACE_FILE)
    by_doc: dict[str, int] = {}
    for p in report.pages:
        src = str(p.metadata.get("source") or p.source or p.id)
        by_doc[src] = by_doc.get(src, 0) + 1
    payload = {
        "index": str(root), "pages_added": len(report.pages), "pages_total": len(pipeline.index),
        "pages_before": before, "duplicates_skipped": len(report.duplicates),
        "errors": [{"source": e.source, "page": e.page, "error": str(e)} for e in report.errors],
        "documents": [{"source": k, "pages": v} for k, v in by_doc.items()], "seconds": round(elapsed, 3),
    }
    human = _table(["source", "pages added"], [[k, v] for k, v in by_doc.items()]) if by_doc else "no new pages"
    human += (
        f"\n\nindexed {len(report.pages)} new pages ({len(report.duplicates)} duplicates skipped, "
        f"{len(report.errors)} errors) in {elapsed:.1f}s; {len(pipeline.index)} pages in {root}"
    )
    for e in report.errors:
        human += f"\n  error: {e}"
    _emit(args, payload, human)
    return EXIT_OK if report.pages or not report.errors else EXIT_ERROR


def cmd_search(args: argparse.Namespace) -> int:
    import time

    for name, value in (("--candidates", args.candidates), ("--top-n", args.top_n)):
        if value < 1:
            return _error(f"{name} must be a positive int, got {value}")
    if (problem := _check_report_path(args)) is not None:
        return _error(problem)
    if args.report and args.no_rerank:
        return _error("--report shows the reranker's pruning; it cannot be combined with --no-rerank")
    root, saved = _workspace(args)
    if not saved:
        return _error(f"no minirerank index in {root}; build one with `minirerank index DOCS --index {root}`")
    pipeline, _ = _open_pipeline(args, root, saved, create=False)
    t0 = time.perf_counter()
    results = pipeline.search(args.query, k=args.candidates, top_n=args.top_n, rerank=not args.no_rerank)
    elapsed = time.perf_counter() - t0
    report_path = None
    if args.report:
        from .report import build_pipeline_report

        report_path = str(build_pipeline_report(pipeline, args.query, results).save(args.report))
    rows = [
        {
            "rank": r.rank, "page_id": r.page_id, "score": float(r.score),
            "first_stage_score": float(r.first_stage_score), "first_stage_rank": r.first_stage_rank,
            "source": r.metadata.get("source"), "page": r.metadata.get("page"),
        }
        for r in results
    ]
    payload = {
        "query": args.query, "index": str(root), "pages_in_index": len(pipeline.index), "candidates": args.candidates,
        "reranked": not args.no_rerank, "results": rows, "seconds": round(elapsed, 4), "report": report_path,
    }
    headers = ["rank", "score", "1st stage", "1st rank", "page", "source", "p."]
    human = (
        f'query: "{args.query}"  ({len(pipeline.index)} pages indexed, {min(args.candidates, len(pipeline.index))} '
        f"candidates{'' if not args.no_rerank else ', first stage only'}; {elapsed:.2f}s)\n\n"
        + _table(headers, [[r["rank"], r["score"], r["first_stage_score"], r["first_stage_rank"], r["page_id"], r["source"], r["page"]] for r in rows])
        + (f"\n\nreport written to {report_path}" if report_path else "")
    )
    _emit(args, payload, human)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(json_output=args.json)
    try:
        return args.func(args)
    except MiniRerankError as exc:
        return _error(str(exc))
    except OSError as exc:  # a missing checkpoint, an unwritable report path, ...
        return _error(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
