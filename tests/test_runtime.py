"""One decode runtime: a seeded request gives the same reply through every client of it —
``SteerGenerator``, ``steer generate --input``, and ``steer serve`` alone and under concurrent load."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest


# Seeded probes: different prompts, attributes, sampling settings and a stop string.
PROBES = [
    {"id": "a", "prompt": "Hello there, smith.", "attributes": {"humor": 4}, "seed": 11, "max_new_tokens": 24,
     "temperature": 1.0, "top_p": 0.95},
    {"id": "b", "prompt": "Can you fix my sword?", "attributes": {}, "seed": 12, "max_new_tokens": 17,
     "temperature": 0.7, "top_p": 1.0},
    {"id": "c", "prompt": "Tell me a story.", "attributes": {"creativity": 4, "humor": 0}, "seed": 13,
     "max_new_tokens": 30, "temperature": 1.2, "top_p": 0.9, "stop": ["e"]},
]


@pytest.fixture(scope="module")
def policy(build_tiny_policy, tmp_path_factory):
    return build_tiny_policy(tmp_path_factory.mktemp("runtime") / "policy")


def _chat_body(probe: dict, stream: bool = False) -> dict:
    body = {"messages": [{"role": "user", "content": probe["prompt"]}], "attributes": probe["attributes"],
            "seed": probe["seed"], "max_tokens": probe["max_new_tokens"], "temperature": probe["temperature"],
            "top_p": probe["top_p"], "stream": stream}
    if probe.get("stop"):
        body["stop"] = probe["stop"]
    return body


def _streamed(client: httpx.Client, url: str, body: dict) -> tuple[str, str]:
    text, reason = "", None
    with client.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"]
            if choice:
                text += choice[0]["delta"].get("content") or ""
                reason = choice[0].get("finish_reason") or reason
    return text, reason


def test_a_seeded_request_gives_the_same_reply_through_every_client(policy, steer_serve, tmp_path):
    from steer.cli.generate import GenerateConfig
    from steer.cli.generate import main as generate_main
    from steer.runtime.generator import SteerGenerator

    # 1. The library, one request at a time.
    generator = SteerGenerator.load(policy, device="cpu")
    alone = {}
    for p in PROBES:
        r = generator.generate([{"role": "user", "content": p["prompt"]}], attributes=p["attributes"],
                               max_new_tokens=p["max_new_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                               seed=p["seed"], stop=p.get("stop"))
        alone[p["id"]] = (r.text, r.finish_reason, r.completion_tokens)
    assert any(reason == "stop" for _, reason, _ in alone.values()), "a probe should end at its stop string"
    assert len({text for text, _, _ in alone.values()}) == len(PROBES)

    # 2. `steer generate --input`: all probes in one batch.
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    out = tmp_path / "replies.jsonl"
    assert generate_main(GenerateConfig(policy=str(policy), input=str(requests), output=str(out), batch_size=8)) == 0
    batch = {row["id"]: (row["text"], row["finish_reason"], row["completion_tokens"])
             for row in map(json.loads, out.read_text().splitlines())}
    assert batch == alone

    # 3. `steer serve`: alone, then each probe among concurrent streaming requests.
    with steer_serve(policy, "--max-batch-size", "8") as server, httpx.Client() as client:
        for p in PROBES:
            reply = client.post(f"{server.url}/v1/chat/completions", json=_chat_body(p), timeout=120).json()
            choice = reply["choices"][0]
            assert (choice["message"]["content"], choice["finish_reason"], reply["usage"]["completion_tokens"]) \
                == alone[p["id"]], p["id"]
        load = [{"messages": [{"role": "user", "content": f"Noise {i}"}], "seed": 100 + i, "max_tokens": 8 + 3 * i,
                 "temperature": 1.0} for i in range(9)]
        bodies = [_chat_body(p) for p in PROBES] + load
        order = [0, 3, 4, 1, 5, 6, 2, 7, 8, 9, 10, 11]  # the probes join a batch already running
        with ThreadPoolExecutor(len(order)) as pool:
            futures = {i: pool.submit(_streamed, client, server.url, bodies[i]) for i in order}
            streamed = {i: f.result() for i, f in futures.items()}
    for i, p in enumerate(PROBES):
        text, reason = streamed[i]
        assert (text, reason) == alone[p["id"]][:2], p["id"]
