"""A small HTTP client for the steer server's ``/v1`` API, as the chat UI uses it.

The UI never formats prompts or loads models: everything it shows comes through here, over
HTTP, from the same endpoints any OpenAI-compatible client calls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

# The schema rarely changes while a server runs, but a restarted server may serve another policy:
# re-read it after this many seconds so a page reload picks the new one up.
SCHEMA_TTL_S = 30.0


class ServerError(SteerError):
    """The server refused a request or could not be reached; the message is shown to the user."""

    def __init__(self, message: str, status: int | None = None, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    min: int
    max: int
    default: int
    description: str = ""
    levels: tuple[str, ...] = ()  # the word for each value, min to max, when the server's schema has them


@dataclass(frozen=True)
class ServerSchema:
    """What ``GET /v1/attributes`` says: the steerable attributes and what an APM can measure."""

    name: str
    attributes: tuple[AttributeSpec, ...]
    score_attributes: tuple[AttributeSpec, ...] | None  # None: the server has no APM

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    @property
    def can_score(self) -> bool:
        return bool(self.score_attributes)

    def get(self, name: str) -> AttributeSpec | None:
        return next((a for a in self.attributes if a.name == name), None)


@dataclass
class ChatResult:
    """The end of one streamed reply."""

    text: str = ""
    finish_reason: str | None = None
    attributes: dict[str, int] = field(default_factory=dict)  # as the server applied them
    scores: dict[str, float] | None = None  # as the server's APM measured the reply
    usage: dict[str, int] | None = None
    model: str | None = None
    candidates: int | None = None  # best_of: how many replies the server drew to pick this one


def _specs(items: Sequence[Mapping[str, Any]]) -> tuple[AttributeSpec, ...]:
    return tuple(
        AttributeSpec(
            name=str(a["name"]),
            min=int(a["min"]),
            max=int(a["max"]),
            default=int(a["default"]),
            description=str(a.get("description") or ""),
            levels=tuple(str(w) for w in a.get("levels") or ()),
        )
        for a in items
    )


def _error_message(response: httpx.Response) -> tuple[str, str | None]:
    """The server's ``{"error": {"message", "param"}}`` body, or the raw text when it is not JSON."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return (response.text.strip()[:300] or response.reason_phrase), None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), error.get("param")
    if isinstance(body, dict) and body.get("detail"):
        return str(body["detail"]), None
    return str(body)[:300], None


class SteerClient:
    """Talks to one steer server. Thread-safe: Gradio runs handlers in worker threads."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        # Generous read timeout: a long reply on a CPU may take minutes, but a dead server
        # should be reported quickly, hence the short connect timeout.
        self.timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._schema: ServerSchema | None = None
        self._schema_at = 0.0
        self._lock = threading.Lock()

    def _headers(self, api_key: str | None) -> dict[str, str]:
        key = api_key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _get(self, path: str, api_key: str | None = None) -> Any:
        url = f"{self.base_url}{path}"
        try:
            response = httpx.get(url, headers=self._headers(api_key), timeout=self.timeout)
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach the steer server at {self.base_url}: {e}") from None
        if response.status_code != 200:
            message, param = _error_message(response)
            raise ServerError(f"{path}: HTTP {response.status_code}: {message}", response.status_code, param)
        return response.json()

    def schema(self, api_key: str | None = None, refresh: bool = False) -> ServerSchema:
        with self._lock:
            fresh = self._schema is not None and time.monotonic() - self._schema_at < SCHEMA_TTL_S
            if fresh and not refresh:
                return self._schema
        data = self._get("/v1/attributes", api_key)
        try:
            scores = data.get("score_attributes")
            schema = ServerSchema(
                name=str(data.get("schema_name") or ""),
                attributes=_specs(data["attributes"]),
                score_attributes=_specs(scores) if scores else None,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ServerError(f"/v1/attributes returned an unexpected body ({e!r})") from None
        with self._lock:
            self._schema, self._schema_at = schema, time.monotonic()
        return schema

    def model_name(self, api_key: str | None = None) -> str | None:
        data = self._get("/v1/models", api_key).get("data") or []
        return data[0].get("id") if data else None

    def stream_chat(
        self,
        messages: list[dict[str, str]],
        attributes: Mapping[str, int],
        temperature: float | None = None,
        max_tokens: int | None = None,
        seed: int | None = None,
        score: bool = False,
        api_key: str | None = None,
        best_of: int | None = None,
    ) -> Iterator[str | ChatResult]:
        """Yield the reply's text pieces as they arrive, then one ``ChatResult``.

        Closing the iterator early (the UI's Stop button) closes the HTTP stream, which tells
        the server to stop generating.
        """
        body: dict[str, Any] = {"messages": messages, "attributes": dict(attributes), "stream": True}
        if temperature is not None:
            body["temperature"] = float(temperature)
        if max_tokens is not None:
            body["max_tokens"] = int(max_tokens)
        if seed is not None:
            body["seed"] = int(seed)
        if score:
            body["score"] = True
        if best_of is not None and int(best_of) > 1:
            body["best_of"] = int(best_of)
        result = ChatResult()
        url = f"{self.base_url}/v1/chat/completions"
        try:
            with httpx.stream("POST", url, json=body, headers=self._headers(api_key), timeout=self.timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    message, param = _error_message(resp)
                    raise ServerError(message, resp.status_code, param)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, "event:" lines
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error after the stream started
                        raise ServerError(_chunk_error(chunk))
                    if chunk.get("attributes"):
                        result.attributes = {k: int(v) for k, v in chunk["attributes"].items()}
                    if chunk.get("usage"):
                        result.usage = chunk["usage"]
                    result.model = chunk.get("model") or result.model
                    for choice in chunk.get("choices") or []:
                        if choice.get("index", 0) != 0:
                            continue
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            result.text += piece
                            yield piece
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
                        if choice.get("scores"):
                            result.scores = {k: float(v) for k, v in choice["scores"].items()}
                        if choice.get("candidates"):
                            result.candidates = int(choice["candidates"])
        except httpx.HTTPError as e:
            raise ServerError(f"lost the connection to the steer server at {self.base_url}: {e}") from None
        yield result


def _chunk_error(chunk: Mapping[str, Any]) -> str:
    error = chunk["error"]
    return str(error.get("message") if isinstance(error, dict) else error)
