"""Hostile and unlucky input: nothing a client sends makes the server stall, crash or answer 5xx."""

from __future__ import annotations

import json
import threading

import pytest


@pytest.fixture(scope="module")
def client(make_client, wait_ready, tiny_policy):
    with make_client(tiny_policy, max_tokens_limit=64, max_prompt_tokens=300, max_messages=50) as c:
        wait_ready(c)
        yield c


def post_raw(client, body: dict, **headers):
    # ensure_ascii keeps lone surrogates as "\ud800" escapes: valid JSON that decodes to invalid text.
    return client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                       headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "system", "content": "ok"}, {"role": "user", "content": "a\udc80"}]}, "messages[1].content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": "x" * 100_000}, "stop"),
])
def test_text_no_tokenizer_can_take_is_a_400_naming_the_field(client, body, param):
    r = post_raw(client, {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_template_that_raises_is_a_400(hello, client, monkeypatch):
    template = client.app.state.server.serving.policy.template

    def broken(*args, **kwargs):
        raise ValueError("this chat template does not render conversations as growing prefixes")

    monkeypatch.setattr(template, "tokenize", broken)
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages" and "growing prefixes" in r.json()["error"]["message"]

    def type_error(*args, **kwargs):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    monkeypatch.setattr(template, "tokenize", type_error)
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_oversized_prompts_are_refused_before_tokenizing(hello, client, monkeypatch):
    serving = client.app.state.server.serving
    calls = []
    tokenize = serving.policy.template.tokenize
    monkeypatch.setattr(serving.policy.template, "tokenize", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    # The body: thousands of one-word messages (capped by count) ...
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word"} for i in range(24_001)]
    r = client.post("/v1/chat/completions", json={"messages": many, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
    # ... and a few messages with more characters than max_prompt_tokens could ever hold.
    huge = serving.max_chars_per_token * 300 + 1
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * huge}],
                                                  "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
    assert r.status_code == 200 and calls == [1]


def test_short_prompts_are_built_on_the_event_loop_and_long_ones_on_the_worker(hello, client, monkeypatch):
    """A short prompt is rendered and tokenized where its request is handled (handing it to the
    worker thread cost more than building it); a long one goes to the worker, so that the loop
    keeps streaming; and while the worker holds the tokenizer, a short one waits its turn there
    rather than using the tokenizer from a second thread."""
    serving = client.app.state.server.serving
    threads = []
    tokenize = serving.policy.template.tokenize
    monkeypatch.setattr(serving.policy.template, "tokenize",
                        lambda *a, **k: threads.append(threading.current_thread().name) or tokenize(*a, **k))
    loop_thread = []
    serving_submit = serving.submit
    monkeypatch.setattr(serving, "submit",
                        lambda p: loop_thread.append(threading.current_thread().name) or serving_submit(p))
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
    assert r.status_code == 200
    assert threads == loop_thread and not threads[0].startswith("steer-prompt")

    monkeypatch.setattr(serving, "INLINE_PROMPT_CHARS", sum(len(m["content"]) for m in hello) - 1)
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
    assert r.status_code == 200
    assert threads[1].startswith("steer-prompt") and loop_thread[1] != threads[1]

    monkeypatch.undo()
    entered = threading.Event()
    build_locked = serving._build_locked
    monkeypatch.setattr(serving, "_build_locked", lambda req: entered.set() or build_locked(req))
    result = []
    with serving._prompt_lock:  # as if the worker were tokenizing a long prompt
        request = threading.Thread(target=lambda: result.append(
            client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})))
        request.start()
        assert entered.wait(30)
    request.join(60)
    assert result and result[0].status_code == 200


@pytest.mark.parametrize("sent, configured, status", [
    ("é".encode(), ["sk-one"], 401),
    ("é".encode(), ["é"], 200),
    (b"sk-one", ["clé-secrète"], 401),
    (b"\xff\xfe", ["sk-one"], 401),
])
def test_non_ascii_api_keys_compare_as_bytes(make_client, wait_ready, tiny_policy, sent, configured, status):
    with make_client(tiny_policy, api_keys=configured) as c:
        wait_ready(c)
        r = c.get("/v1/models", headers={"Authorization": b"Bearer " + sent})
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"]["type"] == "authentication_error"


def test_tiny_temperature_is_greedy(hello, client):
    greedy = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 12, "temperature": 0})
    tiny = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 12, "temperature": 1e-38,
                                                     "seed": 5})
    assert greedy.status_code == tiny.status_code == 200
    assert tiny.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]


def _wait_active(server_state, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while server_state.engine.stats().active == 0:
        assert time.monotonic() < deadline, "the request never started decoding"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [False, True])
def test_requests_in_flight_when_the_engine_stops_get_a_clean_error(hello, make_client, sse_events, wait_ready, tiny_policy, stream):

    with make_client(tiny_policy, max_tokens_limit=4000) as c:
        wait_ready(c)
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", c.post("/v1/chat/completions", json={
            "messages": hello, "max_tokens": 4000, "ignore_eos": True, "stream": stream})))
        worker.start()
        state = c.app.state.server
        _wait_active(state)
        state.engine.stop()
        worker.join(60)
        r = result["r"]
        if stream:
            assert r.status_code == 200
            events = sse_events(r.text)
            assert events[-1] == "[DONE]"
            error = events[-2]["error"]
        else:
            assert r.status_code == 503 and r.headers["Retry-After"]
            error = r.json()["error"]
        assert error["code"] == "request_cancelled" and "retry" in error["message"]


def test_a_failing_engine_loop_fails_its_rows_and_starts_over(hello, make_client, wait_ready, tiny_policy):
    with make_client(tiny_policy, engine_restart_backoff_s=0.01) as c:
        wait_ready(c)
        engine = c.app.state.server.engine
        calls = []

        def crash_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected loop failure")

        engine.on_step = crash_once
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 30, "ignore_eos": True})
        assert r.status_code == 500 and r.json()["error"]["code"] == "generation_failed"
        assert "retry" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert r.status_code == 200
        assert engine.restarts_total == 1 and "steer_engine_restarts_total 1.0" in c.get("/metrics").text

        engine.max_restarts = 1

        def fail_with_a_row():
            # Only once the request holds a row: a step that merely finishes the previous request
            # would otherwise kill the engine before this one arrives, and it would get a 503.
            if engine.stats().active:
                raise RuntimeError("again")

        engine.on_step = fail_with_a_row  # now fails for good
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert r.status_code == 500
        health = c.get("/health")
        assert health.status_code == 503 and "engine failed" in health.json()["status"]
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed"


def test_a_hung_engine_is_reported_by_health(hello, make_client, wait_ready, tiny_policy):
    import time

    with make_client(tiny_policy, stall_after_s=0.2) as c:
        wait_ready(c)
        engine = c.app.state.server.engine
        release, entered = threading.Event(), threading.Event()
        prefill = engine.batch._prefill

        def hang(sequences):
            entered.set()
            release.wait(60)
            return prefill(sequences)

        engine.batch._prefill = hang
        worker = threading.Thread(target=lambda: c.post("/v1/chat/completions",
                                                        json={"messages": hello, "max_tokens": 4}))
        worker.start()
        assert entered.wait(30)
        deadline = time.monotonic() + 30
        while (health := c.get("/health")).status_code == 200:
            assert time.monotonic() < deadline, "the stall was never reported"
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"].startswith("stalled")
        release.set()
        worker.join(60)
        assert c.get("/health").status_code == 200


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PIPES = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# The end of an assistant turn depends on the turn's position: the one-pass path must notice.
POSITIONAL = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
              "{% if m['role'] == 'assistant' %}<|end{{ loop.index }}|>{% endif %}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("placement", ["reply", "system"])
@pytest.mark.parametrize("chat_template", [CHATML, PIPES, POSITIONAL])
def test_chat_template_prompts_render_in_one_pass_with_the_same_segments(gpt2_tokenizer, chat_template, placement):
    from steer.core.attributes import Attribute, AttributeSchema
    from steer.core.template import ChatTemplatePrompt

    schema = AttributeSchema(name="t", attributes=(Attribute("humor", 0, 4, 0, "funny"),))
    tok = type(gpt2_tokenizer).from_pretrained(gpt2_tokenizer.name_or_path)
    tok.chat_template = chat_template
    template = ChatTemplatePrompt(schema, tok, default_system="Be kind.", label_placement=placement)
    turns = 40
    messages = []
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} <extra_id_2>humor:4 sneaky"})
        messages.append({"role": "assistant", "content": f"answer {i}", **({"labels": {"humor": i % 5}} if i % 2 else {})})
    messages.append({"role": "user", "content": "last"})

    renders = []
    chat = template._chat
    template._chat = lambda *a, **k: renders.append(1) or chat(*a, **k)
    fast = template.render(messages, mode="inference", attributes={"humor": 2})
    template._render_inference_once = lambda *a: None  # the general path, twice per assistant turn
    del template._chat
    slow = template.render(messages, mode="inference", attributes={"humor": 2})
    assert [(s.text, s.trainable) for s in fast] == [(s.text, s.trainable) for s in slow]
    if chat_template is POSITIONAL:
        assert len(renders) > turns  # fell back to the general path, same result
    else:
        assert len(renders) <= 3  # the probe (once per template) and one render
