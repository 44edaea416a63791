"""`minirerank tune` on the toy: distil the shipped dense teacher on the held-out test split, then compare the tuned
student, the shipped student and the teacher on the same held-out queries and first-stage candidates.

    python benchmarks/tune.py                       # 1,200 steps, 1 thread: ~45 min on a 2-core CPU
    python benchmarks/tune.py --steps 20            # a quick look
    python benchmarks/tune.py --listwise --steps 30 --lr 1e-4   # a cached listwise student (tune --listwise)

The test split's pages (PNG) and queries ({"query", "page"}) are written to OUT/pages and OUT/queries.json, and
`tune` runs exactly as `minirerank tune --teacher T --pages OUT/pages --queries OUT/queries.json --out OUT/student`
would (rerunning continues a stopped run). tune holds out 20 % of the queried pages with their queries; the
comparison reranks each held-out query's first-stage top 10 with each system in this one process (CPU, float32),
so the times are side by side. Prints the table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from minirerank_core import ListwiseReranker, MiniReranker  # noqa: E402
from minirerank_core.calibrate import CalibrationQuery, read_queries  # noqa: E402
from minirerank_core.defaults import DEFAULT_EMBEDDER_DIR, DEFAULT_RERANKER_DIR, DEFAULT_TEACHER_DIR  # noqa: E402
from minirerank_core.pages import ingest  # noqa: E402
from minirerank_core.rerankers.loading import load_checkpoint  # noqa: E402
from minirerank_core.retrieval import FirstStage, PageIndex  # noqa: E402


def export_split(data: Path, out: Path) -> tuple[Path, Path]:
    """The toy's test split as a user would bring it: a folder of page images and a queries file."""
    from minirerank_core.train.data import DataSet

    if not (data / "recipe.json").exists():
        from minirerank_core.train.data import build
        from minirerank_core.train.recipe import DATA

        print(f"building the toy dataset (seed 0) into {data} ...", file=sys.stderr, flush=True)
        build(data, **DATA)
    ds = DataSet(data)
    pages_dir, queries_file = out / "pages", out / "queries.json"
    if not queries_file.exists():
        pages_dir.mkdir(parents=True, exist_ok=True)
        for pid in ds.page_ids("test"):
            shutil.copyfile(ds.image_path(pid), pages_dir / f"{pid}.png")
        queries = [{"query": q["query"], "page": q["positive"]} for q in ds.split_queries("test")]
        queries_file.write_text(json.dumps(queries, indent=1))
    return pages_dir, queries_file


def compare(student_dir: Path, teacher_dir: str, pages_dir: Path, listwise: bool = False) -> dict:
    from minirerank_core.train.tune import TeacherScores, evaluate_heldout

    held = json.loads((student_dir / "run" / "heldout.json").read_text())["per_query"]
    queries = [CalibrationQuery(r["query"], r["page"]) for r in held]
    cands = {r["query"]: r["candidates"] for r in held}
    pages = {p.id: p for p in ingest([pages_dir], show_progress=False).pages}

    # The teacher's dense forward over every held-out candidate, timed here; its scores checked against tune's cache.
    ckpt = load_checkpoint(teacher_dir, dtype="float32", device="cpu")
    timed = TeacherScores(student_dir / "run" / "compare_teacher_scores.json", ckpt.name)
    timed.scores, timed.seconds, timed.pairs = {}, 0.0, 0
    worst = 0.0
    for r in held:
        t = time.perf_counter()
        s = ckpt.dense_scores(r["query"], [pages[p] for p in r["candidates"]])
        timed.add(r["query"], r["candidates"], s, time.perf_counter() - t)
        worst = max(worst, max(abs(a - b) for a, b in zip(s, r["teacher_scores"])))
    del ckpt

    rows = {}
    index = PageIndex.open(student_dir / "run" / "index")
    for name, path in (("tuned student", student_dir), ("shipped student", DEFAULT_RERANKER_DIR)):
        cls = ListwiseReranker if listwise and name == "tuned student" else MiniReranker
        rr = cls.from_pretrained(path)
        fs = FirstStage.from_pretrained(DEFAULT_EMBEDDER_DIR, reranker=rr, index=index)
        h = evaluate_heldout(rr, fs, pages, queries, cands, timed)
        c = rr.config
        layout = {"mode": c.mode} if cls is ListwiseReranker else {"query_positions": c.query_positions}
        rows[name] = {**h.summary(), "config": {"exit_layer": c.exit_layer, "band": list(c.band),
                                                 "keep_ratio": c.keep_ratio, **layout}}
    return {"teacher_max_abs_diff": worst, "systems": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "data", help="toy dataset (built from seed 0 when missing)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tune", help="work directory (pages, queries, student)")
    ap.add_argument("--teacher", default=str(DEFAULT_TEACHER_DIR))
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: tune's, 3e-4)")
    ap.add_argument("--exit", type=int, default=None, help="the student's exit layer (default: tune's)")
    ap.add_argument("--listwise", action="store_true",
                    help="tune a cached listwise student (tune --listwise, on its defaults but for the flags below)")
    ap.add_argument("--readback-relevance", type=float, default=None,
                    help="--listwise: the read-back head's relevance key (default: tune's; 0: the labels evenly)")
    ap.add_argument("--readback-copy-scale", type=float, default=None,
                    help="--listwise: the read-back head's copy scale (default: tune's)")
    ap.add_argument("--readout", default=None, choices=("all", "labels"),
                    help="--listwise: ListwiseConfig.readout (default: tune's)")
    ap.add_argument("--copy-weight", type=float, default=None,
                    help="--listwise: the copy task's weight (default: tune's; it pulls a relevance-keyed head back "
                         "to even labels)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from minirerank_core.train.tune import tune

    overrides = dict(readback_relevance=args.readback_relevance, readback_copy_scale=args.readback_copy_scale,
                     readout=args.readout, copy_weight=args.copy_weight)
    pages_dir, queries_file = export_split(args.data, args.out)
    report = tune(args.teacher, ingest([pages_dir], show_progress=False).pages, args.out / "student",
                  queries=read_queries(queries_file), device="cpu", threads=args.threads, steps=args.steps,
                  **(dict(listwise=True, **{k: v for k, v in overrides.items() if v is not None})
                     if args.listwise else {}),
                  **({"lr": args.lr} if args.lr else {}), **({"exit_layer": args.exit} if args.exit else {}))
    result = compare(args.out / "student", args.teacher, pages_dir, listwise=args.listwise)
    first = result["systems"]["tuned student"]
    print(f"tuned: {report.setting()}, {report.steps} steps on {report.n_train_queries} queries")
    print(f"{first['queries']} held-out queries on unseen pages, {first['candidates_per_query']} first-stage candidates "
          f"each (first-stage recall {first['first_stage_recall']}); teacher rescored here (max |diff| vs tune's "
          f"cache {result['teacher_max_abs_diff']:.1e})")
    print(f"{'system':16s} {'nDCG@5':>7s} {'retention':>9s} {'agree nDCG@5':>12s} {'agree top-1':>11s} {'s/query':>8s} {'x dense':>8s}")
    print(f"{'teacher (dense)':16s} {first['teacher_ndcg5']:7.4f} {1:9.3f} {1:12.4f} {1:11.3f} "
          f"{first['teacher_seconds_per_query']:8.4f} {1:8.4f}")
    for name, r in result["systems"].items():
        print(f"{name:16s} {r['student_ndcg5']:7.4f} {r['retention']:9.3f} {r['agreement_ndcg5']:12.4f} "
              f"{r['agreement_top1']:11.3f} {r['student_seconds_per_query']:8.4f} {r['time_ratio']:8.4f}")
    print(json.dumps({"teacher": args.teacher, "steps": report.steps, "threads": args.threads, **result}))


if __name__ == "__main__":
    main()
