"""LangChain document compressor (langchain_minirerank.MiniRerank) on a tiny random model, used directly and
inside langchain_classic's ContextualCompressionRetriever, and documents_to_messages. Expected scores come from
the core reranker (through sigmoid: the compressor's default scale is a probability)."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("langchain_core")

from langchain_core.callbacks import CallbackManagerForRetrieverRun  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402
from langchain_core.messages import HumanMessage  # noqa: E402
from langchain_minirerank import (  # noqa: E402
    IMPORTANCE_KEY,
    MiniRerank,
    MissingImageWarning,
    UnprunedWarning,
    documents_to_messages,
)

from minirerank_core import (  # noqa: E402
    ConfigError,
    ImportanceMap,
    InvalidImageError,
    InvalidImportanceError,
    InvalidQueryError,
    MiniReranker,
    RerankConfig,
)
from minirerank_core import testing as T  # noqa: E402

QUERY = "revenue growth in the annual report"
SIZES = [(200, 150), (120, 260), (160, 160), (180, 120), (140, 200)]


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


def sigmoid(x: float) -> float:
    """The compressor's default score: sigmoid of the core's (RerankResult.probability)."""
    return 1.0 / (1.0 + math.exp(-x))


def probs(scores) -> list[float]:
    return [sigmoid(s) for s in scores]


def test_compress_like_the_core(reranker, files, expected):
    by_id, best = expected
    inputs = docs(files)
    out = MiniRerank(reranker, top_n=3).compress_documents(inputs, QUERY)
    assert [d.id for d in out] == best[:3]
    for d in out:
        i = int(d.id[1:])
        assert type(d.metadata["relevance_score"]) is float
        assert d.metadata["relevance_score"] == pytest.approx(sigmoid(by_id[d.id]), abs=1e-6)
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
        assert d.metadata["relevance_score"] == pytest.approx(sigmoid(by_id["d2"]), abs=1e-6)


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
    out = MiniRerank(reranker, top_n=None, batch_size=2, score_threshold=sigmoid(by_id[best[1]])).compress_documents(docs(files), QUERY)
    assert [d.id for d in out] == best[:2]
    # on the raw scale the threshold is the core's score itself
    out = MiniRerank(reranker, top_n=None, batch_size=2, score="logit", score_threshold=by_id[best[1]]).compress_documents(docs(files), QUERY)
    assert [d.id for d in out] == best[:2]


def test_score_scales(reranker, files, expected):
    by_id, best = expected
    prob = MiniRerank(reranker, top_n=None).compress_documents(docs(files), QUERY)
    logit = MiniRerank(reranker, top_n=None, score="logit").compress_documents(docs(files), QUERY)
    assert [d.id for d in prob] == [d.id for d in logit] == best
    assert [d.metadata["relevance_score"] for d in logit] == pytest.approx([by_id[i] for i in best], abs=1e-6)
    assert [d.metadata["relevance_score"] for d in prob] == pytest.approx(probs(by_id[i] for i in best), abs=1e-6)
    assert all(0.0 <= d.metadata["relevance_score"] <= 1.0 for d in prob)
    assert MiniRerank(reranker).score == "probability"
    with pytest.raises(ConfigError, match="score must be one of 'probability', 'logit'"):
        MiniRerank(reranker, score="probabilities")
    with pytest.raises(ConfigError, match=r"score_threshold=-1\.0 is not a probability"):
        MiniRerank(reranker, score_threshold=-1.0)


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
    assert [got[f"d{i}"] for i in range(len(files))] == pytest.approx(probs(want), abs=1e-6)
    assert all(IMPORTANCE_KEY not in d.metadata for d in out)
    # the form MiniRerankRetriever writes ({"grid": [h, w], "values": [...]}) gives the same scores
    as_json = [
        Document(page_content="", id=f"d{i}", metadata={
            "image_path": str(f), IMPORTANCE_KEY: ImportanceMap.coerce(imps[i], sparse.visual_grid(str(f))).to_json()})
        for i, f in enumerate(files)
    ]
    got = {d.id: d.metadata["relevance_score"] for d in MiniRerank(sparse, top_n=None).compress_documents(as_json, QUERY)}
    assert [got[f"d{i}"] for i in range(len(files))] == pytest.approx(probs(want), abs=1e-6)
    # a map that does not fit the page's grid is refused, never silently reshaped
    short = [Document(page_content="", metadata={"image_path": str(files[0]), IMPORTANCE_KEY: imps[0][:-1]}, id="d0")]
    with pytest.raises(InvalidImportanceError, match=r"d0.*flat importance map needs \d+ values"):
        MiniRerank(sparse).compress_documents(short, QUERY)
    # documents from another retriever carry no maps: every visual token is used, with a warning
    plain = [Document(page_content="", metadata={"image_path": str(f)}, id=f"d{i}") for i, f in enumerate(files)]
    with pytest.warns(UnprunedWarning, match="every visual token"):
        out = MiniRerank(sparse, top_n=None, score="logit").compress_documents(plain, QUERY)
    got = {d.id: d.metadata["relevance_score"] for d in out}
    assert [got[f"d{i}"] for i in range(len(files))] == pytest.approx(
        sparse.score(QUERY, [str(f) for f in files], keep_ratio=1.0), abs=1e-6)


def test_async_matches_and_runs_off_the_loop(tiny, files, expected):
    by_id, best = expected
    model, proc = tiny("qwen3_vl")
    threads = set()

    class Recording(MiniReranker):
        def score(self, query, candidates, importance=None, *, keep_ratio=None, missing_maps="raise"):
            threads.add(threading.current_thread().name)
            return super().score(query, candidates, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)

    out = asyncio.run(MiniRerank(Recording(model, proc), top_n=3).acompress_documents(docs(files), QUERY))
    assert [d.id for d in out] == best[:3]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(probs(by_id[i] for i in best[:3]), abs=1e-6)
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
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(probs(by_id[i] for i in best[:2]), abs=1e-6)
    aout = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.id for d in aout] == best[:2]
    # kwargs reach the base retriever: only the first two candidates are reranked
    first_two = retriever.invoke(QUERY, k=2)
    assert sorted(d.id for d in first_two) == ["d0", "d1"]


# --- handing the pages to the answering model ------------------------------------------------------------
def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def blocks(messages) -> list:
    """The one HumanMessage's content blocks as ("text", str) / ("image", (mime_type, pixels, raw bytes))."""
    assert len(messages) == 1 and isinstance(messages[0], HumanMessage)
    out = []
    for b in messages[0].content:
        if b["type"] == "image":
            raw = base64.b64decode(b["base64"], validate=True)
            out.append(("image", (b["mime_type"], pixels(raw), raw)))
        else:
            assert b["type"] == "text" and set(b) == {"type", "text"}
            out.append(("text", b["text"]))
    return out


def test_documents_to_messages_sends_images_in_order_with_labels(files):
    inputs = [
        Document(page_content=b64(files[3]), metadata={"source": "/docs/report.pdf", "page": 4}, id="b64"),
        Document(page_content="caption", metadata={"image_path": str(files[0])}, id="path"),
        Document(page_content="caption", metadata={"image": b64(files[2]), "page": 7}, id="md_image"),
        Document(page_content="caption", metadata={"image_url": files[1].as_uri()}),  # no id, no source
    ]
    parts = blocks(documents_to_messages(QUERY, inputs))
    assert [k for k, _ in parts] == ["text"] + ["text", "image"] * 4 + ["text"]
    assert "ranked most relevant first" in parts[0][1]
    labels = [v for k, v in parts[1:-1] if k == "text"]
    assert labels == ["[1] report.pdf, page 4", f"[2] {files[0].name}", "[3] md_image, page 7", "[4] #3"]
    images = [v for k, v in parts if k == "image"]
    for (mime, px, _), f in zip(images, [files[3], files[0], files[2], files[1]]):
        assert mime == "image/png"
        np.testing.assert_array_equal(px, pixels(f.read_bytes()))  # the page itself, in the order given
    assert images[1][2] == files[0].read_bytes()  # a PNG file goes as it is
    assert parts[-1] == ("text", f"Question: {QUERY}")
    assert blocks(documents_to_messages(QUERY, inputs[:1], instruction=None))[0] == ("text", "[1] report.pdf, page 4")


def test_documents_to_messages_after_the_compressor_follows_the_ranking(reranker, files, expected):
    _, best = expected
    ranked = MiniRerank(reranker, top_n=3).compress_documents(docs(files), QUERY)
    parts = blocks(documents_to_messages(QUERY, ranked))
    images = [v for k, v in parts if k == "image"]
    assert len(images) == 3
    for (_, px, _), doc_id in zip(images, best[:3]):
        np.testing.assert_array_equal(px, pixels(files[int(doc_id[1:])].read_bytes()))
    labels = [v for k, v in parts[1:-1] if k == "text"]
    assert labels == [f"[{r}] {files[int(i[1:])].name}, page {i[1:]}" for r, i in enumerate(best[:3], start=1)]
    texts = " ".join(v for k, v in parts if k == "text")
    assert not any(f"{d.metadata['relevance_score']:.2f}" in texts for d in ranked)  # scores are not sent


def test_documents_to_messages_missing_images(files):
    inputs = [Document(page_content="x", metadata={"image_path": str(files[0])}, id="a"),
              Document(page_content="plain text", id="txt"),
              Document(page_content="x", metadata={"image_path": str(files[1])}, id="b")]
    with pytest.raises(InvalidImageError, match=r"'txt'.*text-only"):
        documents_to_messages(QUERY, inputs)
    with pytest.warns(MissingImageWarning, match="'txt'"):
        parts = blocks(documents_to_messages(QUERY, inputs, on_missing_image="skip"))
    assert [v for k, v in parts[1:-1] if k == "text"] == [f"[1] {files[0].name}", f"[2] {files[1].name}"]
    with pytest.raises(InvalidQueryError):
        documents_to_messages("", inputs[:1])


def test_chain_hands_the_pages_to_a_chat_model(reranker, files, expected, recording_chat_model):
    """ContextualCompressionRetriever -> documents_to_messages -> chat model, as one LCEL chain, sync and async."""
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    _, best = expected
    retriever = ContextualCompressionRetriever(
        base_compressor=MiniRerank(reranker, top_n=2), base_retriever=PageListRetriever(paths=[str(f) for f in files]))
    chain = ({"docs": retriever, "question": RunnablePassthrough()}
             | RunnableLambda(lambda x: documents_to_messages(x["question"], x["docs"])) | recording_chat_model)
    assert chain.invoke(QUERY).content == "received 2 page images"
    assert asyncio.run(chain.ainvoke(QUERY)).content == "received 2 page images"
    assert len(recording_chat_model.received) == 2
    for messages in recording_chat_model.received:
        images = [v for k, v in blocks(messages) if k == "image"]
        assert len(images) == 2
        for (_, px, _), doc_id in zip(images, best[:2]):
            np.testing.assert_array_equal(px, pixels(files[int(doc_id[1:])].read_bytes()))
