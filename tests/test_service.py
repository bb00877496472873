"""The chat API in-process (FastAPI TestClient) on a tiny random Llama saved as a policy directory."""

from __future__ import annotations

import json
from pathlib import Path
import threading
import time

import pytest

from steer.core.artifacts import save_steer_config


@pytest.fixture(scope="module")
def client(make_client, wait_ready, tiny_policy):
    with make_client(tiny_policy, max_tokens_limit=64, max_prompt_tokens=300) as c:
        wait_ready(c)
        yield c


def test_models_and_attributes(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-steer"
    attrs = client.get("/v1/attributes").json()
    assert [a["name"] for a in attrs["attributes"]] == ["helpfulness", "humor", "creativity"]
    assert attrs["attributes"][0] == {"name": "helpfulness", "min": 0, "max": 4, "default": 3,
                                      "description": "How well the reply serves the user.", "levels": None}
    assert attrs["attributes"][1]["levels"] == ["serious", "dry", "playful", "funny", "hilarious"]
    assert attrs["aliases"] == {"humour": "humor"}
    assert attrs["score_attributes"] is None


def test_completion_shape_and_applied_attributes(hello, client):
    r = client.post("/v1/chat/completions", json={
        "model": "tiny-steer", "messages": hello, "max_tokens": 12, "seed": 3, "attributes": {"humour": 4},
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-steer"
    # The alias maps to the canonical name, and every attribute is reported (defaults filled in).
    assert body["attributes"] == {"helpfulness": 3, "humor": 4, "creativity": 1}
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] <= 12 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_prompt_comes_from_the_policy_template(hello, client, tiny_policy):
    """usage.prompt_tokens is exactly the template's inference prompt for the requested attributes."""
    from steer.models.policy import load_policy

    policy = load_policy(tiny_policy)
    expected = policy.template.tokenize(hello, policy.tokenizer, mode="inference", attributes={"humor": 2})
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 1, "attributes": {"humor": 2}})
    assert r.json()["usage"]["prompt_tokens"] == len(expected.input_ids)


def test_stream_matches_non_stream_with_the_same_seed(hello, sse_events, client):
    base = {"messages": hello, "max_tokens": 16, "seed": 11, "temperature": 1.0, "attributes": {"creativity": 4}}
    whole = client.post("/v1/chat/completions", json=base).json()
    r = client.post("/v1/chat/completions", json={**base, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["attributes"] == whole["attributes"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert finish == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_n_choices_and_request_stop_string(hello, client):
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 10, "n": 3, "seed": 5})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # Each choice samples with its own generator (seed + index), so the choices differ.
    assert len({c["message"]["content"] for c in body["choices"]}) > 1
    first = body["choices"][0]["message"]["content"]
    if len(first) >= 3:
        # Stopping at a string the reply is known to contain cuts the reply just before it.
        stop = first[1:3]
        cut = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 10, "seed": 5, "stop": stop})
        assert cut.json()["choices"][0]["message"]["content"] == first[:first.find(stop)]
        assert cut.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"attributes": {"wit": 3}}, "attributes.wit"),
        ({"attributes": {"humor": 9}}, "attributes.humor"),
        ({"attributes": {"humor": "high"}}, "attributes.humor"),
        ({"attributes": {"humor": 2.5}}, "attributes.humor"),
        ({"attributes": ["humor"]}, "attributes"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
        ({"max_tokens": 65}, "max_tokens"),
        ({"max_tokens": None, "max_completion_tokens": 1000}, "max_completion_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 99}, "n"),
        ({"seed": -1}, "seed"),
        ({"stream": "yes please"}, "stream"),
        ({"score": True}, "score"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(hello, client, patch, param):
    r = client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 4, **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_bad_json_and_unknown_model(hello, client):
    r = client.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": hello})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_metrics_report_requests_tokens_and_latency(hello, client):
    client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 5})
    client.post("/v1/chat/completions", json={"messages": [], "max_tokens": 5})
    text = client.get("/metrics").text
    assert 'steer_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'steer_requests_total{route="/v1/chat/completions",status="400"}' in text
    tokens = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("steer_generated_tokens_total")))
    assert tokens >= 1
    assert "steer_time_to_first_token_seconds_count" in text and "steer_request_latency_seconds_bucket" in text
    # A reply reaches its client just before the engine frees the row (and the engine's stats reach
    # the server a moment later), so the gauges are read until the engine is idle.
    deadline = time.monotonic() + 10
    while not ("steer_queue_depth 0.0" in text and "steer_active_rows 0.0" in text) and time.monotonic() < deadline:
        time.sleep(0.05)
        text = client.get("/metrics").text
    assert "steer_queue_depth 0.0" in text and "steer_active_rows 0.0" in text


def test_body_limit_and_api_keys(hello, make_client, wait_ready, tiny_policy):
    with make_client(tiny_policy, max_body_bytes=2000, api_keys=["sk-one", "sk-two"]) as c:
        wait_ready(c)
        assert c.get("/health").status_code == 200  # health stays open for probes
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
        assert r.status_code == 401
        ok = {"Authorization": "Bearer sk-two"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        r = c.post("/v1/chat/completions", headers=ok, json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_health_and_routes_report_a_policy_that_fails_to_load(demo_schema, hello, make_client, tmp_path):
    broken = tmp_path / "broken"
    save_steer_config(broken, "policy", demo_schema, base_model="does-not-exist", adapter=None)
    with make_client(broken) as c:
        deadline = time.monotonic() + 30
        while "failed" not in c.get("/health").json()["status"] and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"].startswith("failed")
        r = c.post("/v1/chat/completions", json={"messages": hello})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"


# ------------------------------------------------------------------ engine
def _engine(tiny_policy, **kw):
    import torch

    from steer.runtime.scheduler import Scheduler as Engine
    from steer.models.policy import load_policy

    torch.set_num_threads(1)  # as the servers here; the module fixture restores it
    policy = load_policy(tiny_policy)
    engine = Engine(policy.model, policy.tokenizer, eos_token_ids=[policy.tokenizer.eos_token_id], **kw)
    return policy, engine


def test_streamed_deltas_hold_split_characters_and_add_up_to_the_reply(make_row, collector, tiny_policy, monkeypatch):
    import torch

    import steer.runtime.scheduler
    from steer.runtime.scheduler import Row
    from steer.runtime.sampling import SamplingParams

    policy, engine = _engine(tiny_policy)
    tok = policy.tokenizer
    reply = "Tea 日 and 🙂, then <end> more"
    script = tok(reply, add_special_tokens=False)["input_ids"]
    assert sum(t in engine._decoder.byte_tokens for t in script) == 7  # 日 and 🙂 come as byte runs
    drawn = iter(script)
    monkeypatch.setattr(steer.runtime.scheduler, "sample_next_tokens",
                        lambda logits, params, rngs, generated=None: torch.tensor([next(drawn) for _ in params]))
    sink, deltas = collector(), []
    row = Row(prompt_ids=make_row(policy, "hi", seed=0)[0].prompt_ids, params=SamplingParams(max_new_tokens=len(script)),
              stops=["<end>"], sink=lambda event: (deltas.append(event.delta), sink(event)))
    engine.start()
    try:
        engine.submit([row])
        assert sink.done.wait(30)
    finally:
        engine.stop()
    assert sink.final.finish_reason == "stop"
    assert sink.final.text == sink.text == "Tea 日 and 🙂, then "
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) > 5  # streamed as it came, not at the end


@pytest.fixture
def make_row(collector):
    """``make_row(policy, content, seed, max_new=24, temperature=1.0)``: an engine row and its sink."""
    from steer.runtime.scheduler import Row
    from steer.runtime.sampling import SamplingParams

    def make(policy, content, seed, max_new=24, temperature=1.0):
        prompt = policy.template.tokenize([{"role": "user", "content": content}], policy.tokenizer,
                                          mode="inference", attributes={"humor": 2})
        sink = collector()
        params = SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed)
        return Row(prompt_ids=prompt.input_ids, params=params, stops=policy.template.stop_strings, sink=sink), sink

    return make


@pytest.mark.parametrize("admission", ["mixed-step", "merge-kv-cache", "re-prefill"])
def test_seeded_request_gives_the_same_text_alone_or_batched(make_row, tiny_policy, admission):
    policy, engine = _engine(tiny_policy, max_batch_size=8, max_queue=16, mixed_steps=admission == "mixed-step")
    if admission == "re-prefill":
        engine.batch._mergeable = False  # the path models with sliding-window caches take
    engine.start()
    try:
        alone, alone_sink = make_row(policy, "Once upon a time", seed=1234)
        engine.submit([alone])
        assert alone_sink.done.wait(30)
        # Same request among others of different lengths, some admitted mid-decode (cache merge).
        first_wave = [make_row(policy, "x " * k + "hello", seed=k) for k in range(3)]
        engine.submit([r for r, _ in first_wave])
        time.sleep(0.01)
        target, target_sink = make_row(policy, "Once upon a time", seed=1234)
        second_wave = [make_row(policy, "a much longer prompt " * k, seed=100 + k) for k in range(1, 4)]
        engine.submit([second_wave[0][0], target, second_wave[1][0]])
        engine.submit([second_wave[2][0]])
        for _, sink in first_wave + second_wave + [(target, target_sink)]:
            assert sink.done.wait(30)
        assert engine.stats().max_batch_seen > 1
        assert target_sink.text == alone_sink.text
        assert target_sink.final.completion_tokens == alone_sink.final.completion_tokens
    finally:
        engine.stop()


def test_requests_joining_a_running_batch_are_prefilled_inside_its_decode_steps(make_row, tiny_policy):
    """Once a batch runs, arriving requests take free or newly added rows and are prefilled by the
    next decode step (steer.runtime.mixed_step) rather than by a forward pass of their own, and still
    generate exactly what they generate alone. A prompt longer than the batch's cache joins too: it
    shares the template's opening with the running rows, so the cache grows on the left to take it
    and that opening is copied (tests/test_generation.py covers a long prompt that shares nothing)."""
    from steer.runtime.scheduler import Scheduler as Engine

    policy, _ = _engine(tiny_policy)
    # No EOS: rows run to their budget, so the first one is still running when the others arrive.
    engine = Engine(policy.model, policy.tokenizer, max_batch_size=5)
    alone_engine = Engine(policy.model, policy.tokenizer, max_batch_size=1, mixed_steps=False)
    specs = [("Once upon a time", 1), ("hi", 2), ("tell me a much longer story than that", 3),
             ("a very long prompt " * 20, 4)]
    alone_engine.start()
    try:
        expected = []
        for content, seed in specs:
            row, sink = make_row(policy, content, seed=seed, max_new=12)
            alone_engine.submit([row])
            assert sink.done.wait(30)
            expected.append((sink.text, sink.final.completion_tokens))
    finally:
        alone_engine.stop()

    prefilled = []
    prefill = engine.batch._prefill
    engine.batch._prefill = lambda sequences: (prefilled.append(len(sequences)), prefill(sequences))[1]
    engine.start()
    try:
        running, running_sink = make_row(policy, "a story that goes on and on and on and on and on", seed=9, max_new=100_000, temperature=0)
        engine.submit([running])
        deadline = time.monotonic() + 30
        while engine.stats().tokens_total < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        rows = [make_row(policy, content, seed=seed, max_new=12) for content, seed in specs]
        engine.submit([rows[0][0]])  # joins alone
        engine.submit([r for r, _ in rows[1:3]])  # two at once: the batch grows by two rows
        assert rows[0][1].done.wait(30) and rows[1][1].done.wait(30)
        columns = engine.batch._state.columns
        copied = engine.stats().prompt_tokens_copied
        assert len(rows[3][0].prompt_ids) > columns + 1  # longer than the batch's cache
        engine.submit([rows[3][0]])
        for _, sink in rows:
            assert sink.done.wait(30)
        assert [(sink.text, sink.final.completion_tokens) for _, sink in rows] == expected
        assert prefilled == [1]  # only the request that started the batch
        assert engine.stats().prompt_tokens_copied - copied >= 8
        assert engine.stats().max_batch_seen >= 3 and not running_sink.done.is_set()
    finally:
        engine.stop()


@pytest.mark.parametrize("mixed_steps", [True, False], ids=["prefilled-in-the-step", "prefilled-apart"])
def test_a_free_slot_is_taken_over_then_compacted_and_text_is_unchanged(collector, tiny_policy, mixed_steps):
    """A row that ends leaves its batch slot free; the next request is written into it (no cache
    copy), prefilled inside the next decode step or on its own, and generates exactly what it
    generates alone; a slot nobody takes is compacted away."""
    from steer.runtime.scheduler import Row
    from steer.runtime.scheduler import Scheduler as Engine
    from steer.runtime.sampling import SamplingParams

    policy, _ = _engine(tiny_policy)
    # No EOS: rows run to their budget.
    engine = Engine(policy.model, policy.tokenizer, max_batch_size=4, mixed_steps=mixed_steps)

    def row(content, seed, max_new):
        ids = policy.template.tokenize([{"role": "user", "content": content}], policy.tokenizer,
                                       mode="inference", attributes={"humor": 2}).input_ids
        sink = collector()
        return Row(prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=seed),
                   stops=["\x00never"], sink=sink), sink

    placed = []
    place, claim = engine.batch._place, engine.batch._claim_slots
    engine.batch._place = lambda new, j, slot, r: (placed.append(slot), place(new, j, slot, r))

    def claim_spy(rows):
        claimed = claim(rows)
        placed.extend(slot for slot, r in engine.batch._joining if any(r is x for x in rows))
        return claimed

    engine.batch._claim_slots = claim_spy
    engine.start()
    try:
        alone, alone_sink = row("Once upon a time", 1234, 12)
        engine.submit([alone])
        assert alone_sink.done.wait(30)
        long_row, long_sink = row("a much longer prompt " * 4, 1, 100_000)
        short_row, short_sink = row("hi", 2, 2)
        engine.submit([long_row, short_row])
        assert short_sink.done.wait(30)
        target, target_sink = row("Once upon a time", 1234, 12)
        engine.submit([target])
        assert target_sink.done.wait(30)
        # The target takes the short row's slot. With mixed steps the long and the short row joined
        # the batch the first request left (kept for the template's opening they share with it): the
        # long row in that request's slot, the short one in a row added for it.
        assert placed == ([0, 1, 1] if mixed_steps else [1])
        assert engine.batch._mixed is mixed_steps
        assert (target_sink.text, target_sink.final.completion_tokens) == (alone_sink.text, 12)
        # Nobody takes the slot the target left: after a few steps the batch is one row again.
        deadline = time.monotonic() + 30
        while len(engine.batch.slots) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.batch.slots == [long_row] and not long_sink.done.is_set()
        engine.cancel([long_row])
        assert long_sink.done.wait(30) and long_sink.final.finish_reason == "cancelled"
    finally:
        engine.stop()


def test_cancelling_one_row_between_steps_keeps_the_rest_decoding(make_row, tiny_policy):
    """A row cancelled between two steps frees its slot before the next step (the batch's mask is
    updated in place there); the other rows go on and the server stays up."""
    policy, engine = _engine(tiny_policy, max_batch_size=4)
    (first, first_sink), (second, second_sink) = [make_row(policy, "hi", seed=s, max_new=3000, temperature=0)
                                                  for s in (1, 2)]
    cancel_first = threading.Event()

    def between_steps():  # runs on the engine thread, after a step and before the next
        if cancel_first.is_set() and not first.cancelled:
            engine.cancel([first])

    engine.on_step = between_steps
    engine.start()
    try:
        engine.submit([first, second])
        deadline = time.monotonic() + 10
        while not (first_sink.text and second_sink.text) and time.monotonic() < deadline:
            time.sleep(0.005)
        cancel_first.set()
        assert first_sink.done.wait(10) and first_sink.final.finish_reason == "cancelled"
        decoded = len(second.generated)
        deadline = time.monotonic() + 10
        while len(second.generated) < decoded + 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(second.generated) >= decoded + 5 and not second_sink.done.is_set()
        assert engine.stats().active == 1
        engine.cancel([second])
        assert second_sink.done.wait(10) and second_sink.final.finish_reason == "cancelled"
    finally:
        engine.stop()


def test_eos_ends_the_reply_and_counts_as_a_completion_token(make_row, tiny_policy):
    """Usage counts EOS, as steer.runtime.generator does, so both report the same completion_tokens."""
    from steer.runtime.scheduler import Scheduler as Engine

    policy, engine = _engine(tiny_policy)
    engine.start()
    try:
        row, sink = make_row(policy, "Once upon a time", seed=0, max_new=8, temperature=0)
        engine.submit([row])
        assert sink.done.wait(30)
        greedy = list(row.generated)
    finally:
        engine.stop()
    assert len(greedy) == 8
    # The same greedy request, now with its third token declared EOS.
    engine = Engine(policy.model, policy.tokenizer, eos_token_ids=[greedy[2]])
    engine.start()
    try:
        row, sink = make_row(policy, "Once upon a time", seed=0, max_new=8, temperature=0)
        engine.submit([row])
        assert sink.done.wait(30)
    finally:
        engine.stop()
    first = greedy.index(greedy[2])  # the earliest occurrence of that token ends it
    assert sink.final.finish_reason == "stop"
    assert sink.final.completion_tokens == first + 1
    assert sink.text == sink.final.text == policy.tokenizer.decode(greedy[:first])


def test_ignore_eos_runs_every_reply_to_max_tokens(hello, make_client, wait_ready, tiny_policy, monkeypatch):
    """With every token declared EOS, a reply is one token long unless the request says ignore_eos."""
    import steer.runtime.model_runner

    monkeypatch.setattr(steer.runtime.model_runner, "eos_token_ids", lambda model, tokenizer: set(range(len(tokenizer))))
    with make_client(tiny_policy) as c:
        wait_ready(c)
        body = {"messages": hello, "max_tokens": 7, "seed": 3, "n": 2}
        plain = c.post("/v1/chat/completions", json=body).json()
        assert plain["usage"]["completion_tokens"] == 2
        assert {ch["finish_reason"] for ch in plain["choices"]} == {"stop"}
        long = c.post("/v1/chat/completions", json={**body, "ignore_eos": True}).json()
        assert long["usage"]["completion_tokens"] == 14
        assert {ch["finish_reason"] for ch in long["choices"]} == {"length"}
        assert all(ch["message"]["content"] for ch in long["choices"])


def test_cancel_frees_the_slot(make_row, tiny_policy):
    policy, engine = _engine(tiny_policy, max_batch_size=1, max_queue=0)
    engine.start()
    try:
        from steer.runtime.scheduler import QueueFullError

        long_row, sink = make_row(policy, "hi", seed=1, max_new=3000, temperature=0)
        engine.submit([long_row])
        deadline = time.monotonic() + 10
        while not sink.text and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.stats().active == 1
        other, other_sink = make_row(policy, "hi", seed=2, max_new=4)
        with pytest.raises(QueueFullError):
            engine.submit([other])
        engine.cancel([long_row])
        assert sink.done.wait(10) and sink.final.finish_reason == "cancelled"
        stats = engine.stats()
        assert stats.active == 0 and stats.cancelled_total == 1
        engine.submit([other])
        assert other_sink.done.wait(10) and other_sink.final.finish_reason in ("stop", "length")
    finally:
        engine.stop()


# ---------------------------------------------------------------- scoring


def test_score_returns_the_apm_measurement_of_each_reply(build_tiny_apm, demo_schema, hello, make_client, sse_events, wait_ready, tiny_policy, tmp_path):
    from steer.models.apm import AttributePredictor

    apm_dir = build_tiny_apm(tmp_path / "apm")
    with make_client(tiny_policy, apm=str(apm_dir)) as c:
        wait_ready(c)
        assert [a["name"] for a in c.get("/v1/attributes").json()["score_attributes"]] == demo_schema.names
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 8, "n": 2, "seed": 4,
                                                 "score": True})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        apm = AttributePredictor.load(apm_dir)
        for choice in choices:
            expected = apm.predict([hello + [{"role": "assistant", "content": choice["message"]["content"]}]])[0]
            assert list(choice["scores"]) == demo_schema.names
            assert list(choice["scores"].values()) == pytest.approx(expected.tolist(), abs=1e-3)
        stream = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 8, "seed": 4, "score": True,
                                                      "stream": True})
        finals = [e for e in sse_events(stream.text)[:-1] if e["choices"] and e["choices"][0].get("finish_reason")]
        assert finals[0]["choices"][0]["scores"] == choices[0]["scores"]


# --------------------------------------------------------------- settings
def test_settings_come_from_flags_over_environment(monkeypatch):
    from steer.service.cli import ServeConfig
    from steer.service.settings import ServerSettings, SettingsError

    for name, value in {"STEER_POLICY": "/env/policy", "STEER_MAX_BATCH_SIZE": "4", "STEER_API_KEYS": "a, b",
                        "STEER_UI": "0", "STEER_RETRY_AFTER": "7", "STEER_DRAIN_TIMEOUT": ""}.items():
        monkeypatch.setenv(name, value)
    s = ServerSettings.from_env({"max_batch_size": 8})
    assert (s.policy, s.max_batch_size, s.api_keys, s.ui) == ("/env/policy", 8, ["a", "b"], False)
    assert (s.retry_after_s, s.drain_timeout_s) == (7, 30.0)  # an empty variable is no value
    monkeypatch.setenv("STEER_PORT", "eighty")
    with pytest.raises(SettingsError) as info:
        ServerSettings()
    assert info.value.field == "port" and "STEER_PORT" in str(info.value) and "'eighty'" in str(info.value)
    monkeypatch.delenv("STEER_PORT")
    with pytest.raises(SettingsError) as info:
        ServerSettings(policy="p", max_batch_size=0)
    assert info.value.field == "max_batch_size"

    from steer.cli.main import build_parser

    for name in ("STEER_POLICY", "STEER_MAX_BATCH_SIZE", "STEER_API_KEYS", "STEER_UI", "STEER_RETRY_AFTER"):
        monkeypatch.delenv(name)
    parser = build_parser(ServeConfig, prog="steer serve", description="")
    (config,) = parser.parse_args_into_dataclasses(
        args=["--policy", "/flag/policy", "--no-ui", "--api-key", "k1", "--api-key", "k2", "--max-queue", "3"])
    s = config.to_settings()
    assert (s.policy, s.ui, s.api_keys, s.max_queue) == ("/flag/policy", False, ["k1", "k2"], 3)
    assert s.engine_in_process is False  # the engine runs in its own process unless asked
    (config,) = parser.parse_args_into_dataclasses(args=["--policy", "p", "--engine-in-process"])
    assert config.to_settings().engine_in_process is True
    monkeypatch.setenv("STEER_ENGINE_IN_PROCESS", "1")
    assert ServerSettings().engine_in_process is True
    (config,) = parser.parse_args_into_dataclasses(args=["--policy", "p", "--ui", "--no-ui"])
    with pytest.raises(SettingsError, match="not both"):
        config.to_settings()


def test_every_setting_has_a_flag_a_variable_and_a_row_in_the_docs():
    """The flags, the variables and the docs table all come from ServerSettings' fields."""
    from steer.service.cli import ServeConfig
    from steer.service.settings import ServerSettings, env_var, flag_name, settings_table
    from steer.cli.main import build_parser

    options = {opt for action in build_parser(ServeConfig, prog="steer serve", description="")._actions
               for opt in action.option_strings}
    for name in ServerSettings.model_fields:
        assert f"--{flag_name(name).replace('_', '-')}" in options
        assert env_var(name).startswith("STEER_")
    assert env_var("drain_timeout_s") == "STEER_DRAIN_TIMEOUT" and flag_name("api_keys") == "api_key"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    assert settings_table() in docs, "docs/serving.md's settings table is stale: paste `python -m steer.service.settings`"
    assert settings_table().count("\n| `--") == len(ServerSettings.model_fields)


@pytest.mark.parametrize("args, env, field, source", [
    (["--port", "-1"], {}, "port", "--port"),
    (["--max-batch-size", "0"], {}, "max_batch_size", "--max-batch-size"),
    ([], {"STEER_MAX_BATCH_SIZE": "four"}, "max_batch_size", "STEER_MAX_BATCH_SIZE"),
    ([], {"STEER_ALLOW_NO_AUTH": "perhaps"}, "allow_no_auth", "STEER_ALLOW_NO_AUTH"),
])
def test_serve_cli_names_the_setting_a_bad_value_is_for(args, env, field, source, tmp_path, capsys, monkeypatch):
    from steer.cli.main import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--policy", str(tmp_path), "--no-ui", *args]) == 2
    err = capsys.readouterr().err
    assert f"error [{field}]" in err and source in err and "Traceback" not in err


def test_serve_cli_rejects_a_flag_value_of_the_wrong_type(tmp_path, capsys):
    from steer.cli.main import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error, before any setting is built
        main(["serve", "--policy", str(tmp_path), "--max-batch-size", "four"])
    assert exit_info.value.code == 2
    assert "--max-batch-size" in capsys.readouterr().err


def test_serve_cli_rejects_a_missing_or_wrong_policy(tmp_path, capsys, monkeypatch):
    from steer.cli.main import main

    monkeypatch.delenv("STEER_POLICY", raising=False)
    assert main(["serve", "--no-ui"]) == 2
    assert "policy" in capsys.readouterr().err
    assert main(["serve", "--policy", str(tmp_path), "--no-ui"]) == 2
    assert "steer_config.json is missing" in capsys.readouterr().err


def test_fast_content_chunk_is_the_pydantic_chunk(hello):
    """Streaming renders content deltas from a cached prefix; the JSON must be what the protocol
    model gives, whatever the text holds."""
    from steer.service.protocol import ChatCompletionRequest, ChunkChoice, DeltaMessage
    from steer.service.serving import ChatServing, Generation

    serving = ChatServing.__new__(ChatServing)
    serving.model_name = 'tiny "steer" \\ é'
    gen = Generation(request=ChatCompletionRequest(messages=hello), messages=[], attributes={}, prompt_tokens=1,
                     rows=[], events=None)
    for index, text in [(0, "hello"), (2, ' "quoted" \\ back\nslash\t'), (1, "é – 字 😀 \u2028 </script>"), (0, "\x00\x1f")]:
        fast = serving._content_chunk(gen, index, text)
        slow = serving._chunk(gen, [ChunkChoice(index=index, delta=DeltaMessage(content=text))])
        assert fast.startswith("data: ") and fast.endswith("\n\n")
        assert json.loads(fast[6:]) == json.loads(slow[6:])


def test_every_error_body_comes_from_one_builder_with_the_documented_shape():
    from steer.service.errors import error_response, invalid_api_key
    from steer.service.protocol import ErrorResponse, error_body
    from steer.service.serving import ServingError

    body = error_body("bad value", param="x", code="invalid_value")
    assert ErrorResponse.model_validate(body).model_dump() == body  # what /openapi.json documents
    assert ServingError(400, "bad value", param="x", code="invalid_value").body() == body
    assert json.loads(error_response(400, "bad value", param="x", code="invalid_value").body) == body
    # A message quoting a lone surrogate from the request still renders (escaped).
    assert b"\\ud800" in error_response(400, "got '\ud800'").body
    assert invalid_api_key().body()["error"]["type"] == "authentication_error"
