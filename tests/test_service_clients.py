"""Real OpenAI clients, unchanged, against a live ``steer serve``: the ``openai`` package,
LangChain's ``ChatOpenAI`` and LiteLLM. docs/serving.md lists the versions tested."""

from __future__ import annotations


import pytest


KEY = "sk-clients"
ATTRS = {"helpfulness": 4, "humour": 1, "creativity": 3}


@pytest.fixture(scope="module")
def server(build_tiny_policy, steer_serve, tmp_path_factory):
    policy = build_tiny_policy(tmp_path_factory.mktemp("clients") / "policy")
    with steer_serve(policy, "--engine-in-process", "--api-key", KEY, "--max_tokens_limit", "64") as s:
        yield s


def test_openai_package_chat_stream_and_raw_response(hello, server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    completion = client.chat.completions.create(
        model="tiny-steer", messages=[{"role": "developer", "content": "Be brief."}, *hello], max_tokens=10,
        temperature=0, presence_penalty=0, frequency_penalty=0, logprobs=False, user="u1", store=False,
        parallel_tool_calls=False, response_format={"type": "text"}, metadata={"k": "v"},
        extra_body={"attributes": ATTRS})
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.model_extra["attributes"] == {"helpfulness": 4, "humor": 1, "creativity": 3}

    stream = client.chat.completions.create(
        model="tiny-steer", messages=[{"role": "developer", "content": "Be brief."}, *hello], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"attributes": ATTRS})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens

    raw = client.chat.completions.with_raw_response.create(model="tiny-steer", messages=hello, max_tokens=4)
    assert raw.http_request.url.path == "/v1/chat/completions"
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.parse().choices[0].message.role == "assistant"


def test_langchain_chat_openai_invoke_and_stream(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny-steer", base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                     temperature=0, max_tokens=10, presence_penalty=0.0, frequency_penalty=0.0,
                     extra_body={"attributes": ATTRS})
    reply = llm.invoke([("system", "Be brief."), ("human", "Tell me a story.")])
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(chunk.content for chunk in llm.stream([("system", "Be brief."), ("human", "Tell me a story.")]))
    assert streamed == reply.content


def test_litellm_completion(hello, server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    import litellm

    response = litellm.completion(model="openai/tiny-steer", api_base=f"{server.url}/v1", api_key=KEY,
                                  messages=hello, max_tokens=8, temperature=0, num_retries=0,
                                  extra_body={"attributes": ATTRS})
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens <= 8
    chunks = list(litellm.completion(model="openai/tiny-steer", api_base=f"{server.url}/v1", api_key=KEY,
                                     messages=hello, max_tokens=8, temperature=0, stream=True, num_retries=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == response.choices[0].message.content
