"""steer.client against a live server (sync and async) and against scripted answers (retries)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from steer.client import AsyncSteerClient, NpcLine, SteerAPIError, SteerClient


def test_sync_client_talks_to_npcs(npc_live_server):
    with SteerClient(npc_live_server.url) as steer:
        assert [a.name for a in steer.attributes()] == ["helpfulness", "humor", "creativity"]
        assert steer.attributes()[1].levels == ["serious", "dry", "playful", "funny", "hilarious"]
        assert [n.id for n in steer.npcs()] == ["brom", "captain-ardent", "lysa"]
        assert steer.npc("brom").bounds["humor"].max == 1
        reply = steer.chat([{"role": "user", "content": "Hi"}], {"humor": 2}, max_tokens=8, seed=1)
        assert reply.attributes["humor"] == 2 and reply.finish_reason in ("stop", "length")
        assert "".join(steer.chat_stream([{"role": "user", "content": "Hi"}], {"humor": 2}, max_tokens=8,
                                         seed=1)) == reply.content

        session = steer.create_session("brom", seed=5, player_name="Ana")
        assert session.npc_id == "brom" and session.turns == 0
        line = steer.say(session.id, "Fix my sword?", attributes={"humor": 3})
        assert isinstance(line, NpcLine) and line.was_clamped and line.attributes["humor"] == 1
        items = list(steer.say_stream(session.id, "How much?"))
        final = items[-1]
        assert isinstance(final, NpcLine) and "".join(items[:-1]) == final.content and final.index == 3
        history = steer.history(session.id)
        assert history.session.turns == 2
        assert [m.content for m in history.messages] == ["Fix my sword?", line.content, "How much?", final.content]

        saved = steer.export_session(session.id)
        steer.end_session(session.id)
        with pytest.raises(SteerAPIError) as e:
            steer.session(session.id)
        assert e.value.status == 404 and e.value.code == "session_not_found"
        restored = steer.import_session(saved)
        assert [m.content for m in steer.history(restored.id).messages][-1] == final.content

        with pytest.raises(SteerAPIError) as e:
            steer.say(restored.id, "hi", attributes={"charm": 1})
        assert e.value.status == 400 and e.value.param == "attributes.charm" and "charm" in e.value.message


def test_async_client_talks_to_npcs(npc_live_server):
    async def run():
        async with AsyncSteerClient(npc_live_server.url) as steer:
            session = await steer.create_session("lysa", seed=9)
            line = await steer.say(session.id, "A room, please.")
            items = [item async for item in steer.say_stream(session.id, "And dinner?")]
            history = await steer.history(session.id)
            return session, line, items, history

    session, line, items, history = asyncio.run(run())
    assert isinstance(items[-1], NpcLine) and "".join(items[:-1]) == items[-1].content
    assert [m.content for m in history.messages] == ["A room, please.", line.content, "And dinner?", items[-1].content]
    # The same seed and lines from the sync client: the same replies.
    with SteerClient(npc_live_server.url) as steer:
        again = steer.create_session("lysa", seed=9)
        assert steer.say(again.id, "A room, please.").content == line.content


def _scripted(answers):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status, headers = answers[min(len(calls) - 1, len(answers) - 1)]
        if status == 200:
            return httpx.Response(200, json={"index": 1, "role": "assistant", "content": "Aye."})
        body = {"error": {"message": "every slot is busy", "type": "rate_limit_error", "param": None,
                          "code": "server_busy"}}
        return httpx.Response(status, json=body, headers=headers)

    return handler, calls


def test_client_retries_429_and_503_with_retry_after_then_gives_up():
    handler, calls = _scripted([(429, {"Retry-After": "0"}), (503, {"Retry-After": "0"}), (200, {})])
    with SteerClient("http://npc.test", transport=httpx.MockTransport(handler)) as steer:
        assert steer.say("s1", "hello").content == "Aye."
    assert len(calls) == 3

    handler, calls = _scripted([(429, {"Retry-After": "0"})])
    with SteerClient("http://npc.test", transport=httpx.MockTransport(handler), max_retries=2) as steer:
        with pytest.raises(SteerAPIError) as e:
            steer.say("s1", "hello")
    assert e.value.status == 429 and e.value.code == "server_busy" and len(calls) == 3

    # A 503 without Retry-After (the engine died) and a 409 are not retried.
    for status in (503, 409):
        handler, calls = _scripted([(status, {})])
        with SteerClient("http://npc.test", transport=httpx.MockTransport(handler)) as steer:
            with pytest.raises(SteerAPIError):
                steer.say("s1", "hello")
        assert len(calls) == 1


def test_async_client_retries_429():
    handler, calls = _scripted([(429, {"Retry-After": "0"}), (200, {})])

    async def run():
        async with AsyncSteerClient("http://npc.test", transport=httpx.MockTransport(handler)) as steer:
            return await steer.say("s1", "hello")

    assert asyncio.run(run()).content == "Aye." and len(calls) == 2


def test_unreachable_server_is_a_clear_error():
    with SteerClient("http://127.0.0.1:9", timeout=2, max_retries=0) as steer:
        with pytest.raises(SteerAPIError, match="cannot reach http://127.0.0.1:9"):
            steer.npcs()


def test_terminal_chat_example(npc_live_server, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    save = tmp_path / "save.json"
    script = f"Hello, Brom.\n/mood humor=4\nA joke?\n/save {save}\n/quit\n"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run([sys.executable, str(repo / "examples" / "npc_chat.py"), "--server", npc_live_server.url,
                          "--npc", "brom", "--seed", "3"], input=script, capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Talking to Brom" in out.stdout and "[humor clamped to 1]" in out.stdout
    saved = json.loads(save.read_text())
    assert [m["content"] for m in saved["messages"][0::2]] == ["Hello, Brom.", "A joke?"]
    listing = subprocess.run([sys.executable, str(repo / "examples" / "npc_chat.py"), "--server", npc_live_server.url],
                             capture_output=True, text=True, env=env, timeout=60)
    assert "captain-ardent" in listing.stdout


def test_the_guide_client_example_runs(npc_live_server, capsys):
    """docs/npc.md's steer.client example, run as written against a live server."""
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "npc.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in guide.split("```python\n")[1:]]
    code = next(b for b in blocks if "SteerClient(" in b).replace("http://127.0.0.1:8000", npc_live_server.url)
    namespace: dict = {}
    exec(code, namespace)
    line, save = namespace["line"], namespace["save"]
    assert line.clamped == [{"attribute": "humor", "requested": 4, "applied": 1}] and not line.fell_back
    assert [m["content"] for m in save["messages"][0::2]] == ["Can you fix my sword?", "How much?"]
