"""The `minirerank` command line.

    minirerank demo                                   index a small sample corpus and answer a few queries
    minirerank index DOCS... --index DIR              PDFs / images / folders -> first-stage index (+ page cache)
    minirerank search "query" --index DIR [--report]  first stage + rerank over an index
    minirerank rerank "query" DOCS...                 rerank the pages of PDFs / images directly
    minirerank tune --teacher T --pages DOCS --out OUT  distil a reranker into a miniReranker on your pages
    minirerank bench [--suite S] [-- ARGS]            run a benchmark from benchmarks/ (e.g. -- --quick)
    minirerank serve [--index DIR] [--port 8080]      HTTP service: Cohere / Jina compatible /v1/rerank, /v1/search

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
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MiniRerankError
from .validation import check_optional_positive_int, check_positive_int

if TYPE_CHECKING:
    from .candidates import Candidate
    from .rerankers.base import Reranker

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
    g.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:1, mps; also for the embedder")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on a GPU that supports it, float32 on the CPU; also for the embedder")
    g.add_argument("--settings", metavar="FILE", help="a settings file (e.g. written by `minirerank calibrate --save`) "
                   "instead of the checkpoint's own minirerank_config.json")
    g.add_argument("--batch-size", type=int, help="pages per model batch")
    g.add_argument("--max-query-tokens", type=int, help="longest query accepted (default: min(512, 1/8 of the model's context))")
    g.add_argument("--truncate-query", action="store_true", help="cut a longer query to the limit (with a warning) instead of refusing it")
    g.add_argument("--cache-dir", help="directory of the on-disk page KV cache (reused across runs), or an fsspec URL "
                                       "(s3://bucket/prefix, gs://..., az://...) of a write-once cache shared by machines")
    g.add_argument("--local-cache-dir", metavar="DIR", help="a local disk tier in front of a remote --cache-dir URL")
    g.add_argument("--kv-dtype", choices=["int8", "fp8"], help="cache pages compressed (one byte per value plus scales; "
                                                               "default: the model's own values)")


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
    if getattr(args, "max_query_tokens", None) is not None:
        changes["max_query_tokens"] = args.max_query_tokens
    if getattr(args, "truncate_query", False):
        changes["query_overflow"] = "truncate"
    if getattr(args, "kv_dtype", None) is not None:
        changes["kv_dtype"] = args.kv_dtype
    return changes


def load_reranker(args: argparse.Namespace) -> Reranker:
    """The reranker the options ask for: --model (or the shipped default), --listwise, config overrides on top of
    the settings the checkpoint was saved with."""
    from .engine.config import RerankConfig
    from .engine.settings import read_settings
    from .rerankers import ListwiseConfig, ListwiseReranker, MiniReranker
    from .rerankers.loading import checkpoint_path

    changes = _config_changes(args)
    cache_dir: Any = args.cache_dir
    if getattr(args, "local_cache_dir", None):
        from .cache import open_store

        cache_dir = open_store(args.cache_dir, local_dir=args.local_cache_dir)
    if args.listwise:
        for key, flag in (("index_keep_ratio", "--index-keep-ratio"), ("kv_dtype", "--kv-dtype")):
            if key in changes:
                raise ConfigError(f"{flag} applies to the point-wise reranker, not --listwise")
        if "keep_ratio" in changes or "exit_layer" in changes or "band" in changes:
            changes.setdefault("mode", "cached" if ("exit_layer" in changes or "band" in changes) else "single_pass")
        return ListwiseReranker.from_pretrained(args.model, ListwiseConfig(**changes) if changes else None,
                                                cache_dir=cache_dir)
    saved = read_settings(getattr(args, "settings", None) or checkpoint_path(args.model))
    if getattr(args, "settings", None) and saved.config is None:
        raise ConfigError(f"--settings {args.settings}: no minirerank settings found there")
    config = None
    if changes or getattr(args, "settings", None):
        config = (saved.config or RerankConfig()).replace(**changes)
    template = saved.template if getattr(args, "settings", None) else None
    return MiniReranker.from_pretrained(args.model, config, template=template, cache_dir=cache_dir)


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
    from .engine.settings import read_settings
    from .rerankers.loading import checkpoint_path

    saved = read_settings(checkpoint_path(args.model)).config
    if saved is not None and (saved.keep_ratio < 1.0 or saved.index_keep_ratio < 1.0):
        print(
            "minirerank: note: no first stage here (--embedder not given), so every visual token is used "
            "(keep_ratio=1, index_keep_ratio=1); `minirerank search` prunes with the index's maps",
            file=sys.stderr,
        )
        args.keep_ratio = 1.0
        args.index_keep_ratio = 1.0


def _candidates(args: argparse.Namespace, reranker: Reranker, pages) -> list[Candidate]:
    """The pages as candidates: with --embedder, through an in-memory first stage (first-stage order, maps on the
    reranker's grid); without, in the order given and without maps."""
    from .candidates import Candidate

    if not args.embedder:
        return [Candidate(p) for p in pages]
    from .retrieval import FirstStage

    first_stage = FirstStage.from_pretrained(args.embedder, reranker=reranker)
    first_stage.add(pages, show_progress=not args.quiet)
    return first_stage.candidates(args.query, len(pages), reranker)


def cmd_rerank(args: argparse.Namespace) -> int:
    import time

    check_optional_positive_int("--top-n", args.top_n)
    if (problem := _check_report_path(args)) is not None:
        return _error(problem)
    _no_first_stage_pruning(args)
    report = _ingest(args.docs, args)
    if not report.pages:
        return _error("no readable pages in " + ", ".join(args.docs))
    reranker = load_reranker(args)
    candidates = _candidates(args, reranker, report.pages)
    t0 = time.perf_counter()
    reranker.index(candidates, show_progress=not args.quiet)  # page prefill (the offline part)
    t1 = time.perf_counter()
    results = reranker.rerank(args.query, candidates, top_n=args.top_n)
    t2 = time.perf_counter()
    rows = _result_rows(results)
    report_path = None
    if args.report:
        from .report import build_report

        report_path = str(build_report(reranker, args.query, results).save(args.report))
    payload = {
        "query": args.query,
        "candidates": len(candidates),
        "results": rows,
        "timing_s": {"page_prefill": round(t1 - t0, 4), "rerank": round(t2 - t1, 4)},
        "skipped": [{"source": e.source, "error": str(e)} for e in report.errors],
        "report": report_path,
    }
    human = (
        f'query: "{args.query}"  ({len(candidates)} pages; prefill {t1 - t0:.2f}s, rerank {t2 - t1:.2f}s)\n\n'
        + _table(["rank", "score", "page", "source", "p."], [[r["rank"], r["score"], r["page_id"], r["source"], r["page"]] for r in rows])
        + (f"\n\nreport written to {report_path}" if report_path else "")
    )
    _emit(args, payload, human)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate, queries_from_pdfs, read_queries

    check_positive_int("--candidates", args.candidates)
    check_positive_int("--max-queries", args.max_queries)
    report = _ingest(args.pages, args)
    if not report.pages:
        return _error("no readable pages in " + ", ".join(args.pages))
    if args.queries:
        queries = read_queries(args.queries)[: args.max_queries]
    else:
        queries = queries_from_pdfs(args.pages, report.pages, max_queries=args.max_queries)
        if not queries:
            return _error("no text layer to draw queries from (scanned pages or images): pass --queries FILE")
    reranker = load_reranker(args)
    first_stage = None
    if args.embedder:
        from .retrieval import FirstStage

        first_stage = FirstStage.from_pretrained(args.embedder, reranker=reranker)
    cal = calibrate(reranker, report.pages, queries, first_stage=first_stage, k=args.candidates, target=args.target,
                    show_progress=not args.quiet)
    saved = str(cal.save(args.save)) if args.save else None
    payload = {**cal.to_json(), "saved": saved, "queries": [q.query for q in queries]}
    human = cal.table() + (f"\n\nsettings written to {saved} (use --settings {saved})" if saved else "")
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(human)
        print(json.dumps({k: v for k, v in payload.items() if k not in ("rows", "queries")}, default=str))
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from .calibrate import read_queries
    from .train.tune import tune

    report = _ingest(args.pages, args)
    if not report.pages:
        return _error("no readable pages in " + ", ".join(args.pages))
    queries = read_queries(args.queries) if args.queries else None
    settings = {"exit_layer": args.exit, "band": tuple(args.band) if args.band else None, "keep_ratio": args.keep,
                "query_positions": args.positions, "steps": args.steps, "holdout": args.holdout,
                "candidates": args.candidates, "lr": args.lr, "label_weight": args.label_weight,
                "listwise": args.listwise or None, "copy_weight": args.copy_weight, "attn_scale": args.attn_scale,
                "readback_init": args.readback_init, "readback_relevance": args.readback_relevance,
                "readback_copy_scale": args.readback_copy_scale, "readout": args.readout}
    result = tune(args.teacher, report.pages, args.out, queries=queries, embedder=args.embedder,
                  device=args.device or "auto", threads=args.threads, quiet=args.quiet or args.json,
                  show_progress=not args.quiet, **{k: v for k, v in settings.items() if v is not None})
    payload = result.to_json()
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(result.table())
        print(json.dumps(payload, default=str))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    # a source checkout (editable install), else the working directory when it is a checkout
    bench_dir = next((d for d in (Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks")
                      if d.is_dir()), Path.cwd() / "benchmarks")
    suites = sorted(p.stem for p in bench_dir.glob("*.py") if not p.name.startswith("_"))
    if not suites:
        return _error("the benchmarks ship with the source repository, not the installed package: clone it and run "
                      "`python benchmarks/<suite>.py` (or `minirerank bench` from inside the checkout)")
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
    _add_serve_command(sub)

    cal = sub.add_parser(
        "calibrate", parents=[common], help="measure how far a checkpoint can be made mini without training",
        description="Sweep exit layer, interaction band and keep ratio (exact positions) for a checkpoint used as it "
        "is, against its own dense ranking on your pages and queries; print a table (time vs dense, nDCG@5 and top-1 "
        "agreement) and save the fastest setting within the target agreement (--save) for --settings / "
        "MiniReranker.from_pretrained(settings=...).",
    )
    cal.add_argument("--pages", nargs="+", required=True, metavar="DOCS", help="PDFs, page images or folders of them")
    cal.add_argument("--queries", help="queries file (JSON list, JSON lines or one per line); default: drawn from the "
                     "PDFs' text layer (headings and distinctive phrases)")
    cal.add_argument("--embedder", help="colpali-engine embedder: candidates and pruning maps (keep ratios < 1 are "
                     "swept only with one)")
    cal.add_argument("--target", type=float, default=0.97, help="nDCG@5 agreement with the dense ranking (default 0.97)")
    cal.add_argument("-k", "--candidates", type=int, default=20, help="candidates per query (default 20)")
    cal.add_argument("--max-queries", type=int, default=64, help="at most this many queries (default 64)")
    cal.add_argument("--save", metavar="FILE", help="write the chosen setting as a settings file")
    _add_reranker_options(cal)
    cal.set_defaults(func=cmd_calibrate)

    tn = sub.add_parser(
        "tune", parents=[common], help="distil a reranker into a miniReranker on your pages (training)",
        description="Distil a reranker checkpoint (query-first Qwen3-VL-Reranker included) into a vision-first "
        "miniReranker initialised from its weights and trained in exactly the given setting on your pages: "
        "text-layer (or given) queries, first-stage hard negatives, the teacher's scores cached in OUT/run. "
        "Resumable (rerun the same command). Prints held-out agreement with the teacher and the time ratio; "
        "OUT loads with MiniReranker.from_pretrained(OUT) or --model OUT.",
    )
    tn.add_argument("--teacher", required=True, help="reranker checkpoint to distil (local path or hub id)")
    tn.add_argument("--pages", nargs="+", required=True, metavar="DOCS", help="PDFs, page images or folders of them")
    tn.add_argument("--out", required=True, help="output directory: the student (save_pretrained) and OUT/run")
    tn.add_argument("--queries", help="queries file (JSON list of strings or {query, page}, JSON lines or one per "
                    "line); default: drawn from the PDFs' text layer")
    tn.add_argument("--embedder", help="colpali-engine embedder for hard negatives and pruning maps (default: the "
                    "shipped ColQwen3 when the teacher has its vision tower)")
    tn.add_argument("--exit", type=int, help="exit layer (default: 3/4 of the layers)")
    tn.add_argument("--band", type=int, nargs=2, metavar=("B0", "B1"), help="interaction band (default: [L/4, 5L/8))")
    tn.add_argument("--keep", type=float, help="query-time keep ratio of visual tokens (default 0.5)")
    tn.add_argument("--positions", choices=["exact", "shared"], help="query positions (default shared)")
    tn.add_argument("--steps", type=int, help="training steps (default 300)")
    tn.add_argument("--holdout", type=float, help="share of the queries held out, by page (default 0.2)")
    tn.add_argument("-k", "--candidates", type=int, help="first-stage candidates per held-out query (default 10)")
    tn.add_argument("--lr", type=float, help="learning rate (default 3e-4)")
    tn.add_argument("--label-weight", type=float, help="weight of the label loss next to distillation (default 0.5)")
    tn.add_argument("--listwise", action="store_true", help="train a cached listwise student (ListwiseReranker, label "
                    "logits after \"[\") on the same pages and teacher scores instead of a point-wise one")
    tn.add_argument("--copy-weight", type=float, help="--listwise: weight of the copy task (default 0: off)")
    tn.add_argument("--attn-scale", type=float, help="--listwise: sharpen the trained layers' attention by this "
                    "factor at the start (default 1.0)")
    tn.add_argument("--readback-init", type=int, metavar="N", help="--listwise: write an analytic read-back head "
                    "into the layer before the exit, fitted on N windows, before training (for a model without copy "
                    "heads, like the toy; default 60, 0: none)")
    tn.add_argument("--readback-relevance", type=float, metavar="C", help="--listwise --readback-init: key the head "
                    "on each label's own yes/no judgement at this weight (default 0.5; 0: the labels evenly)")
    tn.add_argument("--readback-copy-scale", type=float, metavar="G", help="--listwise --readback-init: a copied "
                    "label's norm in units of the state at \"[\" (default 20)")
    tn.add_argument("--readout", choices=("all", "labels"), help="--listwise: 'labels' (default) makes the layer "
                    "before the exit a read-out layer where \"[\" attends to the label tokens only")
    tn.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, ...")
    tn.add_argument("--threads", type=int, help="torch CPU threads")
    tn.set_defaults(func=cmd_tune)

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
        "(which models built it). Running it again adds new pages; already indexed pages are skipped (and their page "
        "cache filled if a killed run left it incomplete). One writer at a time per workspace.",
    )
    ix.add_argument("docs", nargs="+", help="PDFs, page images or folders of them")
    ix.add_argument("--index", required=True, metavar="DIR", help="workspace directory (created or extended)")
    ix.add_argument("--embedder", help="colpali-engine embedder checkpoint (default: the workspace's, else the shipped one)")
    ix.add_argument("--lock-timeout", type=float, default=60.0, metavar="S",
                    help="one writer per workspace: wait up to S seconds for another `minirerank index` on it, then "
                         "fail before doing any work (default 60; searches never wait)")
    _add_reranker_options(ix)
    rg = ix.add_argument_group("distributed (Ray; the [ray] extra)")
    rg.add_argument("--ray", action="store_true", help="render, embed, prefill and write segments on a Ray cluster; "
                                                       "the workspace must be visible to every worker")
    rg.add_argument("--ray-address", metavar="ADDR", help="the cluster (default: a local one started for the job)")
    rg.add_argument("--workers", type=int, default=1, help="actors per model stage (embed, prefill; default 1)")
    rg.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G", help="GPUs per actor (default 0)")
    rg.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per actor (default 1)")
    ix.set_defaults(func=cmd_index)

    se = sub.add_parser("search", parents=[common], help="search an index and rerank the candidates")
    se.add_argument("query")
    se.add_argument("--index", metavar="DIR", help="workspace directory made by `minirerank index` (or --server)")
    se.add_argument("--server", metavar="URL", help="search with a running `minirerank serve` (its index and models) "
                                                    "instead of loading the models here; same output")
    se.add_argument("--api-key", default=os.environ.get("MINIRERANK_API_KEY"),
                    help="the server's key (default: $MINIRERANK_API_KEY)")
    se.add_argument("-k", "--candidates", type=int, default=20, help="first-stage candidates to rerank (default 20)")
    se.add_argument("-n", "--top-n", type=int, default=5, help="pages to show (default 5)")
    se.add_argument("--no-rerank", action="store_true", help="first stage only")
    se.add_argument("--embedder", help="embedder checkpoint (default: the one the index was built with)")
    se.add_argument("--report", help="write a visual report (.png or .html)")
    _add_reranker_options(se)
    se.set_defaults(func=cmd_search)


def _open_pipeline(args: argparse.Namespace, create: bool):
    """The workspace's pipeline: reranker and embedder from the options, else the ones that built the index."""
    from .pipeline import RerankPipeline, read_workspace

    root = Path(args.index)
    saved = read_workspace(root)
    if args.model is None and saved.get("reranker"):
        args.model = saved["reranker"]
    if args.cache_dir is None:
        args.cache_dir = str(root / "cache")
    if not create and not saved and not (root / "index" / "manifest.json").exists():
        raise ConfigError(f"no minirerank index in {root}; build one with `minirerank index DOCS --index {root}`")
    return RerankPipeline.open(root, reranker=load_reranker(args), embedder=args.embedder, create=create,
                               lock_timeout=getattr(args, "lock_timeout", 60.0), show_progress=not args.quiet)


def cmd_index(args: argparse.Namespace) -> int:
    import time

    if args.ray:
        from .distributed.ray_index import index_command

        payload, human, ok = index_command(args, load_reranker)
        _emit(args, payload, human)
        return EXIT_OK if ok else EXIT_ERROR
    t0 = time.perf_counter()
    pipeline = _open_pipeline(args, create=True)
    before = len(pipeline.index)
    report = pipeline.add(list(args.docs))
    elapsed = time.perf_counter() - t0
    by_doc: dict[str, int] = {}
    for p in report.pages:
        src = str(p.metadata.get("source") or p.source or p.id)
        by_doc[src] = by_doc.get(src, 0) + 1
    root = pipeline.workspace
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

    check_positive_int("--candidates", args.candidates)
    check_positive_int("--top-n", args.top_n)
    if (problem := _check_report_path(args)) is not None:
        return _error(problem)
    if args.report and args.no_rerank:
        return _error("--report shows the reranker's pruning; it cannot be combined with --no-rerank")
    if args.server:
        payload = _search_remote(args)
        _emit(args, payload, _search_text(args, payload))
        return EXIT_OK
    if not args.index:
        return _error("give the workspace with --index DIR (or a running server with --server URL)")
    pipeline = _open_pipeline(args, create=False)
    root = pipeline.workspace
    t0 = time.perf_counter()
    results = pipeline.search(args.query, k=args.candidates, top_n=args.top_n, rerank=not args.no_rerank)
    elapsed = time.perf_counter() - t0
    report_path = None
    if args.report:
        from .report import build_report

        report_path = str(build_report(pipeline.reranker, args.query, results).save(args.report))
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
    _emit(args, payload, _search_text(args, payload))
    return EXIT_OK


def _search_text(args: argparse.Namespace, payload: dict[str, Any]) -> str:
    headers = ["rank", "score", "1st stage", "1st rank", "page", "source", "p."]
    rows, n, report_path = payload["results"], payload["pages_in_index"], payload["report"]
    return (
        f'query: "{args.query}"  ({n} pages indexed, {min(args.candidates, n)} '
        f"candidates{'' if not args.no_rerank else ', first stage only'}; {payload['seconds']:.2f}s)\n\n"
        + _table(headers, [[r["rank"], r["score"], r["first_stage_score"], r["first_stage_rank"], r["page_id"], r["source"], r["page"]] for r in rows])
        + (f"\n\nreport written to {report_path}" if report_path else "")
    )


_SEARCH_ROW_KEYS = ("rank", "page_id", "score", "first_stage_score", "first_stage_rank", "source", "page")


def _search_remote(args: argparse.Namespace) -> dict[str, Any]:
    """`search --server URL`: the server's /v1/search, as the payload a local search prints (stdlib HTTP only)."""
    import urllib.error
    import urllib.request

    local = [f for f, v in (("--index", args.index), ("--report", args.report), ("--model", args.model),
                            ("--embedder", args.embedder), ("--listwise", args.listwise), ("--cache-dir", args.cache_dir))
             if v] + (["reranker settings"] if _config_changes(args) else [])
    if local:
        raise ConfigError(f"--server searches with the server's index and models; drop {', '.join(local)}")
    body = json.dumps({"query": args.query, "k": args.candidates, "top_n": args.top_n, "rerank": not args.no_rerank})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})}
    request = urllib.request.Request(args.server.rstrip("/") + "/v1/search", data=body.encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=_SERVER_TIMEOUT_S) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        raise MiniRerankError(f"{message} (server answered {exc.code})") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MiniRerankError(f"cannot reach the server at {args.server} ({getattr(exc, 'reason', exc)})") from None
    return {
        "query": args.query, "index": answer["index"], "pages_in_index": answer["pages_in_index"],
        "candidates": args.candidates, "reranked": answer["reranked"],
        "results": [{k: r.get(k) for k in _SEARCH_ROW_KEYS} for r in answer["results"]],
        "seconds": answer["seconds"], "report": None,
    }


_SERVER_TIMEOUT_S = 600  # the server enforces its own (shorter) request limit and answers 504 past it


def _add_serve_command(sub) -> None:
    sv = sub.add_parser(
        "serve", help="serve reranking (and search over a workspace) over HTTP, Cohere / Jina compatible",
        description="Load the models once and answer POST /v1/rerank (Cohere / Jina rerank API; also /v2/rerank), "
        "POST /v1/search (with --index), GET /health, /ready and /metrics. Documents are page images (data URL or "
        "base64), page ids of the index, or files under --root. SIGINT / SIGTERM finish the requests in flight, "
        "then exit. Needs the [serve] extra.",
    )
    sv.add_argument("--index", metavar="DIR", help="workspace to search (/v1/search); its models are served")
    sv.add_argument("--embedder", help="embedder checkpoint for the pruning maps (default: the workspace's; without "
                                       "--index and --embedder, pages are not pruned)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free port, printed at start)")
    sv.add_argument("--api-key", default=os.environ.get("MINIRERANK_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1 and /v2 (default: $MINIRERANK_API_KEY)")
    sv.add_argument("--root", metavar="DIR", help="documents may name image files under DIR; no other file is read")
    sv.add_argument("--max-documents", type=int, help="documents per request, and search's k (default 128)")
    sv.add_argument("--timeout", type=float, metavar="S", help="seconds a request may take, queue included (default 60)")
    sv.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings-only server log")
    _add_reranker_options(sv)
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, create_app, run_server
    except ImportError as exc:
        return _error(str(exc))
    limits = Limits(**{k: v for k, v in (("max_documents", args.max_documents), ("request_timeout_s", args.timeout))
                       if v is not None})
    embedder = None
    if args.index:
        target = _open_pipeline(args, create=False)
    else:
        _no_first_stage_pruning(args)  # no embedder: every visual token (said once, at start)
        target = load_reranker(args)
        if args.embedder:
            from .retrieval.embedder import PageEmbedder

            embedder = PageEmbedder.for_reranker(args.embedder, target)
    app = create_app(target, embedder=embedder, api_key=args.api_key or None, root=args.root, limits=limits)
    run_server(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
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
