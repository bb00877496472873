"""A small Python client for a running ``steer serve``: chat, attributes, NPCs and dialogue sessions.

    from steer.client import SteerClient

    with SteerClient("http://127.0.0.1:8000") as steer:
        session = steer.create_session("brom", seed=7, player_name="Ana")
        line = steer.say(session.id, "Can you fix my sword?", attributes={"humor": 1})
        print(line.content)

``AsyncSteerClient`` has the same methods as coroutines (and async iterators for streams).
Errors are ``SteerAPIError`` with the server's ``message``, ``type``, ``param`` and ``code``. A
full server (429) or one still loading its model (503 with ``Retry-After``) is retried with
backoff (tenacity), honouring ``Retry-After``, up to ``max_retries`` times.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from steer.core.errors import SteerError
from steer.npc import NpcProfile

DEFAULT_URL = "http://127.0.0.1:8000"


class SteerAPIError(SteerError):
    """An error answer from the server (or no answer at all: ``status`` 0)."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, retry_after: float | None = None):
        super().__init__(f"{status}: {message}" if status else message, param)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        # 503 only with Retry-After: without it the server needs a restart, waiting will not help.
        return self.status == 429 or (self.status == 503 and self.retry_after is not None)


def _error(response: httpx.Response) -> SteerAPIError:
    try:
        info = response.json()["error"]
        message, kind, param, code = info["message"], info.get("type"), info.get("param"), info.get("code")
    except (ValueError, KeyError, TypeError):
        message, kind, param, code = response.text[:500] or response.reason_phrase, None, None, None
    retry_after = response.headers.get("retry-after")
    try:
        retry_after = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry_after = None
    return SteerAPIError(response.status_code, message, kind, param, code, retry_after)


# --------------------------------------------------------------- results
def _build(cls, data: Mapping[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AttributeInfo:
    name: str
    min: int
    max: int
    default: int
    description: str = ""
    levels: list[str] | None = None  # the word for each value, min to max, when the schema has them


@dataclass
class ChatReply:
    content: str
    finish_reason: str | None
    attributes: dict[str, int]
    scores: dict[str, float] | None = None
    usage: dict[str, int] | None = None
    id: str = ""


@dataclass
class Session:
    id: str
    npc_id: str
    player_name: str | None = None
    seed: int | None = None
    turns: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    busy: bool = False


@dataclass
class NpcLine:
    """One stored message of a session; NPC replies also carry how they were made."""

    index: int
    role: str
    content: str
    created_at: float = 0.0
    attributes: dict[str, int] | None = None
    clamped: list[dict[str, Any]] | None = None
    safety: dict[str, Any] | None = None
    scores: dict[str, float] | None = None
    seed: int | None = None
    best_of: int | None = None
    finish_reason: str | None = None
    dropped_turns: int | None = None
    session_id: str | None = None
    npc_id: str | None = None

    @property
    def was_clamped(self) -> bool:
        return bool(self.clamped)

    @property
    def fell_back(self) -> bool:
        """The NPC said its profile's fallback line because every draw measured too toxic."""
        return bool(self.safety and self.safety.get("fallback"))


@dataclass
class History:
    session: Session
    messages: list[NpcLine] = field(default_factory=list)


def _chat_reply(data: Mapping[str, Any]) -> ChatReply:
    choice = data["choices"][0]
    return ChatReply(content=choice["message"]["content"], finish_reason=choice.get("finish_reason"),
                     attributes=data.get("attributes") or {}, scores=choice.get("scores"), usage=data.get("usage"),
                     id=data.get("id", ""))


def _history(data: Mapping[str, Any]) -> History:
    return History(session=_build(Session, data["session"]), messages=[_build(NpcLine, m) for m in data["data"]])


def _sse_data(line: str) -> dict[str, Any] | None:
    if not line.startswith("data: {"):
        return None  # blank separators and the final "data: [DONE]"
    return json.loads(line[len("data: "):])


def _chat_piece(event: Mapping[str, Any]) -> str | None:
    if "error" in event:
        raise SteerAPIError(200, event["error"].get("message", "generation failed"), event["error"].get("type"))
    choices = event.get("choices") or []
    return choices[0].get("delta", {}).get("content") if choices else None


def _npc_event(event: Mapping[str, Any]) -> str | NpcLine | None:
    kind = event.get("type")
    if kind == "delta":
        return event["content"]
    if kind == "message":
        return _build(NpcLine, event)
    if kind == "error":
        err = event.get("error", {})
        raise SteerAPIError(200, err.get("message", "generation failed"), err.get("type"), err.get("param"),
                            err.get("code"))
    return None


def _drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


class _Base:
    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, max_backoff: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_backoff = max_backoff

    def _wait(self, retry_state) -> float:
        error = retry_state.outcome.exception()
        if isinstance(error, SteerAPIError) and error.retry_after is not None:
            return min(error.retry_after, self.max_backoff)
        return wait_exponential_jitter(initial=0.25, max=self.max_backoff)(retry_state)

    def _retry_args(self) -> dict[str, Any]:
        return dict(retry=retry_if_exception(lambda e: isinstance(e, SteerAPIError) and e.retryable),
                    wait=self._wait, stop=stop_after_attempt(self.max_retries + 1), reraise=True)

    @staticmethod
    def _chat_body(messages, attributes, stream, **options) -> dict[str, Any]:
        return _drop_none({"messages": list(messages), "attributes": attributes, "stream": stream, **options})

    @staticmethod
    def _say_body(content, attributes, stream, best_of, max_tokens) -> dict[str, Any]:
        return _drop_none({"content": content, "attributes": attributes, "stream": stream, "best_of": best_of,
                           "max_tokens": max_tokens})


class SteerClient(_Base):
    """Blocking client; use as a context manager or call ``close()``."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, max_backoff: float = 10.0, transport: httpx.BaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, max_retries, max_backoff)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._http.close()

    # -------------------------------------------------------------- http
    def _request(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in Retrying(**self._retry_args()):
            with attempt:
                try:
                    response = self._http.request(method, path, json=body)
                except httpx.HTTPError as e:
                    raise SteerAPIError(0, f"cannot reach {self.base_url}: {e}") from e
                if response.status_code >= 400:
                    raise _error(response)
                return response.json()

    def _stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        for attempt in Retrying(**self._retry_args()):
            with attempt:
                try:
                    context = self._http.stream("POST", path, json=body)
                    response = context.__enter__()
                except httpx.HTTPError as e:
                    raise SteerAPIError(0, f"cannot reach {self.base_url}: {e}") from e
                if response.status_code >= 400:
                    response.read()
                    context.__exit__(None, None, None)
                    raise _error(response)
        try:
            for line in response.iter_lines():
                event = _sse_data(line)
                if event is not None:
                    yield event
        finally:
            context.__exit__(None, None, None)

    # -------------------------------------------------------------- chat
    def attributes(self) -> list[AttributeInfo]:
        return [_build(AttributeInfo, a) for a in self._request("GET", "/v1/attributes")["attributes"]]

    def chat(self, messages: Sequence[Mapping[str, str]], attributes: Mapping[str, int] | None = None,
             **options) -> ChatReply:
        """One chat completion; ``options`` are the API's (max_tokens, seed, temperature, score, ...)."""
        return _chat_reply(self._request("POST", "/v1/chat/completions",
                                         self._chat_body(messages, attributes, False, **options)))

    def chat_stream(self, messages: Sequence[Mapping[str, str]], attributes: Mapping[str, int] | None = None,
                    **options) -> Iterator[str]:
        """The reply's text, piece by piece as it is generated."""
        for event in self._stream("/v1/chat/completions", self._chat_body(messages, attributes, True, **options)):
            piece = _chat_piece(event)
            if piece:
                yield piece

    # -------------------------------------------------------------- NPCs
    def npcs(self) -> list[NpcProfile]:
        return [NpcProfile.model_validate(n) for n in self._request("GET", "/v1/npcs")["data"]]

    def npc(self, npc_id: str) -> NpcProfile:
        return NpcProfile.model_validate(self._request("GET", f"/v1/npcs/{npc_id}"))

    def create_npc(self, profile: NpcProfile | Mapping[str, Any]) -> NpcProfile:
        data = profile.model_dump() if isinstance(profile, NpcProfile) else dict(profile)
        return NpcProfile.model_validate(self._request("POST", "/v1/npcs", data))

    def update_npc(self, profile: NpcProfile | Mapping[str, Any]) -> NpcProfile:
        data = profile.model_dump() if isinstance(profile, NpcProfile) else dict(profile)
        return NpcProfile.model_validate(self._request("PUT", f"/v1/npcs/{data['id']}", data))

    def delete_npc(self, npc_id: str) -> None:
        self._request("DELETE", f"/v1/npcs/{npc_id}")

    # ---------------------------------------------------------- sessions
    def create_session(self, npc_id: str, seed: int | None = None, player_name: str | None = None) -> Session:
        body = _drop_none({"seed": seed, "player_name": player_name})
        return _build(Session, self._request("POST", f"/v1/npcs/{npc_id}/sessions", body))

    def session(self, session_id: str) -> Session:
        return _build(Session, self._request("GET", f"/v1/sessions/{session_id}"))

    def say(self, session_id: str, content: str, attributes: Mapping[str, int] | None = None,
            best_of: int | None = None, max_tokens: int | None = None) -> NpcLine:
        """The player's line in, the NPC's stored reply out."""
        body = self._say_body(content, attributes, False, best_of, max_tokens)
        return _build(NpcLine, self._request("POST", f"/v1/sessions/{session_id}/messages", body))

    def say_stream(self, session_id: str, content: str, attributes: Mapping[str, int] | None = None,
                   best_of: int | None = None, max_tokens: int | None = None) -> Iterator[str | NpcLine]:
        """Text pieces (``str``) as they are generated, then the stored reply (``NpcLine``)."""
        body = self._say_body(content, attributes, True, best_of, max_tokens)
        for event in self._stream(f"/v1/sessions/{session_id}/messages", body):
            item = _npc_event(event)
            if item is not None:
                yield item

    def history(self, session_id: str) -> History:
        return _history(self._request("GET", f"/v1/sessions/{session_id}/messages"))

    def end_session(self, session_id: str) -> None:
        self._request("DELETE", f"/v1/sessions/{session_id}")

    def export_session(self, session_id: str) -> dict[str, Any]:
        """The session as JSON-ready data, for a save game."""
        return self._request("GET", f"/v1/sessions/{session_id}/export")

    def import_session(self, data: Mapping[str, Any]) -> Session:
        """A new session holding an exported one's history (and seed)."""
        return _build(Session, self._request("POST", "/v1/sessions/import", dict(data)))


class AsyncSteerClient(_Base):
    """``SteerClient`` for asyncio: the same methods, awaited; streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, max_backoff: float = 10.0, transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(base_url, api_key, timeout, max_retries, max_backoff)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=timeout,
                                       transport=transport)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        async for attempt in AsyncRetrying(**self._retry_args()):
            with attempt:
                try:
                    response = await self._http.request(method, path, json=body)
                except httpx.HTTPError as e:
                    raise SteerAPIError(0, f"cannot reach {self.base_url}: {e}") from e
                if response.status_code >= 400:
                    raise _error(response)
                return response.json()

    async def _stream(self, path: str, body: Any) -> AsyncIterator[dict[str, Any]]:
        async for attempt in AsyncRetrying(**self._retry_args()):
            with attempt:
                try:
                    context = self._http.stream("POST", path, json=body)
                    response = await context.__aenter__()
                except httpx.HTTPError as e:
                    raise SteerAPIError(0, f"cannot reach {self.base_url}: {e}") from e
                if response.status_code >= 400:
                    await response.aread()
                    await context.__aexit__(None, None, None)
                    raise _error(response)
        try:
            async for line in response.aiter_lines():
                event = _sse_data(line)
                if event is not None:
                    yield event
        finally:
            await context.__aexit__(None, None, None)

    async def attributes(self) -> list[AttributeInfo]:
        return [_build(AttributeInfo, a) for a in (await self._request("GET", "/v1/attributes"))["attributes"]]

    async def chat(self, messages, attributes=None, **options) -> ChatReply:
        return _chat_reply(await self._request("POST", "/v1/chat/completions",
                                               self._chat_body(messages, attributes, False, **options)))

    async def chat_stream(self, messages, attributes=None, **options) -> AsyncIterator[str]:
        async for event in self._stream("/v1/chat/completions", self._chat_body(messages, attributes, True, **options)):
            piece = _chat_piece(event)
            if piece:
                yield piece

    async def npcs(self) -> list[NpcProfile]:
        return [NpcProfile.model_validate(n) for n in (await self._request("GET", "/v1/npcs"))["data"]]

    async def npc(self, npc_id: str) -> NpcProfile:
        return NpcProfile.model_validate(await self._request("GET", f"/v1/npcs/{npc_id}"))

    async def create_npc(self, profile) -> NpcProfile:
        data = profile.model_dump() if isinstance(profile, NpcProfile) else dict(profile)
        return NpcProfile.model_validate(await self._request("POST", "/v1/npcs", data))

    async def update_npc(self, profile) -> NpcProfile:
        data = profile.model_dump() if isinstance(profile, NpcProfile) else dict(profile)
        return NpcProfile.model_validate(await self._request("PUT", f"/v1/npcs/{data['id']}", data))

    async def delete_npc(self, npc_id: str) -> None:
        await self._request("DELETE", f"/v1/npcs/{npc_id}")

    async def create_session(self, npc_id: str, seed: int | None = None, player_name: str | None = None) -> Session:
        body = _drop_none({"seed": seed, "player_name": player_name})
        return _build(Session, await self._request("POST", f"/v1/npcs/{npc_id}/sessions", body))

    async def session(self, session_id: str) -> Session:
        return _build(Session, await self._request("GET", f"/v1/sessions/{session_id}"))

    async def say(self, session_id: str, content: str, attributes=None, best_of=None, max_tokens=None) -> NpcLine:
        body = self._say_body(content, attributes, False, best_of, max_tokens)
        return _build(NpcLine, await self._request("POST", f"/v1/sessions/{session_id}/messages", body))

    async def say_stream(self, session_id: str, content: str, attributes=None, best_of=None,
                         max_tokens=None) -> AsyncIterator[str | NpcLine]:
        body = self._say_body(content, attributes, True, best_of, max_tokens)
        async for event in self._stream(f"/v1/sessions/{session_id}/messages", body):
            item = _npc_event(event)
            if item is not None:
                yield item

    async def history(self, session_id: str) -> History:
        return _history(await self._request("GET", f"/v1/sessions/{session_id}/messages"))

    async def end_session(self, session_id: str) -> None:
        await self._request("DELETE", f"/v1/sessions/{session_id}")

    async def export_session(self, session_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/sessions/{session_id}/export")

    async def import_session(self, data: Mapping[str, Any]) -> Session:
        return _build(Session, await self._request("POST", "/v1/sessions/import", dict(data)))
