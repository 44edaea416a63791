"""The whole recipe of the shipped defaults, stage after stage, each resumable (a finished stage is skipped).

    python -m minirerank_core.train.recipe --out /work/train_runs/r1 [--data /work/train_runs/data] [--threads 1]

Stages and their arguments are listed in stages() below (and in MODEL_CARD.md); `--smoke` shrinks every stage to a
few steps for a quick end-to-end check. Afterwards `python -m minirerank_core.train.export --run OUT` writes the
package assets and `python benchmarks/quality.py` measures them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ..fileio import write_json
from .readback import HEAD_COPY_SCALE, HEAD_RELEVANCE

# Arguments of train.data.build for the shipped models' dataset (benchmarks/quality.py rebuilds it from these).
DATA = dict(seed=0, vocab_size=2048, grid_frac=1.0, grid_px=16, max_pages_per_doc=40)
STUDENT = dict(exit_layer=6, band=(2, 5), keep_ratio=0.5)
# The teacher trains in two phases in one run directory (phase 2 resumes phase 1's checkpoint and optimizer):
# phase 1 mostly on random negatives with a high learning rate, so the from-scratch LM first finds the query ->
# page-cell attention (guided in layers 2-4, the student's band); phase 2 on first-stage hard negatives.
TEACHER_PHASES = (
    (300, ["--lr", "1e-3", "--random-frac", "1.0", "0.3"]),
    (1400, ["--lr", "5e-4", "--random-frac", "0.3", "0.0", "--eval-every", "200"]),
)
TEACHER = ["--groups", "2", "--hard", "3", "--extra-queries", "4", "--warmup", "20", "--guide-layers", "2", "3", "4",
           "--guide-weight", "1.0", "--eval-queries", "80"]
# The listwise student (train.listwise): the point-wise student in the cached listwise layout (exit 8, the student's
# band, keep 0.5 by the embedder's maps), its last layer set to the analytic read-back head keyed on each label's own
# judgement, "[" reading the label tokens only in that layer (readout "labels"). No gradient steps: training that
# layer further lowered validation nDCG@5 (docs/DESIGN.md, listwise training). Both listwise models' heads use the
# same soft relevance key and large copy (the label logits then follow the attention over the labels).
LISTWISE = dict(steps=0, readback_init=60, readback_relevance=HEAD_RELEVANCE, readback_copy_scale=HEAD_COPY_SCALE,
                freeze_below=7, window=20, min_window=4)
# The single-pass model: the student's label tokens trained in the single pass (the relevance loss, no loss at "["),
# then on from there with the dense teacher's order distilled at the label tokens (RankNet + soft ranking, lr 3e-5),
# then the read-back head fitted on single-pass windows with the read-out mask and an uncentred key.
SINGLE = dict(steps=1800, lr=5e-5, window=10, min_window=4, keep_ratio=0.5, bind_layer=6, readback_init=60,
              distill_steps=1800, distill_lr=3e-5)


def stages(run: Path, data: Path, smoke: bool) -> list[tuple[str, Path, int | None, list[str]]]:
    """(name, output directory, steps it must reach to count as done, module + arguments) per stage."""
    s = (lambda full, small: str(small if smoke else full))  # noqa: E731

    def single_pass_stage(name: str, init: Path, *args: str, eval_queries: int) -> tuple:
        """A listwise-stage run in the single-pass layout, on the listwise stage's mined negatives (mined once)."""
        return (name, run / name, None,
                ["minirerank_core.train.listwise", "--data", str(data), "--init", str(init),
                 "--teacher", str(run / "teacher" / "final"), "--embedder", str(run / "embedder" / "final"),
                 "--out", str(run / name), "--layouts", "single_pass", "--keep-ratio", str(SINGLE["keep_ratio"]),
                 "--template", "readback", *args, "--mined", str(run / "listwise" / "mined_negatives.json"),
                 "--eval-queries", "4" if smoke else str(eval_queries)])

    # The single pass's label tokens trained by the relevance loss at each of them, no loss at "[".
    label_tokens = ["--single-pass-aux", "relevance", "--aux-weight", "1", "--bind-layer", str(SINGLE["bind_layer"]),
                    "--label-weight", "0", "--warmup", s(20, 1), "--window", s(SINGLE["window"], 4),
                    "--min-window", s(SINGLE["min_window"], 3), "--ckpt-every", "300"]
    # Both listwise models' read-back heads (one setting), "[" reading the label rows alone in that layer.
    readback_head = ["--readback-relevance", str(LISTWISE["readback_relevance"]),
                     "--readback-copy-scale", str(LISTWISE["readback_copy_scale"]), "--readout", "labels"]
    student = ["--exit-layer", str(STUDENT["exit_layer"]), "--band", *map(str, STUDENT["band"]),
               "--keep-ratio", str(STUDENT["keep_ratio"]), "--query-positions", "shared"]
    teacher = [
        (f"teacher-{i + 1}", run / "teacher", int(s(steps, 3 * (i + 1))),
         ["minirerank_core.train.reranker", "teacher", "--data", str(data), "--init-pretrain", str(run / "pretrain"),
          "--embedder", str(run / "embedder" / "final"), "--negatives", "first-stage", "--out", str(run / "teacher"),
          *TEACHER, *extra, "--steps", s(steps, 3 * (i + 1))] + (["--eval-queries", "8"] if smoke else []))
        for i, (steps, extra) in enumerate(TEACHER_PHASES)
    ]
    return [
        ("data", data, None, ["minirerank_core.train.data", "--out", str(data)]
         + [f"--{k.replace('_', '-')}={v}" for k, v in DATA.items()] + (["--max-docs", "12"] if smoke else [])),
        ("pretrain", run / "pretrain", None,
         ["minirerank_core.train.pretrain", "--data", str(data), "--out", str(run / "pretrain"),
          "--steps", s(400, 4), "--batch", "8", "--lr", "2e-3", "--warmup", s(30, 1), "--char-weight", "1.0",
          "--eval-every", s(50, 4), "--eval-pages", s(32, 4)]),
        ("embedder", run / "embedder", None,
         ["minirerank_core.train.embedder", "--data", str(data), "--init-pretrain", str(run / "pretrain"),
          "--out", str(run / "embedder"), "--steps", s(300, 3), "--batch", "8", "--hard", "4", "--lr", "5e-4",
          "--warmup", s(15, 1), "--temperature", "0.02"]),
        *teacher,
        ("student", run / "student", None,
         ["minirerank_core.train.reranker", "student", "--data", str(data), "--init", str(run / "teacher" / "final"),
          "--teacher", str(run / "teacher" / "final"), "--embedder", str(run / "embedder" / "final"),
          "--negatives", "first-stage", "--out", str(run / "student"), *student, "--steps", s(600, 3), "--groups", "2",
          "--hard", "3", "--extra-queries", "2", "--lr", "3e-4", "--warmup", s(10, 1)]
         + (["--eval-queries", "8"] if smoke else [])),
        ("listwise", run / "listwise", None,
         ["minirerank_core.train.listwise", "--data", str(data), "--init", str(run / "student" / "final"),
          "--teacher", str(run / "teacher" / "final"), "--embedder", str(run / "embedder" / "final"),
          "--out", str(run / "listwise"), "--layouts", "cached", "--cached-exit-layer", "8",
          "--cached-band", *map(str, STUDENT["band"]), "--cached-keep-ratio", str(STUDENT["keep_ratio"]),
          "--template", "readback", "--readback-init", s(LISTWISE["readback_init"], 2),
          *readback_head, "--freeze-below", str(LISTWISE["freeze_below"]), "--distill-weight", "0",
          "--pool", s(LISTWISE["readback_init"], 2), "--steps", str(LISTWISE["steps"]),
          "--window", s(LISTWISE["window"], 4), "--min-window", s(LISTWISE["min_window"], 3)]
         + (["--eval-queries", "4"] if smoke else ["--eval-queries", "60"])),
        single_pass_stage("single-train", run / "student" / "final", *label_tokens, "--distill-weight", "0",
                          "--lr", str(SINGLE["lr"]), "--steps", s(SINGLE["steps"], 2), eval_queries=30),
        single_pass_stage("single-distill", run / "single-train" / "final", *label_tokens, "--distill-weight", "1",
                          "--lr", str(SINGLE["distill_lr"]), "--steps", s(SINGLE["distill_steps"], 2), eval_queries=30),
        single_pass_stage("single-head", run / "single-distill" / "final", "--readback-init", s(SINGLE["readback_init"], 2),
                          *readback_head, "--readback-uncentred",
                          "--distill-weight", "0", "--steps", "0", "--window", s(LISTWISE["window"], 4),
                          "--min-window", s(LISTWISE["min_window"], 3), eval_queries=60),
    ]


def _done(name: str, out: Path, steps: int | None) -> bool:
    if name == "data":
        return (out / "recipe.json").exists()
    result = out / "result.json"
    if not result.exists():
        return False
    return steps is None or json.loads(result.read_text()).get("step", 0) >= steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run directory (one sub-directory per stage)")
    ap.add_argument("--data", type=Path, default=None, help="dataset directory (default: OUT/data)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    ap.add_argument("--smoke", action="store_true", help="a few steps per stage on a dozen documents")
    ap.add_argument("--only", nargs="*", default=None, help="run only these stages")
    args = ap.parse_args(argv)
    run = args.out
    data = args.data or run / "data"
    run.mkdir(parents=True, exist_ok=True)
    runtime = ["--device", args.device, "--amp", args.amp, "--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    for name, out, steps, cmd in stages(run, data, args.smoke):
        if args.only and name.split("-")[0] not in args.only:
            continue
        if _done(name, out, steps):
            print(f"[recipe] {name}: done, skipped", flush=True)
            continue
        full = [sys.executable, "-m", *cmd] + ([] if name == "data" else runtime)
        print(f"[recipe] {name}: {' '.join(full[1:])}", flush=True)
        t = time.time()
        subprocess.run(full, check=True)
        timings[name] = timings.get(name, 0.0) + time.time() - t
        write_json(run / "timings.json", timings)
    print(json.dumps({"timings_s": timings, "total_s": sum(timings.values())}), flush=True)


if __name__ == "__main__":
    main()
