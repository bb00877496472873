"""NPC dialogue without FastAPI: profiles, sessions and turns on top of ``ChatServing``.

A reply goes through the same path as ``POST /v1/chat/completions``: the profile and the history
become messages, the policy's template renders them, and a ``ChatCompletionRequest`` is started
on the shared engine. Database calls run in worker threads so the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from steer.service.npc.protocol import (
    Clamp,
    CreateSessionRequest,
    MessageList,
    MessageRequest,
    NpcMessage,
    NpcReply,
    Safety,
    SessionExport,
    SessionObject,
)
from steer.service.npc.store import NpcStore, SessionBusy, SessionInfo, SessionNotFound, TurnLease
from steer.service.protocol import ChatCompletionRequest
from steer.service.serving import ChatServing, ServingError, bad_request
from steer.service.settings import ServerSettings
from steer.core.attributes import AttributeValueError
from steer.npc import NpcError, NpcProfile, clean_line, dialogue_messages, fit_history, turn_seed

logger = logging.getLogger(__name__)

# Set once the chat request takes best_of itself (the evaluation issue's APM-guided best-of-n):
# then one request asks serving for the best candidate. Until then candidates come back as
# choices (n) with their APM scores and the pick happens here.
SERVING_HAS_BEST_OF = "best_of" in ChatCompletionRequest.model_fields


def not_found(what: str, ident: str, param: str) -> ServingError:
    return ServingError(404, f"{what} {ident!r} does not exist", type="not_found_error", param=param,
                        code=f"{what.replace(' ', '_')}_not_found")


def session_object(info: SessionInfo) -> SessionObject:
    return SessionObject(id=info.id, npc_id=info.npc_id, player_name=info.player_name, seed=info.seed,
                         turns=info.turns, created_at=info.created_at, updated_at=info.updated_at, busy=info.busy)


def message_object(m: dict[str, Any]) -> NpcMessage:
    meta = m.get("meta") or {}
    return NpcMessage(index=m["index"], role=m["role"], content=m["content"], created_at=m["created_at"], **meta)


@dataclass
class Turn:
    """One player line being answered: the session's lease and everything the reply needs."""

    lease: TurnLease
    profile: NpcProfile
    request: MessageRequest
    chat: ChatServing
    messages: list[dict[str, str]]
    attributes: dict[str, int]
    clamped: list[dict[str, Any]]
    dropped: int
    max_tokens: int
    best_of: int
    check_toxicity: bool
    index: int = field(init=False)
    committed: bool = False

    def __post_init__(self):
        self.index = self.lease.session.turns

    def seed(self, attempt: int) -> int | None:
        seed = self.lease.session.seed
        return None if seed is None else turn_seed(seed, self.index, attempt)


class NpcServing:
    def __init__(self, store: NpcStore, settings: ServerSettings, chat: Callable[[], ChatServing]):
        self.store = store
        self.settings = settings
        self._chat = chat  # raises the 503 ServingError while the model loads

    @staticmethod
    async def _db(fn, *args):
        return await asyncio.to_thread(fn, *args)

    # ---------------------------------------------------------- profiles
    async def list_npcs(self) -> list[NpcProfile]:
        return await self._db(self.store.list_profiles)

    async def get_npc(self, npc_id: str) -> NpcProfile:
        profile = await self._db(self.store.get_profile, npc_id)
        if profile is None:
            raise not_found("npc", npc_id, "npc_id")
        return profile

    def _check_profile(self, profile: NpcProfile) -> None:
        try:
            profile.check_against(self._chat().policy.schema)
        except NpcError as e:
            raise bad_request(str(e), e.field, "invalid_value") from None

    async def create_npc(self, profile: NpcProfile) -> NpcProfile:
        self._check_profile(profile)
        if not await self._db(self.store.put_profile, profile, "api", True):
            raise ServingError(409, f"npc {profile.id!r} already exists; PUT /v1/npcs/{profile.id} replaces it",
                               param="id", code="npc_exists")
        return profile

    async def put_npc(self, npc_id: str, profile: NpcProfile) -> tuple[NpcProfile, bool]:
        if profile.id != npc_id:
            raise bad_request(f"id {profile.id!r} does not match the URL's {npc_id!r}", "id")
        self._check_profile(profile)
        created = await self._db(self.store.put_profile, profile, "api")
        return profile, created

    async def delete_npc(self, npc_id: str) -> None:
        if not await self._db(self.store.delete_profile, npc_id):
            raise not_found("npc", npc_id, "npc_id")

    # ---------------------------------------------------------- sessions
    async def create_session(self, npc_id: str, req: CreateSessionRequest) -> SessionObject:
        await self.get_npc(npc_id)
        info = await self._db(self.store.create_session, npc_id, req.player_name, req.seed)
        return session_object(info)

    async def get_session(self, sid: str) -> SessionObject:
        try:
            return session_object(await self._db(self.store.get_session, sid))
        except SessionNotFound:
            raise not_found("session", sid, "session_id") from None

    async def messages(self, sid: str) -> MessageList:
        try:
            info = await self._db(self.store.get_session, sid)
            rows = await self._db(self.store.messages, sid)
        except SessionNotFound:
            raise not_found("session", sid, "session_id") from None
        return MessageList(session=session_object(info), data=[message_object(m) for m in rows])

    async def delete_session(self, sid: str) -> None:
        try:
            await self._db(self.store.delete_session, sid)
        except SessionNotFound:
            raise not_found("session", sid, "session_id") from None

    async def export_session(self, sid: str) -> SessionExport:
        try:
            info = await self._db(self.store.get_session, sid)
            rows = await self._db(self.store.messages, sid)
        except SessionNotFound:
            raise not_found("session", sid, "session_id") from None
        return SessionExport(npc_id=info.npc_id, player_name=info.player_name, seed=info.seed,
                             messages=[{"role": m["role"], "content": m["content"], "meta": m["meta"],
                                        "created_at": m["created_at"]} for m in rows])

    async def import_session(self, data: SessionExport) -> SessionObject:
        await self.get_npc(data.npc_id)
        for i, m in enumerate(data.messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise bad_request(f"messages[{i}].role: expected {expected!r} (turns alternate user/assistant)",
                                  f"messages[{i}].role")
        if len(data.messages) % 2:
            raise bad_request("messages: the last message must be the NPC's reply", "messages")
        info = await self._db(self.store.create_session, data.npc_id, data.player_name, data.seed,
                              [m.model_dump() for m in data.messages])
        return session_object(info)

    # ------------------------------------------------------------- turns
    async def begin(self, sid: str, req: MessageRequest) -> Turn:
        """Lease the session and build the reply's prompt; ``ServingError`` (400/404/409/503) on failure."""
        chat = self._chat()
        try:
            lease = await self._db(self.store.begin_turn, sid)
        except SessionNotFound:
            raise not_found("session", sid, "session_id") from None
        except SessionBusy:
            raise ServingError(409, f"session {sid!r} is answering another message; send the next line after "
                               "that reply", type="conflict_error", code="session_busy") from None
        try:
            return await self._prepare(lease, req, chat)
        except BaseException:
            await self._release(lease)
            raise

    async def _prepare(self, lease: TurnLease, req: MessageRequest, chat: ChatServing) -> Turn:
        profile = await self._db(self.store.get_profile, lease.session.npc_id)
        if profile is None:
            raise ServingError(409, f"the session's npc {lease.session.npc_id!r} no longer exists",
                               type="conflict_error", code="npc_not_found")
        schema = chat.policy.schema
        try:
            attributes, clamped = profile.steer(schema, req.attributes)
        except AttributeValueError as e:
            raise bad_request(str(e), f"attributes.{e.field}" if e.field else "attributes") from None
        best_of = req.best_of or profile.best_of
        apm = chat.apm
        if best_of > 1 and apm is None:
            raise bad_request("best_of above 1 needs an attribute prediction model to pick the best reply; "
                              "start the server with --apm DIR", "best_of")
        max_tokens = req.max_tokens or min(profile.max_tokens, self.settings.max_tokens_limit)
        messages = dialogue_messages(profile, lease.history, req.content, lease.session.player_name)
        budget = self.settings.max_prompt_tokens
        if chat.max_context is not None:
            budget = min(budget, chat.max_context - min(max_tokens, chat.max_context - 1))

        def count(msgs):
            return len(chat.policy.template.tokenize(msgs, chat.policy.tokenizer, mode="inference",
                                                     attributes=attributes).input_ids)

        try:
            messages, dropped = await asyncio.to_thread(fit_history, messages, count, budget)
        except NpcError as e:
            raise bad_request(str(e), e.field, "context_length_exceeded") from None
        return Turn(lease=lease, profile=profile, request=req, chat=chat, messages=messages, attributes=attributes,
                    clamped=clamped, dropped=dropped, max_tokens=max_tokens, best_of=best_of,
                    check_toxicity=apm is not None and "toxicity" in apm.schema)

    async def _release(self, lease: TurnLease) -> None:
        # Shielded: this runs while a cancelled request (client gone) unwinds.
        with anyio.CancelScope(shield=True):
            await self._db(self.store.release, lease)

    async def release(self, turn: Turn) -> None:
        """Give the session back without a reply (a no-op once the reply is stored)."""
        if not turn.committed:
            await self._release(turn.lease)

    def _chat_request(self, turn: Turn, attempt: int, stream: bool = False) -> ChatCompletionRequest:
        body: dict[str, Any] = dict(
            messages=turn.messages, attributes=turn.attributes, max_tokens=turn.max_tokens,
            temperature=turn.profile.temperature, top_p=turn.profile.top_p, seed=turn.seed(attempt), stream=stream,
            score=turn.check_toxicity or turn.best_of > 1,
        )
        if turn.best_of > 1:
            if SERVING_HAS_BEST_OF:
                body["best_of"] = turn.best_of
            else:
                body["n"] = turn.best_of
        return ChatCompletionRequest(**body)

    def _too_toxic(self, turn: Turn, scores: dict[str, float] | None) -> bool:
        # The APM predicts on the schema's scale; a reply rounds to a level above the bound.
        return turn.check_toxicity and scores is not None and scores["toxicity"] > turn.profile.max_toxicity + 0.5

    def _pick(self, turn: Turn, choices) -> Any | None:
        """The candidate closest to the requested attributes among those within the toxicity bound."""
        allowed = [c for c in choices if not self._too_toxic(turn, c.scores)]
        if not allowed:
            return None

        def distance(choice) -> float:
            if not choice.scores:
                return 0.0
            return sum((choice.scores[name] - value) ** 2 for name, value in turn.attributes.items()
                       if name in choice.scores)

        return min(allowed, key=distance)

    async def _generate(self, turn: Turn) -> tuple[str, dict[str, Any]]:
        """The reply and its meta: bounded redraws while it measures above max_toxicity, then the fallback."""
        regenerations = 0
        last_toxicity = None
        for attempt in range(turn.profile.max_regenerations + 1):
            req = self._chat_request(turn, attempt)
            response = await turn.chat.complete(turn.chat.start(req))
            choice = self._pick(turn, response.choices)
            if choice is not None:
                toxicity = choice.scores.get("toxicity") if (turn.check_toxicity and choice.scores) else None
                return clean_line(choice.message.content), self._meta(turn, attempt, regenerations, False, toxicity,
                                                          choice.scores, choice.finish_reason)
            regenerations += 1
            last_toxicity = min(c.scores["toxicity"] for c in response.choices)
            logger.info("npc %s: reply %d of turn %d measured toxicity %.2f > %d; redrawing", turn.profile.id,
                        attempt, turn.index, last_toxicity, turn.profile.max_toxicity)
        # Every draw measured too toxic: the designer's line instead (regenerations counts redraws).
        return turn.profile.fallback_line, self._meta(turn, turn.profile.max_regenerations, regenerations - 1, True,
                                                      last_toxicity, None, "stop")

    def _meta(self, turn: Turn, attempt: int, regenerations: int, fallback: bool, toxicity: float | None,
              scores: dict[str, float] | None, finish_reason: str | None) -> dict[str, Any]:
        safety = Safety(checked=turn.check_toxicity, max_toxicity=turn.profile.max_toxicity,
                        toxicity=None if toxicity is None else round(float(toxicity), 4),
                        regenerations=regenerations, fallback=fallback)
        return {
            "attributes": turn.attributes,
            "clamped": [Clamp(**c).model_dump() for c in turn.clamped] or None,
            "safety": safety.model_dump(),
            "scores": scores,
            "seed": turn.seed(attempt),
            "best_of": turn.best_of if turn.best_of > 1 else None,
            "finish_reason": finish_reason,
            "dropped_turns": turn.dropped or None,
        }

    async def _commit(self, turn: Turn, content: str, meta: dict[str, Any]) -> NpcReply:
        try:
            index = await self._db(self.store.commit_turn, turn.lease, turn.request.content, content, meta)
        except SessionBusy:
            raise ServingError(409, f"session {turn.lease.session.id!r} was deleted or taken over while "
                               "replying", type="conflict_error", code="session_busy") from None
        turn.committed = True
        msg = message_object({"index": index, "role": "assistant", "content": content, "meta": meta,
                              "created_at": turn.lease.session.updated_at})
        return NpcReply(session_id=turn.lease.session.id, npc_id=turn.profile.id, **msg.model_dump())

    async def reply(self, turn: Turn) -> NpcReply:
        try:
            content, meta = await self._generate(turn)
            return await self._commit(turn, content, meta)
        finally:
            await self.release(turn)

    def streams_live(self, turn: Turn) -> bool:
        """Tokens go out as they are decoded unless the reply must be judged whole first (toxicity
        check or best-of-n): then the checked reply is sent as one piece."""
        return not turn.check_toxicity and turn.best_of == 1

    def start_stream(self, turn: Turn):
        """Queue a live reply now, so a full server answers 429 before the response starts."""
        return turn.chat.start(self._chat_request(turn, 0, stream=True))

    async def stream(self, turn: Turn, gen=None) -> AsyncIterator[str]:
        """Server-sent events: ``{"type": "delta", "content"}`` pieces, then ``{"type": "message", ...}``
        (the stored reply, as the non-streaming response), then ``[DONE]``."""
        try:
            if gen is None:
                content, meta = await self._generate(turn)
                yield _event({"type": "delta", "content": content})
            else:
                content, finish_reason = "", None
                async for chunk in turn.chat.stream(gen):
                    for event in _parse_sse(chunk):
                        if "error" in event:
                            yield _event({"type": "error", **event})
                            return
                        for choice in event.get("choices", []):
                            piece = clean_line(choice.get("delta", {}).get("content") or "")
                            if piece:
                                content += piece
                                yield _event({"type": "delta", "content": piece})
                            finish_reason = choice.get("finish_reason") or finish_reason
                meta = self._meta(turn, 0, 0, False, None, None, finish_reason)
            reply = await self._commit(turn, content, meta)
            yield _event({"type": "message", **reply.model_dump(mode="json")})
            yield "data: [DONE]\n\n"
        except ServingError as e:  # the response has started: the error goes out as an event
            yield _event({"type": "error", **e.body()})
        finally:
            await self.release(turn)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _parse_sse(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.split("\n"):
        if line.startswith("data: {"):
            out.append(json.loads(line[len("data: "):]))
    return out
