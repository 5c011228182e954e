"""The asyncio client: ``AsyncClient`` and its ``AsyncSession`` handles (the methods of ``Client``/``Session``,
awaitable)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import httpx

from . import _core
from .errors import SessionFinished, SessionNotFound, SlimeRouterError
from .types import SessionData, Trajectory

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletion

__all__ = ["AsyncClient", "AsyncSession", "AsyncGenerateStream"]


class AsyncClient:
    """An asyncio client of one slime-router: ``Client``'s methods, awaitable (``get_session`` and
    ``AsyncSession.openai`` make no request and are plain methods). Use it as an async context manager or call
    ``aclose()``."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout | None = _core.DEFAULT_TIMEOUT,
                 headers: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = _core.timeout_of(timeout)
        self.headers = _core.headers_of(api_key, headers)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self.headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.base_url!r})"

    # --- plumbing -------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: Any = None, *, session: bool = False,
                       params: Mapping[str, Any] | None = None) -> Any:
        content = None if body is None else _core.dumps(body)
        r = await self._http.request(method, path, content=content, params=params,
                                     headers=_core.JSON_HEADERS if content is not None else None)
        return _core.loads(r, session=session)

    async def _stream(self, path: str, body: Any) -> AsyncGenerateStream:
        request = self._http.build_request("POST", path, content=_core.dumps(body), headers=_core.JSON_HEADERS)
        response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            try:
                await response.aread()
            finally:
                await response.aclose()
            _core.check(response, session=True)
        return AsyncGenerateStream(response)

    # --- sessions -------------------------------------------------------------------------------

    def session(self, session_id: str | None = None, metadata: Mapping[str, Any] | None = None, *,
                finish_on_exit: bool = False) -> SessionOpener:
        """Open a session (``POST /sessions``), as ``Client.session``. Await it (``s = await client.session()``)
        or use it as an async context manager (``async with client.session() as s:``; on exit the session is
        finished only when ``finish_on_exit``)."""

        async def open_() -> AsyncSession:
            d = await self._request("POST", "/sessions", _core.open_body(session_id, metadata), session=True)
            return AsyncSession(self, d["session_id"], metadata=d.get("metadata") or {}, opened=d.get("opened"),
                                finish_on_exit=finish_on_exit)

        return SessionOpener(open_)

    def get_session(self, session_id: str, *, finish_on_exit: bool = False) -> AsyncSession:
        """A handle on an existing session (no request is made), as ``Client.get_session``."""
        return AsyncSession(self, session_id, finish_on_exit=finish_on_exit)

    async def list_sessions(self) -> dict[str, Any]:
        """``GET /sessions``, as ``Client.list_sessions``."""
        result: dict[str, Any] = await self._request("GET", "/sessions")
        return result

    async def retrieve_batch(self, session_ids: Iterable[str], finish: bool = False, numpy: bool = False,
                             format: _core.BatchFormat = "columnar") -> dict[str, SessionData | SlimeRouterError]:
        """Many sessions in one request (``POST /retrieve_batch``), as ``Client.retrieve_batch``."""
        ids, body = _core.batch_body(session_ids, finish, format)
        r = await self._http.post("/retrieve_batch", content=_core.dumps(body), headers=_core.JSON_HEADERS)
        _core.check(r)
        return _core.batch_result(ids, _core.batch_items(r.content, format, numpy), numpy)

    async def retrieve_text(self, text: str, strict: bool = False) -> dict[str, Any]:
        """``POST /retrieve_from_text``, as ``Client.retrieve_text``."""
        body: dict[str, Any] = {"text": text}
        if strict:
            body["strict"] = True
        result: dict[str, Any] = await self._request("POST", "/retrieve_from_text", body)
        return result

    async def retrieve_messages(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """``POST /retrieve_from_messages``, as ``Client.retrieve_messages``."""
        result: dict[str, Any] = await self._request("POST", "/retrieve_from_messages", {"messages": messages, **kw})
        return result


class SessionOpener(Awaitable["AsyncSession"]):
    """What ``AsyncClient.session()`` returns: await it for the ``AsyncSession``, or use it as an async context
    manager (``async with client.session() as s:``). The session is opened at the await / on entering."""

    def __init__(self, open_: Callable[[], Awaitable[AsyncSession]]) -> None:
        self._open = open_
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._open()
        return await self._session.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.__aexit__(exc_type, exc, tb)


class AsyncGenerateStream(AsyncIterator[dict[str, Any]]):
    """The chunks of a streamed ``/generate`` (``AsyncSession.generate(..., stream=True)``): an async iterator
    that closes the connection when exhausted, on ``aclose()`` or when used as an async context manager and left
    (closing it before the end aborts the generation). Mid-stream error events raise ``SlimeRouterError``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self._closed = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        try:
            async for line in self._lines:
                event = _core.sse_event(line)
                if _core.is_done(event):
                    break
                if event is not None:
                    return event
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Close the connection (aborting the generation if it has not ended)."""
        if not self._closed:
            self._closed = True
            await self.response.aclose()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class AsyncSession:
    """``Session`` for ``AsyncClient``: the same attributes and methods, awaitable (``openai()`` returns an
    ``openai.AsyncOpenAI``). An async context manager: ``finish()`` on exit only when ``finish_on_exit``."""

    def __init__(self, client: AsyncClient, session_id: str, *, metadata: Mapping[str, Any] | None = None,
                 opened: bool | None = None, finish_on_exit: bool = False) -> None:
        self.client = client
        self.id = session_id
        self.base_url = client.base_url + _core.session_path(session_id)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.opened = opened
        self.finish_on_exit = finish_on_exit

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, base_url={self.base_url!r})"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self.finish_on_exit:
            return
        try:
            await self.finish()
        except (SessionFinished, SessionNotFound):
            pass
        except Exception:
            if exc is None:
                raise

    @overload
    async def generate(self, text: str | list[str] | None = None,
                       input_ids: list[int] | list[list[int]] | None = None,
                       sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None, *,
                       stream: Literal[True], **extra: Any) -> AsyncGenerateStream: ...

    @overload
    async def generate(self, text: str | list[str] | None = None,
                       input_ids: list[int] | list[list[int]] | None = None,
                       sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                       stream: bool = False, **extra: Any) -> Any: ...

    async def generate(self, text: str | list[str] | None = None,
                       input_ids: list[int] | list[list[int]] | None = None,
                       sampling_params: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
                       stream: bool = False, **extra: Any) -> Any:
        """SGLang ``/generate`` in this session, as ``Session.generate``; with ``stream=True`` the awaited result
        is an ``AsyncGenerateStream`` (``async for chunk in await s.generate(..., stream=True)``)."""
        body = _core.generate_body(text, input_ids, sampling_params, stream, extra)
        path = _core.session_path(self.id, "/generate")
        if stream:
            return await self.client._stream(path, body)
        return await self.client._request("POST", path, body, session=True)

    async def chat(self, messages: list[dict[str, Any]], tools: list[Any] | None = None,
                   **params: Any) -> ChatCompletion:
        """OpenAI chat completion in this session, as ``Session.chat``."""
        body = _core.chat_body(messages, tools, params)
        data = await self.client._request("POST", _core.session_path(self.id, "/v1/chat/completions"), body,
                                          session=True)
        reply: ChatCompletion = _core.chat_reply(data)
        return reply

    def openai(self, **kwargs: Any) -> openai.AsyncOpenAI:
        """An ``openai.AsyncOpenAI`` client whose base URL is this session's ``/v1`` (as ``Session.openai``)."""
        from openai import AsyncOpenAI

        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", self.client.timeout)
        headers = {k: v for k, v in self.client.headers.items() if k.lower() != "authorization"}
        if headers:
            kwargs.setdefault("default_headers", headers)
        kwargs.setdefault("api_key", self.client.api_key or "none")
        return AsyncOpenAI(base_url=self.base_url + "/v1", **kwargs)

    async def set_metadata(self, **kv: Any) -> dict[str, Any]:
        """Merge ``kv`` into the session's metadata (``PATCH``); returns the merged metadata."""
        d = await self.client._request("PATCH", _core.session_path(self.id), {"metadata": kv}, session=True)
        self.metadata = dict(d.get("metadata") or {})
        return self.metadata

    async def data(self, numpy: bool = False) -> SessionData:
        """``GET /sessions/{id}``: metadata, counters, gaps and trajectories."""
        d = await self.client._request("GET", _core.session_path(self.id), session=True)
        return SessionData.from_json(d, numpy=numpy)

    async def trajectories(self, numpy: bool = False) -> list[Trajectory]:
        """The session's trajectories."""
        return (await self.data(numpy)).trajectories

    async def finish_data(self, numpy: bool = False) -> SessionData:
        """Finish the session (``DELETE``): its data one last time, then freed."""
        d = await self.client._request("DELETE", _core.session_path(self.id), session=True)
        return SessionData.from_json(d, numpy=numpy)

    async def finish(self, numpy: bool = False) -> list[Trajectory]:
        """Finish the session and return its trajectories."""
        return (await self.finish_data(numpy)).trajectories
