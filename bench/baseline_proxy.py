"""The baseline: the original slime router's design, for side-by-side numbers.

Written the way THUDM/slime's ``slime/router/router.py`` + ``middleware/radix_tree_middleware.py`` were:
- a FastAPI app with a catch-all ``/{path:path}`` route that forwards to a worker chosen by least count,
  through one ``httpx.AsyncClient`` (``timeout=None``, a connection limit), copying the request headers;
- the reply read whole, ``json.loads``-ed and re-sent as a ``JSONResponse`` with the worker's headers;
- a Starlette ``BaseHTTPMiddleware`` on every request that, for ``/generate``, parses the request JSON,
  calls the route, and materializes the (streaming-wrapped) response again to inspect it. The radix tree
  itself is left out (this is the pass-through shape); ``--tokenize`` adds the original per-request
  tokenization of the whole prompt (the pre-cache cost).

It runs on uvicorn with its default settings (the original called ``uvicorn.run(app, ...)``), which pick
uvloop and httptools when installed, as here.

    python -m bench.baseline_proxy --port 18100 --worker-url http://127.0.0.1:18001 --worker-url http://127.0.0.1:18002
"""

from __future__ import annotations

import argparse
import json

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "proxy-authenticate",
              "proxy-authorization", "te", "trailers", "upgrade"}


def _filter_headers(headers):
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def _materialize_response(resp):
    body = b""
    async for chunk in resp.body_iterator:
        body += chunk
    ct = resp.headers.get("content-type", "")
    headers = _filter_headers(resp.headers)
    if "application/json" in ct:
        try:
            data = json.loads(body.decode("utf-8"))
            return JSONResponse(content=data, status_code=resp.status_code, headers=headers)
        except Exception:
            pass
    return Response(content=body, status_code=resp.status_code, headers=headers, media_type=resp.media_type)


class GenerateMiddleware(BaseHTTPMiddleware):
    """The original RadixTreeMiddleware's request/response handling, without the tree."""

    def __init__(self, app, *, router):
        super().__init__(app)
        self.router = router

    async def dispatch(self, request: Request, call_next):
        if request.url.path != "/generate":
            return await call_next(request)
        request_json = await request.json()
        tokenizer = self.router.tokenizer
        if tokenizer is not None and isinstance(request_json.get("text"), str):
            request_json["input_tokens"] = tokenizer(request_json["text"], add_special_tokens=False)["input_ids"]
        request._json = request_json
        response = await call_next(request)
        if response.__class__.__name__ == "_StreamingResponse":
            response = await _materialize_response(response)
        return response


class BaselineRouter:
    def __init__(self, worker_urls: list[str], concurrency: int = 512, tokenizer=None):
        self.app = FastAPI()
        self.worker_urls: dict[str, int] = {u.rstrip("/"): 0 for u in worker_urls}
        self.tokenizer = tokenizer
        self.client = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency), timeout=httpx.Timeout(None))
        self.app.post("/add_worker")(self.add_worker)
        self.app.get("/list_workers")(self.list_workers)
        self.app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])(self.proxy)
        self.app.add_middleware(GenerateMiddleware, router=self)

    async def proxy(self, request: Request, path: str):
        worker_url = self._use_url()
        url = f"{worker_url}/{path}"
        body = await request.body()
        headers = dict(request.headers)
        try:
            response = await self.client.request(request.method, url, content=body, headers=headers)
            content = await response.aread()
            content_type = response.headers.get("content-type", "")
            try:
                data = json.loads(content)
                return JSONResponse(content=data, status_code=response.status_code, headers=dict(response.headers))
            except Exception:
                return Response(content=content, status_code=response.status_code, headers=dict(response.headers),
                                media_type=content_type or None)
        finally:
            self._finish_url(worker_url)

    async def add_worker(self, request: Request):
        worker_url = request.query_params.get("url") or request.query_params.get("worker_url")
        if not worker_url:
            body = await request.body()
            payload = json.loads(body) if body else {}
            worker_url = payload.get("url") or payload.get("worker_url")
        if not worker_url:
            return JSONResponse(status_code=400, content={"error": "worker_url is required"})
        self.worker_urls.setdefault(worker_url, 0)
        return {"status": "success", "worker_urls": self.worker_urls}

    async def list_workers(self, request: Request):
        return {"urls": list(self.worker_urls.keys())}

    def _use_url(self):
        assert len(self.worker_urls) > 0, "No workers available"
        url = min(self.worker_urls, key=self.worker_urls.get)
        self.worker_urls[url] += 1
        return url

    def _finish_url(self, url):
        self.worker_urls[url] -= 1


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Baseline proxy in the original slime router's design.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--worker-url", action="append", default=[])
    ap.add_argument("--concurrency", type=int, default=512, help="httpx max_connections")
    ap.add_argument("--tokenize", action="store_true",
                    help="tokenize every text prompt whole (builtin Qwen3 tokenizer), as the original did per turn")
    a = ap.parse_args(argv)
    tok = None
    if a.tokenize:
        from slime_router_core.tokenizers import BUILTIN_CHECKPOINT, load_tokenizer

        tok = load_tokenizer(BUILTIN_CHECKPOINT)
    router = BaselineRouter(a.worker_url, a.concurrency, tok)
    uvicorn.run(router.app, host=a.host, port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
