"""The FastAPI app: an app factory, a lifespan that loads the model, and thin routes.

The model loads in the background once the server is up, so ``/health`` answers 503 while it
loads and 200 after; API routes answer 503 until then. Nothing heavy happens at import time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from service.protocol import (
    AttributesResponse,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
)
from service.serving import ChatServing, ServingError
from service.settings import ServerSettings

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}
KNOWN_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/attributes", "/health", "/metrics")


class ErrorJSONResponse(JSONResponse):
    """Error bodies escape non-ASCII: a message may quote the request's own text, which can hold a
    lone surrogate that UTF-8 cannot encode (JSON's "\\ud800" escape is the only way to send it back)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return ErrorJSONResponse(body, status_code=status, headers=headers)


class ServerState:
    """What the lifespan loads; routes read it through ``app.state.server``."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.serving: ChatServing | None = None
        self.engine = None
        self.load_error: str | None = None
        # Graceful shutdown: once draining, new requests get 503 + Retry-After while the ones in
        # flight (counted by AdmissionMiddleware) finish.
        self.draining = False
        self.in_flight = 0

    def load(self) -> None:
        """Blocking: load the policy (and APM) and start the engine, in a child process unless
        ``engine_in_process``."""
        from steer.policy import load_policy

        s = self.settings
        if s.threads > 0:
            import torch

            torch.set_num_threads(s.threads)
        if s.engine_in_process:
            policy = load_policy(s.policy, device=s.device, dtype=s.dtype)
            engine = self._thread_engine(policy)
        else:
            # This process only renders and tokenizes prompts: it needs no weights.
            policy = load_policy(s.policy, device=s.device, load_model=False)
            engine = self._process_engine()
        apm = None
        if s.apm:
            from steer.apm import AttributePredictor

            apm = AttributePredictor.load(s.apm, device=s.device)
        self.metrics.bind_engine(engine.stats)
        self.metrics.bind_restarts(lambda: engine.restarts_total)
        self.engine = engine
        self.serving = ChatServing(policy, engine, s, self.metrics, apm=apm)
        logger.info("serving %s (schema %s)%s", self.serving.model_name, policy.schema.name,
                    f" with APM {s.apm}" if apm is not None else "")

    def _thread_engine(self, policy):
        from steer.runtime.model_runner import eos_token_ids
        from steer.runtime.scheduler import Scheduler

        s = self.settings
        engine = Scheduler(
            policy.model,
            policy.tokenizer,
            max_batch_size=s.max_batch_size,
            max_queue=s.max_queue,
            eos_token_ids=eos_token_ids(policy.model, policy.tokenizer),
            device=policy.device,
            on_token=self.metrics.tokens.inc,
        )
        engine.max_restarts, engine.restart_backoff_s = s.engine_max_restarts, s.engine_restart_backoff_s
        engine.start()
        return engine

    def _process_engine(self):
        from service.engine_process import EngineProcess, EngineProcessConfig

        s = self.settings
        config = EngineProcessConfig(policy=s.policy, device=s.device, dtype=s.dtype, threads=s.threads,
                                     max_batch_size=s.max_batch_size, log_level=logging.getLogger().level,
                                     sigterm_grace_s=s.drain_timeout_s + 30)
        engine = EngineProcess(config, max_queue=s.max_queue, on_token=self.metrics.tokens.inc,
                               max_restarts=s.engine_max_restarts, restart_backoff_s=s.engine_restart_backoff_s)
        engine.start()
        return engine

    def failure(self) -> str | None:
        """Why the server cannot serve, or None: the model failed to load or the engine died."""
        if self.load_error:
            return self.load_error
        return getattr(self.engine, "error", None)

    async def drain(self, timeout: float) -> None:
        """Stop admitting, give the requests in flight ``timeout`` seconds to finish, then stop the
        engine: whatever still runs ends with a clean error (a stream: an error event and [DONE])."""
        self.draining = True
        loop = asyncio.get_running_loop()
        logger.info("shutting down: new requests get 503; waiting up to %.0f s for %d request(s) in flight",
                    timeout, self.in_flight)
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            logger.warning("%d request(s) still running after %.0f s; ending them", self.in_flight, timeout)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop)
        deadline = loop.time() + 5.0  # their error events go out
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def stall(self) -> str | None:
        """Why the engine looks hung, or None: no decode step for ``stall_after_s`` while rows wait."""
        if self.engine is None:
            return None
        stalled = self.engine.stalled_for()
        if stalled < self.settings.stall_after_s:
            return None
        stats = self.engine.stats()
        return (f"stalled: no decode step for {stalled:.0f} s while requests are in flight "
                f"({stats.active} running, {stats.waiting} waiting)")


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, whether or not they declare a Content-Length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client gone before the body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as streaming needs

        await self.app(scope, replay, send)


class AdmissionMiddleware:
    """Counts the requests in flight and, once the server drains for shutdown, answers new ones
    with 503 + Retry-After. ``/health`` and ``/metrics`` stay open (probes see the drain), and the
    UI's long-lived streams (its heartbeat) are not counted, so an open tab never holds a shutdown."""

    def __init__(self, app, state: ServerState, exempt_prefixes: tuple[str, ...]):
        self.app = app
        self.state = state
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/health", "/metrics") or path.startswith(self.exempt_prefixes):
            return await self.app(scope, receive, send)
        if self.state.draining:
            retry = str(self.state.settings.retry_after_s)
            return await error_response(503, "the server is shutting down; retry on another instance or later",
                                        type="server_error", code="shutting_down",
                                        headers={"Retry-After": retry})(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class AccessMiddleware:
    """With API keys on, every route but ``/health`` needs ``Authorization: Bearer KEY``:
    ``/metrics``, ``/docs``, ``/openapi.json`` and routes added by other routers included. The UI
    (``ui_prefix``) is left to Gradio's login, which asks for a key as the password. Gradio's file
    upload route is closed whether or not keys are on: the UI takes no files, and the route stores
    any number of them."""

    def __init__(self, app, keys: list[bytes], ui_prefix: str):
        self.app = app
        self.keys = keys
        self.ui_prefix = ui_prefix
        self.upload_path = f"{ui_prefix}gradio_api/upload"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.rstrip("/") == self.upload_path:
            return await error_response(403, "file uploads are disabled on this server", code="uploads_disabled")(
                scope, receive, send)
        if self.keys and path != "/health" and not path.startswith(self.ui_prefix) \
                and not key_matches(scope, self.keys):
            return await error_response(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                                        type="authentication_error", code="invalid_api_key",
                                        headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestCountMiddleware:
    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


def key_matches(scope, keys: list[bytes]) -> bool:
    """Whether the request's ``Authorization: Bearer KEY`` is one of ``keys``. Compared as bytes:
    ``hmac.compare_digest`` refuses str with non-ASCII characters, and a header is bytes anyway."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    matched = False
    for key in keys:  # every key is compared, so the time taken does not say which one matched
        matched |= hmac.compare_digest(token, key)
    return scheme.lower() == b"bearer" and matched


_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


def _param_from_loc(loc) -> str | None:
    # pydantic names union members in the location ("content.str"); the client only needs the field.
    parts = [str(p) for p in loc if p != "body" and not _UNION_MEMBER.match(str(p))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load():
            try:
                await asyncio.to_thread(state.load)
            except Exception as e:  # reported by /health; the CLI checks the policy dir before starting
                state.load_error = f"{type(e).__name__}: {e}"
                logger.error("could not load the model: %s", state.load_error)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            await task
            if state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(
        title="steer",
        description="OpenAI-compatible chat completions steered by attribute values (SteerLM).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state
    # Outermost last: count every request, including the ones the body limit rejects.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    ui_prefix = settings.ui_path.rstrip("/") + "/"
    app.add_middleware(AdmissionMiddleware, state=state, exempt_prefixes=(ui_prefix,))
    app.add_middleware(AccessMiddleware, keys=[k.encode("utf-8") for k in settings.api_keys], ui_prefix=ui_prefix)
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics)

    # ------------------------------------------------------------ errors
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, e: ServingError):
        return ErrorJSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        param = _param_from_loc(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                  code="invalid_json")
        if param is None:
            return error_response(400, "the request body must be a JSON object (Content-Type: application/json)",
                                  code="invalid_body")
        message = f"{param}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        types = {401: "authentication_error", 404: "not_found_error"}
        return error_response(e.status_code, str(e.detail), type=types.get(e.status_code, "invalid_request_error"),
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", type="server_error")

    # ------------------------------------------------------- dependencies
    api_keys = [k.encode("utf-8") for k in settings.api_keys]

    async def check_api_key(request: Request) -> None:
        if not settings.api_keys:
            return
        if not key_matches(request.scope, api_keys):
            raise ServingError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})

    def serving() -> ChatServing:
        failure = state.failure()
        if state.serving is not None and failure:  # the engine died after loading (and may be restarting)
            raise ServingError(503, failure, type="server_error", code="engine_failed",
                               headers={"Retry-After": str(max(settings.retry_after_s,
                                                               int(settings.engine_restart_backoff_s) + 1))})
        if state.serving is None:
            detail = f"the model failed to load ({state.load_error})" if state.load_error else "the model is loading"
            raise ServingError(503, f"{detail}; retry shortly", type="server_error", code="model_not_ready",
                               headers={"Retry-After": "5"})
        return state.serving

    auth = [Depends(check_api_key)]

    # ------------------------------------------------------------ routes
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining: the server is shutting down", "model": None},
                                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        failure = state.failure()
        if state.serving is None or failure:
            status = f"failed: {failure}" if failure else "loading"
            return JSONResponse({"status": status, "model": None}, status_code=503)
        stall = state.stall()
        if stall:
            return JSONResponse({"status": stall, "model": state.serving.model_name}, status_code=503)
        return HealthResponse(status="ok", model=state.serving.model_name)

    @app.get("/metrics", response_class=Response)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, dependencies=auth, responses=ERROR_RESPONSES)
    async def list_models():
        return serving().models()

    @app.get("/v1/attributes", response_model=AttributesResponse, dependencies=auth, responses=ERROR_RESPONSES)
    async def list_attributes():
        return serving().attributes()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=auth,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        chat = serving()
        gen = await chat.start_async(body)
        if body.stream:
            # Starlette cancels the stream when the client disconnects; the generator then frees its rows.
            return StreamingResponse(chat.stream(gen), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        task = asyncio.ensure_future(chat.complete(gen))
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # complete() cancels the rows on its way out
                chat.cancel(gen)
                return Response(status_code=499)
        return task.result()

    from service.npc.routes import npc_router

    app.include_router(npc_router(state))
    if settings.ui:
        _mount_ui(app, settings)
    return app


def _mount_ui(app: FastAPI, settings: ServerSettings) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        logger.info("gradio is not installed; serving without the UI (pip install 'steer[ui]')")
        return
    try:
        from ui.app import mount_ui

        extra = {}
        if settings.api_keys:
            keys = [k.encode("utf-8") for k in settings.api_keys]

            def key_login(username: str, password: str) -> bool:
                matched = False
                for key in keys:
                    matched |= hmac.compare_digest(password.encode("utf-8", "surrogatepass"), key)
                return matched

            extra = {"auth": key_login,
                     "auth_message": "This server requires an API key: enter it as the password (any user name)."}
        mount_ui(app, path=settings.ui_path, server_url=None, **extra)
        logger.info("UI mounted at %s", settings.ui_path)
    except Exception as e:  # the API must come up even when the UI cannot
        logger.warning("could not mount the UI at %s: %s", settings.ui_path, e)
