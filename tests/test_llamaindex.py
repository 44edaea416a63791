"""LlamaIndex node postprocessor (llama_index.postprocessor.minirerank.MiniRerank) on a tiny random model.

Everything runs through the real llama-index-core: query engines, MockLLM, the instrumentation dispatcher and
the callback manager. Expected scores always come from the core reranker itself, so a wrong image, a wrong
order or a dropped node fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import (  # noqa: E402
    Document,
    ImageDocument,
    ImageNode,
    MediaResource,
    Node,
    NodeWithScore,
    QueryBundle,
    TextNode,
)
from llama_index.postprocessor.minirerank import IMPORTANCE_KEY, MiniRerank, MissingImageWarning, UnprunedWarning  # noqa: E402

from minirerank_core import ConfigError, InvalidImageError, InvalidQueryError, MiniReranker, RerankConfig  # noqa: E402
from minirerank_core import testing as T  # noqa: E402

QUERY = "revenue growth in the annual report"
SIZES = [(200, 150), (120, 260), (160, 160), (180, 120), (140, 200)]


@pytest.fixture(scope="module")
def reranker(tiny):
    model, proc = tiny("qwen3_vl")
    return MiniReranker(model, proc)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("li_pages")
    out = []
    for i, (w, h) in enumerate(SIZES):
        f = d / f"page{i}.png"
        T.random_page_image(w, h, seed=10 + i).save(f)
        out.append(f)
    return out


@pytest.fixture(scope="module")
def expected(reranker, files):
    """node id -> core score, and the ids best first."""
    scores = reranker.score(QUERY, [str(f) for f in files])
    ids = [f"n{i}" for i in range(len(files))]
    by_id = dict(zip(ids, scores))
    return by_id, sorted(ids, key=lambda i: -by_id[i])


def image_nodes(files, scores=None):
    return [
        NodeWithScore(node=ImageNode(image_path=str(f), id_=f"n{i}", metadata={"page": i}), score=(scores or {}).get(i, 1.0 - i / 10))
        for i, f in enumerate(files)
    ]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# --- basic behaviour -------------------------------------------------------------------------------------
def test_reranks_like_the_core_and_keeps_retrieval_score(reranker, files, expected):
    by_id, best = expected
    nodes = image_nodes(files)
    out = MiniRerank(reranker, top_n=3).postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == best[:3]
    for n in out:
        assert type(n.score) is float
        assert n.score == pytest.approx(by_id[n.node.node_id], abs=1e-6)
        i = int(n.node.node_id[1:])
        assert n.node.metadata["retrieval_score"] == pytest.approx(1.0 - i / 10)
        assert n.node.metadata["page"] == i
    # the caller's nodes are untouched
    assert all("retrieval_score" not in n.node.metadata for n in nodes)
    assert [n.score for n in nodes] == pytest.approx([1.0 - i / 10 for i in range(len(files))])


def test_top_n_none_and_larger_than_list(reranker, files, expected):
    _, best = expected
    for top_n in (None, 50):
        out = MiniRerank(reranker, top_n=top_n).postprocess_nodes(image_nodes(files), query_str=QUERY)
        assert [n.node.node_id for n in out] == best


@pytest.mark.parametrize("top_n", [0, -2, 1.5, True])
def test_bad_top_n(reranker, top_n):
    with pytest.raises(ConfigError, match="top_n"):
        MiniRerank(reranker, top_n=top_n)


def test_empty_list(reranker):
    assert MiniRerank(reranker).postprocess_nodes([], query_str=QUERY) == []
    assert asyncio.run(MiniRerank(reranker).apostprocess_nodes([], query_str=QUERY)) == []


@pytest.mark.parametrize("query", [None, "", "   "])
def test_missing_or_blank_query(reranker, files, query):
    pp = MiniRerank(reranker)
    with pytest.raises(InvalidQueryError, match="query"):
        if query is None:
            pp.postprocess_nodes(image_nodes(files))
        else:
            pp.postprocess_nodes(image_nodes(files), query_bundle=QueryBundle(query))


def test_score_threshold(reranker, files, expected):
    by_id, best = expected
    cut = by_id[best[2]]  # keep exactly the best three
    out = MiniRerank(reranker, top_n=None, score_threshold=cut).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in out] == best[:3]


def test_batching_gives_the_same_scores_in_fewer_pages_per_call(tiny, files, expected):
    by_id, best = expected
    calls = []

    class Counting(MiniReranker):
        def score(self, query, pages, importance=None):
            calls.append(len(pages))
            return super().score(query, pages, importance)

    model, proc = tiny("qwen3_vl")
    out = MiniRerank(Counting(model, proc), top_n=None, batch_size=2).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert calls == [2, 2, 1]
    assert [n.node.node_id for n in out] == best
    assert [n.score for n in out] == pytest.approx([by_id[i] for i in best], abs=1e-6)


# --- where images come from ------------------------------------------------------------------------------
def test_every_image_source_gives_the_same_score(reranker, files, expected):
    by_id, _ = expected
    f = files[1]
    want = by_id["n1"]
    nodes = [
        ImageNode(image=b64(f), id_="b64"),
        ImageNode(image_path=str(f), id_="path"),
        ImageNode(image_url=f.as_uri(), id_="file_url"),
        ImageNode(image_url="data:image/png;base64," + b64(f), id_="data_url"),
        ImageDocument(image_path=str(f), id_="imgdoc_path"),
        ImageDocument(image=b64(f), id_="imgdoc_b64"),
        TextNode(text="caption", metadata={"image_path": str(f)}, id_="md_image_path"),
        Node(image_resource=MediaResource(data=f.read_bytes()), id_="resource_bytes"),
        Node(image_resource=MediaResource(path=str(f)), id_="resource_path"),
        Document(image_resource=MediaResource(url=f.as_uri()), id_="resource_file_url"),
        Document(text="page text", metadata={"file_path": str(f)}, id_="md_file_path"),
    ]
    out = MiniRerank(reranker, top_n=None).postprocess_nodes([NodeWithScore(node=n) for n in nodes], query_str=QUERY)
    assert sorted(n.node.node_id for n in out) == sorted(n.node_id for n in nodes)
    for n in out:
        assert n.score == pytest.approx(want, abs=1e-6), n.node.node_id


def test_text_only_node_raises_by_default(reranker, files):
    nodes = image_nodes(files) + [NodeWithScore(node=TextNode(text="just text", id_="txt"), score=0.5)]
    with pytest.raises(InvalidImageError, match=r"'txt'.*text-only.*on_missing_image='skip'"):
        MiniRerank(reranker).postprocess_nodes(nodes, query_str=QUERY)


def test_text_only_node_skipped_with_a_warning(reranker, files, expected):
    _, best = expected
    nodes = [NodeWithScore(node=TextNode(text="just text", id_="txt"), score=0.5)] + image_nodes(files)
    pp = MiniRerank(reranker, top_n=None, on_missing_image="skip")
    with pytest.warns(MissingImageWarning, match="'txt'"):
        out = pp.postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == best


def test_only_text_nodes_skipped_gives_empty(reranker):
    pp = MiniRerank(reranker, on_missing_image="skip")
    with pytest.warns(MissingImageWarning):
        assert pp.postprocess_nodes([NodeWithScore(node=TextNode(text="a"))], query_str=QUERY) == []


def test_missing_image_file(reranker, files, tmp_path):
    gone = tmp_path / "gone.png"
    nodes = image_nodes(files[:2]) + [NodeWithScore(node=ImageNode(image_path=str(gone), id_="gone"))]
    with pytest.raises(InvalidImageError, match=r"'gone'.*gone\.png.*does not exist"):
        MiniRerank(reranker).postprocess_nodes(nodes, query_str=QUERY)
    with pytest.warns(MissingImageWarning, match="gone.png"):
        out = MiniRerank(reranker, top_n=None, on_missing_image="skip").postprocess_nodes(nodes, query_str=QUERY)
    assert sorted(n.node.node_id for n in out) == ["n0", "n1"]


def test_remote_url_is_never_downloaded(reranker):
    node = NodeWithScore(node=ImageNode(image_url="https://example.com/page.png", id_="remote"))
    with pytest.raises(InvalidImageError, match="never downloads"):
        MiniRerank(reranker).postprocess_nodes([node], query_str=QUERY)


def test_pdf_file_path_is_not_an_image(reranker, tmp_path):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF-1.4\n")
    node = NodeWithScore(node=Document(text="p1", metadata={"file_path": str(pdf)}, id_="pdfnode"))
    with pytest.raises(InvalidImageError, match="not an image file"):
        MiniRerank(reranker).postprocess_nodes([node], query_str=QUERY)


def test_corrupt_image_raises_invalid_image(reranker, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InvalidImageError, match="bad.png"):
        MiniRerank(reranker).postprocess_nodes([NodeWithScore(node=ImageNode(image_path=str(bad)))], query_str=QUERY)


def test_duplicate_node_ids_are_fine(reranker, files):
    nodes = [NodeWithScore(node=ImageNode(image_path=str(files[0]), id_="same")) for _ in range(2)]
    out = MiniRerank(reranker, top_n=None).postprocess_nodes(nodes, query_str=QUERY)
    assert len(out) == 2 and out[0].score == pytest.approx(out[1].score)


# --- pruning with the first stage's importance map -------------------------------------------------------
def test_importance_from_node_metadata_prunes(tiny, files):
    model, proc = tiny("qwen3_vl")
    sparse = MiniReranker(model, proc, RerankConfig(keep_ratio=0.5))
    imps = []
    for i, f in enumerate(files):
        h, w = sparse.visual_grid(str(f))
        imps.append([float((k * 7 + i) % 11) for k in range(h * w)])
    want = sparse.score(QUERY, [str(f) for f in files], importance=imps)
    nodes = [
        NodeWithScore(node=ImageNode(image_path=str(f), id_=f"n{i}", metadata={IMPORTANCE_KEY: imps[i]}), score=0.0)
        for i, f in enumerate(files)
    ]
    out = MiniRerank(sparse, top_n=None).postprocess_nodes(nodes, query_str=QUERY)
    got = {n.node.node_id: n.score for n in out}
    assert [got[f"n{i}"] for i in range(len(files))] == pytest.approx(want, abs=1e-6)
    assert all(IMPORTANCE_KEY not in n.node.metadata for n in out)  # the big map is not passed on
    # the map matters: a different one gives different scores
    flipped = [[-x for x in imp] for imp in imps]
    assert sparse.score(QUERY, [str(f) for f in files], importance=flipped) != pytest.approx(want, abs=1e-6)
    # without any map a pruning reranker attends to every visual token, and says so
    dense_want = sparse.score(QUERY, [str(f) for f in files], keep_ratio=1.0)
    with pytest.warns(UnprunedWarning, match="every visual token"):
        out = MiniRerank(sparse, top_n=None).postprocess_nodes(image_nodes(files), query_str=QUERY)
    got = {n.node.node_id: n.score for n in out}
    assert [got[f"n{i}"] for i in range(len(files))] == pytest.approx(dense_want, abs=1e-6)
    assert dense_want != pytest.approx(want, abs=1e-6)
    # a mix of pruned and unpruned candidates would not be comparable: refused
    nodes[0].node.metadata.pop(IMPORTANCE_KEY)
    with pytest.raises(ConfigError, match="1 of"):
        MiniRerank(sparse).postprocess_nodes(nodes, query_str=QUERY)


# --- construction ----------------------------------------------------------------------------------------
def test_from_model_path_with_device(tiny, tmp_path, files, expected):
    by_id, best = expected
    model, proc = tiny("qwen3_vl")
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    pp = MiniRerank(model=str(tmp_path / "ckpt"), device="cpu", top_n=2)
    assert pp.device == "cpu" and pp.model == str(tmp_path / "ckpt")
    out = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in out] == best[:2]
    assert [n.score for n in out] == pytest.approx([by_id[i] for i in best[:2]], abs=1e-5)
    try:
        from minirerank_core.listwise import ListwiseReranker
    except ImportError:
        return
    lw = MiniRerank(model=str(tmp_path / "ckpt"), mode="listwise", device="cpu", top_n=None)
    assert isinstance(lw.reranker, ListwiseReranker) and lw.mode == "listwise"
    assert len(lw.postprocess_nodes(image_nodes(files), query_str=QUERY)) == len(files)


def test_bad_construction(reranker):
    with pytest.raises(ConfigError, match="not both"):
        MiniRerank(reranker, model="x")
    with pytest.raises(ConfigError, match="device='cuda'.*runs on 'cpu'"):
        MiniRerank(reranker, device="cuda")
    with pytest.raises(ConfigError, match="mode must be"):
        MiniRerank(reranker, mode="pairwise")
    with pytest.raises(ConfigError, match="on_missing_image"):
        MiniRerank(reranker, on_missing_image="ignore")
    with pytest.raises(ConfigError, match="score"):
        MiniRerank(object())


def test_listwise_mode(tiny, reranker, files):
    try:
        from minirerank_core.listwise import ListwiseReranker
    except ImportError:  # listwise support not installed: a clear error, never a silent point-wise fallback
        with pytest.raises(ConfigError, match="listwise.*ListwiseReranker"):
            MiniRerank(reranker, mode="listwise")
        with pytest.raises(ConfigError, match="listwise.*ListwiseReranker"):
            MiniRerank(model="/nonexistent", mode="listwise")
        return
    model, proc = tiny("qwen3_vl")
    calls = []

    class Counting(ListwiseReranker):
        def rerank(self, query, pages, top_n=None, importance=None):
            calls.append(len(pages))
            return super().rerank(query, pages, top_n, importance)

    lw = Counting(model, proc)
    want = lw.rerank(QUERY, [str(f) for f in files])
    calls.clear()
    pp = MiniRerank(lw, top_n=3, batch_size=2)  # mode inferred; batching never splits a listwise ranking
    assert pp.mode == "listwise"
    out = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert calls == [len(files)]
    assert [n.node.node_id for n in out] == [f"n{r.index}" for r in want[:3]]
    assert [n.score for n in out] == pytest.approx([r.score for r in want[:3]], abs=1e-6)
    aout = asyncio.run(pp.apostprocess_nodes(image_nodes(files), query_str=QUERY))
    assert [n.node.node_id for n in aout] == [n.node.node_id for n in out]
    with pytest.raises(ConfigError, match="not a ListwiseReranker"):
        MiniRerank(reranker, mode="listwise")
    with pytest.raises(ConfigError, match="mode='pointwise'"):
        MiniRerank(lw, mode="pointwise")


def test_default_model(files):
    from minirerank_core.cli import _default_dir

    if _default_dir("DEFAULT_RERANKER_DIR") is None:  # no shipped model installed: a clear error
        with pytest.raises(ConfigError, match="default model"):
            MiniRerank()
        return
    pp = MiniRerank(top_n=2)  # the shipped student prunes with first-stage maps; plain nodes carry none
    with pytest.warns(UnprunedWarning):
        assert len(pp.postprocess_nodes(image_nodes(files), query_str=QUERY)) == 2


# --- events ----------------------------------------------------------------------------------------------
class _Collect(BaseEventHandler):
    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "_Collect"

    def handle(self, event, **kwargs):
        self.events.append(event)


@pytest.fixture
def rerank_events():
    root = get_dispatcher()
    handler = _Collect(events=[])
    root.add_event_handler(handler)
    try:
        yield handler.events
    finally:
        root.event_handlers.remove(handler)


def test_events_and_callbacks(reranker, files, expected, rerank_events):
    _, best = expected
    debug = LlamaDebugHandler()
    pp = MiniRerank(reranker, top_n=2, callback_manager=CallbackManager([debug]))
    pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    starts = [e for e in rerank_events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in rerank_events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].top_n == 2 and starts[0].model_name == pp.model and len(starts[0].nodes) == len(files)
    assert starts[0].query.query_str == QUERY
    assert [n.node.node_id for n in ends[0].nodes] == best[:2]
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    start, end = pairs[0]
    assert start.payload["query_str"] == QUERY and start.payload["top_k"] == 2
    assert [n.node.node_id for n in end.payload["nodes"]] == best[:2]


# --- async -----------------------------------------------------------------------------------------------
def test_async_matches_sync(reranker, files, expected, rerank_events):
    by_id, best = expected
    debug = LlamaDebugHandler()
    pp = MiniRerank(reranker, top_n=3, batch_size=2, callback_manager=CallbackManager([debug]))
    out = asyncio.run(pp.apostprocess_nodes(image_nodes(files), query_str=QUERY))
    assert [n.node.node_id for n in out] == best[:3]
    assert [n.score for n in out] == pytest.approx([by_id[i] for i in best[:3]], abs=1e-6)
    assert [type(e) for e in rerank_events if isinstance(e, (ReRankStartEvent, ReRankEndEvent))] == [ReRankStartEvent, ReRankEndEvent]
    assert len(debug.get_event_pairs(CBEventType.RERANKING)) == 1


def test_async_does_not_block_the_loop_and_queues_per_model(tiny, files):
    model, proc = tiny("qwen3_vl")
    active, peak, threads = [0], [0], set()
    lock = threading.Lock()

    class Slow(MiniReranker):
        def score(self, query, pages, importance=None):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            threads.add(threading.current_thread().name)
            time.sleep(0.15)  # blocking work, as a big model's forward pass is
            try:
                return super().score(query, pages, importance)
            finally:
                with lock:
                    active[0] -= 1

    slow = Slow(model, proc)
    pp = MiniRerank(slow, top_n=2, batch_size=2)

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(
            pp.apostprocess_nodes(image_nodes(files), query_str=QUERY),
            pp.apostprocess_nodes(image_nodes(files), query_str="another query"),
        )
        done.set()
        await t
        return ticks, results

    ticks, results = asyncio.run(main())
    assert ticks >= 20  # 6 blocking calls of 0.15 s ran while the loop kept ticking every 10 ms
    assert peak[0] == 1  # one model thread: concurrent queries queue instead of running the model in parallel
    assert threading.main_thread().name not in threads and all(n.startswith("minirerank-model") for n in threads)
    assert all(len(r) == 2 for r in results)


# --- inside LlamaIndex query engines ---------------------------------------------------------------------
class PageListRetriever(BaseRetriever):
    """A plain first stage for these tests: returns the given image nodes with descending scores."""

    def __init__(self, files):
        super().__init__()
        self._files = files

    def _retrieve(self, query_bundle):
        return image_nodes(self._files)


def test_query_engine_end_to_end(reranker, files, expected):
    _, best = expected
    engine = RetrieverQueryEngine.from_args(
        PageListRetriever(files), llm=MockLLM(), node_postprocessors=[MiniRerank(reranker, top_n=2)]
    )
    response = engine.query(QUERY)
    assert [n.node.node_id for n in response.source_nodes] == best[:2]
    assert all(type(n.score) is float for n in response.source_nodes)
    assert isinstance(response.response, str)

    async_response = asyncio.run(engine.aquery(QUERY))
    assert [n.node.node_id for n in async_response.source_nodes] == best[:2]
