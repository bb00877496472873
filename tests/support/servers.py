"""The server in-process: TestClient apps, a live uvicorn thread, SSE parsing, engine event sinks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.support.assets import REPO

NPC_EXAMPLES = REPO / "examples" / "npcs"


class LiveServer:
    """An ASGI app served by uvicorn in a thread on 127.0.0.1, ready once ``health`` answers 200."""

    def __init__(self, app, health: str = "/health"):
        import socket

        import uvicorn

        self.app, self.health = app, health
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import httpx

        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server at {self.url} did not become healthy")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def engine(self):
        return self.app.state.server.engine


def wait_ready(client, timeout: float = 60.0) -> None:
    """Waits until a TestClient's app reports healthy (its engine has loaded the policy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready: {client.get('/health').json()}")


def make_client(policy: Path, **overrides):
    from fastapi.testclient import TestClient

    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    # The engine runs in a thread here: these tests exercise the API, and a child process per app
    # would only add start-up time (tests/test_engine_process.py covers the process engine).
    settings = ServerSettings(policy=str(policy), **{"ui": False, "threads": 1, "engine_in_process": True, **overrides})
    return TestClient(create_app(settings))


def make_npc_client(policy: Path, db: Path | str, npcs: Path | None = NPC_EXAMPLES, **overrides):
    """An app serving the NPCs in ``npcs`` with sessions in ``db``: a SQLite file's path or a database URL."""
    from fastapi.testclient import TestClient

    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    settings = ServerSettings(policy=str(policy), ui=False, threads=1, engine_in_process=True,
                              npcs=str(npcs) if npcs else None, database_url=db if isinstance(db, str) else f"sqlite:///{db}",
                              **{"max_prompt_tokens": 600, **overrides})
    return TestClient(create_app(settings))


def say(client, sid, content, **kw):
    """Sends one line to NPC session ``sid`` and returns the reply's JSON."""
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": content, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Collector:
    """An engine event sink: keeps every event and the text so far; ``done`` is set by the last one."""

    def __init__(self):
        self.events, self.text, self.final = [], "", None
        self.done = threading.Event()

    def __call__(self, event):
        self.events.append(event)
        self.text += event.delta
        if event.finished:
            self.final = event
            self.done.set()
