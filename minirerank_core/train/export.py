"""Stage `export`: write the shipped defaults into minirerank_core/assets/ from a finished recipe run.

    python -m minirerank_core.train.export --run /work/train_runs/r1 --data /work/train_runs/data

  assets/reranker/       the student: HF save_pretrained (safetensors, config, tokenizer, processor config) +
                         minirerank_config.json (RerankConfig fields it was trained with, template strings, ...)
  assets/embedder/       the ColQwen3 embedder: HF save_pretrained + processor config
  assets/sample_corpus/  --sample-pages test-split pages (PNG, named by page id) + queries.json; every query is
                         run through the default pipeline (embedder top-k over the sample corpus, then the student
                         with pruning) and marked with whether its relevant page came out on top ("demo": true)

After writing, the reranker is reloaded offline with AutoProcessor / AutoModelForImageTextToText (and the
embedder with ColQwen3) to check they are self-contained.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..engine.settings import read_settings, write_settings
from .data import DataSet

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "preprocessor_config.json", "minirerank_config.json")


def copy_model(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in MODEL_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def verify_offline(reranker_dir: Path, embedder_dir: Path) -> dict:
    """Reload both directories from local files only (no hub lookup); returns their parameter counts."""
    from colpali_engine.models import ColQwen3, ColQwen3Processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(str(reranker_dir), local_files_only=True)
    rr = AutoModelForImageTextToText.from_pretrained(str(reranker_dir), local_files_only=True)
    ColQwen3Processor.from_pretrained(str(embedder_dir), local_files_only=True)
    emb = ColQwen3.from_pretrained(str(embedder_dir), local_files_only=True)
    out = {"reranker_params": sum(p.numel() for p in rr.parameters()),
           "embedder_params": sum(p.numel() for p in emb.parameters())}
    return out


def choose_sample(ds: DataSet, n_pages: int, n_docs: int) -> list[str]:
    """`n_pages` test pages from the `n_docs` test documents with the most queried pages (similar pages side by
    side make the demo non-trivial)."""
    queried = {q["positive"] for q in ds.split_queries("test")}
    by_doc: dict[str, list[str]] = {}
    for pid in ds.page_ids("test"):
        if pid in queried:
            by_doc.setdefault(ds.pages[pid]["doc_id"], []).append(pid)
    docs = sorted(by_doc, key=lambda d: (-len(by_doc[d]), d))[:n_docs]
    per = max(1, n_pages // len(docs))
    pages = [p for d in docs for p in sorted(by_doc[d])[:per]]
    return pages[:n_pages]


def build_sample_corpus(ds: DataSet, out_dir: Path, reranker_dir: Path, embedder_dir: Path, n_pages: int, n_docs: int,
                        top_k: int = 10) -> dict:
    from ..pages import Page
    from ..reranker import MiniReranker
    from ..retrieval.embedder import PageEmbedder
    from ..retrieval.importance import query_importances
    from ..retrieval.index import PageIndex

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    page_ids = choose_sample(ds, n_pages, n_docs)
    for p in page_ids:
        shutil.copy2(ds.image_path(p), out_dir / f"{p}.png")
    pages = [Page(out_dir / f"{p}.png", id=p) for p in page_ids]
    mini = MiniReranker.from_pretrained(reranker_dir)  # with the settings and prompt it was trained with
    embedder = PageEmbedder.from_pretrained(str(embedder_dir), pixel_budget=mini.pixel_budget)
    embs = embedder.encode_pages(pages, show_progress=False)
    index = PageIndex()
    index.add(embs)
    by_id = {e.page_id: e for e in embs}
    page_by_id = {p.id: p for p in pages}
    entries = []
    for q in ds.split_queries("test"):
        if q["positive"] not in by_id:
            continue
        q_emb = embedder.encode_query(q["query"])
        hits = index.search(q_emb, k=min(top_k, len(pages)))
        cand = [h.page_id for h in hits]
        imps = query_importances(q_emb, [by_id[c] for c in cand], [mini.visual_grid(page_by_id[c]) for c in cand])
        res = mini.rerank(q["query"], [page_by_id[c] for c in cand], importance=imps)
        entries.append(dict(query=q["query"], relevant=[q["positive"]], type=q["type"],
                            first_stage_top1=cand[0] == q["positive"], mini_top1=res[0].page_id == q["positive"],
                            demo=res[0].page_id == q["positive"]))
    n = max(1, len(entries))
    summary = dict(n_queries=len(entries), n_pages=len(pages), top_k=min(top_k, len(pages)),
                   first_stage_top1_accuracy=sum(e["first_stage_top1"] for e in entries) / n,
                   mini_top1_accuracy=sum(e["mini_top1"] for e in entries) / n)
    doc = {
        "format": "minirerank-sample-queries/1",
        "source": "held-out test split of the minirerank training data (Python standard-library docstrings, "
                  "rendered); page ids are the PNG file stems",
        "pipeline": "ColQwen3 embedder (assets/embedder) top-k over these pages, then the mini student "
                    "(assets/reranker, its minirerank_config.json) with the embedder's query importance",
        "accuracy": summary,
        "queries": entries,
    }
    (out_dir / "queries.json").write_text(json.dumps(doc, indent=1))
    return summary


def main(argv=None) -> None:
    from ..defaults import ASSETS_DIR

    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="recipe run directory (student/final, embedder/final)")
    ap.add_argument("--data", type=Path, required=True, help="dataset directory (for the sample corpus)")
    ap.add_argument("--assets", type=Path, default=ASSETS_DIR)
    ap.add_argument("--sample-pages", type=int, default=20)
    ap.add_argument("--sample-docs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rdir, edir = args.assets / "reranker", args.assets / "embedder"
    copy_model(args.run / "student" / "final", rdir)
    copy_model(args.run / "embedder" / "final", edir)
    saved = read_settings(rdir)
    write_settings(rdir, saved.config, saved.template, **{**saved.extra, "embedder": "../embedder",
                                                           "trained_by": "minirerank_core.train (see MODEL_CARD.md)"})
    sizes = verify_offline(rdir, edir)
    summary = build_sample_corpus(DataSet(args.data), args.assets / "sample_corpus", rdir, edir, args.sample_pages, args.sample_docs)
    mb = {d.name: sum(f.stat().st_size for f in d.iterdir()) / 1e6 for d in (rdir, edir, args.assets / "sample_corpus")}
    print(json.dumps({"sizes_mb": mb, **sizes, "sample": summary}))


if __name__ == "__main__":
    main()
