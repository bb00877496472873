"""The one conversation type every loader produces and every stage consumes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from steer.core.errors import SteerError

ROLES = ("system", "user", "assistant")


class ConversationError(SteerError, ValueError):
    """A conversation that cannot be rendered: bad role, order or content."""


@dataclass
class Message:
    role: str
    content: str
    # Assistant turns only: attribute values on the schema's scale. An attribute that raters
    # did not label is absent (never guessed), so consumers can mask it.
    labels: dict[str, int] = field(default_factory=dict)
    # Unrounded values on the same scale when the source has finer resolution than integers
    # (OpenAssistant averages several raters); regression targets use these when present.
    scores: dict[str, float] = field(default_factory=dict)
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.scores:
            out["scores"] = dict(self.scores)
        if self.id is not None:
            out["id"] = self.id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        return cls(
            role=data["role"],
            content=data["content"],
            labels=present(data.get("labels")),
            scores={k: float(v) for k, v in present(data.get("scores")).items()},
            id=data.get("id"),
        )


@dataclass
class Conversation:
    messages: list[Message]
    id: str = ""
    # Conversations that share a group (an OpenAssistant tree, a HelpSteer prompt) must land
    # in the same split, or evaluation leaks.
    group: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    def assistant_indices(self) -> list[int]:
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "source": self.source,
            "messages": [m.to_dict() for m in self.messages],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Conversation:
        """Also reads rows from Parquet files: nested columns arrive as lists and structs (a struct
        field a row lacks is None), and files written before those columns were nested hold JSON text."""
        messages = _maybe_json(data["messages"])
        if not isinstance(messages, list):
            raise ConversationError(f"'messages' must be a list of messages, got {type(messages).__name__}", "messages")
        meta = _maybe_json(data.get("meta"))
        return cls(
            messages=[Message.from_dict(m) for m in messages],
            id=str(data.get("id") or ""),
            group=str(data.get("group") or data.get("id") or ""),
            source=str(data.get("source") or ""),
            meta={k: v for k, v in meta.items() if v is not None} if isinstance(meta, Mapping) else {},
        )


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def present(values: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A label/score mapping without its missing entries. Parquet stores a mapping as a struct
    with one field per key seen anywhere in the file, so a key a row lacks reads back as None."""
    values = _maybe_json(values)
    if not values:
        return {}
    if not isinstance(values, Mapping):
        raise ConversationError(f"labels must be a mapping of attribute to value, got {type(values).__name__}", "labels")
    return {k: v for k, v in values.items() if v is not None}


def as_messages(messages: Sequence[Message | Mapping[str, Any]]) -> list[Message]:
    """Accept OpenAI-style dicts or Message objects."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise ConversationError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if "role" not in m or "content" not in m:
            raise ConversationError(f"messages[{i}] needs 'role' and 'content'", f"messages[{i}]")
        out.append(Message(role=m["role"], content=m["content"], labels=present(m.get("labels"))))
    return out


def validate_messages(messages: Sequence[Message], *, for_generation: bool) -> None:
    """Optional system first, then user/assistant alternating, starting with user.

    For generation the last turn must be the user's (the model answers it); for training
    it must be the assistant's (there is something to learn).
    """
    if not messages:
        raise ConversationError("messages must not be empty", "messages")
    start = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ConversationError(
                f"messages[{i}].role {m.role!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
        if not isinstance(m.content, str):
            raise ConversationError(f"messages[{i}].content must be a string", f"messages[{i}].content")
    if messages[0].role == "system":
        start = 1
    turns = messages[start:]
    if not turns:
        raise ConversationError("messages hold only a system prompt; add a user message", "messages")
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m.role != expected:
            where = f"messages[{start + j}].role"
            if m.role == "system":
                raise ConversationError(f"{where}: a system message may only come first", where)
            raise ConversationError(f"{where}: expected {expected!r} (turns alternate user/assistant), got {m.role!r}", where)
    last = turns[-1].role
    if for_generation and last != "user":
        raise ConversationError("the last message must be from the user for the model to answer it", "messages")
    if not for_generation and last != "assistant":
        raise ConversationError("a training conversation must end with an assistant reply", "messages")
