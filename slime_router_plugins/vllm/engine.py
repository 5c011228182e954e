"""The vLLM engine: SGLang's /generate (the router's wire format) to vLLM's token-in/token-out HTTP API and back.

vLLM's surface (its source, 2026 releases; the fields used here are listed in ``docs/engines.md``):

- ``POST /inference/v1/generate``: ``{request_id, token_ids, sampling_params, stream}`` -> ``choices[0].token_ids``,
  chat-shaped logprobs ``{"content": [{"token": "token_id:<id>", "logprob"}]}``, ``finish_reason`` "stop" | "length";
  no text, no stop reason, no weight version; ``n > 1`` refused; streamed as deltas.
- ``POST /v1/completions`` with ``prompt`` = ids (or text), ``return_token_ids`` (``choices[].token_ids``,
  ``prompt_token_ids``), ``logprobs`` + ``return_tokens_as_token_ids``, ``stop_reason``; ``n`` and batches allowed.

Which one a generation uses: ``/inference/v1/generate`` for one prompt, one sample, when the worker has it and the
router has a tokenizer (the reply's text is decoded from its ids; a text prompt is encoded); ``/v1/completions``
otherwise (a batch, ``n > 1``, an older server, no tokenizer).

The reply comes back as SGLang's: ``text``, ``output_ids``, ``meta_info`` with ``id``, ``finish_reason``
(``{"type": "stop", "matched": <id or stop string>}`` / ``{"type": "length", "length": n}`` / abort),
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``output_token_logprobs`` ``[[logprob, id, None]]``
and ``weight_version``. vLLM does not stamp replies with the weights that produced them: the version is the one
the router knew for the worker when it sent the request (read from ``GET /weight_info`` when the worker was
added, updated by every ``/update_weight_version`` the router forwards). A weight update that lands while a
request runs is not seen; pausing (``/pause`` drains the router, ``/pause_generation`` pauses the workers) before
updating weights closes that window.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from slime_router_core import HTTPError
from slime_router_core.contracts import TOKENIZER, EngineCall
from slime_router_core.sse import DONE, END, EventSplitter, encode_event, parse_event

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import AsyncIterator

    from slime_router_core.router import Router
    from slime_router_core.workers import Worker

GENERATE = "/inference/v1/generate"
COMPLETIONS = "/v1/completions"
SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default; vLLM's would be 16
# SGLang sampling params -> vLLM SamplingParams (same meaning); anything else is refused (400), not dropped
SAMPLING = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
            "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "frequency_penalty": "frequency_penalty",
            "presence_penalty": "presence_penalty", "repetition_penalty": "repetition_penalty", "stop": "stop",
            "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos", "n": "n",
            "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "include_stop_str_in_output",
            "spaces_between_special_tokens": "spaces_between_special_tokens", "sampling_seed": "seed"}
# /generate fields this adapter carries over (the rest are SGLang features vLLM's API has no field for)
FIELDS = frozenset({"text", "input_ids", "sampling_params", "stream", "return_logprob", "top_logprobs_num", "rid",
                    "return_text_in_logprobs", "cache_salt", "extra_key", "priority", "logprob_start_len"})


@dataclass
class Call:
    """What a reply needs to be read back: the request as sent, the prompts, the version known at dispatch."""

    mode: str  # GENERATE or COMPLETIONS
    rid: str
    prompts: list[list[int] | str]
    n: int
    batch: bool  # the client sent a list of prompts (or n > 1): the answer is a list
    want_logprobs: bool
    top: int  # top_logprobs_num asked for
    stops: list[str]
    stop_ids: set[int]
    trim_stop: bool
    version: str
    started: float = field(default_factory=time.perf_counter)


class VLLMEngine:
    """``contracts.Engine`` for vLLM workers (registered by the vllm plugin)."""

    name = "vllm"

    def __init__(self, router: Router) -> None:
        self.router = router

    # --- which workers --------------------------------------------------------------------------------

    def detect(self, paths: frozenset[str]) -> bool:
        return GENERATE in paths or (COMPLETIONS in paths and "/weight_info" in paths)

    async def attach(self, worker: Worker, router: Any) -> None:
        """Read what the worker offers (is ``/inference/v1/generate`` there?) and its weight version."""
        session = router.session
        paths: frozenset[str] = frozenset()
        async with session.get(worker.url + "/openapi.json") as resp:
            if resp.status == 200:
                doc = orjson.loads(await resp.read())
                paths = frozenset(doc.get("paths") or ()) if isinstance(doc, dict) else frozenset()
        version = "default"
        async with session.get(worker.url + "/weight_info") as resp:
            if resp.status == 200:
                info = orjson.loads(await resp.read())
                if isinstance(info, dict) and info.get("weight_version") is not None:
                    version = str(info["weight_version"])
        worker.state["vllm"] = {"generate_endpoint": GENERATE in paths, "weight_version": version}

    def unsupported(self, body: dict[str, Any]) -> str | None:
        extra = [k for k in body if k not in FIELDS]
        if extra:
            return f"the /generate field(s) {sorted(extra)} have no vLLM equivalent"
        sps = body.get("sampling_params")
        for sp in sps if isinstance(sps, list) else [sps or {}]:
            if isinstance(sp, dict):
                bad = [k for k in sp if k not in SAMPLING]
                if bad:
                    return f"the sampling parameter(s) {sorted(bad)} have no vLLM equivalent"
        if body.get("logprob_start_len") not in (None, -1):
            return "input logprobs (logprob_start_len) are not returned by vLLM's token API"
        return None

    # --- generations ------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.router.registry.find(TOKENIZER)

    def call(self, worker: Worker, body: dict[str, Any], stream: bool) -> EngineCall:
        why = self.unsupported(body)
        if why is not None:
            raise HTTPError(400, f"This request cannot go to vLLM worker {worker.url}: {why}.",
                            type="invalid_request_error")
        state = worker.state.get("vllm") or {}
        text, ids = body.get("text"), body.get("input_ids")
        prompts: list[list[int] | str]
        if isinstance(ids, list) and ids and all(type(t) is int for t in ids):
            prompts, batch = [ids], False
        elif isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            prompts, batch = list(ids), True
        elif isinstance(text, str):
            prompts, batch = [text], False
        elif isinstance(text, list):
            prompts, batch = list(text), True
        else:
            raise HTTPError(400, "A vLLM worker needs 'text' or 'input_ids'.", param="text")
        sps = body.get("sampling_params") or {}
        if isinstance(sps, list):  # per-prompt params: vLLM takes one set per request
            if any(sp != sps[0] for sp in sps):
                raise HTTPError(400, "Per-prompt sampling_params differ: a vLLM worker takes one set per batch.",
                                param="sampling_params")
            sps = sps[0] if sps else {}
        sp = {SAMPLING[k]: v for k, v in sps.items()}
        sp.setdefault("max_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)
        n = int(sp.get("n", 1) or 1)
        want = bool(body.get("return_logprob"))
        top = int(body.get("top_logprobs_num") or 0)
        rid = str(body.get("rid") or uuid.uuid4().hex)
        stops = sps.get("stop") or []
        c = Call(mode=GENERATE, rid=rid, prompts=prompts, n=n, batch=batch or n > 1, want_logprobs=want, top=top,
                 stops=[stops] if isinstance(stops, str) else list(stops),
                 stop_ids=set(sps.get("stop_token_ids") or []), trim_stop=not sps.get("no_stop_trim"),
                 version=str(state.get("weight_version", "default")))
        tok = self.tokenizer
        if state.get("generate_endpoint") and tok is not None and not batch and n == 1:
            first = prompts[0]
            token_ids = first if isinstance(first, list) else list(tok.encode(first))
            c.prompts = [token_ids]
            gen_sp = dict(sp)
            if want or top:
                gen_sp["logprobs"] = top
            payload: dict[str, Any] = {"request_id": rid, "token_ids": token_ids, "sampling_params": gen_sp}
            if body.get("cache_salt") is not None:
                payload["cache_salt"] = body["cache_salt"]
            if stream:
                payload["stream"] = True
            return EngineCall(GENERATE, orjson.dumps(payload), c)
        c.mode = COMPLETIONS
        payload = {"prompt": prompts if batch else prompts[0], "request_id": rid, "return_token_ids": True,
                   "return_tokens_as_token_ids": True, **sp}
        if want or top:
            payload["logprobs"] = max(top, 0)
        if stream:
            payload["stream"] = True
        return EngineCall(COMPLETIONS, orjson.dumps(payload), c)

    def _finish(self, c: Call, reason: Any, stop_reason: Any, ids: list[int], text: str) -> tuple[Any, str]:
        """SGLang's finish_reason for vLLM's, and the text with a matched stop string cut (as SGLang does)."""
        if reason == "length":
            return {"type": "length", "length": len(ids)}, text
        if reason == "stop":
            if stop_reason is not None:
                return {"type": "stop", "matched": stop_reason}, text
            tok = self.tokenizer
            eos = getattr(tok, "eos_token_id", None) if tok is not None else None
            if ids and (ids[-1] in c.stop_ids or ids[-1] == eos or c.mode == COMPLETIONS):
                return {"type": "stop", "matched": ids[-1]}, text
            for s in c.stops:  # /inference/v1/generate: the text decoded here still holds the stop string
                at = text.find(s)
                if at >= 0:
                    return {"type": "stop", "matched": s}, (text[:at] if c.trim_stop else text[:at + len(s)])
            return {"type": "stop", "matched": None}, text
        if reason is None:
            return None, text
        return {"type": "abort", "message": f"vLLM finish_reason {reason!r}"}, text

    def _sglang(self, c: Call, index: int, prompt_len: int, ids: list[int], lps: list[float | None], text: str,
                reason: Any, stop_reason: Any, cached: int, tops: list[list[list[Any]]] | None = None
                ) -> dict[str, Any]:
        fr, text = self._finish(c, reason, stop_reason, ids, text)
        meta: dict[str, Any] = {"id": c.rid if not c.batch else f"{c.rid}-{index}", "finish_reason": fr,
                                "prompt_tokens": prompt_len, "completion_tokens": len(ids), "cached_tokens": cached,
                                "weight_version": c.version, "e2e_latency": time.perf_counter() - c.started}
        if c.want_logprobs:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, ids)]
        if c.top and tops is not None:
            meta["output_top_logprobs"] = tops
        out: dict[str, Any] = {"text": text, "output_ids": ids, "meta_info": meta}
        if c.batch:
            out["index"] = index
        return out

    def _decode(self, ids: list[int]) -> str:
        tok = self.tokenizer
        return tok.decode(ids, skip_special_tokens=True) if tok is not None else ""

    def reply(self, worker: Worker, call: EngineCall, data: bytes) -> bytes:
        c: Call = call.state
        obj = orjson.loads(data)
        usage = obj.get("usage") or {}
        cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0) if isinstance(usage, dict) \
            else 0
        out = []
        for ch in sorted(obj["choices"], key=lambda x: x["index"]):
            i = int(ch["index"])
            ids = _completion_ids(ch)
            lps, tops = _logprobs(ch.get("logprobs"), len(ids))
            if c.mode == GENERATE:
                text, prompt_len, stop_reason = self._decode(ids), len(c.prompts[0]), None
            else:
                text, stop_reason = ch.get("text") or "", ch.get("stop_reason")
                prompt_len = len(ch.get("prompt_token_ids") or [])
            out.append(self._sglang(c, i, prompt_len, ids, lps, text, ch.get("finish_reason"), stop_reason,
                                    int(cached), tops))
        return orjson.dumps(out if c.batch else out[0])

    async def stream(self, worker: Worker, call: EngineCall, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """vLLM's delta chunks -> SGLang's cumulative ones (text, output_ids and logprobs so far), then [DONE]
        only if vLLM sent its own (a stream cut short stays cut short)."""
        c: Call = call.state
        splitter = EventSplitter()
        acc: dict[int, dict[str, Any]] = {}
        async for data in chunks:
            out: list[bytes] = []
            for event in splitter.feed(data):
                obj = parse_event(event)
                if obj is END:
                    out.append(DONE)
                    continue
                if not isinstance(obj, dict):
                    continue
                if "error" in obj:  # an error event: passed on as is (the router's chunk check ends the stream)
                    out.append(encode_event(obj))
                    continue
                for ch in obj.get("choices") or ():
                    i = int(ch.get("index", 0))
                    a = acc.setdefault(i, {"ids": [], "lps": [], "tops": [], "text": "", "prompt": 0})
                    new = _completion_ids(ch)  # the delta (both APIs stream token_ids deltas)
                    lps, tops = _logprobs(ch.get("logprobs"), len(new))
                    a["lps"] += lps
                    a["tops"] += tops
                    if c.mode == GENERATE:
                        a["prompt"] = len(c.prompts[0])
                    else:
                        a["text"] += ch.get("text") or ""
                        if ch.get("prompt_token_ids"):
                            a["prompt"] = len(ch["prompt_token_ids"])
                    a["ids"] += new
                    text = self._decode(a["ids"]) if c.mode == GENERATE else a["text"]
                    out.append(encode_event(self._sglang(c, i, a["prompt"], list(a["ids"]), list(a["lps"]), text,
                                                         ch.get("finish_reason"), ch.get("stop_reason"), 0,
                                                         list(a["tops"]))))
            if out:
                yield b"".join(out)

    # --- operations ---------------------------------------------------------------------------------------

    def operation(self, worker: Worker, method: str, path: str, body: Any) -> tuple[str, str, Any] | None:
        b = body if isinstance(body, dict) else {}
        if path == "/abort_request":
            rid = b.get("rid")
            return "POST", "/abort_requests", ({} if b.get("abort_all") or not rid else {"request_ids": [rid]})
        if path == "/pause_generation":
            mode = {"abort": "abort", "in_place": "keep", "retract": "keep"}.get(str(b.get("mode") or "abort"),
                                                                                 "abort")
            return "POST", f"/pause?mode={mode}", None
        if path == "/continue_generation":
            return "POST", "/resume", None
        if path == "/update_weight_version":
            return "POST", path, body
        if path == "/flush_cache":
            return "POST", "/reset_prefix_cache", None
        if path in ("/get_model_info", "/model_info"):
            return "GET", "/v1/models", None
        if path in ("/health", "/health_generate"):
            return "GET", "/health", None
        return None

    def operation_done(self, worker: Worker, path: str, body: Any, status: int, answer: Any) -> tuple[int, Any]:
        if path == "/update_weight_version" and isinstance(answer, dict) and answer.get("success") is not False:
            version = answer.get("new_version") or (body or {}).get("new_version")
            if version is not None:
                worker.state.setdefault("vllm", {})["weight_version"] = str(version)
        if path == "/flush_cache":
            return status, {"success": True, "message": "vLLM prefix cache reset (/reset_prefix_cache)"}
        if path in ("/get_model_info", "/model_info") and isinstance(answer, dict):
            data = answer.get("data") or [{}]
            return status, {"model_path": data[0].get("id"), "is_generation": True, "engine": "vllm"}
        return status, answer


def _token_id(token: Any) -> int:
    if isinstance(token, str) and token.startswith("token_id:"):
        return int(token[len("token_id:"):])
    raise ValueError(f"a vLLM logprob entry without a token id ({token!r}); the router asks for "
                     f"return_tokens_as_token_ids")


def _logprobs(lp: Any, n: int) -> tuple[list[float | None], list[list[list[Any]]]]:
    """One logprob per token (None where there is none) and SGLang's ``output_top_logprobs`` (per token, the
    alternatives as ``[logprob, id, None]``), from either shape vLLM answers: the chat shape of
    ``/inference/v1/generate`` (``{"content": [{"logprob", "top_logprobs": [{"token", "logprob"}]}]}``) or the
    completion shape (``{"token_logprobs": [...], "top_logprobs": [{"token_id:<id>": logprob}]}``)."""
    if not isinstance(lp, dict):
        return [None] * n, []
    content = lp.get("content")
    if content is not None:
        return ([e.get("logprob") for e in content],
                [[[t.get("logprob"), _token_id(t.get("token")), None] for t in e.get("top_logprobs") or ()]
                 for e in content])
    values = lp.get("token_logprobs")
    tops = [[[v, _token_id(k), None] for k, v in (alts or {}).items()] for alts in lp.get("top_logprobs") or ()]
    return (list(values) if values else [None] * n), tops


def _completion_ids(ch: dict[str, Any]) -> list[int]:
    """A completion choice's generated ids: ``token_ids`` (return_token_ids), else the ``token_id:<id>`` strings of
    its logprobs (return_tokens_as_token_ids, for servers older than return_token_ids)."""
    ids = ch.get("token_ids")
    if ids is not None:
        return [int(t) for t in ids]
    tokens = ((ch.get("logprobs") or {}).get("tokens")) or []
    out = []
    for t in tokens:
        if not (isinstance(t, str) and t.startswith("token_id:")):
            raise ValueError(f"a vLLM completion without token ids (token {t!r}); vLLM >= 0.10.2 returns them with "
                             f"return_token_ids")
        out.append(int(t[len("token_id:"):]))
    return out
