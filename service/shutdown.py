"""Graceful shutdown for ``steer serve``: uvicorn, with SIGTERM/SIGINT first draining the server.

uvicorn on its own stops listening at the first signal and waits for open connections, without a
limit, before the app's shutdown stops the engine. Here the first signal starts
``ServerState.drain``: new requests get 503 + ``Retry-After`` (a load balancer moves on), requests
in flight get ``drain_timeout_s`` to finish, the engine stops, and only then does uvicorn exit.
Connections still open after that (a UI tab's heartbeat stream) are closed after a few seconds
(``timeout_graceful_shutdown``) instead of holding the process. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

logger = logging.getLogger(__name__)

# Seconds uvicorn waits for connections still open once the drain is over.
CLOSE_LEFTOVER_CONNECTIONS_S = 3


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._signalled or self._loop is None:
            # A second signal (or one before the loop runs): leave now.
            self.should_exit = self.force_exit = True
            return
        self._signalled = True
        logger.info("received signal %s: draining before shutdown (a second one exits at once)", sig)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit():
            try:
                await self.state.drain(self.drain_timeout_s)
            except Exception:  # never let a failed drain keep the process alive
                logger.exception("draining failed")
            finally:
                self.should_exit = True

        self._drain = asyncio.ensure_future(drain_then_exit())


def build_server(app, host: str, port: int, log_level: str, drain_timeout_s: float) -> GracefulServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=CLOSE_LEFTOVER_CONNECTIONS_S)
    return GracefulServer(config, app.state.server, drain_timeout_s)
