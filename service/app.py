"""The FastAPI app: an app factory, a lifespan that loads the model, and the server's state.

The model loads in the background once the server is up, so ``/health`` answers 503 while it
loads and 200 after; API routes answer 503 until then. Nothing heavy happens at import time.
The routes (``steer.service.routes``, ``steer.service.npc.routes``) read the state from ``app.state.server``;
the middleware is in ``steer.service.middleware`` and the error answers in ``steer.service.errors``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from steer.service.errors import install_error_handlers
from steer.service.metrics import ServerMetrics
from steer.service.middleware import AccessMiddleware, AdmissionMiddleware, BodyLimitMiddleware, RequestCountMiddleware
from steer.service.serving import ChatServing
from steer.service.settings import ServerSettings

logger = logging.getLogger(__name__)


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
        from steer.models.policy import load_policy

        s = self.settings
        if s.threads > 0 and s.engine == "torch":
            import torch

            torch.set_num_threads(s.threads)
        if s.engine_in_process and s.engine == "torch":
            policy = load_policy(s.policy, device=s.device, dtype=s.dtype, schema=s.attribute_schema)
            engine = self._thread_engine(policy)
        else:
            # This process only renders and tokenizes prompts: it needs no weights.
            policy = load_policy(s.policy, device=s.device, load_model=False, schema=s.attribute_schema)
            if s.upstream:
                engine = self._upstream_engine(policy)
            elif s.engine_in_process:
                engine = self._llamacpp_thread_engine(policy)
            else:
                engine = self._process_engine()
        apm = None
        if s.apm:
            from steer.models.apm import AttributePredictor

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

    def _upstream_engine(self, policy):
        # The upstream server does the decoding; this process only reads its token stream, so no
        # engine process is needed (steer.runtime.upstream).
        from steer.runtime.engines import upstream_engine

        s = self.settings
        engine = upstream_engine(s.engine, s.upstream, policy.tokenizer, model=s.upstream_model,
                                 api_key=s.upstream_api_key, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                                 on_token=self.metrics.tokens.inc)
        engine.start()  # learns the upstream's context length and model; fails naming the URL
        return engine

    def _llamacpp_thread_engine(self, policy):
        from steer.runtime.llamacpp import llamacpp_engine

        s = self.settings
        engine = llamacpp_engine(s.policy, policy.tokenizer, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                                 threads=s.threads, on_token=self.metrics.tokens.inc)
        engine.max_restarts, engine.restart_backoff_s = s.engine_max_restarts, s.engine_restart_backoff_s
        engine.start()
        return engine

    def _process_engine(self):
        from steer.service.engine_process import EngineProcess, EngineProcessConfig

        s = self.settings
        config = EngineProcessConfig(policy=s.policy, engine=s.engine, schema=s.attribute_schema, device=s.device,
                                     dtype=s.dtype, threads=s.threads,
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


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start loading the model once the server is up (``/health`` says when it is ready); on the
    way out, wait for that and stop the engine."""
    state: ServerState = app.state.server

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


def create_app(settings: ServerSettings) -> FastAPI:
    from steer.service.npc.routes import npc_router
    from steer.service.routes import router

    app = FastAPI(
        title="steer",
        description="OpenAI-compatible chat completions steered by attribute values (SteerLM).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.server = state = ServerState(settings)
    # Outermost last: count every request, including the ones the body limit rejects.
    ui_prefix = settings.ui_path.rstrip("/") + "/"
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, state=state, exempt_prefixes=(ui_prefix,))
    app.add_middleware(AccessMiddleware, keys=[k.encode("utf-8") for k in settings.api_keys], ui_prefix=ui_prefix)
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics)
    install_error_handlers(app)
    app.include_router(router)
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
        from steer.ui.app import mount_ui

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
