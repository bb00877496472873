"""The NPC endpoints: thin routes over ``NpcServing``, included by ``steer.service.app``.

Off unless the server was started with ``--npcs DIR`` or ``--database-url``; the router's
lifespan then opens the database, runs its migrations and loads the profile files.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, Request, Response

from steer.service.npc.protocol import (
    CreateSessionRequest,
    Deleted,
    MessageList,
    MessageRequest,
    NpcList,
    NpcReply,
    SessionExport,
    SessionObject,
)
from steer.service.errors import model_not_ready
from steer.service.responses import EventStreamResponse
from steer.service.npc.serving import NpcServing
from steer.service.routes import check_api_key
from steer.service.serving import ChatServing, ServingError
from steer.npc import NpcProfile

logger = logging.getLogger(__name__)

ERRORS = {code: {"description": "OpenAI-style error body"} for code in (400, 401, 403, 404, 409, 429, 503)}


def npc_router(state) -> APIRouter:
    """``state`` is the app's ``ServerState`` (settings, and the chat serving once the model loads)."""
    settings = state.settings
    enabled = bool(settings.npcs or settings.database_url)
    holder: dict[str, NpcServing] = {}

    def chat() -> ChatServing:
        failure = state.failure()
        if state.serving is None or failure:
            raise model_not_ready(failure)
        return state.serving

    @asynccontextmanager
    async def lifespan(app):
        if not enabled:
            yield
            return
        engine = await asyncio.to_thread(_open_database, settings)
        from steer.service.npc.store import NpcStore

        holder["npc"] = NpcServing(NpcStore(engine), settings, chat)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.dispose)

    def npc() -> NpcServing:
        if not enabled:
            raise ServingError(404, "NPC sessions are off on this server; start it with --npcs DIR "
                               "(and optionally --database-url URL)", type="not_found_error", code="npcs_disabled")
        if "npc" not in holder:
            raise ServingError(503, "the session database is opening; retry shortly", type="server_error",
                               code="model_not_ready", headers={"Retry-After": "1"})
        return holder["npc"]

    async def require_api_key(request: Request) -> None:
        # Editing NPCs changes what every player sees: never allowed on a server without keys.
        if not settings.api_keys:
            raise ServingError(403, "creating or changing NPCs over the API needs an API key; start the server "
                               "with --api-key KEY (or edit the files in --npcs DIR)", type="permission_error",
                               code="api_key_required")
        await check_api_key(request)

    router = APIRouter(lifespan=lifespan, dependencies=[Depends(check_api_key)], responses=ERRORS,
                       tags=["npcs"])

    # ------------------------------------------------------------ profiles
    @router.get("/v1/npcs", response_model=NpcList)
    async def list_npcs():
        return NpcList(data=await npc().list_npcs())

    @router.get("/v1/npcs/{npc_id}", response_model=NpcProfile)
    async def get_npc(npc_id: str):
        return await npc().get_npc(npc_id)

    @router.post("/v1/npcs", response_model=NpcProfile, status_code=201, dependencies=[Depends(require_api_key)])
    async def create_npc(profile: NpcProfile):
        return await npc().create_npc(profile)

    @router.put("/v1/npcs/{npc_id}", response_model=NpcProfile, dependencies=[Depends(require_api_key)])
    async def put_npc(npc_id: str, profile: NpcProfile, response: Response):
        saved, created = await npc().put_npc(npc_id, profile)
        response.status_code = 201 if created else 200
        return saved

    @router.delete("/v1/npcs/{npc_id}", response_model=Deleted, dependencies=[Depends(require_api_key)])
    async def delete_npc(npc_id: str):
        await npc().delete_npc(npc_id)
        return Deleted(id=npc_id, object="npc")

    # ------------------------------------------------------------ sessions
    @router.post("/v1/npcs/{npc_id}/sessions", response_model=SessionObject, status_code=201)
    async def create_session(npc_id: str, body: CreateSessionRequest | None = None):
        return await npc().create_session(npc_id, body or CreateSessionRequest())

    @router.get("/v1/sessions/{sid}", response_model=SessionObject)
    async def get_session(sid: str):
        return await npc().get_session(sid)

    @router.delete("/v1/sessions/{sid}", response_model=Deleted)
    async def delete_session(sid: str):
        await npc().delete_session(sid)
        return Deleted(id=sid, object="npc.session")

    @router.get("/v1/sessions/{sid}/messages", response_model=MessageList)
    async def list_messages(sid: str):
        return await npc().messages(sid)

    @router.post("/v1/sessions/{sid}/messages", response_model=NpcReply,
                 responses={200: {"content": {"text/event-stream": {}}}})
    async def post_message(sid: str, body: MessageRequest):
        service = npc()
        turn = await service.begin(sid, body)
        if not body.stream:
            return await service.reply(turn)
        gen = None
        if service.streams_live(turn):
            try:
                gen = service.start_stream(turn)
            except BaseException:
                await service.release(turn)
                raise
        return EventStreamResponse(service.stream(turn, gen))

    @router.get("/v1/sessions/{sid}/export", response_model=SessionExport)
    async def export_session(sid: str):
        return await npc().export_session(sid)

    @router.post("/v1/sessions/import", response_model=SessionObject, status_code=201)
    async def import_session(body: SessionExport):
        return await npc().import_session(body)

    return router


def _open_database(settings):
    """Blocking: connect, migrate and load the profile files (the CLI has checked them already)."""
    from steer.service.npc.db import DEFAULT_DATABASE_URL, open_database
    from steer.service.npc.store import NpcStore
    from steer.core.artifacts import load_steer_config
    from steer.npc import load_profiles

    url = settings.database_url or DEFAULT_DATABASE_URL
    engine = open_database(url)
    if settings.npcs:
        schema = load_steer_config(settings.policy, kind="policy")[1] if settings.policy else None
        profiles = load_profiles(settings.npcs, schema)
        NpcStore(engine).sync_file_profiles(profiles)
        logger.info("loaded %d NPC profile(s) from %s", len(profiles), settings.npcs)
    logger.info("NPC sessions in %s", engine.url.render_as_string(hide_password=True))
    return engine
