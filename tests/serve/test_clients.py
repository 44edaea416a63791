"""Clients nobody here wrote, pointed at a real server on localhost: the official cohere SDK (v1 and v2, sync and
async), LangChain's and LlamaIndex's Cohere rerankers, LlamaIndex's Jina reranker, and httpx (sync and async)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from minirerank_core import testing as T
from minirerank_core.serve import BackgroundServer, create_app
from tests.serve.helpers import QUERY, data_url, in_process, png_bytes, sigmoid

KEY = "test-key"


@pytest.fixture(scope="module")
def keyed(pipeline):
    with BackgroundServer(create_app(pipeline, api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [png_bytes(T.random_page_image(160, 190 + 10 * i, seed=120 + i)) for i in range(4)]


@pytest.fixture(scope="module")
def want(pipeline, images) -> list[tuple[int, float]]:
    """(document index, relevance score) best first, computed in this process."""
    return [(i, sigmoid(s)) for i, s in in_process(pipeline, QUERY, images)]


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_cohere_client_v2(keyed, images, want):
    import cohere

    co = cohere.ClientV2(api_key=KEY, base_url=keyed.url)
    r = co.rerank(model="rerank-v3.5", query=QUERY, documents=[data_url(b) for b in images], top_n=3)
    same([(x.index, x.relevance_score) for x in r.results], want[:3])
    assert r.id and r.meta.billed_units.images == 4


def test_cohere_client_v1_returns_documents(keyed, images, want):
    import cohere

    docs = [data_url(b) for b in images]
    r = cohere.Client(api_key=KEY, base_url=keyed.url).rerank(model="rerank-english-v3.0", query=QUERY, documents=docs,
                                                               return_documents=True)
    same([(x.index, x.relevance_score) for x in r.results], want)
    assert all(x.document.text == docs[x.index] for x in r.results)


def test_cohere_async_client_and_errors(keyed, images, want):
    import cohere
    from cohere.errors import BadRequestError, UnauthorizedError

    async def go():
        co = cohere.AsyncClientV2(api_key=KEY, base_url=keyed.url)
        rs = await asyncio.gather(*(co.rerank(model="m", query=QUERY, documents=[data_url(b) for b in images])
                                    for _ in range(3)))
        with pytest.raises(BadRequestError) as bad:
            await co.rerank(model="m", query=QUERY, documents=["plain text is not a page"])
        with pytest.raises(UnauthorizedError):
            await cohere.AsyncClientV2(api_key="wrong", base_url=keyed.url).rerank(model="m", query=QUERY, documents=["x"])
        return rs, bad.value

    rs, bad = asyncio.run(go())
    for r in rs:
        same([(x.index, x.relevance_score) for x in r.results], want)
    assert bad.status_code == 400 and bad.body["type"] == "InvalidDocumentError"


def test_langchain_cohere_rerank(keyed, images, want):
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document

    reranker = CohereRerank(model="rerank-v3.5", cohere_api_key=KEY, base_url=keyed.url, top_n=2)
    docs = [Document(page_content=data_url(b), metadata={"n": i}) for i, b in enumerate(images)]
    out = reranker.compress_documents(docs, QUERY)
    same([(d.metadata["n"], d.metadata["relevance_score"]) for d in out], want[:2])


def test_llama_index_cohere_rerank(keyed, images, want):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank

    post = CohereRerank(top_n=3, model="rerank-v3.5", api_key=KEY, base_url=keyed.url, max_retries=1)
    nodes = [NodeWithScore(node=TextNode(text=data_url(b), id_=f"n{i}")) for i, b in enumerate(images)]
    out = post.postprocess_nodes(nodes, QueryBundle(QUERY))
    same([(int(n.node.node_id[1:]), n.score) for n in out], want[:3])


def test_llama_index_jina_rerank(keyed, images, want):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    post = JinaRerank(top_n=4, api_key=KEY, base_url=keyed.url + "/v1")  # posts to {base_url}/rerank
    nodes = [NodeWithScore(node=TextNode(text=data_url(b), id_=f"n{i}")) for i, b in enumerate(images)]
    out = post.postprocess_nodes(nodes, QueryBundle(QUERY))
    same([(int(n.node.node_id[1:]), n.score) for n in out], want)


def test_jina_multimodal_objects_with_httpx(keyed, images, want):
    body = {"model": "jina-reranker-m0", "query": QUERY, "documents": [{"image": data_url(b)} for b in images],
            "top_n": 4, "return_documents": False}
    r = httpx.post(keyed.url + "/v1/rerank", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    same([(x["index"], x["relevance_score"]) for x in r.json()["results"]], want)


def test_httpx_async_concurrent_requests_queue_and_agree(keyed, images, want):
    """Many requests at once on one model thread: each gets the answer it would get alone."""
    async def go():
        async with httpx.AsyncClient(base_url=keyed.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
            bodies = [{"query": QUERY, "documents": [data_url(b) for b in images[: 2 + i % 3]]} for i in range(8)]
            return await asyncio.gather(*(c.post("/v1/rerank", json=b) for b in bodies))

    for i, r in enumerate(asyncio.run(go())):
        assert r.status_code == 200, r.text
        n = 2 + i % 3  # point-wise: each page's score does not depend on the others sent with it
        same([(x["index"], x["relevance_score"]) for x in r.json()["results"]], [w for w in want if w[0] < n])
