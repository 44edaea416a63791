"""LlamaIndex node postprocessor (llama_index.postprocessor.minirerank.MiniRerank) on a tiny random model.

Everything runs through the real llama-index-core: query engines, MockLLM, the instrumentation dispatcher and
the callback manager. Expected scores always come from the core reranker itself (through sigmoid: the
postprocessor returns probabilities by default), so a wrong image, a wrong order or a dropped node fails the test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.llms import MockLLM  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.base.llms.types import ImageBlock, MessageRole, TextBlock  # noqa: E402
from llama_index.core.schema import (  # noqa: E402
    Document,
    ImageDocument,
    ImageNode,
    MediaResource,
    MetadataMode,
    Node,
    NodeWithScore,
    QueryBundle,
    TextNode,
)
from llama_index.postprocessor.minirerank import (  # noqa: E402
    IMPORTANCE_KEY,
    MiniRerank,
    MissingImageWarning,
    UnprunedWarning,
    nodes_to_messages,
)

from minirerank_core import (  # noqa: E402
    ConfigError,
    ImportanceMap,
    InvalidImageError,
    InvalidImportanceError,
    InvalidQueryError,
    ListwiseConfig,
    ListwiseReranker,
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


def sigmoid(x: float) -> float:
    """The postprocessor's default score: sigmoid of the core's (RerankResult.probability)."""
    return 1.0 / (1.0 + math.exp(-x))


def probs(scores) -> list[float]:
    return [sigmoid(s) for s in scores]


# --- basic behaviour -------------------------------------------------------------------------------------
def test_reranks_like_the_core(reranker, files, expected):
    by_id, best = expected
    nodes = image_nodes(files)
    out = MiniRerank(reranker, top_n=3).postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == best[:3]
    for n in out:
        assert type(n.score) is float
        assert n.score == pytest.approx(sigmoid(by_id[n.node.node_id]), abs=1e-6)
        i = int(n.node.node_id[1:])
        assert n.node.metadata == {"page": i}  # the first-stage score is not kept by default
    # the caller's nodes are untouched
    assert [n.score for n in nodes] == pytest.approx([1.0 - i / 10 for i in range(len(files))])


def test_score_scales(reranker, files, expected):
    """score="probability" (default): sigmoid of the core's score, in [0, 1]; score="logit": the core's score.
    Same order; score_threshold is on the chosen scale."""
    by_id, best = expected
    prob = MiniRerank(reranker, top_n=None).postprocess_nodes(image_nodes(files), query_str=QUERY)
    logit = MiniRerank(reranker, top_n=None, score="logit").postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in prob] == [n.node.node_id for n in logit] == best
    assert [n.score for n in logit] == pytest.approx([by_id[i] for i in best], abs=1e-6)
    assert [n.score for n in prob] == pytest.approx(probs(by_id[i] for i in best), abs=1e-6)
    assert all(0.0 <= n.score <= 1.0 for n in prob)
    assert [n.score for n in prob] != pytest.approx([n.score for n in logit], abs=1e-3)  # really two scales
    # a threshold between the 2nd and 3rd page on each scale keeps the best two
    cut = (by_id[best[1]] + by_id[best[2]]) / 2
    keep = MiniRerank(reranker, top_n=None, score="logit", score_threshold=cut).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in keep] == best[:2]
    keep = MiniRerank(reranker, top_n=None, score_threshold=sigmoid(cut)).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in keep] == best[:2]


def test_bad_score_options(reranker, files):
    with pytest.raises(ConfigError, match="score must be one of 'probability', 'logit'"):
        MiniRerank(reranker, score="sigmoid")
    # a threshold outside [0, 1] on the probability scale is a logit given by mistake
    with pytest.raises(ConfigError, match=r"score_threshold=2\.0 is not a probability.*score='logit'"):
        MiniRerank(reranker, score_threshold=2.0)
    assert MiniRerank(reranker, score="logit", score_threshold=2.0).score_threshold == 2.0
    # fields reassigned after construction are checked when used
    pp = MiniRerank(reranker)
    pp.score = "raw"
    with pytest.raises(ConfigError, match="score must be one of"):
        pp.postprocess_nodes(image_nodes(files), query_str=QUERY)


def test_keep_retrieval_score_is_for_the_caller_not_the_llm(reranker, files):
    nodes = image_nodes(files)
    assert MiniRerank(reranker).keep_retrieval_score is False
    out = MiniRerank(reranker, top_n=None, keep_retrieval_score=True).postprocess_nodes(nodes, query_str=QUERY)
    for n in out:
        i = int(n.node.node_id[1:])
        assert n.node.metadata["retrieval_score"] == pytest.approx(1.0 - i / 10)
        assert "retrieval_score" not in n.node.get_content(metadata_mode=MetadataMode.LLM)
        assert "retrieval_score" not in n.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert f"page: {i}" in n.node.get_content(metadata_mode=MetadataMode.LLM)  # other metadata still reaches it
    # the caller's nodes are untouched (metadata and the excluded-key lists of the shallow copies)
    assert all("retrieval_score" not in n.node.metadata for n in nodes)
    assert all(n.node.excluded_llm_metadata_keys == [] and n.node.excluded_embed_metadata_keys == [] for n in nodes)


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
    cut = sigmoid(by_id[best[2]])  # keep exactly the best three
    out = MiniRerank(reranker, top_n=None, score_threshold=cut).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in out] == best[:3]


def test_batching_gives_the_same_scores_in_fewer_pages_per_call(tiny, files, expected):
    by_id, best = expected
    calls = []

    class Counting(MiniReranker):
        def score(self, query, candidates, importance=None, *, keep_ratio=None, missing_maps="raise"):
            calls.append(len(candidates))
            return super().score(query, candidates, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)

    model, proc = tiny("qwen3_vl")
    out = MiniRerank(Counting(model, proc), top_n=None, batch_size=2).postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert calls == [2, 2, 1]
    assert [n.node.node_id for n in out] == best
    assert [n.score for n in out] == pytest.approx(probs(by_id[i] for i in best), abs=1e-6)


# --- where images come from ------------------------------------------------------------------------------
def test_every_image_source_gives_the_same_score(reranker, files, expected):
    by_id, _ = expected
    f = files[1]
    want = sigmoid(by_id["n1"])
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
    assert [got[f"n{i}"] for i in range(len(files))] == pytest.approx(probs(want), abs=1e-6)
    assert all(IMPORTANCE_KEY not in n.node.metadata for n in out)  # the big map is not passed on
    # the form MiniRerankRetriever writes ({"grid": [h, w], "values": [...]}) gives the same scores
    as_json = [
        NodeWithScore(node=ImageNode(image_path=str(f), id_=f"n{i}", metadata={
            IMPORTANCE_KEY: ImportanceMap.coerce(imps[i], sparse.visual_grid(str(f))).to_json()}), score=0.0)
        for i, f in enumerate(files)
    ]
    got = {n.node.node_id: n.score for n in MiniRerank(sparse, top_n=None).postprocess_nodes(as_json, query_str=QUERY)}
    assert [got[f"n{i}"] for i in range(len(files))] == pytest.approx(probs(want), abs=1e-6)
    # a map that is not finite is refused
    bad = [NodeWithScore(node=ImageNode(image_path=str(files[0]), id_="n0", metadata={
        IMPORTANCE_KEY: [float("nan")] + imps[0][1:]}))]
    with pytest.raises(InvalidImportanceError, match="n0.*finite"):
        MiniRerank(sparse).postprocess_nodes(bad, query_str=QUERY)
    # nor one whose values do not fill its own grid; the error names the node
    bad = [NodeWithScore(node=ImageNode(image_path=str(files[0]), id_="n0", metadata={
        IMPORTANCE_KEY: {"grid": [2, 2], "values": [1.0, 2.0, 3.0]}}))]
    with pytest.raises(InvalidImportanceError, match=r"node 'n0'.*needs 4 values"):
        MiniRerank(sparse).postprocess_nodes(bad, query_str=QUERY)
    # the map matters: a different one gives different scores
    flipped = [[-x for x in imp] for imp in imps]
    assert sparse.score(QUERY, [str(f) for f in files], importance=flipped) != pytest.approx(want, abs=1e-6)
    # without any map a pruning reranker attends to every visual token, and says so
    dense_want = sparse.score(QUERY, [str(f) for f in files], keep_ratio=1.0)
    with pytest.warns(UnprunedWarning, match="every visual token"):
        out = MiniRerank(sparse, top_n=None, score="logit").postprocess_nodes(image_nodes(files), query_str=QUERY)
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
    assert [n.score for n in out] == pytest.approx(probs(by_id[i] for i in best[:2]), abs=1e-5)
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
    with pytest.raises(ConfigError, match="must be a minirerank Reranker.*got object"):
        MiniRerank(object())


def test_listwise_mode(tiny, reranker, files):
    model, proc = tiny("qwen3_vl")
    calls = []

    class Counting(ListwiseReranker):
        def rerank(self, query, candidates, top_n=None, importance=None, *, keep_ratio=None, missing_maps="raise"):
            calls.append(len(candidates))
            return super().rerank(query, candidates, top_n, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)

    lw = Counting(model, proc)
    want = lw.rerank(QUERY, [str(f) for f in files])
    calls.clear()
    pp = MiniRerank(lw, top_n=3, batch_size=2)  # mode inferred; batching never splits a listwise ranking
    assert pp.mode == "listwise"
    out = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert calls == [len(files)]
    assert [n.node.node_id for n in out] == [f"n{r.index}" for r in want[:3]]
    assert [n.score for n in out] == pytest.approx([r.probability for r in want[:3]], abs=1e-6)
    aout = asyncio.run(pp.apostprocess_nodes(image_nodes(files), query_str=QUERY))
    assert [n.node.node_id for n in aout] == [n.node.node_id for n in out]
    with pytest.raises(ConfigError, match=r"mode='listwise' but the reranker given is a MiniReranker \(pointwise\)"):
        MiniRerank(reranker, mode="listwise")
    with pytest.raises(ConfigError, match="mode='pointwise'"):
        MiniRerank(lw, mode="pointwise")


def test_listwise_cached_prunes_with_node_maps_or_warns(tiny, files):
    """Cached listwise prunes with the first stage's maps like the point-wise reranker: nodes carrying them are
    ranked with them; nodes carrying none are ranked unpruned, with an UnprunedWarning."""
    model, proc = tiny("qwen3_vl")
    lw = ListwiseReranker(model, proc, ListwiseConfig(mode="cached", keep_ratio=0.5))
    paths = [str(f) for f in files]
    imps = [[float((k * 3 + i) % 5) for k in range(int.__mul__(*lw.visual_grid(p)))] for i, p in enumerate(paths)]
    want = lw.rerank(QUERY, paths, importance=imps)
    nodes = [NodeWithScore(node=ImageNode(image_path=p, id_=f"n{i}", metadata={IMPORTANCE_KEY: imps[i]})) for i, p in enumerate(paths)]
    out = MiniRerank(lw, top_n=None).postprocess_nodes(nodes, query_str=QUERY)
    assert [n.node.node_id for n in out] == [f"n{r.index}" for r in want]
    assert [n.score for n in out] == pytest.approx([r.probability for r in want], abs=1e-6)
    dense = lw.rerank(QUERY, paths, keep_ratio=1.0)
    assert [r.score for r in dense] != pytest.approx([r.score for r in want], abs=1e-6)
    with pytest.warns(UnprunedWarning, match="every visual token"):
        out = MiniRerank(lw, top_n=None, score="logit").postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in out] == [f"n{r.index}" for r in dense]
    assert [n.score for n in out] == pytest.approx([r.score for r in dense], abs=1e-6)


def test_default_model_round_trips_through_to_dict(files):
    from minirerank_core.defaults import DEFAULT_RERANKER_DIR, default_rerank_config

    pp = MiniRerank(top_n=2)  # the shipped student prunes with first-stage maps; plain nodes carry none
    assert pp.model == str(DEFAULT_RERANKER_DIR) and pp.mode == "pointwise"  # the checkpoint it was loaded from
    data = pp.to_dict()
    assert data["model"] == str(DEFAULT_RERANKER_DIR) and data["class_name"] == "MiniRerank"
    trained = {k: v for k, v in default_rerank_config().to_dict().items() if k not in ("device", "dtype")}
    assert {k: data["config"][k] for k in trained} == trained  # the settings the student was trained with
    assert data["config"]["device"] == pp.reranker.config.device  # resolved on this machine ("auto" -> "cpu")
    again = MiniRerank.from_json(pp.to_json())  # JSON-safe, and reloaded from the directory
    assert again.to_dict() == data and again.reranker.config == pp.reranker.config
    with pytest.warns(UnprunedWarning):
        out = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    with pytest.warns(UnprunedWarning):
        out_again = again.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert len(out) == 2
    assert [n.node.node_id for n in out_again] == [n.node.node_id for n in out]
    assert [n.score for n in out_again] == pytest.approx([n.score for n in out], abs=1e-6)


def test_saved_checkpoint_round_trips_through_to_dict(reranker, files, tmp_path, monkeypatch):
    """to_dict stores the checkpoint directory and the reranker's settings (here not the saved ones), every field;
    from_dict reloads the directory by path and ranks exactly like the original."""
    reranker.save_pretrained(tmp_path / "ckpt")  # saved with the default (dense) settings
    shallow = RerankConfig(exit_layer=3)  # settings other than the saved ones: they must round-trip too
    monkeypatch.chdir(tmp_path)
    pp = MiniRerank(model="ckpt", config=shallow, top_n=3, score="logit", score_threshold=-50.0, batch_size=2,
                    keep_retrieval_score=True, on_missing_image="skip", cache_dir="cache")
    data = json.loads(pp.to_json())
    # absolute paths: a dump is reloaded from any working directory
    assert data["model"] == str(tmp_path / "ckpt") and data["cache_dir"] == str(tmp_path / "cache")
    assert data["config"]["exit_layer"] == 3
    monkeypatch.chdir(tmp_path / "ckpt")
    again = MiniRerank.from_dict(data)
    assert again.to_dict() == pp.to_dict()
    assert again.reranker.config == pp.reranker.config and again.reranker.name == str(tmp_path / "ckpt")
    want = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    got = again.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-6)
    # the stored settings mattered: the checkpoint's own (dense) settings rank differently
    dense = MiniRerank(model=tmp_path / "ckpt", top_n=3, score="logit").postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.score for n in dense] != pytest.approx([n.score for n in want], abs=1e-4)
    # stored fields can be overridden, as LlamaIndex's from_dict allows
    assert MiniRerank.from_dict(data, top_n=1).top_n == 1


def test_listwise_round_trips_through_to_dict(reranker, files, tmp_path):
    reranker.save_pretrained(tmp_path / "ckpt")
    pp = MiniRerank(model=tmp_path / "ckpt", mode="listwise", config=ListwiseConfig(window=4, stride=2), top_n=None)
    data = pp.to_dict()
    assert data["mode"] == "listwise" and data["config"]["window"] == 4 and data["config"]["labels"][:2] == ["A", "B"]
    again = MiniRerank.from_json(pp.to_json())
    assert isinstance(again.reranker, ListwiseReranker) and again.reranker.config == pp.reranker.config
    want = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)  # 5 pages: two windows of 4
    got = again.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.node.node_id for n in got] == [n.node.node_id for n in want]
    assert [n.score for n in got] == pytest.approx([n.score for n in want], abs=1e-6)


def test_from_dict_without_a_checkpoint_directory(reranker, files, tmp_path):
    """A reranker built in code from a model object has no checkpoint: to_dict still describes it, from_dict says
    what to do instead of treating its name as a hub id; given the instance, it rebuilds the rest."""
    pp = MiniRerank(reranker, top_n=2, score="logit")
    data = pp.to_dict()
    assert data["model"] == reranker.name == "Qwen3VLForConditionalGeneration"  # a name, not a path
    with pytest.raises(ConfigError, match=r"not a checkpoint directory.*save_pretrained.*from_dict\(data, reranker=reranker\)"):
        MiniRerank.from_dict(data)
    again = MiniRerank.from_dict(data, reranker=reranker)
    assert again.reranker is reranker and again.to_dict() == data
    # a checkpoint that moved away, or a hub id written by hand, is never looked up on the hub
    for missing in (str(tmp_path / "gone"), "Qwen/Qwen3-VL-2B-Instruct"):
        with pytest.raises(ConfigError, match="not a checkpoint directory"):
            MiniRerank.from_dict({**data, "model": missing})


def test_hub_checkpoint_is_stored_as_its_local_snapshot(tiny, files, tmp_path, monkeypatch):
    """A reranker loaded by hub id is stored as its snapshot directory in the local Hugging Face cache, so
    from_dict reloads it by path, offline."""
    import huggingface_hub.constants

    model, proc = tiny("qwen3_vl")
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--acme--tiny-reranker" / "snapshots" / commit
    MiniReranker(model, proc).save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny-reranker" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-reranker" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    pp = MiniRerank(MiniReranker(model, proc, name="acme/tiny-reranker"), top_n=None)  # as from_pretrained names it
    assert pp.model == str(snapshot)
    again = MiniRerank.from_dict(pp.to_dict())
    assert again.reranker.name == str(snapshot)
    want = pp.postprocess_nodes(image_nodes(files), query_str=QUERY)
    assert [n.score for n in again.postprocess_nodes(image_nodes(files), query_str=QUERY)] == pytest.approx(
        [n.score for n in want], abs=1e-6)


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
    assert [n.score for n in out] == pytest.approx(probs(by_id[i] for i in best[:3]), abs=1e-6)
    assert [type(e) for e in rerank_events if isinstance(e, (ReRankStartEvent, ReRankEndEvent))] == [ReRankStartEvent, ReRankEndEvent]
    assert len(debug.get_event_pairs(CBEventType.RERANKING)) == 1


def test_async_does_not_block_the_loop_and_queues_per_model(tiny, files):
    model, proc = tiny("qwen3_vl")
    active, peak, threads = [0], [0], set()
    lock = threading.Lock()

    class Slow(MiniReranker):
        def score(self, query, candidates, importance=None, *, keep_ratio=None, missing_maps="raise"):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            threads.add(threading.current_thread().name)
            time.sleep(0.15)  # blocking work, as a big model's forward pass is
            try:
                return super().score(query, candidates, importance, keep_ratio=keep_ratio, missing_maps=missing_maps)
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


# --- handing the pages to the answering model ------------------------------------------------------------
def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def file_pixels(path: Path) -> np.ndarray:
    return pixels(path.read_bytes())


def sent(messages) -> list:
    """The one user turn's blocks as ("text", str) / ("image", (mimetype, pixels, raw bytes))."""
    assert len(messages) == 1 and messages[0].role == MessageRole.USER
    out = []
    for block in messages[0].blocks:
        if isinstance(block, ImageBlock):
            raw = block.resolve_image().read()
            out.append(("image", (block.image_mimetype, pixels(raw), raw)))
        else:
            assert isinstance(block, TextBlock)
            out.append(("text", block.text))
    return out


def test_nodes_to_messages_sends_images_in_order_with_labels(files):
    nodes = [
        NodeWithScore(node=ImageNode(image=b64(files[3]), id_="b64", metadata={"source": "/docs/report.pdf", "page": 4})),
        NodeWithScore(node=ImageNode(image_path=str(files[0]), id_="path", metadata={"source": str(files[0])})),
        TextNode(text="caption", id_="md", metadata={"image_path": str(files[2]), "page": 7}),  # a bare node works too
        NodeWithScore(node=ImageDocument(image_path=str(files[1]), id_="nolabel")),
    ]
    parts = sent(nodes_to_messages(QUERY, nodes))
    kinds = [k for k, _ in parts]
    assert kinds == ["text"] + ["text", "image"] * 4 + ["text"]
    assert "ranked most relevant first" in parts[0][1]
    labels = [v for k, v in parts[1:-1] if k == "text"]
    assert labels == ["[1] report.pdf, page 4", f"[2] {files[0].name}", f"[3] {files[2].name}, page 7", "[4] nolabel"]
    images = [v for k, v in parts if k == "image"]
    for (mime, px, _), f in zip(images, [files[3], files[0], files[2], files[1]]):
        assert mime == "image/png"
        np.testing.assert_array_equal(px, file_pixels(f))  # the page itself, in the order given
    assert parts[-1] == ("text", f"Question: {QUERY}")
    # custom or no instruction
    assert sent(nodes_to_messages(QUERY, nodes[:1], instruction=None))[0] == ("text", "[1] report.pdf, page 4")
    assert sent(nodes_to_messages(QUERY, nodes[:1], instruction="Be brief."))[0] == ("text", "Be brief.")


def test_nodes_to_messages_after_minirerank_follows_the_ranking(reranker, files, expected):
    _, best = expected
    nodes = MiniRerank(reranker, top_n=3).postprocess_nodes(image_nodes(files), query_str=QUERY)
    parts = sent(nodes_to_messages(QUERY, nodes))
    images = [v for k, v in parts if k == "image"]
    assert len(images) == 3
    for (_, px, _), node_id in zip(images, best[:3]):
        np.testing.assert_array_equal(px, file_pixels(files[int(node_id[1:])]))
    labels = [v for k, v in parts[1:-1] if k == "text"]
    # no source in metadata: the node id names the page
    assert labels == [f"[{r}] {node_id}, page {node_id[1:]}" for r, node_id in enumerate(best[:3], start=1)]
    texts = " ".join(v for k, v in parts if k == "text")
    assert not any(f"{n.score:.2f}" in texts for n in nodes)  # scores are not sent


def test_nodes_to_messages_image_formats(files, tmp_path):
    """PNG / JPEG / GIF / WEBP files go as they are; other formats (here TIFF) and in-memory pages as PNG."""
    img = Image.open(files[0]).convert("RGB")
    img.save(tmp_path / "p.jpg", quality=90)
    img.save(tmp_path / "p.tiff")
    nodes = [ImageNode(image_path=str(tmp_path / "p.jpg"), id_="jpg"), ImageNode(image_path=str(tmp_path / "p.tiff"), id_="tif")]
    (jpg_mime, jpg_px, jpg_raw), (tif_mime, tif_px, _) = [v for k, v in sent(nodes_to_messages(QUERY, nodes)) if k == "image"]
    assert jpg_mime == "image/jpeg" and jpg_raw == (tmp_path / "p.jpg").read_bytes()
    assert tif_mime == "image/png" and tif_px.shape == (img.height, img.width, 3)
    np.testing.assert_array_equal(tif_px, np.asarray(img))


def test_nodes_to_messages_missing_images_and_bad_query(files):
    nodes = [ImageNode(image_path=str(files[0]), id_="a"), TextNode(text="just text", id_="txt"),
             ImageNode(image_path=str(files[1]), id_="b")]
    with pytest.raises(InvalidImageError, match=r"'txt'.*text-only"):
        nodes_to_messages(QUERY, nodes)
    with pytest.warns(MissingImageWarning, match="'txt'"):
        parts = sent(nodes_to_messages(QUERY, nodes, on_missing_image="skip"))
    assert [v for k, v in parts[1:-1] if k == "text"] == ["[1] a", "[2] b"]  # numbered as sent
    with pytest.raises(InvalidQueryError):
        nodes_to_messages("  ", nodes[:1])
    with pytest.raises(ConfigError, match="on_missing_image"):
        nodes_to_messages(QUERY, nodes[:1], on_missing_image="blank")
