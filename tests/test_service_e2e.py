"""End to end: a real uvicorn server on 127.0.0.1 driven by the official ``openai`` client and raw
HTTP (429 on a full server, a disconnecting client freeing its slot), plus schemathesis fuzzing."""

from __future__ import annotations

import json
import threading
import time
import types

import httpx
import pytest


@pytest.fixture(scope="session")
def live_steer_server(live_server):
    """``live_steer_server(**settings)``: a live server (thread) with these ServerSettings."""
    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    def serve(**settings):
        return live_server(create_app(ServerSettings(ui=False, **{"threads": 1, **settings})))

    return serve


@pytest.fixture(scope="module")
def policy_dir(build_tiny_policy, tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("e2e") / "policy")


@pytest.fixture(scope="module")
def keyed_server(live_steer_server, policy_dir):
    # Two slots and no waiting room: the third concurrent row is refused with 429.
    with live_steer_server(policy=str(policy_dir), api_keys=["sk-test"], max_batch_size=2, max_queue=0,
                    max_tokens_limit=4000) as server:
        yield server


def test_openai_client_non_streaming_and_streaming(hello, keyed_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{keyed_server.url}/v1", api_key="sk-test", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-steer"]
    completion = client.chat.completions.create(
        model="tiny-steer", messages=hello, max_tokens=12, seed=7, temperature=0.8,
        extra_body={"attributes": {"helpfulness": 4, "humour": 1, "creativity": 3}},
    )
    assert completion.object == "chat.completion"
    assert completion.model_extra["attributes"] == {"helpfulness": 4, "humor": 1, "creativity": 3}
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 12

    stream = client.chat.completions.create(
        model="tiny-steer", messages=hello, max_tokens=12, seed=7, temperature=0.8, stream=True,
        stream_options={"include_usage": True},
        extra_body={"attributes": {"helpfulness": 4, "humour": 1, "creativity": 3}},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_openai_client_errors(hello, keyed_server):
    import openai

    bad_key = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="sk-test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-steer", messages=hello, extra_body={"attributes": {"wit": 2}})
    assert info.value.body["param"] == "attributes.wit"


def _cancelled(server) -> int:
    return server.engine.stats().cancelled_total


def test_full_server_429_and_disconnect_frees_the_slots(hello, keyed_server):
    headers = {"Authorization": "Bearer sk-test"}
    long_request = {"messages": hello, "max_tokens": 4000, "n": 2, "temperature": 0, "stream": True}
    before = _cancelled(keyed_server)
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_request) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            # Wait for generated content: both rows now hold the batch's two slots.
            while True:
                line = next(lines)
                if line.startswith("data: ") and '"content":"' in line and '"role"' not in line:
                    break
            assert keyed_server.engine.stats().active == 2
            busy = http.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
            assert busy.status_code == 429
            assert busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # Leaving the block closes the connection mid-stream.
    deadline = time.monotonic() + 10
    while keyed_server.engine.stats().active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert keyed_server.engine.stats().active == 0
    assert _cancelled(keyed_server) == before + 2
    ok = httpx.post(f"{keyed_server.url}/v1/chat/completions", headers=headers,
                    json={"messages": hello, "max_tokens": 2})
    assert ok.status_code == 200
    metrics = httpx.get(f"{keyed_server.url}/metrics", headers=headers).text
    assert 'steer_requests_total{route="/v1/chat/completions",status="429"} 1.0' in metrics
    assert f"steer_cancelled_rows {float(before + 2)}" in metrics


def test_concurrent_requests_share_the_batch(live_steer_server, hello, policy_dir):
    with live_steer_server(policy=str(policy_dir), max_batch_size=8) as server:
        body = {"messages": hello, "max_tokens": 40, "temperature": 0}

        def one(i):
            return httpx.post(f"{server.url}/v1/chat/completions", json={**body, "seed": i}, timeout=60)

        threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(6)]
        results: list = []
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 6
        # Greedy: every reply to the same prompt is identical, batched or not.
        assert len({r.json()["choices"][0]["message"]["content"] for r in results}) == 1
        assert server.engine.stats().max_batch_seen > 1


# ---------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def fuzz_server(live_steer_server, policy_dir):
    with live_steer_server(policy=str(policy_dir), max_tokens_limit=8, default_max_tokens=4, max_n=2,
                    max_body_bytes=20_000) as server:
        yield server


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_5xx(fuzz_server, mode):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    seen = []

    @given(case=schema.as_strategy(GenerationMode(mode)))
    # Derandomized: the same cases every run, so whether the chat route is reached (checked below)
    # cannot depend on the draw.
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    def check(case):
        response = case.call(base_url=fuzz_server.url, timeout=30)
        seen.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, (
            f"{case.method} {case.path} body={case.body!r} -> {response.status_code}: {response.text[:300]}"
        )
        if response.status_code >= 400 and case.path.startswith("/v1/"):
            error = json.loads(response.text)["error"]
            assert error["message"] and error["type"]

    check()
    assert any(path == "/v1/chat/completions" for _, path, _ in seen)
    if mode == "negative":
        assert any(status == 400 for method, path, status in seen if path == "/v1/chat/completions")


def _hostile_bodies():
    """Request bodies as raw JSON text: lone surrogates and control characters in every string,
    integers far past 64 bits, infinities, deep nesting, wrong types in every field."""
    from hypothesis import strategies as st

    chars = st.one_of(st.characters(categories=["Cs"]), st.characters(categories=["Cc", "Cf", "Zl", "Zp"]),
                      st.characters())
    text = st.text(chars, max_size=12)
    scalars = st.one_of(st.none(), st.booleans(), text, st.integers(min_value=-10**400, max_value=10**400),
                        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, -1, 2**63, 2**64]))
    values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(text, kids, max_size=3),
                          max_leaves=8)
    role = st.sampled_from(["user", "system", "assistant", "developer", "tool"]) | text
    content = text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2) | values
    message = st.fixed_dictionaries({"role": role, "content": content}, optional={"name": text | values})
    fields = ["model", "attributes", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n",
              "seed", "stream", "stream_options", "score", "user", "logprobs", "top_logprobs", "presence_penalty",
              "frequency_penalty", "logit_bias", "tools", "response_format", "metadata", text]
    body = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3) | values},
        optional={f: values for f in fields if isinstance(f, str)},
    ).map(lambda b: json.dumps(b, ensure_ascii=True))
    depth = st.integers(min_value=1, max_value=200_000)
    nested = st.builds(lambda d, field: '{"messages": [{"role": "user", "content": "hi"}], "%s": %s%s}'
                       % (field, "[" * d, "]" * d), depth, st.sampled_from(["attributes", "stop", "messages", "x"]))
    nested_content = depth.map(lambda d: '{"messages": [{"role": "user", "content": %s"hi"%s}]}' % ("[" * d, "]" * d))
    huge_number = st.integers(min_value=1, max_value=6000).map(
        lambda n: '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}' % ("9" * n))
    return st.one_of(body, nested, nested_content, huge_number)


def test_hostile_bodies_never_get_a_5xx(fuzz_server):
    from hypothesis import HealthCheck, example, given, settings

    statuses = []
    hi = [{"role": "user", "content": "hi"}]

    @given(raw=_hostile_bodies())
    @example(raw=json.dumps({"messages": hi, "attributes": {"\ud800": 1}}))
    @example(raw=json.dumps({"messages": [{"role": "user", "content": "a\udfff\x00\x1b"}]}))
    @example(raw=json.dumps({"messages": hi, "max_tokens": 10**400}))
    @example(raw='{"messages": [{"role": "user", "content": "hi"}], "attributes": %s}' % ("[" * 5000 + "]" * 5000))
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(raw):
        response = httpx.post(f"{fuzz_server.url}/v1/chat/completions", content=raw.encode("ascii"),
                              headers={"content-type": "application/json"}, timeout=30)
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{raw[:300]!r} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["message"] and error["type"]

    check()
    assert 400 in statuses
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200


def test_non_streaming_client_that_gives_up_frees_its_slot(hello, keyed_server):
    before = _cancelled(keyed_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{keyed_server.url}/v1/chat/completions", headers={"Authorization": "Bearer sk-test"},
                   json={"messages": hello, "max_tokens": 4000, "temperature": 0}, timeout=1.0)
    deadline = time.monotonic() + 10
    while _cancelled(keyed_server) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _cancelled(keyed_server) == before + 1
    assert keyed_server.engine.stats().active == 0


# ------------------------------------------------------------------ docs/npc.md
def _npc_guide_client() -> dict:
    """The client function from docs/npc.md, run as written: the guide must stay true."""
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "npc.md").read_text(encoding="utf-8")
    namespace: dict = {}
    blocks = [b.split("```", 1)[0] for b in guide.split("```python\n")[1:]]
    exec(next(b for b in blocks if "def npc_say" in b), namespace)
    return namespace


def test_npc_guide_client_streams_repeats_with_a_seed_and_waits_out_a_full_server(live_steer_server, hello, policy_dir):
    npc = _npc_guide_client()
    persona, ask = "You are Brom, the village blacksmith.", "Can you fix my sword?"
    with live_steer_server(policy=str(policy_dir), max_batch_size=1, max_queue=0, max_tokens_limit=4000) as server:
        pieces: list[str] = []
        line = npc["npc_say"](server.url, persona, [], ask, "grumpy", on_text=pieces.append, seed=4, max_tokens=12)
        assert line and "".join(pieces) == line and len(pieces) > 1
        whole = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "system", "content": persona}, {"role": "user", "content": ask}],
            "attributes": npc["MOODS"]["grumpy"], "max_tokens": 12, "seed": 4}).json()
        assert whole["choices"][0]["message"]["content"] == line
        assert whole["attributes"] == {"helpfulness": 1, "humor": 0, "creativity": 1}

        # The one slot busy with a long reply (far longer than one request takes to arrive): the
        # client gets a 429, waits as told, and gets its line.
        hold = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
            "messages": hello, "max_tokens": 2000, "ignore_eos": True}))
        hold.start()
        deadline = time.monotonic() + 60
        while server.engine.stats().active == 0:
            assert time.monotonic() < deadline, "the long reply never started"
            time.sleep(0.01)
        history = [{"role": "user", "content": ask}, {"role": "assistant", "content": line}]
        sleeps = []

        def sleep_until_the_slot_is_free(seconds):
            # The guide's client sleeps for Retry-After; here the wait ends when the long reply
            # does, so the retry finds the slot free however slow the machine is.
            sleeps.append(seconds)
            hold.join()

        npc["time"] = types.SimpleNamespace(sleep=sleep_until_the_slot_is_free)
        # Seeded: an unseeded reply of a random model can be empty by chance.
        assert npc["npc_say"](server.url, persona, history, "And my shield?", "cheerful", on_text=lambda piece: None,
                              seed=4, max_tokens=8)
        hold.join()
        metrics = httpx.get(f"{server.url}/metrics").text
    assert 'steer_requests_total{route="/v1/chat/completions",status="429"}' in metrics
    assert len(sleeps) == 1 and sleeps[0] >= 1  # it waited once, for the Retry-After the 429 gave
