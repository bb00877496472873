"""Request and response bodies of the OpenAI-compatible API (pydantic).

Field types are kept loose where the schema or the sampler checks the value with a better
message (``attributes`` values, ``messages[i].role``); everything else is typed so FastAPI's
validation names the offending field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ContentPart(BaseModel):
    """One part of a message's content. Only text parts are supported; other kinds (images, audio,
    files) are accepted by the schema so the error can say so by name."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


# Kept for imports elsewhere: a text part is a content part.
TextPart = ContentPart


class ChatMessageIn(BaseModel):
    # OpenAI's message fields are all accepted; the ones that ask for tools, audio or refusals
    # are refused by name when they carry a value (service.serving).
    model_config = ConfigDict(extra="forbid")
    role: str = Field(description="system (or developer, OpenAI's newer name for it), user or assistant")
    content: str | list[ContentPart] | None = Field(
        default=None, description="Text, or a list of text parts that are joined.")
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content or [])


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = Field(default=None, description="Accepted and ignored (no padding is added).")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Only \"text\" is supported.")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat request, every field of it, plus steer's ``attributes``, ``score`` and
    ``ignore_eos``. Fields steer has no use for (``user``, ``metadata``, ``store``...) are accepted
    and ignored; a field that asks for something steer does not do (tools, JSON mode, logprobs,
    audio) is a 400 naming it."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessageIn] = Field(description="The conversation; the last message must be the user's.")
    model: str | None = Field(default=None, description="The served model's name (see /v1/models).")
    attributes: dict[str, Any] | None = Field(
        default=None,
        description="Attribute values the reply is steered to, e.g. {\"humor\": 3}; missing ones take "
        "their defaults (see /v1/attributes).",
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                           description="Lowers the odds of every token already in the reply.")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0,
                                            description="Lowers a token's odds by how often it is already in the reply.")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit.")
    ignore_eos: bool = Field(default=False, description="Keep generating past the end-of-sequence token until "
                             "max_tokens or a stop string (vLLM's extension; for benchmarks and load tests).")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    score: bool = Field(default=False, description="Also return the attribute prediction model's scores per reply.")
    best_of: int | None = Field(
        default=None, ge=1,
        description="APM-guided best-of-n: draw this many candidates per choice (decoded as one batch) and return "
        "the one the server's attribute prediction model measures closest to the requested attributes (those set "
        "in `attributes`; all of them when none is set). Needs a server started with --apm. With a seed, candidate "
        "i of choice c is drawn with seed + c * best_of + i. Usage counts every candidate's tokens.",
    )
    best_of_weights: dict[str, float] | None = Field(
        default=None, description="Weights of the attributes in the best_of distance (default 1 each).")
    # Accepted and ignored: they describe the caller or the billing, not the reply.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = Field(default=None, description="false or absent; steer stores nothing.")
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Any = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Accepted at their defaults only (400 naming the field otherwise).
    logprobs: bool | None = Field(default=None, description="false or absent; log probabilities are not supported.")
    top_logprobs: int | None = Field(default=None, description="0 or absent.")
    tools: list[Any] | None = Field(default=None, description="[] or absent; tool calling is not supported.")
    tool_choice: Any = Field(default=None, description="\"none\", \"auto\" (with no tools) or absent.")
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = Field(default=None, description="[\"text\"] or absent.")
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    moderation: Any = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None
    scores: dict[str, float] | None = None
    # best_of only: how many candidates were drawn for this choice (``scores`` are the winner's).
    candidates: int | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    attributes: dict[str, int]
    # Not errors: e.g. a requested attribute value the policy never saw in training.
    warnings: list[str] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None
    scores: dict[str, float] | None = None
    candidates: int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    attributes: dict[str, int] | None = None
    warnings: list[str] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AttributeInfo(BaseModel):
    name: str
    min: int
    max: int
    default: int
    description: str
    # The word for each value, min to max ("completely serious" ... "hilarious and over the top"),
    # when the schema has them: what a slider can show beside its number.
    levels: list[str] | None = None


class AttributesResponse(BaseModel):
    schema_name: str
    attributes: list[AttributeInfo]
    aliases: dict[str, str]
    # Scores a request can ask for with "score": true (the APM's schema), or null without an APM.
    score_attributes: list[AttributeInfo] | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, ``ErrorResponse``'s shape: the one place every error answer (HTTP
    responses, the error event of a stream that has begun) is built. A plain dict, not the model,
    since the message may quote the request's own text, lone surrogates included, which pydantic
    would refuse."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class HealthResponse(BaseModel):
    status: str
    model: str | None = None
