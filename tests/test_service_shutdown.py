"""Graceful shutdown: on SIGTERM/SIGINT the server refuses new work (503 + Retry-After), lets the
requests in flight finish, then stops; an open UI tab does not hold it."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def policy_dir(build_tiny_policy, tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("shutdown") / "policy")


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _health(url: str):
    try:
        return httpx.get(f"{url}/health", timeout=5)
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="session")
def stream(hello):
    """``stream(url, out, **body)``: streams ``hello`` from ``url``, appending the status code then
    each event to ``out``."""
    def run(url: str, out: list, **body) -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
                "messages": hello, "stream": True, "stream_options": {"include_usage": True}, **body}) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    payload = line[len("data: "):]
                    out.append(payload if payload == "[DONE]" else json.loads(payload))

    return run


def test_sigterm_drains_requests_in_flight_and_refuses_new_ones(stream, free_port, hello, policy_dir):
    from steer.service.app import create_app
    from steer.service.settings import ServerSettings
    from steer.service.shutdown import build_server

    port = free_port()
    app = create_app(ServerSettings(policy=str(policy_dir), ui=False, threads=1, engine_in_process=True,
                                    max_tokens_limit=400, drain_timeout_s=120))
    server = build_server(app, "127.0.0.1", port, "warning", drain_timeout_s=120)
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: (h := _health(url)) is not None and h.status_code == 200, "the server to start")

    # The engine pauses after each step until the test lets it go on: the reply is in flight for
    # as long as the test needs, whatever the machine's speed.
    engine = app.state.server.engine
    go = threading.Event()
    engine.on_step = lambda: go.wait()
    events: list = []
    client = threading.Thread(target=stream, args=(url, events), kwargs={"max_tokens": 200, "ignore_eos": True})
    client.start()
    _wait(lambda: engine.stats().active == 1, "the reply to start")

    server.handle_exit(signal.SIGTERM, None)  # what the signal handler calls
    health = _wait(lambda: (h := _health(url)) is not None and h.status_code == 503 and h, "the drain to start")
    assert health.json()["status"].startswith("draining") and health.headers["Retry-After"]
    refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": hello, "max_tokens": 2}, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "shutting_down"

    go.set()
    client.join(120)
    assert events[0] == 200 and events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 200
    assert [e["choices"][0]["finish_reason"] for e in events[1:-2] if e["choices"] and
            e["choices"][0].get("finish_reason")] == ["length"]
    runner.join(60)
    assert not runner.is_alive(), "the server did not exit after draining"


def test_drain_timeout_ends_stragglers_with_a_clean_error(stream, free_port, policy_dir):
    from steer.service.app import create_app
    from steer.service.settings import ServerSettings
    from steer.service.shutdown import build_server

    port = free_port()
    app = create_app(ServerSettings(policy=str(policy_dir), ui=False, threads=1, engine_in_process=True,
                                    max_tokens_limit=4000))
    server = build_server(app, "127.0.0.1", port, "warning", drain_timeout_s=0.5)
    runner = threading.Thread(target=server.run, daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: (h := _health(url)) is not None and h.status_code == 200, "the server to start")
    engine = app.state.server.engine
    events: list = []
    client = threading.Thread(target=stream, args=(url, events),
                              kwargs={"max_tokens": 4000, "ignore_eos": True})
    client.start()
    _wait(lambda: engine.stats().active == 1, "the reply to start")
    engine.on_step = lambda: time.sleep(0.01)  # never finishes within the drain timeout
    server.handle_exit(signal.SIGTERM, None)
    client.join(120)
    runner.join(60)
    assert not runner.is_alive()
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_cancelled"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_steer_serve_finishes_a_streaming_reply_on_a_signal(stream, steer_serve, policy_dir, sig):
    """The real command, with its engine process: a signal to the whole process group (Ctrl-C
    reaches the engine child too) lets the reply in flight finish."""
    with steer_serve(policy_dir, "--max_tokens_limit", "4000", new_session=True) as server:
        events: list = []
        client = threading.Thread(target=stream, args=(server.url, events),
                                  kwargs={"max_tokens": 1500, "ignore_eos": True})
        client.start()
        _wait(lambda: any(isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
                          for e in list(events)), "the first tokens")
        server.signal_group(sig)
        client.join(120)
        out = server.stop(timeout=60)
        assert server.proc.returncode == 0, out
    assert events[-1] == "[DONE]", events[-3:]
    assert events[-2]["usage"]["completion_tokens"] == 1500


def test_an_open_ui_tab_does_not_hold_the_shutdown(steer_serve, policy_dir):
    pytest.importorskip("gradio")
    with steer_serve(policy_dir, "--engine-in-process", "--ui", drop_args=("--no-ui",)) as server:
        with httpx.Client(timeout=60) as http:
            with http.stream("GET", f"{server.url}/ui/gradio_api/heartbeat/test-session") as heartbeat:
                assert heartbeat.status_code == 200
                next(heartbeat.iter_lines())  # the tab's heartbeat stream is open
                server.signal(signal.SIGTERM)
                server.proc.wait(timeout=60)  # raises if the open stream holds the process
        assert server.proc.returncode == 0

