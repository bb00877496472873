"""The llama.cpp engine (``--engine llama.cpp``): steer's scheduler over a llama.cpp batch.

Tests marked ``llamacpp`` need llama-cpp-python (the [llamacpp] extra) and skip without it; the
others (settings, errors, the runner interface) run everywhere."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.support.assets import shared_path

try:
    import llama_cpp  # noqa: F401

    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False

needs_llama_cpp = [pytest.mark.llamacpp,
                   pytest.mark.skipif(not HAVE_LLAMA_CPP, reason='llama-cpp-python is not installed: pip install "steer[llamacpp]"')]


def _row(ids, max_new=16, temperature=0.0, seed=None, stops=(), sink=None, **params):
    from steer.runtime.sampling import SamplingParams
    from steer.runtime.scheduler import Row

    return Row(prompt_ids=list(ids), params=SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=seed,
                                                           **params), stops=list(stops), sink=sink)


# ------------------------------------------------------------------ no llama.cpp needed
def test_engine_setting_flag_and_environment(monkeypatch):
    from steer.service.cli import ServeConfig
    from steer.service.settings import ServerSettings, SettingsError

    assert ServerSettings(policy="p").engine == "torch"
    monkeypatch.setenv("STEER_ENGINE", "llama.cpp")
    assert ServerSettings(policy="p").engine == "llama.cpp"
    assert ServeConfig(engine="torch", schema="helpsteer").to_settings().attribute_schema == "helpsteer"
    with pytest.raises(SettingsError) as e:
        ServerSettings(policy="p", engine="tensorrt")
    assert e.value.field == "engine" and "--engine" in str(e.value)


def test_engine_choice_errors_name_the_field(tmp_path):
    from steer.runtime.engines import EngineChoiceError, check_engine

    with pytest.raises(EngineChoiceError) as e:
        check_engine("tensorrt")
    assert e.value.field == "engine"
    with pytest.raises(EngineChoiceError) as e:
        check_engine("llama.cpp", str(tmp_path))  # a policy directory, not a .gguf file
    assert e.value.field == "policy" and "steer export gguf" in str(e.value)


def test_missing_extra_says_what_to_install(monkeypatch):
    from steer.runtime.llamacpp import LlamaCppError, import_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    with pytest.raises(LlamaCppError) as e:
        import_llama_cpp()
    assert 'pip install "steer[llamacpp]"' in str(e.value) and "cmake" in str(e.value)
    assert e.value.field == "engine"


def test_cli_reports_missing_extra_as_one_line(monkeypatch, capsys, tmp_path):
    from steer.cli.main import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code = main(["generate", "--policy", str(tmp_path / "model.gguf"), "--prompt", "hi", "--engine", "llama.cpp"])
    assert code == 2
    assert 'error [engine]: the llama.cpp engine needs llama-cpp-python' in capsys.readouterr().err


def test_a_gguf_without_steer_metadata_needs_a_schema():
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    from steer.core.errors import SteerError
    from steer.models.policy import policy_config

    path = shared_path("models", "stories260K", "stories260K.gguf")
    with pytest.raises(SteerError) as e:
        policy_config(path)
    assert e.value.field == "schema" and "--schema" in str(e.value)
    config, schema = policy_config(path, "helpsteer")
    assert schema.name == "helpsteer" and config["kind"] == "policy"
    assert config["template"] is None  # no chat template in the file: the SteerLM template


def test_a_chat_gguf_without_steer_metadata_is_prompted_in_its_own_chat_format():
    """SmolLM2's GGUF carries a ChatML template: the attribute labels close its system message, so
    the reply starts right after the model's own assistant header, and prompts that differ only in
    the user's line share their opening tokens (what llama.cpp's prefix cache reuses)."""
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    from steer.models.policy import load_policy

    path = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    policy = load_policy(path, load_model=False, schema="helpsteer")
    assert policy.config["template"] == {"type": "chat_template", "label_placement": "system"}

    def prompt(text, **attributes):
        ids = policy.template.tokenize([{"role": "user", "content": text}], policy.tokenizer, mode="inference",
                                       attributes=policy.schema.validate(attributes)).input_ids
        return policy.tokenizer.decode(ids)

    dragon = prompt("Tell me a story about a dragon.", verbosity=0)
    assert dragon.startswith("<|im_start|>system\n") and dragon.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "verbosity:0<|im_end|>\n<|im_start|>user\nTell me a story about a dragon.<|im_end|>" in dragon
    sky = prompt("Why is the sky blue?", verbosity=0)
    shared = dragon[:dragon.index("Tell me")]
    assert sky.startswith(shared) and "verbosity:0" in shared


def test_an_engine_killed_by_an_illegal_instruction_says_how_to_rebuild():
    import signal

    from steer.service.engine_process import exit_reason

    assert "GGML_NATIVE=OFF" in exit_reason(-signal.SIGILL)
    assert exit_reason(1) == "the engine process exited (exit code 1)"


class ScriptedBatch:
    """A runner whose model always puts the most mass on the next token of a script (per row):
    the scheduler's sampling, stop strings, EOS and budget are then exercised without a model."""

    max_context = 64

    def __init__(self, script, vocab):
        self.script, self.vocab, self.slots, self.released = script, vocab, [], []

    def admit(self, rows, first_logits):
        self.slots.extend(rows)

    def step(self):
        rows = [r for r in self.slots if r is not None]
        logits = torch.zeros((len(rows), self.vocab))
        for i, r in enumerate(rows):
            logits[i, self.script[len(r.generated) % len(self.script)]] = 10.0
        return rows, logits

    def release(self, row):
        self.released.append(row)
        self.slots[self.slots.index(row)] = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()

    def idle(self):
        pass

    def reset(self):
        self.slots = []


def test_any_runner_gets_the_same_end_of_reply_rule(llama_tokenizer):
    """EOS, a stop string and the budget end replies in the scheduler, whatever runner decodes."""
    from steer.runtime.scheduler import Scheduler

    tok = llama_tokenizer
    words = tok(" one two three four five", add_special_tokens=False).input_ids
    eos = tok.eos_token_id
    batch = ScriptedBatch(words + [eos], len(tok))
    engine = Scheduler(None, tok, max_batch_size=4, max_queue=8, eos_token_ids=[eos], batch=batch)
    rows = [_row([1], max_new=40), _row([1], max_new=3), _row([1], max_new=40, stops=[" three"]),
            _row([1], max_new=len(words) + 2, ignore_eos=True)]
    engine.run(rows)
    # EOS ends the reply and counts as a token, not as text; a stop string is cut off.
    assert (rows[0].reply.text.strip(), rows[0].finish_reason, len(rows[0].generated)) == \
        ("one two three four five", "stop", len(words) + 1)
    assert rows[1].finish_reason == "length" and len(rows[1].generated) == 3
    assert rows[2].finish_reason == "stop" and rows[2].reply.text.strip() == "one two"
    assert rows[3].finish_reason == "length" and len(rows[3].generated) == len(words) + 2
    assert batch.slots == [] and len(batch.released) == 4


def test_default_runner_is_the_torch_batch(tiny_policy):
    from steer.models.policy import load_policy
    from steer.runtime.scheduler import Scheduler
    from steer.runtime.torch_batch import TorchBatch

    policy = load_policy(tiny_policy, device="cpu")
    ids = policy.template.tokenize([{"role": "user", "content": "hi"}], policy.tokenizer, mode="inference").input_ids
    default = Scheduler(policy.model, policy.tokenizer, max_batch_size=2)
    explicit = Scheduler(None, policy.tokenizer, max_batch_size=2,
                         batch=TorchBatch(policy.model, policy.tokenizer.pad_token_id, torch.device("cpu")))
    assert isinstance(default.batch, TorchBatch)
    a, b = _row(ids, 8, 1.0, seed=5), _row(ids, 8, 1.0, seed=5)
    default.run([a])
    explicit.run([b])
    assert a.generated == b.generated and default.batch.slots == [] and explicit.batch.slots == []


# --------------------------------------------------------------------- llama.cpp
def _stories() -> str:
    return str(shared_path("models", "stories260K", "stories260K.gguf"))


@pytest.fixture(scope="module")
def stories_engine_parts(llama_tokenizer):
    if not HAVE_LLAMA_CPP:
        pytest.skip('llama-cpp-python is not installed: pip install "steer[llamacpp]"')
    from steer.models.modeling import load_tokenizer

    return load_tokenizer(_stories())


def _engine(tokenizer, path=None, max_batch_size=4, **kw):
    from steer.runtime.llamacpp import llamacpp_engine

    return llamacpp_engine(path or _stories(), tokenizer, max_batch_size=max_batch_size, max_queue=64, threads=1, **kw)


def _reference_greedy(path: str, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from llama-cpp-python's own ``Llama``, one sequence, argmax of its logits."""
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=512, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(token)
        llm.eval([token])
    llm.close()
    return out


@pytest.mark.llamacpp
def test_greedy_matches_llama_cpp_reference(stories_engine_parts):
    tok = stories_engine_parts
    engine = _engine(tok)
    prompts = [tok("Once upon a time").input_ids, tok("The cat sat").input_ids, tok("Lily").input_ids]
    rows = [_row(ids, max_new=24, ignore_eos=True) for ids in prompts]
    engine.run(rows)  # all three in one batch
    for ids, row in zip(prompts, rows):
        assert row.generated == _reference_greedy(_stories(), ids, 24)


@pytest.mark.llamacpp
def test_a_step_longer_than_one_llama_decode_call_is_split(stories_engine_parts):
    """Prompts joining together beyond n_batch tokens go in several calls, logits in the last."""
    tok = stories_engine_parts
    engine = _engine(tok, n_batch=16)
    prompts = [tok("Once upon a time there was a little girl named Lily who loved").input_ids,
               tok("The big red dog ran to the park").input_ids]
    assert sum(map(len, prompts)) > 16
    rows = [_row(ids, max_new=10, ignore_eos=True) for ids in prompts]
    engine.run(rows)
    assert engine.batch.decode_calls > engine.batch.steps
    for ids, row in zip(prompts, rows):
        assert row.generated == _reference_greedy(_stories(), ids, 10)


@pytest.mark.llamacpp
def test_exported_policy_greedy_matches_reference(build_random_policy, tmp_path):
    pytest.importorskip("llama_cpp", reason='llama-cpp-python is not installed: pip install "steer[llamacpp]"')
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    from steer.cli.export_gguf import ExportGgufConfig, export_policy
    from steer.runtime.generator import GenerationRequest, SteerGenerator

    path = export_policy(ExportGgufConfig(policy=str(build_random_policy(tmp_path / "policy")),
                                          output=str(tmp_path / "policy.gguf"), dtype="f32"))
    generator = SteerGenerator.load(path, engine="llama.cpp", threads=1, max_batch_size=2)
    messages = [{"role": "user", "content": "Tell me about item 3, please."}]
    prepared = generator.prepare(GenerationRequest(messages, max_new_tokens=12, temperature=0.0, ignore_eos=True))
    result = generator.generate_prepared([prepared])[0]
    assert result.completion_tokens == 12
    rows = generator.engine.run([prepared.row()])
    assert rows[0].generated == _reference_greedy(str(path), prepared.prompt_ids, 12)
    assert rows[0].reply.text == result.text


@pytest.mark.llamacpp
def test_seeded_text_is_the_same_alone_and_among_concurrent_rows(stories_engine_parts, collector):
    tok = stories_engine_parts
    ids = tok("Once upon a time").input_ids
    alone_engine = _engine(tok, max_batch_size=1)
    alone = _row(ids, max_new=30, temperature=0.9, seed=1234, top_p=0.95)
    alone_engine.run([alone])

    engine = _engine(tok, max_batch_size=6)
    engine.start()
    try:
        others = [(_row(tok("x " * k + "hello").input_ids, max_new=20 + k, temperature=1.0, seed=k,
                        sink=(s := collector())), s) for k in range(3)]
        engine.submit([r for r, _ in others])
        deadline = time.monotonic() + 30
        while engine.stats().tokens_total < 6 and time.monotonic() < deadline:
            time.sleep(0.002)
        sink = collector()
        target = _row(ids, max_new=30, temperature=0.9, seed=1234, top_p=0.95, sink=sink)
        later = [(_row(tok("a much longer prompt " * k).input_ids, max_new=15, temperature=0.7, seed=100 + k,
                       sink=(s := collector())), s) for k in range(1, 3)]
        engine.submit([later[0][0], target, later[1][0]])  # joins a running batch
        for _, s in others + later + [(target, sink)]:
            assert s.done.wait(60)
        assert engine.stats().max_batch_seen > 1
        assert target.generated == alone.generated and sink.text == alone.reply.text
    finally:
        engine.stop()


@pytest.mark.llamacpp
def test_cancelling_frees_the_slot_and_the_next_row_reuses_it(stories_engine_parts, collector):
    tok = stories_engine_parts
    engine = _engine(tok, max_batch_size=1)  # one sequence: the next row must take the cancelled one's
    engine.start()
    try:
        long_sink = collector()
        long_row = _row(tok("Once upon a time").input_ids, max_new=100_000, ignore_eos=True, sink=long_sink)
        engine.submit([long_row])
        deadline = time.monotonic() + 30
        while engine.stats().tokens_total < 5 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert engine.batch.sequence_length(0) >= 5
        engine.cancel([long_row])
        assert long_sink.done.wait(30) and long_sink.final.finish_reason == "cancelled"
        deadline = time.monotonic() + 30
        while engine.batch.slots and time.monotonic() < deadline:
            time.sleep(0.002)
        assert engine.batch.slots == [] and engine.stats().active == 0
        # The slot is reused: the sequence keeps only what the new prompt shares with the old one
        # (here its first token), and the new row decodes as it does on a fresh engine.
        sink = collector()
        ids = tok("Lily").input_ids
        row = _row(ids, max_new=10, ignore_eos=True, sink=sink)
        engine.submit([row])
        assert sink.done.wait(30)
        assert row.generated == _reference_greedy(_stories(), ids, 10)
        assert engine.batch.sequence_length(0) == len(ids) + 9  # the last generated token is never fed
    finally:
        engine.stop()


@pytest.mark.llamacpp
def test_a_prompt_reuses_the_cached_prefix_of_a_finished_one(stories_engine_parts):
    """A new request takes the free slot whose cached tokens share the longest prefix with its
    prompt, and only the rest of its prompt is fed; the text is what a fresh engine gives."""
    tok = stories_engine_parts
    engine = _engine(tok, max_batch_size=2)
    story = tok("Once upon a time there was a little girl named Lily").input_ids
    other = tok("The big red dog").input_ids
    first = [_row(other, max_new=4, ignore_eos=True), _row(story, max_new=4, ignore_eos=True)]
    engine.run(first)
    fed = engine.batch.tokens_fed
    follow = story + tok(" who loved to play", add_special_tokens=False).input_ids
    row = _row(follow, max_new=8, ignore_eos=True)
    engine.run([row])
    # Slot 1 held the story and its first generated tokens: the follow-up shares the whole story.
    assert engine.batch.tokens_fed - fed == (len(follow) - len(story)) + 7
    assert row.generated == _reference_greedy(_stories(), follow, 8)


@pytest.mark.llamacpp
def test_each_conversation_keeps_its_cache_for_its_next_turn(stories_engine_parts):
    """Two conversations take turns. The second does not overwrite the first's cache (they share
    only the BOS token): it takes the unused slot, and each conversation's next turn finds its whole
    previous turn still cached."""
    tok = stories_engine_parts
    engine = _engine(tok, max_batch_size=2)
    a = tok("Once upon a time there was a little girl named Lily").input_ids
    b = tok("The big red dog ran to the park").input_ids
    rows = {}
    for name, ids in (("a", a), ("b", b)):
        rows[name] = _row(ids, max_new=4, ignore_eos=True)
        engine.run([rows[name]])
    assert engine.batch.sequence_length(0) > 0 and engine.batch.sequence_length(1) > 0  # one slot each
    for name, ids in (("a", a), ("b", b)):
        follow = ids + rows[name].generated[:3] + tok(" and then", add_special_tokens=False).input_ids
        fed = engine.batch.tokens_fed
        row = _row(follow, max_new=2, ignore_eos=True)
        engine.run([row])
        # Only the new words (and the decode steps) are fed: the previous turn was still cached.
        new = len(follow) - len(ids) - 3
        assert engine.batch.tokens_fed - fed == new + 1, name
        assert row.generated == _reference_greedy(_stories(), follow, 2)


@pytest.mark.llamacpp
def test_a_new_conversation_copies_the_shared_prefix_instead_of_evicting(stories_engine_parts):
    """A prompt that shares a long opening with a cached conversation (one NPC's system turn) but
    goes on differently takes a free slot and copies that opening's cache into it; the cached
    conversation stays whole, and both decode as a fresh engine does."""
    tok = stories_engine_parts
    engine = _engine(tok, max_batch_size=2)
    opening = tok("Once upon a time there was a little girl named Lily. She liked to play in the park").input_ids
    first = opening + tok(" with her dog", add_special_tokens=False).input_ids
    second = opening + tok(" on sunny days", add_special_tokens=False).input_ids
    engine.run([_row(first, max_new=3, ignore_eos=True)])
    held = engine.batch.sequence_length(0)
    fed, copied = engine.batch.tokens_fed, engine.batch.sequences_copied
    row = _row(second, max_new=4, ignore_eos=True)
    engine.run([row])
    assert engine.batch.sequences_copied == copied + 1
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert common >= len(opening)
    assert engine.batch.tokens_fed - fed == (len(second) - common) + 3  # the rest, then 3 steps
    assert engine.batch.sequence_length(0) == held  # the first conversation is intact
    assert row.generated == _reference_greedy(_stories(), second, 4)
    again = _row(first + [1], max_new=2, ignore_eos=True)  # ... and it can still continue from its cache
    fed = engine.batch.tokens_fed
    engine.run([again])
    assert engine.batch.tokens_fed - fed <= 3


@pytest.mark.llamacpp
def test_replies_end_by_eos_stop_string_and_budget_as_on_torch(stories_engine_parts):
    """The same ReplyState ends llama.cpp replies: given the tokens, text and ends are the torch engine's."""
    from steer.runtime.detokenize import TokenDecoder
    from steer.runtime.stopping import ReplyState

    tok = stories_engine_parts
    ids = tok("Once upon a time").input_ids
    engine = _engine(tok)
    free = _row(ids, max_new=40)
    budget = _row(ids, max_new=5)
    eos = _row(ids, max_new=40, logit_bias={tok.eos_token_id: 100.0})
    engine.run([free, budget, eos])
    text = free.reply.text
    stop = text.split()[3]
    stopped = _row(ids, max_new=40, stops=[" " + stop])
    engine.run([stopped])
    assert stopped.finish_reason == "stop" and stopped.reply.text == text[:text.index(" " + stop)]
    assert budget.finish_reason == "length" and budget.generated == free.generated[:5]
    assert eos.finish_reason == "stop" and eos.generated == [tok.eos_token_id] and eos.reply.text == ""
    for row in (free, budget, eos, stopped):  # the rule applied to these tokens by hand
        state = ReplyState(TokenDecoder.for_tokenizer(tok).detokenizer(), row.stops, row.params.max_new_tokens,
                           frozenset(engine.eos_token_ids))
        ended = [state.add(t) for t in row.generated]
        assert ended[-1] and not any(ended[:-1]) and state.text == row.reply.text


# ------------------------------------------------------------------- end to end
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llamacpp_server(tmp_path_factory):
    if not HAVE_LLAMA_CPP:
        pytest.skip('llama-cpp-python is not installed: pip install "steer[llamacpp]"')
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "steer.cli", "serve", "--engine", "llama.cpp", "--policy",
                                 _stories(), "--schema", "helpsteer", "--port", str(port), "--threads", "1",
                                 "--max-batch-size", "4", "--no-ui"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("steer serve --engine llama.cpp never became healthy:\n" + log.read_text())
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.llamacpp
def test_serve_llamacpp_end_to_end_streaming_and_not(llamacpp_server):
    body = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 12, "temperature": 0.8,
            "seed": 7, "attributes": {"helpfulness": 3}}
    r = httpx.post(llamacpp_server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["usage"]["completion_tokens"] >= 1
    text = whole["choices"][0]["message"]["content"]
    deltas, finish = [], None
    with httpx.stream("POST", llamacpp_server + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        for line in s.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                deltas.append(choice.get("delta", {}).get("content") or "")
                finish = choice.get("finish_reason") or finish
    assert "".join(deltas) == text and finish == whole["choices"][0]["finish_reason"]  # same seed, same text
    bad = httpx.post(llamacpp_server + "/v1/chat/completions",
                     json={**body, "attributes": {"nonsense": 3}}, timeout=30)
    assert bad.status_code == 400


@pytest.mark.llamacpp
def test_in_process_llamacpp_engine_serves(make_client, wait_ready, hello):
    with make_client(Path(_stories()), engine="llama.cpp", attribute_schema="helpsteer") as c:
        wait_ready(c)
        r = c.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 6, "seed": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        threads = [threading.Thread(target=lambda: c.post("/v1/chat/completions",
                                                          json={"messages": hello, "max_tokens": 6}))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert c.app.state.server.engine.stats().finished_total == 4


@pytest.mark.llamacpp
def test_steerability_eval_runs_on_the_llamacpp_engine(build_tiny_policy, build_tiny_apm, tmp_path):
    """`steer eval steerability --engine llama.cpp` on an exported policy: the same grid, generated
    by llama.cpp, cached apart from the torch engine's generations."""
    if not HAVE_LLAMA_CPP:
        pytest.skip('llama-cpp-python is not installed: pip install "steer[llamacpp]"')
    pytest.importorskip("gguf", reason="the [gguf] extra is not installed")
    from steer.cli.export_gguf import ExportGgufConfig, export_policy
    from steer.training.steerability import SteerabilityConfig, main

    path = export_policy(ExportGgufConfig(policy=str(build_tiny_policy(tmp_path / "policy")),
                                          output=str(tmp_path / "policy.gguf"), dtype="f32"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Can you fix my sword?"}\n{"prompt": "A room, please."}\n')
    config = SteerabilityConfig(policy=str(path), apm=[str(build_tiny_apm(tmp_path / "apm"))], output=str(tmp_path / "out"),
                                prompts=str(prompts), attributes="humor", values="0,4", samples=1, best_of="1,2",
                                max_new_tokens=4, seed=3, batch_size=8, bootstrap=50, device="cpu",
                                engine="llama.cpp", threads=1)
    assert main(config) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["steerability"]) == {"humor"}
    caches = [p.name for p in (tmp_path / "out" / "cache").glob("*.generations.jsonl")]
    assert len(caches) == 1 and "-llama.cpp" in caches[0]
    lines = (tmp_path / "out" / "cache" / caches[0]).read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # prompts x values x the largest best-of
