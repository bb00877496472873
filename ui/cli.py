"""``steer ui``: run the chat UI on its own, as a client of a steer server elsewhere.

The server (``steer serve``) already mounts the same UI at ``/ui``; this entry point is for a UI
on another machine or port, e.g. in front of a GPU server that runs with ``--no-ui``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from urllib.parse import urlparse

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)


class UiConfigError(SteerError, ValueError):
    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class UiConfig:
    server: str = field(
        default="http://127.0.0.1:8000",
        metadata={"help": "Base URL of the steer server (the part before /v1), e.g. http://gpu-box:8000."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Interface the UI listens on (0.0.0.0 for all)."})
    port: int = field(default=7860, metadata={"help": "TCP port the UI listens on."})
    api_key: str | None = field(
        default=None,
        metadata={"help": "API key sent to the server when it requires one (users can also type theirs in the UI)."},
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level."})

    def validate(self) -> None:
        # Not __post_init__: the steer CLI builds the config before it catches SteerError.
        parsed = urlparse(self.server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UiConfigError(f"--server {self.server!r} must be an http(s) URL such as http://127.0.0.1:8000",
                                "server")
        if parsed.path.rstrip("/").endswith("/v1"):
            raise UiConfigError(f"--server {self.server!r}: give the server's base URL, without /v1", "server")
        if not 0 < self.port < 65536:
            raise UiConfigError(f"--port {self.port} is not a valid TCP port", "port")


def build_app(config: UiConfig):
    """A FastAPI app serving only the UI at ``/``; its handlers talk to ``config.server``."""
    from fastapi import FastAPI

    from steer.ui.app import mount_ui

    config.validate()
    app = FastAPI(title="steer UI", docs_url=None, redoc_url=None, openapi_url=None)
    return mount_ui(app, path="/", server_url=config.server, api_key=config.api_key)


def main(config: UiConfig) -> int:
    import uvicorn

    from steer.ui.client import ServerError, SteerClient

    config.validate()
    try:
        schema = SteerClient(config.server, api_key=config.api_key).schema()
        logger.info("server %s serves schema %r (%d attributes)", config.server, schema.name, len(schema.attributes))
    except ServerError as e:
        # The server may come up later (or still be loading its model); the page reports it too.
        logger.warning("%s; starting the UI anyway", e)
    app = build_app(config)
    logger.info("steer UI on http://%s:%d/ -> %s", config.host, config.port, config.server)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    return 0
