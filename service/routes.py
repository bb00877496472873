"""The API's routes: thin, at module level, reading the app's ``ServerState`` from
``request.app.state.server`` (set by ``steer.service.app.create_app``); the work is in ``ChatServing``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from steer.service.errors import invalid_api_key, model_not_ready
from steer.service.metrics import CONTENT_TYPE_LATEST
from steer.service.middleware import key_matches
from steer.service.protocol import (
    AttributesResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
)
from steer.service.responses import EventStreamResponse
from steer.service.serving import ChatServing, ServingError

if TYPE_CHECKING:
    from steer.service.app import ServerState

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def ready_chat(state: ServerState) -> ChatServing:
    """The chat serving, or the 503 that says why there is none to use right now."""
    failure = state.failure()
    settings = state.settings
    if state.serving is not None and failure:  # the engine died after loading (and may be restarting)
        raise ServingError(503, failure, type="server_error", code="engine_failed",
                           headers={"Retry-After": str(max(settings.retry_after_s,
                                                           int(settings.engine_restart_backoff_s) + 1))})
    if state.serving is None:
        raise model_not_ready(state.load_error)
    return state.serving


async def check_api_key(request: Request) -> None:
    """Routes check the key themselves too, not only ``AccessMiddleware``: a route must not
    depend on how it was mounted to be closed."""
    keys = server_state(request).settings.api_keys
    if keys and not key_matches(request.scope, [k.encode("utf-8") for k in keys]):
        raise invalid_api_key()


router = APIRouter()
api = APIRouter(dependencies=[Depends(check_api_key)], responses=ERROR_RESPONSES)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request):
    state = server_state(request)
    if state.draining:
        return JSONResponse({"status": "draining: the server is shutting down", "model": None},
                            status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})
    failure = state.failure()
    if state.serving is None or failure:
        status = f"failed: {failure}" if failure else "loading"
        return JSONResponse({"status": status, "model": None}, status_code=503)
    stall = state.stall()
    if stall:
        return JSONResponse({"status": stall, "model": state.serving.model_name}, status_code=503)
    return HealthResponse(status="ok", model=state.serving.model_name)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request):
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@api.get("/v1/models", response_model=ModelList)
async def list_models(request: Request):
    return ready_chat(server_state(request)).models()


@api.get("/v1/attributes", response_model=AttributesResponse)
async def list_attributes(request: Request):
    return ready_chat(server_state(request)).attributes()


@api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
          responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    chat = ready_chat(server_state(request))
    gen = await chat.start_async(body)
    if body.stream:
        # The stream is cancelled when the client disconnects; the generator then frees its rows.
        return EventStreamResponse(chat.stream(gen))
    task = asyncio.ensure_future(chat.complete(gen))
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()  # complete() cancels the rows on its way out
            chat.cancel(gen)
            return Response(status_code=499)
    return task.result()


router.include_router(api)
