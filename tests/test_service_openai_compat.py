"""What OpenAI clients send unasked is accepted; what steer cannot do is refused by name; the
penalties and logit bias they may send change the reply as OpenAI's do."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client(make_client, wait_ready, tiny_policy):
    with make_client(tiny_policy, max_tokens_limit=64, max_prompt_tokens=300) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="session")
def chat(hello):
    """``chat(client, **body)``: a greedy 8-token request for ``hello`` with ``body`` on top."""
    def post(client, **body):
        return client.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 8, "temperature": 0, **body})

    return post


def test_openai_defaults_are_accepted(chat, client):
    defaults = {
        "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
        "parallel_tool_calls": True, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "user": "player-7", "metadata": {"session": "abc"}, "store": False, "service_tier": "auto",
        "modalities": ["text"], "safety_identifier": "x", "prompt_cache_key": "k", "stream": False,
        "stream_options": None, "n": 1, "functions": None, "function_call": None,
    }
    plain = chat(client)
    r = chat(client, **defaults)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]
    r = chat(client, stream=True, stream_options={"include_usage": True, "include_obfuscation": True})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("patch, param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"store": True}, "store"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "content": "42", "tool_call_id": "1"}]}, "messages[1].tool_calls"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"dog": 5}}, "logit_bias"),
    ({"logit_bias": {"100000": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 250}}, "logit_bias"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_what_steer_cannot_do_is_a_400_naming_the_field(chat, client, patch, param):
    r = chat(client, **patch)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    if param not in ("presence_penalty", "logit_bias", "frobnicate"):
        assert "not supported" in error["message"]


def test_developer_role_is_the_system_message(chat, hello, client):
    serving = client.app.state.server.serving
    prompts = []
    tokenize = serving.policy.template.tokenize

    def spy(messages, *args, **kwargs):
        prompts.append(messages)
        return tokenize(messages, *args, **kwargs)

    serving.policy.template.tokenize = spy
    try:
        system = chat(client, messages=[{"role": "system", "content": "Be brief."}, *hello])
        developer = chat(client, messages=[{"role": "developer", "content": "Be brief."}, *hello])
    finally:
        del serving.policy.template.tokenize
    assert system.status_code == developer.status_code == 200
    assert prompts[0] == prompts[1] and prompts[1][0]["role"] == "system"
    assert system.json()["choices"][0]["message"]["content"] == developer.json()["choices"][0]["message"]["content"]


def _token_ids(client, text: str) -> list[int]:
    tokenizer = client.app.state.server.serving.policy.tokenizer
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_logit_bias_and_penalties_change_the_reply(chat, client):
    tokenizer = client.app.state.server.serving.policy.tokenizer
    forced = tokenizer.convert_tokens_to_ids("▁cat") if "▁cat" in tokenizer.get_vocab() else 300
    r = chat(client, logit_bias={str(forced): 100}, max_tokens=6, ignore_eos=True)
    assert r.status_code == 200
    assert _token_ids(client, r.json()["choices"][0]["message"]["content"]).count(forced) >= 5

    plain = chat(client, max_tokens=24, ignore_eos=True).json()["choices"][0]["message"]["content"]
    penalised = chat(client, max_tokens=24, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised.status_code == 200
    text = penalised.json()["choices"][0]["message"]["content"]
    ids = _token_ids(client, text)
    # Greedy decoding of a random model repeats itself; with the penalties each token is rarer.
    assert max(map(_token_ids(client, plain).count, set(_token_ids(client, plain)))) > max(map(ids.count, set(ids)))
