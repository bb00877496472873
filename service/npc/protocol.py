"""Request and response bodies of the NPC endpoints (pydantic)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field



def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


Text = Annotated[str, AfterValidator(_no_nul)]

from steer.npc import NpcProfile

SESSION_EXPORT_FORMAT = "steer.npc-session.v1"


class NpcList(BaseModel):
    object: Literal["list"] = "list"
    data: list[NpcProfile]


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seed: int | None = Field(default=None, ge=0, lt=2**63,
                             description="Same seed and same player lines: the same NPC lines, whatever else runs.")
    player_name: Text | None = Field(default=None, min_length=1, max_length=100)


class SessionObject(BaseModel):
    id: str
    object: Literal["npc.session"] = "npc.session"
    npc_id: str
    player_name: str | None
    seed: int | None
    turns: int
    created_at: float
    updated_at: float
    busy: bool = Field(description="A reply is being generated for this session right now.")


class MessageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: Text = Field(min_length=1, max_length=4000, description="The player's line.")
    attributes: dict[str, Any] | None = Field(
        default=None, description="Overrides of the NPC's attribute values, clamped into its bounds.")
    stream: bool = False
    best_of: int | None = Field(default=None, ge=1, le=16,
                                description="Candidates drawn for this reply (default: the profile's); needs --apm.")
    max_tokens: int | None = Field(default=None, ge=1, description="Default: the profile's max_tokens.")


class Clamp(BaseModel):
    attribute: str
    requested: int
    applied: int


class Safety(BaseModel):
    checked: bool = Field(description="The server's APM measured the reply's toxicity.")
    max_toxicity: int
    toxicity: float | None = Field(default=None, description="The APM's measurement of the reply that was kept.")
    regenerations: int = Field(default=0, description="Replies redrawn because they measured above max_toxicity.")
    fallback: bool = Field(default=False, description="Every draw was too toxic: content is the profile's fallback line.")


class NpcMessage(BaseModel):
    index: int
    role: Literal["user", "assistant"]
    content: str
    created_at: float
    attributes: dict[str, int] | None = None
    clamped: list[Clamp] | None = None
    safety: Safety | None = None
    scores: dict[str, float] | None = None
    seed: int | None = None
    best_of: int | None = None
    finish_reason: str | None = None
    dropped_turns: int | None = Field(default=None, description="Oldest turns left out of the prompt to fit the context.")


class NpcReply(NpcMessage):
    object: Literal["npc.message"] = "npc.message"
    session_id: str
    npc_id: str


class MessageList(BaseModel):
    object: Literal["list"] = "list"
    session: SessionObject
    data: list[NpcMessage]


class ExportedMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: Text
    meta: dict[str, Any] | None = None
    created_at: float | None = None


class SessionExport(BaseModel):
    """A session as a save-game file: ``GET /v1/sessions/{id}/export``, ``POST /v1/sessions/import``."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["steer.npc-session.v1"] = SESSION_EXPORT_FORMAT
    npc_id: str
    player_name: Text | None = Field(default=None, max_length=100)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    messages: list[ExportedMessage] = Field(default_factory=list)


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
