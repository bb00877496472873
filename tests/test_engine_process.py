"""The engine in a child process: same text as the engine in a thread, the queue limit enforced on
the server's side, and a dead engine process turned into errors and a failing /health, not a hang."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from steer.runtime.scheduler import QueueFullError, Row
from steer.service.engine_process import EngineFailedError, EngineProcess, EngineProcessConfig
from steer.runtime.sampling import SamplingParams


@pytest.fixture
def make_row(collector):
    """``make_row(policy, content, seed, max_new=16)``: an engine row and its sink."""
    def make(policy, content: str, seed: int, max_new: int = 16):
        ids = policy.template.tokenize([{"role": "user", "content": content}], policy.tokenizer, mode="inference",
                                       attributes=policy.schema.validate({})).input_ids
        sink = collector()
        stops = [policy.template.end_marker] + list(policy.template.stop_strings)
        return Row(prompt_ids=list(ids), params=SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=seed),
                   stops=stops, sink=sink), sink

    return make


@pytest.fixture(scope="module")
def engine_process(tiny_policy):
    engine = EngineProcess(EngineProcessConfig(policy=str(tiny_policy), device="cpu", threads=1, max_batch_size=2),
                           max_queue=1)
    engine.start()
    yield engine
    engine.stop()


def test_process_engine_gives_the_thread_engines_text(make_row, tiny_policy, engine_process):
    from steer.runtime.scheduler import Scheduler as Engine
    from steer.runtime.model_runner import eos_token_ids
    from steer.models.policy import load_policy

    policy = load_policy(tiny_policy, device="cpu")
    assert engine_process.max_context == policy.model.config.max_position_embeddings
    thread_engine = Engine(policy.model, policy.tokenizer, eos_token_ids=eos_token_ids(policy.model, policy.tokenizer))
    thread_engine.start()
    try:
        texts = {}
        for name, engine in (("thread", thread_engine), ("process", engine_process)):
            rows = [make_row(policy, prompt, seed=seed) for prompt, seed in (("Once upon a time", 3), ("Hello", 4))]
            engine.submit([r for r, _ in rows])
            for _, sink in rows:
                assert sink.done.wait(30)
            texts[name] = [(sink.final.text, sink.final.finish_reason, sink.final.completion_tokens) for _, sink in rows]
            # Deltas add up to the final text, as the server streams them.
            assert ["".join(e.delta for e in sink.events) for _, sink in rows] == [t for t, _, _ in texts[name]]
        assert texts["process"] == texts["thread"]
        assert engine_process.stats().finished_total >= 2
    finally:
        thread_engine.stop()


def test_queue_limit_and_cancel_on_the_server_side(make_row, tiny_policy, engine_process):
    from steer.models.policy import load_policy

    policy = load_policy(tiny_policy, load_model=False)
    # Two batch slots and one waiting place: the fourth row is refused at once.
    rows = [make_row(policy, "Once upon a time", seed=i, max_new=3000) for i in range(3)]
    engine_process.submit([r for r, _ in rows])
    extra, extra_sink = make_row(policy, "Hello", seed=9)
    with pytest.raises(QueueFullError, match="busy"):
        engine_process.submit([extra])
    engine_process.cancel([r for r, _ in rows])
    for _, sink in rows:
        assert sink.done.wait(30)
        assert sink.final.finish_reason == "cancelled"
    engine_process.submit([extra])  # room again
    assert extra_sink.done.wait(30)
    assert extra_sink.final.finish_reason in ("stop", "length")


def test_engine_process_that_cannot_load_fails_start_with_the_reason(tmp_path):
    from steer.core.artifacts import save_steer_config
    from steer.core.attributes import Attribute, AttributeSchema
    from steer.core.template import PromptTemplate

    schema = AttributeSchema(name="x", attributes=(Attribute("humor", 0, 4, 0, "funny"),))
    save_steer_config(tmp_path, "policy", schema, PromptTemplate(schema).to_dict(), base_model=str(tmp_path / "gone"),
                      adapter=None, name="broken")
    engine = EngineProcess(EngineProcessConfig(policy=str(tmp_path), device="cpu", threads=1))
    with pytest.raises(EngineFailedError) as e:
        engine.start()
    assert "gone" in str(e.value)


def test_a_killed_engine_process_fails_requests_and_health(hello, make_client, wait_ready, tiny_policy):
    """The server keeps answering: requests in flight end with an error, /health turns 503 naming
    the cause, and new requests get a 503 instead of hanging."""
    with make_client(tiny_policy, engine_in_process=False, max_tokens_limit=4000, engine_max_restarts=0) as client:
        wait_ready(client, timeout=120)
        engine = client.app.state.server.engine
        assert isinstance(engine, EngineProcess)
        reply = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert reply.status_code == 200
        # Token counts cross the process boundary into /metrics.
        metrics = client.get("/metrics").text
        tokens = float(next(line.split()[1] for line in metrics.splitlines()
                            if line.startswith("steer_generated_tokens_total ")))
        assert tokens == reply.json()["usage"]["completion_tokens"]
        # So do decode steps: one request alone takes its first token from the prefill (or a step).
        steps = float(next(line.split()[1] for line in metrics.splitlines()
                           if line.startswith("steer_decode_steps_total ")))
        assert tokens - 1 <= steps <= tokens
        # The same prompt again is copied from what the first request left in the engine's cache,
        # all but its last token, and both counts reach /metrics.
        assert client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4}).status_code == 200
        metrics = client.get("/metrics").text
        fed, copied = (float(next(line.split()[1] for line in metrics.splitlines()
                                  if line.startswith(f"steer_prompt_tokens_{kind}_total ")))
                       for kind in ("fed", "copied"))
        prompt = reply.json()["usage"]["prompt_tokens"]
        assert (fed, copied) == (prompt + 1, prompt - 1)
        result = {}

        def long_request():
            result["response"] = client.post("/v1/chat/completions",
                                             json={"messages": hello, "max_tokens": 3000, "stream": True,
                                                   "ignore_eos": True})

        # ignore_eos: the reply must still be running when the engine is killed.
        worker = threading.Thread(target=long_request)
        worker.start()
        _kill_while_decoding(engine, worker)
        assert '"type": "server_error"' in result["response"].text
        health = client.get("/health")
        assert health.status_code == 503 and "engine process exited" in health.json()["status"]
        refused = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
        assert "engine process exited" in refused.json()["error"]["message"]


def test_engine_threads_leave_a_core_to_the_http_side(monkeypatch):
    import torch

    from steer.service import engine_process

    assert engine_process.engine_threads(3, torch.device("cpu")) == 3
    monkeypatch.setattr(engine_process.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert engine_process.engine_threads(0, torch.device("cpu")) == 3
    monkeypatch.setattr(engine_process.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert engine_process.engine_threads(0, torch.device("cpu")) == 1
    assert engine_process.engine_threads(0, torch.device("cuda")) == torch.get_num_threads()


def test_cancel_command_tolerates_a_row_that_finished_in_between():
    """The engine thread removes a finished row from the shared dict at any moment; a cancel for it
    arriving just then must not end the command loop with a KeyError."""
    from steer.service.engine_process import handle_command

    class RowsPoppedMidCheck(dict):
        def __contains__(self, key):  # the engine thread pops the row right after the check
            present = dict.__contains__(self, key)
            self.pop(key, None)
            return present

    class FakeEngine:
        cancelled: list = []

        def cancel(self, rows):
            self.cancelled.extend(rows)

    live, gone = object(), object()
    rows = RowsPoppedMidCheck({1: live, 2: gone})
    engine = FakeEngine()
    dict.pop(rows, 2)  # finished before the command arrived
    handle_command(engine, rows, lambda key: None, "cancel", [1, 2, 3])
    assert engine.cancelled == [live]


def _stream_until_killed(client, engine, messages):
    result = {}

    def long_request():
        result["response"] = client.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 3000, "stream": True, "ignore_eos": True})

    worker = threading.Thread(target=long_request)
    worker.start()
    _kill_while_decoding(engine, worker)
    return result["response"]


def _kill_while_decoding(engine, worker: threading.Thread) -> None:
    """SIGKILLs the engine process once it is decoding the worker's request, then waits for the
    worker's request to end. The waits are on states; their limits only stop a hung test."""
    deadline = time.monotonic() + 120
    while engine.stats().active == 0:
        assert time.monotonic() < deadline, "the request never started decoding"
        assert worker.is_alive(), "the request ended before the engine was killed"
        time.sleep(0.02)
    os.kill(engine._process.pid, signal.SIGKILL)
    worker.join(120)
    assert not worker.is_alive(), "the request in flight never ended after the engine was killed"


def test_a_crashed_engine_process_is_restarted_and_counted(hello, make_client, sse_events, wait_ready, tiny_policy):

    with make_client(tiny_policy, engine_in_process=False, max_tokens_limit=4000, engine_restart_backoff_s=0.1) as client:
        wait_ready(client, timeout=120)
        engine = client.app.state.server.engine
        first_pid = engine._process.pid
        response = _stream_until_killed(client, engine, hello)
        events = sse_events(response.text)
        assert events[-1] == "[DONE]" and "engine process exited" in events[-2]["error"]["message"]
        wait_ready(client, timeout=120)  # the supervisor brings a new engine process up
        assert engine._process.pid != first_pid and engine.restarts_total == 1
        assert "steer_engine_restarts_total 1.0" in client.get("/metrics").text
        again = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
