"""LangChain document compressor (langchain_minirerank.MiniRerank) on a tiny random model, used directly and
inside langchain_classic's ContextualCompressionRetriever. Expected scores come from the core reranker."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import CallbackManagerForRetrieverRun  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_minirerank import IMPORTANCE_KEY, MiniRerank, MissingImageWarning, UnprunedWarning  # noqa: E402

from minirerank_core import ConfigError, InvalidImageError, InvalidQueryError, MiniReranker, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402

QUERY = "revenue growth in the annual report"
SIZES = [(200, 150), (120, 260), (160, 160), (180, 120), (140, 200)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reranker(tiny):
    model, proc = tiny("qwen3_vl")
    return MiniReranker(model, proc)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("lc_pages")
    out = []
    for i, (w, h) in enumerate(SIZES):
        f = d / f"page{i}.png"
        T.random_page_image(w, h, seed=20 + i).save(f)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def expected(reranker, files):
    scores = reranker.score(QUERY, [str(f) for f in files])
    ids = [f"d{i}" for i in range(len(files))]
    by_id = dict(zip(ids, scores))
    return by_id, sorted(ids, key=lambda i: -by_id[i])


def docs(files):
    return [
        Document(page_content=f"page {i} text", metadata={"image_path": str(f), "page": i}, id=f"d{i}")
        for i, f in enumerate(files)
    ]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_compress_like_the_core(reranker, files, expected):
    by_id, best = expected
    inputs = docs(files)
    out = MiniRerank(reranker, top_n=3).compress_documents(inputs, QUERY)
    assert [d.id for d in out] == best[:3]
    for d in out:
        i = int(d.id[1:])
        assert type(d.metadata["relevance_score"]) is float
        assert d.metadata["relevance_score"] == pytest.approx(by_id[d.id], abs=1e-6)
        assert d.metadata["page"] == i and d.metadata["image_path"] == str(files[i])
        assert d.page_content == f"page {i} text"
    assert all("relevance_score" not in d.metadata for d in inputs)  # inputs untouched


def test_top_n(reranker, files, expected):
    _, best = expected
    assert [d.id for d in MiniRerank(reranker, top_n=None).compress_documents(docs(files), QUERY)] == best
    assert [d.id for d in MiniRerank(reranker, top_n=99).compress_documents(docs(files), QUERY)] == best
    assert [d.id for d in MiniRerank(reranker, top_n=1).compress_documents(docs(files), QUERY)] == best[:1]
    for bad in (0, -1, 2.0):
        with pytest.raises(ConfigError, match="top_n"):
            MiniRerank(reranker, top_n=bad)


def test_empty_and_bad_query(reranker, files):
    assert MiniRerank(reranker).compress_documents([], QUERY) == []
    assert asyncio.run(MiniRerank(reranker).acompress_documents([], QUERY)) == []
    with pytest.raises(InvalidQueryError):
        MiniRerank(reranker).compress_documents(docs(files), "  ")


def test_base64_content_and_other_sources(reranker, files, expected):
    by_id, _ = expected
    f = files[2]
    inputs = [
        Document(page_content=b64(f), id="b64"),
        Document(page_content="data:image/png;base64," + b64(f), id="data_url"),
        Document(page_content="caption", metadata={"image": b64(f)}, id="md_image"),
        Document(page_content="caption", metadata={"image_url": f.as_uri()}, id="file_url"),
        Document(page_content="caption", metadata={"source": str(f)}, id="source"),
        Document(page_content="caption", metadata={"image_path": str(f)}),  # no id
    ]
    out = MiniRerank(reranker, top_n=None).compress_documents(inputs, QUERY)
    assert sorted(str(d.id) for d in out) == sorted(str(d.id) for d in inputs)
    for d in out:
        assert d.metadata["relevance_score"] == pytest.approx(by_id["d2"], abs=1e-6)


def test_plain_text_is_not_mistaken_for_base64(reranker):
    doc = Document(page_content="SGVsbG8gd29ybGQgdGhpcyBpcyB0ZXh0", id="t")  # valid base64 of plain text
    with pytest.raises(InvalidImageError, match="'t'.*text-only"):
        MiniRerank(reranker).compress_documents([doc], QUERY)


def test_text_only_and_missing_file_policy(reranker, files, expected, tmp_path):
    _, best = expected
    extra = [
        Document(page_content="plain text", id="txt"),
        Document(page_content="x", metadata={"image_path": str(tmp_path / "nope.png")}, id="gone"),
    ]
    with pytest.raises(InvalidImageError, match="'txt'"):
        MiniRerank(reranker).compress_documents(docs(files) + extra, QUERY)
    with pytest.raises(InvalidImageError, match=r"'gone'.*nope\.png.*does not exist"):
        MiniRerank(reranker).compress_documents(docs(files) + extra[1:], QUERY)
    with pytest.warns(MissingImageWarning, match=r"2 document.*'txt'.*'gone'"):
        out = MiniRerank(reranker, top_n=None, on_missing_image="skip").compress_documents(extra + docs(files), QUERY)
    assert [d.id for d in out] == best


def test_score_threshold_and_batching(reranker, files, expected):
    by_id, best = expected
    out = MiniRerank(reranker, top_n=None, batch_size=2, score_threshold=by_id[best[1]]).compress_documents(docs(files), QUERY)
    assert [d.id for d in out] == best[:2]


def test_importance_metadata_prunes(tiny, files):
    model, proc = tiny("qwen3_vl")
    sparse = MiniReranker(model, proc, RerankConfig(keep_ratio=0.25))
    imps = [[float((k * 5 + i) % 7) for k in range(int.__mul__(*sparse.visual_grid(str(f))))] for i, f in enumerate(files)]
    want = sparse.score(QUERY, [str(f) for f in files], importance=imps)
    inputs = [
        Document(page_content="", metadata={"image_path": str(f), IMPORTANCE_KEY: imps[i]}, id=f"d{i}")
        for i, f in enumerate(files)
    ]
    out = MiniRerank(sparse, top_n=None).compress_documents(inputs, QUERY)
    got = {d.id: d.metadata["relevance_score"] for d in out}
    assert [got[f"d{i}"] for i in range(len(files))] == pytest.approx(want, abs=1e-6)
    assert all(IMPORTANCE_KEY not in d.metadata for d in out)
    # documents from another retriever carry no maps: every visual token is used, with a warning
    plain = [Document(page_content="", metadata={"image_path": str(f)}, id=f"d{i}") for i, f in enumerate(files)]
    with pytest.warns(UnprunedWarning, match="every visual token"):
        out = MiniRerank(sparse, top_n=None).compress_documents(plain, QUERY)
    got = {d.id: d.metadata["relevance_score"] for d in out}
    assert [got[f"d{i}"] for i in range(len(files))] == pytest.approx(
        sparse.score(QUERY, [str(f) for f in files], keep_ratio=1.0), abs=1e-6)


def test_async_matches_and_runs_off_the_loop(tiny, files, expected):
    by_id, best = expected
    model, proc = tiny("qwen3_vl")
    threads = set()

    class Recording(MiniReranker):
        def score(self, query, pages, importance=None):
            threads.add(threading.current_thread().name)
            return super().score(query, pages, importance)

    out = asyncio.run(MiniRerank(Recording(model, proc), top_n=3).acompress_documents(docs(files), QUERY))
    assert [d.id for d in out] == best[:3]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([by_id[i] for i in best[:3]], abs=1e-6)
    assert threads and all(t.startswith("minirerank-model") for t in threads)


def test_bad_construction(reranker):
    with pytest.raises(ConfigError, match="not both"):
        MiniRerank(reranker, model="x")
    with pytest.raises(ConfigError, match="device"):
        MiniRerank(reranker, device="cuda:1")
    with pytest.raises(ConfigError, match="on_missing_image"):
        MiniRerank(reranker, on_missing_image="blank")


# --- inside ContextualCompressionRetriever ---------------------------------------------------------------
class PageListRetriever(BaseRetriever):
    """A plain first stage for these tests: returns the page documents, k of them."""

    paths: list[str]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None):
        return docs([Path(p) for p in self.paths])[:k]


def test_contextual_compression_retriever_end_to_end(reranker, files, expected):
    from langchain_classic.retrievers import ContextualCompressionRetriever

    by_id, best = expected
    retriever = ContextualCompressionRetriever(
        base_compressor=MiniRerank(reranker, top_n=2), base_retriever=PageListRetriever(paths=[str(f) for f in files])
    )
    out = retriever.invoke(QUERY)
    assert [d.id for d in out] == best[:2]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([by_id[i] for i in best[:2]], abs=1e-6)
    aout = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.id for d in aout] == best[:2]
    # kwargs reach the base retriever: only the first two candidates are reranked
    first_two = retriever.invoke(QUERY, k=2)
    assert sorted(d.id for d in first_two) == ["d0", "d1"]
