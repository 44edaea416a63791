"""The routes over a real uvicorn server, spoken to with httpx: results equal the in-process reranker, every way
of naming a document, every limit's error, the bearer key, /v1/search, health, readiness and metrics."""

from __future__ import annotations

import base64
import hashlib

import httpx
import pytest

from minirerank_core import testing as T
from minirerank_core.serve import BackgroundServer, Limits, create_app
from tests.serve.helpers import QUERY, data_url, in_process, png_bytes, sigmoid


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Pages the index has never seen (sent in the requests)."""
    return [png_bytes(T.random_page_image(150 + 10 * i, 200, seed=80 + i)) for i in range(3)]


def post(server, body, path="/v1/rerank", **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def check_error(r: httpx.Response, status: int, kind: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == kind
    for w in words:
        assert w in body["message"]
    return body


# --- results --------------------------------------------------------------------------------------------------
def test_rerank_equals_the_in_process_reranker_with_first_stage_maps(server, pipeline, images):
    r = post(server, {"query": QUERY, "documents": [data_url(b) for b in images], "model": "anything"})
    assert r.status_code == 200, r.text
    body = r.json()
    want = in_process(pipeline, QUERY, images)
    assert [x["index"] for x in body["results"]] == [i for i, _ in want]
    assert [x["score"] for x in body["results"]] == pytest.approx([s for _, s in want], abs=1e-4)
    assert [x["relevance_score"] for x in body["results"]] == pytest.approx([sigmoid(s) for _, s in want], abs=1e-5)
    assert all(0.0 <= x["relevance_score"] <= 1.0 for x in body["results"])
    assert "document" not in body["results"][0]
    # the maps really prune: every visual token gives other scores
    dense = dict(in_process(pipeline, QUERY, images, keep_ratio=1.0))
    assert [x["score"] for x in body["results"]] != pytest.approx([dense[x["index"]] for x in body["results"]], abs=1e-4)
    assert body["model"] == pipeline.reranker.name and body["id"]
    assert body["meta"]["billed_units"] == {"search_units": 1, "images": 3} and body["meta"]["api_version"]["version"]
    assert body["usage"]["total_tokens"] > 0


def test_every_way_of_naming_a_document_gives_the_same_score(server, pipeline, page_dir):
    raw = (page_dir / "page-1.png").read_bytes()
    page_id = pipeline.index.content_hashes()[hashlib.sha256(raw).hexdigest()]
    b64 = base64.b64encode(raw).decode()
    docs = [data_url(raw), b64, {"image": b64}, {"text": data_url(raw)}, "page-1.png", str(page_dir / "page-1.png"),
            page_id, {"text": page_id}, (page_dir / "page-1.png").as_uri()]
    r = post(server, {"query": QUERY, "documents": docs, "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == list(range(len(docs)))
    assert max(x["score"] for x in results) == pytest.approx(min(x["score"] for x in results), abs=1e-6)
    echoed = {x["index"]: x["document"] for x in results}
    assert echoed[0] == {"text": docs[0]} and echoed[2] == {"image": b64} and echoed[3] == {"text": docs[0]}


def test_top_n_duplicates_and_order(server, images):
    docs = [data_url(b) for b in images] + [data_url(images[1])]
    full = post(server, {"query": QUERY, "documents": docs}).json()["results"]
    scores = [x["score"] for x in full]
    assert scores == sorted(scores, reverse=True)
    by_index = {x["index"]: x["score"] for x in full}
    assert by_index[3] == by_index[1]  # the same image twice: scored once, both answered
    top = post(server, {"query": QUERY, "documents": docs, "top_n": 2}).json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in full[:2]]
    assert len(post(server, {"query": QUERY, "documents": docs, "top_n": 99}).json()["results"]) == 4


def test_the_cohere_v2_and_jina_paths_answer_alike(server, images):
    body = {"query": QUERY, "documents": [data_url(b) for b in images]}
    want = post(server, body).json()["results"]
    for path in ("/v2/rerank", "/rerank"):
        got = post(server, body, path=path).json()["results"]
        assert [x["index"] for x in got] == [x["index"] for x in want]
        assert [x["score"] for x in got] == pytest.approx([x["score"] for x in want], abs=1e-5)


# --- bad input: 4xx with the error's name, never a 500 -------------------------------------------------------
def test_documents_that_are_not_images(server, images, page_dir, tmp_path):
    ok = data_url(images[0])
    cases = [
        (["hello world"], 400, "InvalidDocumentError", "not an image"),
        ([{"text": "hello world"}], 400, "InvalidDocumentError", "documents[0].text"),
        ([{"image": ok, "text": "x"}], 400, "InvalidDocumentError", "exactly one"),
        (["https://example.com/page.png"], 400, "InvalidDocumentError", "never downloads"),
        (["data:text/plain;base64,aGVsbG8="], 400, "InvalidDocumentError", "data:image"),
        ([ok, "../outside.png"], 400, "PathOutsideRootError", "documents[1]"),
        ([str(tmp_path / "elsewhere.png")], 400, "PathOutsideRootError", "outside"),
        (["page-9.png"], 400, "InvalidDocumentError", "page-9.png"),
        ([base64.b64encode(images[0][:60]).decode()], 400, "InvalidImageError", "documents[0]"),  # truncated PNG
        ([], 400, "EmptyCandidatesError", "at least one"),
    ]
    (tmp_path / "elsewhere.png").write_bytes(images[0])
    (page_dir.parent / "outside.png").write_bytes(images[0])
    for docs, status, kind, word in cases:
        check_error(post(server, {"query": QUERY, "documents": docs}), status, kind, word)


def test_bad_queries_and_fields(server, images):
    docs = [data_url(images[0])]
    check_error(post(server, {"query": "   ", "documents": docs}), 400, "InvalidQueryError", "query")
    check_error(post(server, {"query": "revenue " * 3000, "documents": docs}), 400, "InvalidQueryError", "max_query_tokens")
    check_error(post(server, {"query": QUERY, "documents": docs, "top_n": 0}), 400, "ConfigError", "top_n")
    check_error(post(server, {"documents": docs}), 422, "RequestValidationError", "query")
    check_error(post(server, {"query": QUERY, "documents": [3]}), 422, "RequestValidationError")
    r = httpx.post(server.url + "/v1/rerank", content=b'{"query": ', headers={"content-type": "application/json"})
    check_error(r, 422, "RequestValidationError")
    check_error(httpx.get(server.url + "/v1/nothing-here"), 404, "HTTPError")
    check_error(httpx.get(server.url + "/v1/rerank"), 405, "HTTPError")


def test_each_limit_has_its_error(pipeline, images):
    import numpy as np
    from PIL import Image

    noise = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)))
    blank = png_bytes(Image.new("RGB", (400, 300), "white"))  # 120,000 pixels in a few hundred bytes
    limits = Limits(max_documents=2, max_image_bytes=10_000, max_image_pixels=100_000, max_request_bytes=60_000)
    assert len(noise) > limits.max_image_bytes and len(data_url(noise)) < limits.max_request_bytes
    with BackgroundServer(create_app(pipeline, limits=limits)) as s:
        one = data_url(images[0])
        check_error(post(s, {"query": QUERY, "documents": [one] * 3}), 400, "TooManyDocumentsError", "max_documents")
        check_error(post(s, {"query": QUERY, "documents": [data_url(noise)]}), 413, "ImageBytesError", "max_image_bytes")
        check_error(post(s, {"query": QUERY, "documents": [data_url(blank)]}), 413, "ImageTooLargeError",
                    "max_image_pixels")
        check_error(post(s, {"query": QUERY, "documents": ["x" * 70_000]}), 413, "RequestTooLargeError",
                    "max_request_bytes")
        chunked = httpx.post(s.url + "/v1/rerank", content=iter([b'{"query": "', b"x" * 70_000, b'"}']),
                             headers={"content-type": "application/json"})
        check_error(chunked, 413, "RequestTooLargeError")
        check_error(post(s, {"query": QUERY, "k": 3}, path="/v1/search"), 400, "TooManyDocumentsError", "k=3")
        assert post(s, {"query": QUERY, "documents": [one, one]}).status_code == 200  # at the limits: fine


def test_local_paths_need_a_root(pipeline, page_dir):
    with BackgroundServer(create_app(pipeline)) as s:  # no root
        check_error(post(s, {"query": QUERY, "documents": [str(page_dir / "page-0.png")]}), 400, "PathOutsideRootError",
                    "--root")


# --- key, search, health, readiness, metrics ------------------------------------------------------------------
def test_bearer_key(pipeline, images):
    with BackgroundServer(create_app(pipeline, api_key="s3cret")) as s:
        body = {"query": QUERY, "documents": [data_url(images[0])]}
        r = post(s, body)
        check_error(r, 401, "UnauthorizedError", "Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        check_error(post(s, body, headers={"Authorization": "Bearer wrong"}), 401, "UnauthorizedError")
        check_error(post(s, {"query": QUERY}, path="/v1/search"), 401, "UnauthorizedError")
        assert post(s, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/health", "/ready", "/metrics"):
            assert httpx.get(s.url + open_path).status_code == 200


def test_search_equals_the_pipeline(server, pipeline):
    r = post(server, {"query": QUERY, "k": 4, "top_n": 3}, path="/v1/search")
    assert r.status_code == 200, r.text
    body = r.json()
    want = pipeline.search(QUERY, k=4, top_n=3)
    assert [x["page_id"] for x in body["results"]] == [w.page_id for w in want]
    assert [x["rank"] for x in body["results"]] == [1, 2, 3]
    assert [x["first_stage_rank"] for x in body["results"]] == [w.first_stage_rank for w in want]
    assert [x["score"] for x in body["results"]] == pytest.approx([w.score for w in want], abs=1e-5)
    assert [x["relevance_score"] for x in body["results"]] == pytest.approx([w.probability for w in want], abs=1e-6)
    assert body["pages_in_index"] == 4 and body["reranked"] is True and body["index"] == str(pipeline.workspace)
    plain = post(server, {"query": QUERY, "k": 4, "top_n": None, "rerank": False}, path="/v1/search").json()
    assert [x["first_stage_rank"] for x in plain["results"]] == [1, 2, 3, 4]
    assert [x["score"] for x in plain["results"]] == [x["first_stage_score"] for x in plain["results"]]


def test_search_needs_an_index(pipeline):
    with BackgroundServer(create_app(pipeline.reranker, embedder=pipeline.embedder)) as s:
        check_error(post(s, {"query": QUERY}, path="/v1/search"), 400, "NoIndexError", "--index")
        assert httpx.get(s.url + "/ready").json()["index"] is None


def test_health_and_ready(server, pipeline):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["model"] == pipeline.reranker.name and ready["pages_in_index"] == 4


def test_metrics_in_prometheus_format(pipeline, images):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(s) -> dict:
        text = httpx.get(s.url + "/metrics").text
        return {(x.name, tuple(sorted(x.labels.items()))): x.value
                for fam in text_string_to_metric_families(text) for x in fam.samples}

    with BackgroundServer(create_app(pipeline)) as s:
        fresh = png_bytes(T.random_page_image(140, 210, seed=99))
        body = {"query": QUERY, "documents": [data_url(fresh), data_url(images[0])]}
        before = scrape(s)
        for _ in range(2):
            assert post(s, body).status_code == 200
        assert post(s, {"query": " ", "documents": ["x"]}).status_code == 400
        m = scrape(s)
    ok = ("minirerank_requests_total", (("method", "POST"), ("route", "/v1/rerank"), ("status", "200")))
    bad = ("minirerank_requests_total", (("method", "POST"), ("route", "/v1/rerank"), ("status", "400")))
    assert m[ok] == 2 and m[bad] == 1
    assert m[("minirerank_request_duration_seconds_count", (("route", "/v1/rerank"),))] == 3
    assert m[("minirerank_request_duration_seconds_bucket", (("le", "+Inf"), ("route", "/v1/rerank")))] == 3
    assert m[("minirerank_documents_total", ())] == 4
    hits = ("minirerank_page_cache_hits_total", ())
    assert m[hits] - before[hits] >= 2  # the second request found both pages' KV cached
    assert m[("minirerank_page_cache_memory_pages", ())] >= 1
    assert m[("minirerank_embedding_cache_hits_total", ())] >= 2
    assert m[("minirerank_requests_pending", ())] == 0
