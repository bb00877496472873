"""The HTTP-upstream engine (steer.runtime.upstream) against a fake vLLM / llama-server that decodes
from a real tiny policy: same text as the torch engine, steer's stop rules, early close of the
upstream stream, queueing, errors naming the upstream, seeds and API keys passed through, and
ChatServing over it (plain and streaming)."""

import asyncio
import threading

import pytest

from steer.runtime.rows import Row
from steer.runtime.sampling import SamplingParams
from steer.runtime.scheduler import EngineFailedError, QueueFullError, Scheduler
from steer.runtime.stopping import reply_stops
from steer.runtime.upstream import UpstreamEngine, UpstreamError

APIS = ["vllm", "llama-server"]
PATHS = {"vllm": "/v1/completions", "llama-server": "/completion"}
WAIT_S = 60  # the most any test waits for an event; never a timing assertion


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, build_ui_policy):
    return build_ui_policy(tmp_path_factory.mktemp("upstream") / "policy")


@pytest.fixture(scope="module")
def policy(policy_dir):
    from steer.models.policy import load_policy

    return load_policy(policy_dir, device="cpu")


@pytest.fixture(scope="module")
def eos_ids(policy):
    from steer.runtime.model_runner import eos_token_ids

    return sorted(eos_token_ids(policy.model, policy.tokenizer))


@pytest.fixture(scope="module")
def fake(policy, fake_upstream, live_server):
    upstream = fake_upstream(policy.model, policy.tokenizer)
    with live_server(upstream.app()) as server:
        upstream.url = server.url
        yield upstream


@pytest.fixture
def reset_fake(fake):
    yield fake
    fake.api_key, fake.fail, fake.token_ids_field, fake.tokens_per_event, fake.script = None, None, False, 1, None
    fake.inject, fake.delay_s = None, 0.005
    fake.records.clear()


@pytest.fixture(scope="module")
def prompt(policy):
    attributes = policy.schema.validate({})
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    return list(policy.template.tokenize(messages, policy.tokenizer, mode="inference", attributes=attributes).input_ids)


def make_row(policy, prompt, sink=None, stops=(), **params) -> Row:
    params = SamplingParams(**{"max_new_tokens": 24, "temperature": 0.0, **params})
    return Row(prompt_ids=list(prompt), params=params, stops=reply_stops(policy.template, list(stops)), sink=sink)


@pytest.fixture(scope="module")
def torch_reply(policy, prompt, eos_ids):
    """The torch engine's greedy reply to ``prompt`` (its row), for ``max_new_tokens``."""
    cache = {}

    def reply(max_new_tokens=24, stops=()):
        key = (max_new_tokens, tuple(stops))
        if key not in cache:
            scheduler = Scheduler(policy.model, policy.tokenizer, eos_token_ids=eos_ids, max_queue=0)
            cache[key] = scheduler.run([make_row(policy, prompt, stops=stops, max_new_tokens=max_new_tokens)])[0]
        return cache[key]

    return reply


@pytest.fixture
def engine_for(reset_fake, policy, eos_ids):
    engines = []

    def make(api, **kw):
        engine = UpstreamEngine(kw.pop("url", reset_fake.url), api=api, tokenizer=policy.tokenizer,
                                eos_token_ids=eos_ids, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def decode(engine, rows):
    engine.submit(rows)
    for row in rows:
        assert row.sink.done.wait(WAIT_S)
    return rows


@pytest.mark.parametrize("api", APIS)
def test_greedy_reply_equals_torch_engine(api, engine_for, policy, prompt, torch_reply, collector):
    expected = torch_reply(40)
    counted = []
    engine = engine_for(api, on_token=counted.append)
    engine.start()
    assert engine.max_context == 512  # learned from the upstream
    row, = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=40)])
    assert row.generated == expected.generated
    assert row.reply.text == expected.reply.text and row.finish_reason == expected.finish_reason
    assert row.sink.text == expected.reply.text  # the streamed deltas add up to the reply
    assert row.sink.final.completion_tokens == len(expected.generated)
    stats = engine.stats()
    assert stats.finished_total == 1 and stats.tokens_total == len(expected.generated)
    assert stats.active == 0 and stats.steps_total >= 1
    assert engine.stalled_for() == 0.0
    engine.stop()  # joins the loop thread: every on_token call has been made
    assert sum(counted) == len(expected.generated)


def test_vllm_token_ids_field_and_several_tokens_per_event(engine_for, reset_fake, policy, prompt, torch_reply,
                                                           collector):
    reset_fake.token_ids_field, reset_fake.tokens_per_event = True, 3
    engine = engine_for("vllm")
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.generated == torch_reply().generated and row.reply.text == torch_reply().reply.text
    assert reset_fake.records[-1].body["return_token_ids"] is True


@pytest.mark.parametrize("api", APIS)
def test_request_carries_prompt_ids_budget_and_no_upstream_stops(api, engine_for, reset_fake, policy, prompt,
                                                                 collector):
    engine = engine_for(api)
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=5, presence_penalty=0.5,
                                    logit_bias={3: -100.0})])
    assert row.finish_reason == "length" and len(row.generated) == 5
    body = reset_fake.records[-1].body
    assert body["prompt"] == prompt and body["stream"] is True and body["stop"] == []
    assert body["presence_penalty"] == 0.5
    if api == "vllm":
        assert body["max_tokens"] == 5 and body["logprobs"] == 0 and body["return_tokens_as_token_ids"] is True
        assert body["model"] == "policy" and body["ignore_eos"] is True and body["logit_bias"] == {"3": -100.0}
    else:
        assert body["n_predict"] == 5 and body["return_tokens"] is True and body["cache_prompt"] is True
        assert body["ignore_eos"] is False and body["logit_bias"] == [[3, -100.0]]


@pytest.mark.parametrize("api", APIS)
def test_stop_string_ends_reply_and_closes_upstream_stream(api, engine_for, reset_fake, policy, prompt, torch_reply,
                                                           collector):
    full = torch_reply(200).reply.text
    assert len(full) > 12, full
    stop = full[6:9]
    cut = full.find(stop)
    engine = engine_for(api)
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector(), stops=[stop], max_new_tokens=200)])
    assert row.finish_reason == "stop" and row.reply.text == full[:cut] == row.sink.text
    record = reset_fake.records[-1]
    assert record.ended.wait(WAIT_S)
    assert record.closed_early and record.sent < 200


@pytest.mark.parametrize("api", APIS)
def test_cancel_closes_upstream_stream(api, engine_for, reset_fake, policy, prompt, collector):
    first = threading.Event()
    sink = collector()

    def on_event(event):
        sink(event)
        first.set()

    on_event.done = sink.done
    engine = engine_for(api)
    engine.start()
    row = make_row(policy, prompt, on_event, max_new_tokens=400, ignore_eos=True)
    engine.submit([row])
    assert first.wait(WAIT_S)
    engine.cancel([row])
    assert sink.done.wait(WAIT_S)
    assert sink.final.finish_reason == "cancelled" and sink.final.error is None
    record = reset_fake.records[-1]
    assert record.ended.wait(WAIT_S)
    assert record.closed_early and record.sent < 400
    assert engine.stats().cancelled_total == 1


def test_queue_full_and_waiting_rows(engine_for, policy, prompt, collector):
    engine = engine_for("vllm", max_batch_size=1, max_queue=1)
    rows = [make_row(policy, prompt, collector(), max_new_tokens=3) for _ in range(3)]
    engine.submit(rows[:2])  # one may stream, one may wait
    with pytest.raises(QueueFullError):
        engine.submit(rows[2:])
    assert engine.stats().waiting == 2
    engine.cancel(rows[1:2])  # a waiting row leaves the queue at once
    assert rows[1].sink.done.is_set() and rows[1].sink.final.finish_reason == "cancelled"
    engine.submit(rows[2:])
    engine.start()  # the waiting rows run once the engine starts, one at a time
    for row in (rows[0], rows[2]):
        assert row.sink.done.wait(WAIT_S) and row.finish_reason in ("stop", "length")
    stats = engine.stats()
    assert stats.max_batch_seen == 1 and stats.finished_total == 2 and stats.cancelled_total == 1


@pytest.mark.parametrize("api", APIS)
def test_unreachable_upstream(api, engine_for, free_port, policy, prompt, collector):
    dead = f"http://127.0.0.1:{free_port()}"
    engine = engine_for(api, url=dead)
    with pytest.raises(EngineFailedError, match=dead):
        engine.start()
    with pytest.raises(EngineFailedError, match="not running"):
        engine.submit([make_row(policy, prompt, collector())])


def test_upstream_gone_after_start_fails_the_row(engine_for, free_port, policy, prompt, collector):
    engine = engine_for("vllm")
    engine.start()
    engine.url = dead = f"http://127.0.0.1:{free_port()}"  # the server went away
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.finish_reason == "error" and dead in row.error and "vllm" in row.error
    assert row.sink.final.finish_reason == "error"


@pytest.mark.parametrize("api", APIS)
def test_http_error_from_upstream_fails_the_row_with_its_message(api, engine_for, reset_fake, policy, prompt,
                                                                 collector):
    engine = engine_for(api)
    engine.start()
    reset_fake.fail = (400, "This model's maximum context length is 512 tokens")
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.finish_reason == "error"
    assert "HTTP 400" in row.error and "maximum context length is 512" in row.error and reset_fake.url in row.error
    with pytest.raises(UpstreamError, match="HTTP 400"):
        engine.run([make_row(policy, prompt)])


@pytest.mark.parametrize("api", APIS)
def test_seed_is_passed_through_and_repeats(api, engine_for, reset_fake, policy, prompt, collector):
    engine = engine_for(api)
    engine.start()
    rows = decode(engine, [make_row(policy, prompt, collector(), temperature=1.0, seed=s) for s in (7, 7, 8)])
    assert [r.body["seed"] for r in reset_fake.records[-3:]] == [7, 7, 8]
    assert rows[0].generated == rows[1].generated


@pytest.mark.parametrize("api", APIS)
def test_api_key_is_sent_as_bearer(api, engine_for, reset_fake, policy, prompt, collector):
    reset_fake.api_key = "sk-upstream"
    with pytest.raises(EngineFailedError, match="401"):
        engine_for(api).start()
    engine = engine_for(api, api_key="sk-upstream")
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=4)])
    assert row.finish_reason in ("stop", "length")
    assert reset_fake.records[-1].headers["authorization"] == "Bearer sk-upstream"


def test_run_decodes_on_an_engine_not_started(engine_for, policy, prompt, torch_reply):
    engine = engine_for("llama-server", max_batch_size=2)
    ended = []
    # Past max_batch_size: they take turns, and each is handed back as it ends (to be saved at once).
    rows = engine.run([make_row(policy, prompt) for _ in range(3)], on_done=ended.append)
    assert all(r.reply.text == torch_reply().reply.text for r in rows)
    assert engine.stats().max_batch_seen <= 2
    assert sorted(map(id, ended)) == sorted(map(id, rows))


def test_vllm_needs_a_served_model_name(engine_for):
    with pytest.raises(EngineFailedError, match="does not serve 'other'"):
        engine_for("vllm", model="other").start()


def test_chat_serving_over_upstream(engine_for, policy_dir, torch_reply, policy, sse_events):
    from steer.models.policy import load_policy
    from steer.service.metrics import ServerMetrics
    from steer.service.protocol import ChatCompletionRequest
    from steer.service.serving import ChatServing
    from steer.service.settings import ServerSettings

    light = load_policy(policy_dir, device="cpu", load_model=False)
    assert light.model is None
    engine = engine_for("vllm")
    engine.start()
    serving = ChatServing(light, engine, ServerSettings(policy=str(policy_dir)), ServerMetrics())
    body = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "temperature": 0,
            "max_tokens": 24}

    async def both():
        response = await serving.complete(await serving.start_async(ChatCompletionRequest(**body)))
        chunks = [c async for c in serving.stream(await serving.start_async(
            ChatCompletionRequest(**body, stream=True, stream_options={"include_usage": True})))]
        return response, chunks

    response, chunks = asyncio.run(both())
    expected = torch_reply()
    assert response.choices[0].message.content == expected.reply.text
    assert response.choices[0].finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.generated)
    events = sse_events("".join(chunks))
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices"))
    assert streamed == expected.reply.text
    assert events[-2]["usage"]["completion_tokens"] == len(expected.generated)


@pytest.mark.parametrize("api", APIS)
def test_eos_ends_the_reply_as_on_torch(api, engine_for, reset_fake, policy, prompt, eos_ids, collector):
    # A bias that makes EOS the third token's choice is hard to arrange; one that forces it at once is not.
    force = {eos_ids[0]: 100.0}
    scheduler = Scheduler(policy.model, policy.tokenizer, eos_token_ids=eos_ids, max_queue=0)
    expected, = scheduler.run([make_row(policy, prompt, logit_bias=force)])
    engine = engine_for(api)
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector(), logit_bias=force)])
    assert row.finish_reason == expected.finish_reason == "stop"
    assert row.generated == expected.generated == [eos_ids[0]] and row.reply.text == ""
    assert reset_fake.records[-1].ended.wait(WAIT_S)


@pytest.mark.parametrize("api", APIS)
def test_characters_split_across_tokens(api, engine_for, reset_fake, policy, prompt, collector):
    # stories260K spells these characters as byte tokens: llama-server sends no id for a token that
    # leaves a character unfinished, and the engine must still end with the right text.
    text = "Hi \u2615 caf\u00e9 \U0001F600 end"
    script = policy.tokenizer.encode(text, add_special_tokens=False)
    assert sum(t in policy.tokenizer.convert_tokens_to_ids(["<0xE2>", "<0xF0>"]) for t in script) == 2
    reset_fake.script = script
    engine = engine_for(api)
    engine.start()
    row, = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=len(script) + 4)])
    assert row.finish_reason == "length" and row.reply.text == policy.tokenizer.decode(script) == text
    assert row.sink.text == text
    record = reset_fake.records[-1]
    if api == "llama-server":
        assert record.sent < len(script)  # ids were withheld
    else:
        assert row.generated == script


def test_stop_ends_streaming_and_waiting_rows(engine_for, reset_fake, policy, prompt, collector):
    from steer.runtime.rows import STOPPED_MESSAGE

    first = threading.Event()
    engine = engine_for("llama-server", max_batch_size=1)
    engine.start()
    streaming, waiting = collector(), collector()

    def on_event(event):
        streaming(event)
        first.set()

    rows = [make_row(policy, prompt, on_event, max_new_tokens=400, ignore_eos=True),
            make_row(policy, prompt, waiting, max_new_tokens=400)]
    engine.submit(rows)
    assert first.wait(WAIT_S)
    assert engine.stalled_for() > 0.0 and engine.stats().waiting == 1
    engine.stop()
    for sink in (streaming, waiting):
        assert sink.done.is_set() and sink.final.finish_reason == "cancelled" and sink.final.error == STOPPED_MESSAGE
    assert reset_fake.records[-1].ended.wait(WAIT_S) and reset_fake.records[-1].closed_early
    assert len(reset_fake.records) == 1  # the waiting row never reached the upstream
    with pytest.raises(Exception, match="shutting down"):
        engine.submit([make_row(policy, prompt)])


@pytest.mark.llamacpp
def test_real_llama_server_greedy(engine_for, policy, prompt, torch_reply, shared_path, free_port, collector):
    """Against llama.cpp's own server on stories260K's F32 GGUF (the same weights as the policy):
    set STEER_LLAMA_SERVER to the llama-server binary (or put it on PATH) and run ``-m llamacpp``."""
    import os
    import shutil
    import subprocess
    import time

    import httpx

    binary = os.environ.get("STEER_LLAMA_SERVER") or shutil.which("llama-server")
    if not binary:
        pytest.skip("no llama-server binary (set STEER_LLAMA_SERVER)")
    gguf = shared_path("models", "stories260K", "stories260K.gguf")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                               "-c", "1024", "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, "llama-server exited"
            time.sleep(0.2)
        engine = engine_for("llama-server", url=url, max_batch_size=2)
        engine.start()
        assert 0 < engine.max_context <= 512  # -c 1024 over 2 slots, at most the model's training context
        expected = torch_reply(40)
        rows = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=40) for _ in range(2)])
        for row in rows:
            assert row.finish_reason == expected.finish_reason, row.error
            # Other kernels: greedy replies agree at least until the first near-tie.
            assert row.generated[:8] == expected.generated[:8]
        assert rows[0].generated == rows[1].generated
        stop = expected.reply.text[6:9]
        row, = decode(engine, [make_row(policy, prompt, collector(), stops=[stop], max_new_tokens=40)])
        assert row.finish_reason == "stop" and stop not in row.reply.text
    finally:
        server.terminate()
        server.wait(30)


@pytest.mark.parametrize("api", APIS)
def test_many_rows_take_turns_in_the_batch(api, engine_for, reset_fake, policy, prompt, torch_reply, collector):
    full = torch_reply(40).reply.text
    stop = full[6:9]
    engine = engine_for(api, max_batch_size=4, max_queue=8)
    engine.start()
    rows = decode(engine, [make_row(policy, prompt, collector(), max_new_tokens=40, stops=[stop] if i % 2 else [])
                           for i in range(10)])
    for i, row in enumerate(rows):
        assert row.reply.text == (full[:full.find(stop)] if i % 2 else full) == row.sink.text
    stats = engine.stats()
    assert stats.max_batch_seen == 4 and stats.finished_total == 10 and stats.waiting == stats.active == 0


@pytest.mark.parametrize("api", APIS)
def test_malformed_stream_and_error_events_fail_the_row(api, engine_for, reset_fake, policy, prompt, collector):
    engine = engine_for(api)
    engine.start()
    reset_fake.inject = "data: {not json"
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.finish_reason == "error" and "malformed stream event" in row.error and reset_fake.url in row.error
    reset_fake.inject = 'data: {"error": {"code": 500, "message": "CUDA out of memory", "type": "server_error"}}'
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.finish_reason == "error" and "reported an error: CUDA out of memory" in row.error
    assert reset_fake.records[-1].ended.wait(WAIT_S) and reset_fake.records[-1].closed_early


def test_silent_upstream_times_out(engine_for, reset_fake, policy, prompt, collector):
    engine = engine_for("vllm", timeout_s=0.5)
    engine.start()
    reset_fake.delay_s = 30  # one event, then silence
    row, = decode(engine, [make_row(policy, prompt, collector())])
    assert row.finish_reason == "error" and "did not answer within 0.5 s" in row.error
    assert len(row.generated) == 1 and row.sink.final.text == ""


# ------------------------------------------------------------------- wiring: --engine vllm / --upstream
def test_engine_choice_names_the_upstream_field():
    from steer.runtime.engines import EngineChoiceError, check_engine

    with pytest.raises(EngineChoiceError, match="--upstream URL") as e:
        check_engine("vllm", "policy")
    assert e.value.field == "upstream"
    with pytest.raises(EngineChoiceError, match="--engine vllm") as e:
        check_engine("torch", "policy", "http://127.0.0.1:8000")
    assert e.value.field == "upstream"
    with pytest.raises(EngineChoiceError, match="http") as e:
        check_engine("vllm", "policy", "127.0.0.1:8000")
    assert e.value.field == "upstream"
    # A llama-server upstream needs no llama.cpp here, and takes a policy directory for the tokenizer.
    assert check_engine("llama.cpp", "policy-dir", "http://127.0.0.1:8080") == "llama.cpp"
    assert check_engine("vllm", "policy-dir", "https://gpu-host:8000/v1") == "vllm"


@pytest.mark.parametrize("engine,api", [("vllm", "vllm"), ("llama.cpp", "llama-server")])
def test_steer_generator_decodes_on_an_upstream(engine, api, reset_fake, policy_dir, torch_reply):
    from steer.runtime.generator import SteerGenerator

    generator = SteerGenerator.load(policy_dir, engine=engine, upstream=reset_fake.url)
    try:
        assert generator.model is None and generator.max_context == 512  # learned from the upstream
        result = generator.generate([{"role": "user", "content": "Tell me a story about a cat."}], temperature=0.0,
                                    max_new_tokens=24)
    finally:
        generator.engine.stop()
    expected = torch_reply()
    assert result.text == expected.reply.text and result.completion_tokens == len(expected.generated)
    assert reset_fake.records and reset_fake.records[-1].path == PATHS[api]


def test_steer_serve_over_a_vllm_upstream(reset_fake, policy_dir, torch_reply, make_client, wait_ready, sse_events):
    reset_fake.api_key = "upstream-secret"
    body = {"messages": [{"role": "user", "content": "Tell me a story about a cat."}], "temperature": 0,
            "max_tokens": 24}
    expected = torch_reply()
    with make_client(policy_dir, engine="vllm", upstream=reset_fake.url, upstream_api_key="upstream-secret",
                     engine_in_process=False) as client:
        wait_ready(client)
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected.reply.text
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in sse_events(streamed.text)[:-1]
                       if e.get("choices"))
        assert text == expected.reply.text
        assert client.get("/metrics").text.count("steer_") > 0
    assert reset_fake.records and all(r.path == PATHS["vllm"] for r in reset_fake.records)
    assert all(r.headers.get("authorization") == "Bearer upstream-secret" for r in reset_fake.records)


def test_steer_serve_reports_an_upstream_that_is_down(policy_dir, make_client, free_port):
    url = f"http://127.0.0.1:{free_port()}"
    with make_client(policy_dir, engine="vllm", upstream=url, engine_in_process=False) as client:
        for _ in range(1200):
            health = client.get("/health")
            if health.json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        assert health.status_code == 503 and health.json()["status"].startswith("failed")
        assert url in health.json()["status"]
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 503 and url in reply.json()["error"]["message"]


def test_cli_vllm_engine_without_upstream_names_the_field(policy_dir, capsys):
    from steer.cli.main import main

    code = main(["generate", "--policy", str(policy_dir), "--prompt", "hi", "--engine", "vllm"])
    assert code != 0
    assert "error [upstream]: --engine vllm decodes on a vLLM server you run" in capsys.readouterr().err


def test_cli_generate_on_a_llama_server_upstream(reset_fake, policy_dir, torch_reply, capsys):
    import json

    from steer.cli.main import main

    code = main(["generate", "--policy", str(policy_dir), "--prompt", "Tell me a story about a cat.", "--engine",
                 "llama.cpp", "--upstream", reset_fake.url, "--temperature", "0", "--max-new-tokens", "24", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == torch_reply().reply.text
    assert reset_fake.records[-1].path == PATHS["llama-server"]
