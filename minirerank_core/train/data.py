"""Stage `data`: offline corpus -> rendered pages, queries with hard negatives, splits, tokenizer.

    python -m minirerank_core.train.data --out /work/train_runs/data --seed 0

Recipe (everything follows from --seed and the Python version, both recorded in recipe.json):
  1. Text: docstrings of the Python standard library (corpus.py), one document per top-level module/package.
  2. Split by source document (seeded shuffle of documents, filled to the target page fractions), so no module
     contributes pages to two splits.
  3. Each document gets one seeded style (font family, sizes, margins, columns, spacing, tints) and is laid out
     into pages: a heading per docstring, its paragraphs, and a two-column table of members (name, summary) after
     the module docstring and every few sections. At most --max-pages-per-doc pages per document.
  4. Queries from the words actually drawn on a page: distinctive keywords (by IDF, shuffled, lower-cased),
     phrases (4-7 consecutive words), lower-cased / reordered phrases, heading + keyword. A query is kept only if
     no other page of its split contains all its content words, so each query has exactly one relevant page.
  5. Hard negatives: the top pages of the split by BM25 against the query (positive excluded).
  6. Tokenizer: byte-level BPE with Qwen's special tokens, trained on the training split's page text.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .corpus import Document, stdlib_documents
from .render import Block, render_blocks, sample_style

PAGE_SIZE = (320, 448)  # (width, height): 10 x 14 = 140 merged visual tokens at 32 px per token
SPLITS = ("train", "val", "test")

STOPWORDS = set("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each either else few for from further had has have having he her here
hers him his how however i if in into is it its itself just may me might more most must my no nor not now of off on
once only or other otherwise our out over own same shall she should so some such than that the their them then there
these they this those through to too under until up upon use used using very via was we were what when where which
while who whom why will with would yet you your true false none return returns returned value values object objects
default given new name see one two set get must also called call calls method methods function functions argument
arguments class instance string str int type list dict file files data first last number optional raise raised
""".split())
WORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]+")


def norm_words(text: str) -> list[str]:
    return [w.lower() for w in WORD_RE.findall(text)]


def content_words(text: str) -> list[str]:
    return [w for w in norm_words(text) if len(w) >= 3 and w not in STOPWORDS]


# --- pages --------------------------------------------------------------------------------------------------
def document_blocks(doc: Document, rng: random.Random, table_every: int = 8) -> list[Block]:
    blocks: list[Block] = []
    summaries = []
    for s in doc.sections[1:]:
        first = re.split(r"(?<=[.!?])\s", s.text.split("\n\n")[0])[0]
        words = first.split()[:6]
        if len(words) >= 3:
            summaries.append((s.title.rsplit(".", 1)[-1], " ".join(words).rstrip(".,;:")))
    for i, s in enumerate(doc.sections):
        title = s.title if s.title.count(".") <= 1 else ".".join(s.title.split(".")[-2:])
        blocks.append(Block("heading", title))
        blocks.extend(Block("para", p) for p in s.text.split("\n\n"))
        if i % table_every == 0 and summaries:
            k = rng.randint(3, 6)
            start = rng.randrange(max(1, len(summaries) - k + 1))
            rows = summaries[start : start + k]
            if len(rows) >= 2:
                blocks.append(Block("table", rows=[("Name", "Summary")] + rows))
    return blocks


def paginate(doc: Document, rng: random.Random, max_pages: int, size=PAGE_SIZE, body_sizes=(14, 18), grid_frac: float = 0.0,
             grid_px: int = 16):
    style = sample_style(rng, size[0], body_sizes, grid_frac, grid_px)
    blocks = document_blocks(doc, rng)
    pages = []
    while blocks and len(pages) < max_pages:
        page = render_blocks(blocks, style, *size)
        if len(page.rest) == len(blocks) and page.rest == blocks:  # nothing fitted (cannot happen on sane sizes)
            break
        if len(page.words) >= 12:
            pages.append(page)
        blocks = page.rest
    return style, pages


def split_documents(docs: list[Document], rng: random.Random, fractions: dict[str, float], est_pages) -> dict[str, str]:
    order = list(docs)
    rng.shuffle(order)
    total = sum(est_pages(d) for d in docs)
    assign, filled = {}, Counter()
    for d in order:
        for split in ("test", "val"):
            if filled[split] < fractions[split] * total:
                assign[d.doc_id] = split
                filled[split] += est_pages(d)
                break
        else:
            assign[d.doc_id] = "train"
    return assign


# --- queries ------------------------------------------------------------------------------------------------
@dataclass
class PageText:
    page_id: str
    doc_id: str
    split: str
    words: list[tuple[str, str]]  # (text, kind)
    vocab: set[str] = field(default_factory=set)


def _strip(w: str) -> str:
    return w.strip(".,;:()[]{}'\"`<>!?")


def make_queries(page: PageText, idf: dict[str, float], rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Up to `n` candidate (query, type) pairs for one page, several per type, best-first per type."""
    ranked = sorted(page.vocab, key=lambda w: (-idf.get(w, 0.0), w))
    top = ranked[:10]
    body = [_strip(t) for t, k in page.words if k != "heading"]
    heading = " ".join(_strip(t) for t, k in page.words if k == "heading")
    out = []
    for _ in range(n * 4):
        kind = rng.choice(["keywords", "phrase", "phrase_variant", "heading"])
        if kind == "keywords" and len(top) >= 3:
            q = " ".join(rng.sample(top[:8], rng.randint(2, 3)))
        elif kind in ("phrase", "phrase_variant") and len(body) >= 8:
            L = rng.randint(4, 7)
            s = rng.randrange(len(body) - L)
            span = [w for w in body[s : s + L] if w]
            if not any(w.lower() in top for w in span) or sum(bool(WORD_RE.fullmatch(w)) for w in span) < 3:
                continue
            if kind == "phrase_variant":
                span = [w.lower() for w in span]
                if rng.random() < 0.5:
                    rng.shuffle(span)
            q = " ".join(span)
        elif kind == "heading" and heading and top:
            q = heading.lower() + " " + rng.choice(top[:6])
        else:
            continue
        q = re.sub(r"\s+", " ", q).strip()
        if len(content_words(q)) >= 2 and len(q) <= 90:
            out.append((q, kind))
    return out


def bm25_matrix(pages: list[PageText], k1: float = 1.2, b: float = 0.75):
    vocab = {w: i for i, w in enumerate(sorted({w for p in pages for w in p.vocab}))}
    tf = np.zeros((len(pages), len(vocab)), dtype=np.float32)
    for i, p in enumerate(pages):
        for w, c in Counter(content_words(" ".join(t for t, _ in p.words))).items():
            tf[i, vocab[w]] = c
    dl = tf.sum(1, keepdims=True)
    df = (tf > 0).sum(0)
    idf = np.log(1 + (len(pages) - df + 0.5) / (df + 0.5))
    weights = idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / dl.mean()))
    return vocab, weights


# --- the stage ----------------------------------------------------------------------------------------------
def build(out: Path, seed: int = 0, vocab_size: int = 2048, max_pages_per_doc: int = 40, val_frac: float = 0.05,
          test_frac: float = 0.12, train_queries_per_page: int = 2, max_docs: int | None = None, show_progress: bool = True,
          documents: list[Document] | None = None, page_size: tuple[int, int] = PAGE_SIZE,
          body_sizes: tuple[int, int] = (14, 18), grid_frac: float = 0.0, grid_px: int = 16) -> dict:
    from ..testing import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "pages").mkdir(exist_ok=True)
    docs = stdlib_documents() if documents is None else list(documents)
    if max_docs is not None:
        docs = docs[:max_docs]
    chars_per_page = 420
    est = lambda d: min(max_pages_per_doc, max(1, d.n_chars // chars_per_page))  # noqa: E731
    assign = split_documents(docs, random.Random(seed + 1), {"val": val_frac, "test": test_frac}, est)

    records, texts = [], []
    for d in tqdm(docs, desc="render pages", unit="doc", disable=not show_progress, mininterval=15):
        style, pages = paginate(d, random.Random(f"{seed}:{d.doc_id}"), max_pages_per_doc, page_size, tuple(body_sizes),
                                 grid_frac, grid_px)
        for k, page in enumerate(pages):
            pid = f"{d.doc_id}-{k:03d}"
            page.image.save(out / "pages" / f"{pid}.png")
            records.append(dict(page_id=pid, doc_id=d.doc_id, split=assign[d.doc_id], style=style.to_dict(),
                                words=[[w.text, *w.box, w.kind] for w in page.words]))
            texts.append(PageText(pid, d.doc_id, assign[d.doc_id], [(w.text, w.kind) for w in page.words],
                                  set(content_words(page.text))))

    df = Counter(w for p in texts for w in p.vocab)
    idf = {w: math.log(len(texts) / c) for w, c in df.items()}
    queries = []
    for split in SPLITS:
        pool = [p for p in texts if p.split == split]
        if not pool:
            continue
        vocab, weights = bm25_matrix(pool)
        index_of_word: dict[str, set[int]] = {}
        for i, p in enumerate(pool):
            for w in p.vocab:
                index_of_word.setdefault(w, set()).add(i)
        per_page = train_queries_per_page if split == "train" else 1
        for i, p in enumerate(pool):
            prng = random.Random(f"{seed}:q:{p.page_id}")
            kept, seen_kinds = [], set()
            for q, kind in make_queries(p, idf, prng, 3 * per_page):
                cw = set(content_words(q))
                if not cw <= p.vocab:
                    continue
                holders = set.intersection(*(index_of_word[w] for w in cw))
                if holders != {i} or kind in seen_kinds or any(q == k[0] for k in kept):
                    continue
                kept.append((q, kind))
                seen_kinds.add(kind)
                if len(kept) == per_page:
                    break
            for j, (q, kind) in enumerate(kept):
                qv = np.zeros(len(vocab), dtype=np.float32)
                for w in set(content_words(q)):
                    if w in vocab:
                        qv[vocab[w]] = 1.0
                s = weights @ qv
                s[i] = -np.inf
                hard = [pool[h].page_id for h in np.argsort(-s, kind="stable")[:11] if h != i][:10]
                queries.append(dict(qid=f"{p.page_id}-q{j}", split=split, query=q, type=kind, positive=p.page_id,
                                    hard_negatives=hard))

    with open(out / "pages.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(out / "queries.jsonl", "w") as f:
        for q in queries:
            f.write(json.dumps(q) + "\n")

    tok = build_tokenizer([t.replace("\n", " ") for t in (" ".join(w for w, _ in p.words) for p in texts if p.split == "train")]
                          + [q["query"] for q in queries if q["split"] == "train"], vocab_size=vocab_size)
    tok.save_pretrained(out / "tokenizer")

    counts = {s: dict(pages=sum(r["split"] == s for r in records), queries=sum(q["split"] == s for q in queries),
                      documents=sorted({r["doc_id"] for r in records if r["split"] == s})) for s in SPLITS}
    recipe = dict(
        seed=seed, python=sys.version.split()[0], corpus="Python standard-library docstrings (importlib + inspect)",
        corpus_documents=len(docs), page_size=list(page_size), body_sizes=list(body_sizes), grid_frac=grid_frac, grid_px=grid_px, vocab_size=len(tok), max_pages_per_doc=max_pages_per_doc,
        fractions=dict(val=val_frac, test=test_frac), train_queries_per_page=train_queries_per_page,
        query_types=dict(Counter(q["type"] for q in queries)), splits=counts,
    )
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    return recipe


# --- loading ------------------------------------------------------------------------------------------------
class DataSet:
    """Read side of a built dataset directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.pages = {}
        with open(self.root / "pages.jsonl") as f:
            for line in f:
                r = json.loads(line)
                self.pages[r["page_id"]] = r
        with open(self.root / "queries.jsonl") as f:
            self.queries = [json.loads(line) for line in f]
        self.recipe = json.loads((self.root / "recipe.json").read_text())

    def page_ids(self, split: str) -> list[str]:
        return [pid for pid, r in self.pages.items() if r["split"] == split]

    def split_queries(self, split: str) -> list[dict]:
        return [q for q in self.queries if q["split"] == split]

    def image_path(self, page_id: str) -> Path:
        return self.root / "pages" / f"{page_id}.png"

    def image(self, page_id: str) -> Image.Image:
        with Image.open(self.image_path(page_id)) as im:
            return im.convert("RGB")

    def tokenizer(self):
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(self.root / "tokenizer"))
        tok.padding_side = "left"
        return tok


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minirerank_core.train.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory (pages/, pages.jsonl, queries.jsonl, tokenizer/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--max-pages-per-doc", type=int, default=40)
    ap.add_argument("--val-frac", type=float, default=0.05)
    ap.add_argument("--test-frac", type=float, default=0.12)
    ap.add_argument("--train-queries-per-page", type=int, default=2)
    ap.add_argument("--body-size", type=int, nargs=2, default=(14, 18), metavar=("MIN", "MAX"),
                    help="body font size range in px (headings are 3-7 px larger)")
    ap.add_argument("--grid-frac", type=float, default=0.0,
                    help="fraction of documents in the typewriter layout aligned to the 16-px patch grid")
    ap.add_argument("--grid-px", type=int, default=16, help="glyph slot width of the typewriter layout (lines are twice that)")
    ap.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (smoke tests)")
    args = ap.parse_args(argv)
    recipe = build(args.out, seed=args.seed, vocab_size=args.vocab_size, max_pages_per_doc=args.max_pages_per_doc,
                   val_frac=args.val_frac, test_frac=args.test_frac, train_queries_per_page=args.train_queries_per_page,
                   max_docs=args.max_docs, body_sizes=tuple(args.body_size), grid_frac=args.grid_frac, grid_px=args.grid_px)
    print(json.dumps({k: v for k, v in recipe.items() if k != "splits"}))
    print(json.dumps({s: {k: v for k, v in c.items() if k != "documents"} for s, c in recipe["splits"].items()}))


if __name__ == "__main__":
    main()
