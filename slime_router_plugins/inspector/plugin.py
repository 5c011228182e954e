"""inspector plugin: the trajectory inspector, a page that renders what the trainer will get, token by token.

Routes only (no request-path hook); all data-plane (behind ``--api-key`` when it is set: the page asks for the key
and sends it as ``Authorization: Bearer``):

- ``GET /inspector``: the page (``static/index.html``); ``GET /inspector/static/{name}``: its script and style.
- ``GET /inspector/sessions``: every open session's summary with its trajectories' structure (reason, parent,
  diverges_at, lengths, the weight versions it holds, turns' groups): what the page's list and filters need without
  downloading every token.
- ``POST /inspector/tokens`` ``{"ids": [...]}``: the text of each token (the registered ``TOKENIZER``), so the page
  shows every token as text.

The token data itself comes from the existing routes: ``GET /sessions/{sid}``, ``POST /retrieve_from_text``,
``POST /retrieve_from_messages``, and the cache's audit counters from ``GET /radix_tree/stats``.

Stands down (unregisters itself: no route) when no trajectory cache is registered, as the sessions plugin does.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from slime_router_core import HTTPError, hookimpl
from slime_router_core.access import declare_open_paths
from slime_router_core.contracts import SESSIONS, TOKENIZER, TRAJECTORY_CACHE, Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from slime_router_core.registry import ComponentRegistry
    from slime_router_core.router import Router

log = logging.getLogger("slime_router.inspector")

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"inspector.js": "text/javascript; charset=utf-8", "inspector.css": "text/css; charset=utf-8"}
MAX_IDS = 1_000_000
REPLACEMENT = "\ufffd"


@hookimpl(trylast=True)  # after the plugin that registers the trajectory cache
def register_components(registry: ComponentRegistry, router: Router) -> None:
    if not registry.has(TRAJECTORY_CACHE) or not registry.has(TOKENIZER):
        log.info("inspector: off (no trajectory cache is registered; load the radix_tree plugin and pass "
                 "--hf-checkpoint to inspect trajectories)")
        router.plugins.pm.unregister(sys.modules[__name__])  # stand down: no route
        return


class TokenTexts:
    """Each token id's text, memoized per tokenizer: decoded alone; a token that is part of a multi-byte
    character (decodes to U+FFFD alone) shows its vocabulary form (e.g. ``<0xE4>`` / byte-level ``ä¸``)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.size = len(tokenizer)
        self.known: dict[int, str] = {}

    def texts(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self.known})
        if missing:
            tok = self.tokenizer
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None and hasattr(backend, "decode_batch"):
                decoded = backend.decode_batch([[i] for i in missing], skip_special_tokens=False)
            else:
                decoded = [tok.decode([i], skip_special_tokens=False) for i in missing]
            raw = None
            for i, text in zip(missing, decoded):
                if REPLACEMENT in text:
                    raw = raw or dict(zip(missing, tok.convert_ids_to_tokens(missing)))
                    text = str(raw.get(i) or text)
                self.known[i] = text
        return [self.known[i] for i in ids]


class TokenIds(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[StrictInt] = Field(max_length=MAX_IDS, description="Token ids")


class TokenStrings(BaseModel):
    texts: list[str] = Field(description="The text of each token, in order")


@hookimpl
def register_routes(app: FastAPI, router: Router) -> None:
    tokenizer = router.registry.find(TOKENIZER)
    if tokenizer is None:  # pragma: no cover - register_components stood down
        return
    texts = TokenTexts(tokenizer)
    # the page and its files hold no data: a browser loads them without a key (it cannot send one on a page load);
    # what the page fetches (sessions, token texts, retrievals) stays behind the data key
    declare_open_paths("/inspector")
    declare_open_paths("/inspector/static/", prefix=True)

    @app.get("/inspector", response_class=FileResponse, include_in_schema=False)
    async def inspector_page() -> FileResponse:
        """The trajectory inspector (a page: open it in a browser)."""
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/inspector/static/{name}", response_class=FileResponse, include_in_schema=False)
    async def inspector_static(name: str) -> FileResponse:
        """The page's script and style."""
        if name not in FILES:
            raise HTTPError(404, f"No inspector file {name[:100]!r}: {', '.join(sorted(FILES))}")
        return FileResponse(STATIC / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/inspector/sessions")
    async def inspector_sessions(limit: int = Query(500, ge=1, le=100_000)) -> dict[str, Any]:
        """The ``limit`` most recent open sessions (as ``GET /sessions``) with their trajectories' structure:
        reason, parent, diverges_at, lengths, the weight versions they hold and their turns' groups (for the page's
        list and filters), and the store's counters."""
        store = router.registry.find(SESSIONS)
        if store is None:
            return {"sessions": [], "stats": None, "shown": 0}
        items = store.overview(limit)
        return {"sessions": items, "stats": store.stats(), "shown": len(items)}

    @app.post("/inspector/tokens", response_class=Response, responses={200: {"model": TokenStrings}})
    async def inspector_tokens(body: TokenIds) -> Response:
        """The text of each token id (decoded alone with the router's tokenizer; a piece of a multi-byte
        character: its vocabulary form), for the page to show every token as text."""
        bad = next((i for i in body.ids if not 0 <= i < texts.size), None)
        if bad is not None:
            raise HTTPError(400, f"Token id {bad} is not in the vocabulary (0..{texts.size - 1}).", param="ids")
        return Response(orjson.dumps({"texts": texts.texts(body.ids)}), media_type="application/json")
