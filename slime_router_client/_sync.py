"""The blocking client: ``Client`` and its ``Session`` handles."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from . import _core
from .errors import SessionFinished, SessionNotFound, SlimeRouterError
from .types import SessionData, Trajectory

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletion

__all__ = ["Client", "Session", "GenerateStream"]


class Client:
    """A blocking client of one slime-router.

    ``base_url``: the router (e.g. ``"http://127.0.0.1:30000"``); ``api_key``: the router's ``--api-key``, sent as
    ``Authorization: Bearer <key>``; ``timeout``: seconds per request (None: no limit; generations can be long,
    hence the 600 s default, 10 s to connect); ``headers``: sent with every request. One connection pool is kept:
    use it as a context manager or call ``close()``. Safe to share between threads (``httpx.Client`` is).
    """

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = _core.DEFAULT_TIMEOUT,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = _core.timeout_of(timeout)
        self.headers = _core.headers_of(api_key, headers)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    # --- plumbing -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, session: bool = False,
                 params: Mapping[str, Any] | None = None) -> Any:
        content = None if body is None else _core.dumps(body)
        r = self._http.request(method, path, content=content, params=params,
                               headers=_core.JSON_HEADERS if content is not None else None)
        return _core.loads(r, session=session)

    def _stream(self, path: str, body: Any) -> GenerateStream:
        request = self._http.build_request("POST", path, content=_core.dumps(body), headers=_core.JSON_HEADERS)
        response = self._http.send(request, stream=True)
        if response.status_code >= 400:  # refused before it began: raise now, not at the first next()
            try:
                response.read()
            finally:
                response.close()
            _core.check(response, session=True)
        return GenerateStream(response)

    # --- sessions -------------------------------------------------------------------------------

    def session(self, session_id: str | None = None, metadata: Mapping[str, Any] | None = None, *,
                finish_on_exit: bool = False) -> Session:
        """Open a session (``POST /sessions``): a new id when ``session_id`` is None, else that id (an open one is
        reused, its metadata merged). ``finish_on_exit``: when used as a context manager, finish the session (free
        it on the router, its trajectories dropped) on leaving the block; by default it is left open for the
        trainer to retrieve. Raises ``SessionFinished``/``SessionNotFound`` for an id that was finished/expired."""
        d = self._request("POST", "/sessions", _core.open_body(session_id, metadata), session=True)
        return Session(self, d["session_id"], metadata=d.get("metadata") or {}, opened=d.get("opened"),
                       finish_on_exit=finish_on_exit)

    def get_session(self, session_id: str, *, finish_on_exit: bool = False) -> Session:
        """A handle on an existing session (no request is made: an unknown id raises ``SessionNotFound`` on first
        use). Requests sent through it (``generate``, ``chat``...) open it on the router if it is not open."""
        return Session(self, session_id, finish_on_exit=finish_on_exit)

    def list_sessions(self) -> dict[str, Any]:
        """``GET /sessions``: ``{"sessions": [summary, ...], "stats": {...}}`` (open sessions and the store's
        counters)."""
        result: dict[str, Any] = self._request("GET", "/sessions")
        return result

    def retrieve_batch(self, session_ids: Iterable[str], finish: bool = False, numpy: bool = False,
                       format: _core.BatchFormat = "columnar") -> dict[str, SessionData | SlimeRouterError]:
        """Many sessions in one request (``POST /retrieve_batch``): id -> ``SessionData``, or the error of an id
        the router could not answer (a ``SessionNotFound``/``SessionFinished``/``SlimeRouterError`` instance,
        returned, not raised), in the order asked (duplicate ids asked once). ``finish``: finish each session
        read (hand over and free). ``format``: ``"columnar"`` (flat arrays, decoded with
        ``slime_router_plugins.sessions.columnar``; the default) or ``"jsonl"`` (a JSON line per session); both
        give equal data. ``numpy``: token fields as numpy arrays (from columnar: read-only views)."""
        ids, body = _core.batch_body(session_ids, finish, format)
        r = self._http.post("/retrieve_batch", content=_core.dumps(body), headers=_core.JSON_HEADERS)
        _core.check(r)
        return _core.batch_result(ids, _core.batch_items(r.content, format, numpy), numpy)

    def retrieve_text(self, text: str, strict: bool = False) -> dict[str, Any]:
        """``POST /retrieve_from_text``: the recorded tokens, loss mask, rollout logprobs and weight versions of a
        trajectory text (``strict``: refuse text that was not recorded instead of tokenizing it afresh)."""
        body: dict[str, Any] = {"text": text}
        if strict:
            body["strict"] = True
        result: dict[str, Any] = self._request("POST", "/retrieve_from_text", body)
        return result

    def retrieve_messages(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """``POST /retrieve_from_messages``: the same for a chat conversation; ``kw``: ``tools``,
        ``chat_template_kwargs``, ``strict``, ``history_mode``, ``return_text``."""
        result: dict[str, Any] = self._request("POST", "/retrieve_from_messages", {"messages": messages, **kw})
        return result


class GenerateStream(Iterator[dict[str, Any]]):
    """The chunks of a streamed ``/generate`` (``Session.generate(..., stream=True)``), as SGLang sends them.

    An iterator that closes the connection when it is exhausted, on ``close()``, when used as a context manager
    and leaves the block, or when garbage-collected. Closing it before the end aborts the generation. An error
    event of the router in the middle of the stream raises ``SlimeRouterError`` (status 502).
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.iter_lines()
        self._closed = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise StopIteration
        try:
            for line in self._lines:
                event = _core.sse_event(line)
                if _core.is_done(event):
                    break
                if event is not None:
                    return event
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Close the connection (aborting the generation if it has not ended)."""
        if not self._closed:
            self._closed = True
            self.response.close()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover -- interpreter shutdown
            pass


class Session:
    """A handle on one router session: everything sent through it (``generate``, ``chat``, the OpenAI client of
    ``openai()``) is recorded into the session, whose exact trajectories ``trajectories()``/``finish()`` return.

    ``id``; ``base_url``: the absolute URL of the session's scoped prefix (``{router}/sessions/{id}``: give
    ``base_url + "/v1"`` to any OpenAI-compatible agent); ``metadata``: as the router answered when the session
    was opened (not kept up to date: ``data().metadata`` is); ``opened``: True when ``Client.session`` opened it,
    False when it was open already, None for ``Client.get_session``. A context manager: ``finish()`` on exit
    only when ``finish_on_exit`` (then errors of an already finished session are ignored).
    """

    def __init__(self, client: Client, session_id: str, *, metadata: Mapping[str, Any] | None = None,
                 opened: bool | None = None, finish_on_exit: bool = False) -> None:
        self.client = client
        self.id = session_id
        self.base_url = client.base_url + _core.session_path(session_id)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.opened = opened
        self.finish_on_exit = finish_on_exit

    def __repr__(self) -> str:
        return f"Session({self.id!r}, base_url={self.base_url!r})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.finish_on_exit:
            return
        try:
            self.finish()
        except (SessionFinished, SessionNotFound):
            pass  # finished in the block already, or expired: nothing left to free
        except Exception:
            if exc is None:
                raise  # do not hide the block's own exception behind a failed clean-up

    # --- generation -----------------------------------------------------------------------------

    @overload
    def generate(self, text: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None, *,
                 stream: Literal[True], **extra: Any) -> GenerateStream: ...

    @overload
    def generate(self, text: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                 stream: bool = False, **extra: Any) -> Any: ...

    def generate(self, text: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                 stream: bool = False, **extra: Any) -> Any:
        """SGLang ``/generate`` in this session: give ``text`` or ``input_ids`` (a list of them for a batch),
        ``sampling_params`` (``max_new_tokens``, ``temperature``, ``n``...); ``extra`` fields go into the body as
        they are (``return_logprob``, ``rid``...).

        Returns the worker's reply: ``{"text", "output_ids", "meta_info"}``, or a list of them for a batch or
        ``n > 1``. With ``stream=True`` it returns a ``GenerateStream``: an iterator of the stream's chunks (dicts
        as SGLang sends them; the last one carries ``meta_info.finish_reason``), not the merged reply; the request
        is sent before this returns (an error answer raises here), an error event mid-stream raises
        ``SlimeRouterError`` (502) from the iterator. The session records a streamed generation once the stream
        ends; one left unfinished (the stream closed early) is aborted and not recorded.
        """
        body = _core.generate_body(text, input_ids, sampling_params, stream, extra)
        path = _core.session_path(self.id, "/generate")
        if stream:
            return self.client._stream(path, body)
        return self.client._request("POST", path, body, session=True)

    def chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
             **params: Any) -> ChatCompletion:
        """OpenAI chat completion (``/v1/chat/completions``) in this session: ``params`` are the body's other
        fields (``max_tokens``, ``temperature``, ``model``...; no ``stream``: use ``openai()`` to stream). Returns
        ``openai.types.chat.ChatCompletion`` when the ``openai`` package is installed, else the JSON dict."""
        body = _core.chat_body(messages, tools, params)
        data = self.client._request("POST", _core.session_path(self.id, "/v1/chat/completions"), body,
                                    session=True)
        reply: ChatCompletion = _core.chat_reply(data)
        return reply

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        """An ``openai.OpenAI`` client whose base URL is this session's ``/v1``: every call it makes (by an agent
        framework too) is recorded in the session. The client's API key, timeout and headers are passed on;
        ``max_retries`` defaults to 0 (a retried generation that reached the worker would be recorded twice, as a
        branch); ``kwargs`` override any of these."""
        from openai import OpenAI

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", self.client.timeout)
        headers = {k: v for k, v in self.client.headers.items() if k.lower() != "authorization"}
        if headers:
            kwargs.setdefault("default_headers", headers)
        kwargs.setdefault("api_key", self.client.api_key or "none")  # the SDK insists on a key
        return OpenAI(base_url=self.base_url + "/v1", **kwargs)

    # --- metadata and trajectories --------------------------------------------------------------

    def set_metadata(self, **kv: Any) -> dict[str, Any]:
        """Merge ``kv`` into the session's metadata (``PATCH /sessions/{id}``; e.g. ``reward=1.0``); returns the
        merged metadata."""
        d = self.client._request("PATCH", _core.session_path(self.id), {"metadata": kv}, session=True)
        self.metadata = dict(d.get("metadata") or {})
        return self.metadata

    def data(self, numpy: bool = False) -> SessionData:
        """``GET /sessions/{id}``: the session's metadata, counters, gaps and trajectories."""
        d = self.client._request("GET", _core.session_path(self.id), session=True)
        return SessionData.from_json(d, numpy=numpy)

    def trajectories(self, numpy: bool = False) -> list[Trajectory]:
        """The session's trajectories (``GET /sessions/{id}``), with numpy arrays when ``numpy``."""
        return self.data(numpy).trajectories

    def finish_data(self, numpy: bool = False) -> SessionData:
        """Finish the session (``DELETE /sessions/{id}``): its data one last time, then the router frees it; any
        later use of the id raises ``SessionFinished``."""
        d = self.client._request("DELETE", _core.session_path(self.id), session=True)
        return SessionData.from_json(d, numpy=numpy)

    def finish(self, numpy: bool = False) -> list[Trajectory]:
        """Finish the session and return its trajectories (``finish_data`` has the metadata and gaps too)."""
        return self.finish_data(numpy).trajectories
