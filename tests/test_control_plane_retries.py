"""Issue 13, defect 3: one mechanism for choosing and retrying workers.

The forwarded control-plane endpoints (``/get_model_info``, ``/get_server_info``, ``/v1/models``...) go
through the router's select-and-retry loop like ``/generate``: ``select_worker`` hooks, in-flight
accounting, ``upstream_failed`` for every failed attempt, ``should_retry`` and ``--max-attempts``.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from slime_router_core import hookimpl
from slime_router_testing import ServerThread, free_port

CORE_ONLY: list[str] = []


class FirstChoice:
    """Selects the workers in a fixed order (the first untried one wins); records the failure hooks."""

    def __init__(self, order: list[str], retry: Any = None) -> None:
        self.order = order
        self.retry = retry  # what should_retry answers (None: no opinion, the core decides)
        self.failed: list[tuple[str, int | None, str | None]] = []
        self.asked: list[tuple[str, int | None, int]] = []

    @hookimpl
    def select_worker(self, ctx, workers):
        by_url = {w.url: w for w in workers}
        return next((by_url[u] for u in self.order if u in by_url), None)

    @hookimpl
    def upstream_failed(self, ctx, worker, status, error):
        self.failed.append((worker.url, status, type(error).__name__ if error is not None else None))

    @hookimpl
    def should_retry(self, ctx, worker, status, error, attempt):
        self.asked.append((worker.url, status, attempt))
        return self.retry


async def _answer_503(scope: dict, receive: Any, send: Any) -> None:
    """A worker whose control endpoints fail (e.g. still loading)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = orjson.dumps({"error": {"message": "model still loading"}})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
def failing_worker():
    with ServerThread(_answer_503) as server:
        yield server


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def _workers(r: ServerThread) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(r.url + "/list_workers").json()["workers"]}


def test_should_retry_false_makes_forwarding_give_up_after_the_first_failure(router, mock_worker):
    good, dead = mock_worker(), _dead_url()
    policy = FirstChoice([dead, good.url], retry=False)
    r = router(plugins=CORE_ONLY, worker_urls=[dead, good.url], extra=[("first_choice", policy)])
    resp = httpx.get(r.url + "/get_model_info")
    assert resp.status_code == 502, resp.text
    assert "unreachable" in resp.json()["error"]["message"]
    assert policy.asked == [(dead, None, 1)]  # asked once, answered False: no second attempt
    assert [(u, s) for u, s, _ in policy.failed] == [(dead, None)]
    workers = _workers(r)
    assert workers[good.url]["requests"] == 0  # never tried
    assert all(w["in_flight"] == 0 for w in workers.values())


def test_max_attempts_1_is_honoured_by_get_model_info_against_a_failing_worker(router, mock_worker):
    good, dead = mock_worker(), _dead_url()
    policy = FirstChoice([dead, good.url])
    r = router(plugins=CORE_ONLY, worker_urls=[dead, good.url], max_attempts=1, extra=[("first_choice", policy)])
    resp = httpx.get(r.url + "/get_model_info")
    assert resp.status_code == 502, resp.text
    assert policy.asked == []  # no attempt left: should_retry is not even asked
    assert [u for u, _, _ in policy.failed] == [dead]
    assert _workers(r)[good.url]["requests"] == 0


def test_connection_errors_are_retried_on_another_worker_by_default(router, mock_worker):
    good, dead = mock_worker(), _dead_url()
    policy = FirstChoice([dead, good.url])
    r = router(plugins=CORE_ONLY, worker_urls=[dead, good.url], extra=[("first_choice", policy)])
    resp = httpx.get(r.url + "/get_model_info")
    assert resp.status_code == 200 and resp.json()["model_path"]
    assert policy.asked == [(dead, None, 1)]
    assert [(u, s) for u, s, _ in policy.failed] == [(dead, None)]
    workers = _workers(r)
    assert workers[dead]["failures"] == 1 and workers[good.url]["requests"] == 1
    assert all(w["in_flight"] == 0 for w in workers.values())


def test_control_plane_5xx_calls_upstream_failed_and_should_retry_decides(router, mock_worker, failing_worker):
    good = mock_worker()
    retrying = FirstChoice([failing_worker.url, good.url], retry=True)
    r = router(plugins=CORE_ONLY, worker_urls=[failing_worker.url, good.url], extra=[("first_choice", retrying)])
    resp = httpx.get(r.url + "/get_server_info")
    assert resp.status_code == 200, resp.text
    assert retrying.failed == [(failing_worker.url, 503, None)]
    assert retrying.asked == [(failing_worker.url, 503, 1)]
    assert all(w["in_flight"] == 0 for w in _workers(r).values())


def test_a_control_plane_error_answer_not_retried_is_passed_through(router, mock_worker, failing_worker):
    good = mock_worker()
    policy = FirstChoice([failing_worker.url, good.url])  # no opinion: the core does not retry a 5xx answer
    r = router(plugins=CORE_ONLY, worker_urls=[failing_worker.url, good.url], extra=[("first_choice", policy)])
    resp = httpx.get(r.url + "/get_model_info")
    assert resp.status_code == 503
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {"error": {"message": "model still loading"}}  # the worker's own body
    assert policy.failed == [(failing_worker.url, 503, None)]
    assert _workers(r)[good.url]["requests"] == 0


def test_no_workers_left_reports_the_last_failure(router):
    dead1, dead2 = _dead_url(), _dead_url()
    r = router(plugins=CORE_ONLY, worker_urls=[dead1, dead2])
    resp = httpx.get(r.url + "/v1/models")
    assert resp.status_code == 502 and "unreachable" in resp.json()["error"]["message"]
    workers = _workers(r)
    assert {w["failures"] for w in workers.values()} == {1}
    assert all(w["in_flight"] == 0 for w in workers.values())
