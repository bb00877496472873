"""NPC profiles, dialogue sessions, reproducible lines and safety, on a tiny random policy (SQLite)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def client(make_npc_client, wait_ready, tiny_policy, tmp_path_factory):
    with make_npc_client(tiny_policy, tmp_path_factory.mktemp("db") / "sessions.db") as c:
        wait_ready(c)
        yield c


def sse(text: str) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------------ profiles
def test_profile_files_are_validated_naming_file_and_field(demo_schema, npc_examples, tmp_path):
    from steer.npc import NpcError, load_profiles

    good = (npc_examples / "brom.yaml").read_text()
    (tmp_path / "brom.yaml").write_text(good.replace("id: brom", "id: Brom Smith"))
    with pytest.raises(NpcError, match=r"brom\.yaml: id: String should match"):
        load_profiles(tmp_path)
    (tmp_path / "brom.yaml").write_text(good.replace("  humor: {max: 1}", "  humor: {max: 1, min: 3}"))
    with pytest.raises(NpcError, match=r"brom\.yaml: bounds\.humor: .*min 3 is above max 1"):
        load_profiles(tmp_path)
    (tmp_path / "brom.yaml").write_text(good.replace("  humor: 0\n", "  charm: 2\n"))
    with pytest.raises(NpcError, match=r"brom\.yaml: attributes\.charm: the policy has no attribute"):
        load_profiles(tmp_path, demo_schema)
    (tmp_path / "brom.yaml").write_text(good.replace("  humor: 0\n", "  humor: 3\n"))
    with pytest.raises(NpcError, match=r"attributes\.humor: 3 is outside this NPC's range 0-1"):
        load_profiles(tmp_path, demo_schema)
    (tmp_path / "brom.yaml").write_text("id: [unclosed")
    with pytest.raises(NpcError, match=r"brom\.yaml: not valid YAML"):
        load_profiles(tmp_path)


def test_serve_cli_rejects_a_bad_profile_before_starting(tiny_policy, tmp_path):
    from steer.service.cli import ServeConfig, main
    from steer.npc import NpcError

    (tmp_path / "x.yaml").write_text("id: x\nname: X\npersona: p\nbest_of: 0\n")
    with pytest.raises(NpcError, match=r"x\.yaml: best_of: Input should be greater than or equal to 1"):
        main(ServeConfig(policy=str(tiny_policy), npcs=str(tmp_path)))


def test_serve_cli_rejects_a_database_it_cannot_use(npc_examples, tiny_policy, tmp_path):
    from steer.service.cli import ServeConfig, main
    from steer.service.npc.db import DatabaseError

    with pytest.raises(DatabaseError, match=r"only sqlite:/// and postgresql:// are supported"):
        main(ServeConfig(policy=str(tiny_policy), npcs=str(npc_examples), database_url="mysql://u@h/db"))
    with pytest.raises(DatabaseError, match=r"cannot open the session database postgresql\+psycopg://steer:\*\*\*@"
                                            r"127\.0\.0\.1:1/x: .*"):
        main(ServeConfig(policy=str(tiny_policy), npcs=str(npc_examples),
                         database_url="postgresql://steer:hunter2@127.0.0.1:1/x"))


def test_list_and_get_npcs(client):
    r = client.get("/v1/npcs")
    assert r.status_code == 200
    assert [n["id"] for n in r.json()["data"]] == ["brom", "captain-ardent", "lysa"]
    brom = client.get("/v1/npcs/brom").json()
    assert brom["bounds"]["humor"] == {"min": None, "max": 1} and brom["max_toxicity"] == 0
    missing = client.get("/v1/npcs/nobody")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "npc_id"


def test_creating_npcs_needs_an_api_key(make_npc_client, wait_ready, client, tiny_policy, tmp_path):
    profile = {"id": "wren", "name": "Wren", "persona": "A shy herbalist.", "attributes": {"humor": 1}}
    r = client.post("/v1/npcs", json=profile)
    assert r.status_code == 403 and r.json()["error"]["code"] == "api_key_required"
    assert client.delete("/v1/npcs/brom").status_code == 403
    with make_npc_client(tiny_policy, tmp_path / "k.db", api_keys=["sekret"]) as c:
        wait_ready(c)
        assert c.post("/v1/npcs", json=profile).status_code == 401
        key = {"Authorization": "Bearer sekret"}
        r = c.post("/v1/npcs", json=profile, headers=key)
        assert r.status_code == 201, r.text
        assert c.post("/v1/npcs", json=profile, headers=key).status_code == 409
        bad = c.put("/v1/npcs/wren", json={**profile, "attributes": {"charm": 1}}, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "attributes.charm"
        bad = c.put("/v1/npcs/wren", json={**profile, "persona": ""}, headers=key)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "persona"
        r = c.put("/v1/npcs/wren", json={**profile, "role": "the herbalist"}, headers=key)
        assert r.status_code == 200 and c.get("/v1/npcs/wren", headers=key).json()["role"] == "the herbalist"
        sid = c.post("/v1/npcs/wren/sessions", headers=key).json()["id"]
        assert c.delete("/v1/npcs/wren").status_code == 401
        assert c.delete("/v1/npcs/wren", headers=key).json() == {"id": "wren", "object": "npc", "deleted": True}
        assert c.get("/v1/npcs/wren", headers=key).status_code == 404
        assert c.delete("/v1/npcs/wren", headers=key).status_code == 404
        # Its sessions stay readable but take no new lines.
        assert c.get(f"/v1/sessions/{sid}/messages", headers=key).status_code == 200
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}, headers=key)
        assert r.status_code == 409 and r.json()["error"]["code"] == "npc_not_found"
        assert c.get(f"/v1/sessions/{sid}", headers=key).json()["busy"] is False


# ------------------------------------------------------------------ sessions
def test_a_conversation_is_stored_and_clamps_are_reported(say, client):
    r = client.post("/v1/npcs/brom/sessions", json={"seed": 7, "player_name": "Ana"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    first = say(client, sid, "Can you fix my sword?", attributes={"humor": 4})
    assert first["role"] == "assistant" and first["index"] == 1 and isinstance(first["content"], str)
    assert first["attributes"]["humor"] == 1
    assert first["clamped"] == [{"attribute": "humor", "requested": 4, "applied": 1}]
    second = say(client, sid, "How much?", attributes={"humor": 1})
    assert second["index"] == 3 and second["clamped"] is None
    history = client.get(f"/v1/sessions/{sid}/messages").json()
    assert history["session"]["turns"] == 2 and history["session"]["player_name"] == "Ana"
    assert [(m["role"], m["content"]) for m in history["data"]] == [
        ("user", "Can you fix my sword?"), ("assistant", first["content"]),
        ("user", "How much?"), ("assistant", second["content"])]
    assert history["data"][1]["clamped"] == first["clamped"]


def test_bad_session_requests_are_4xx_naming_the_field(client):
    sid = client.post("/v1/npcs/brom/sessions").json()["id"]
    for body, param in [({"content": ""}, "content"), ({"content": "hi", "attributes": {"charm": 2}}, "attributes.charm"),
                        ({"content": "hi", "attributes": {"humor": 9}}, "attributes.humor"),
                        ({"content": "hi", "best_of": 3}, "best_of"), ({"content": "a\x00b"}, "content")]:
        r = client.post(f"/v1/sessions/{sid}/messages", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert client.post("/v1/sessions/nope/messages", json={"content": "hi"}).status_code == 404
    assert client.post("/v1/npcs/nobody/sessions").status_code == 404
    r = client.post("/v1/npcs/brom/sessions", json={"seed": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"
    # A refused line leaves the session free and unchanged.
    assert client.get(f"/v1/sessions/{sid}").json() | {"updated_at": 0} == {
        **client.get(f"/v1/sessions/{sid}").json(), "updated_at": 0, "turns": 0, "busy": False}


def test_streaming_reply_equals_the_stored_one(say, client):
    sid = client.post("/v1/npcs/lysa/sessions", json={"seed": 3}).json()["id"]
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": "Any rooms free?", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["type"] == "message"
    assert "".join(e["content"] for e in events[:-1] if e["type"] == "delta") == final["content"]
    stored = client.get(f"/v1/sessions/{sid}/messages").json()["data"][1]
    assert stored["content"] == final["content"] and stored["seed"] == final["seed"]
    # The same seed without streaming draws the same line.
    other = client.post("/v1/npcs/lysa/sessions", json={"seed": 3}).json()["id"]
    assert say(client, other, "Any rooms free?")["content"] == final["content"]


def test_delete_export_and_import(say, client):
    sid = client.post("/v1/npcs/captain-ardent/sessions", json={"seed": 11, "player_name": "Ana"}).json()["id"]
    line = say(client, sid, "Any work for me?")["content"]
    exported = client.get(f"/v1/sessions/{sid}/export").json()
    assert exported["format"] == "steer.npc-session.v1" and exported["npc_id"] == "captain-ardent"
    assert [m["content"] for m in exported["messages"]] == ["Any work for me?", line]
    assert client.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "object": "npc.session", "deleted": True}
    assert client.get(f"/v1/sessions/{sid}/messages").status_code == 404
    assert client.delete(f"/v1/sessions/{sid}").status_code == 404
    r = client.post("/v1/sessions/import", json=exported)
    assert r.status_code == 201, r.text
    restored = r.json()
    assert restored["turns"] == 1 and restored["seed"] == 11 and restored["id"] != sid
    history = client.get(f"/v1/sessions/{restored['id']}/messages").json()["data"]
    assert [m["content"] for m in history] == ["Any work for me?", line]
    bad = {**exported, "messages": exported["messages"][::-1]}
    r = client.post("/v1/sessions/import", json=bad)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"


def test_a_leased_session_refuses_a_second_line_with_409(say, client, tmp_path_factory):
    """The lease lives in the database row, so it holds against a request from any server process;
    here a second engine on the same SQLite file stands in for the other process."""
    from steer.service.npc.db import create_db_engine
    from steer.service.npc.store import NpcStore

    url = client.app.state.server.settings.database_url
    sid = client.post("/v1/npcs/brom/sessions", json={"seed": 1}).json()["id"]
    other = NpcStore(create_db_engine(url))
    lease = other.begin_turn(sid)
    r = client.post(f"/v1/sessions/{sid}/messages", json={"content": "Hello?"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
    assert client.get(f"/v1/sessions/{sid}").json()["busy"] is True
    other.release(lease)
    assert say(client, sid, "Hello?")["index"] == 1
    other.engine.dispose()


def test_simultaneous_lines_to_one_session_never_interleave(live_server, npc_examples, tiny_policy, tmp_path):
    import httpx

    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    settings = ServerSettings(policy=str(tiny_policy), ui=False, threads=1, engine_in_process=True,
                              npcs=str(npc_examples), database_url=f"sqlite:///{tmp_path / 's.db'}")
    with live_server(create_app(settings)) as server:
        sid = httpx.post(f"{server.url}/v1/npcs/lysa/sessions", json={"seed": 2}).json()["id"]
        statuses = []
        barrier = threading.Barrier(4)

        def talk(i):
            barrier.wait()
            r = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json={"content": f"line {i}"}, timeout=60)
            statuses.append(r.status_code)

        for _ in range(3):
            threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        assert set(statuses) <= {200, 409} and 200 in statuses
        history = httpx.get(f"{server.url}/v1/sessions/{sid}/messages").json()
        roles = [m["role"] for m in history["data"]]
        assert roles == ["user", "assistant"] * statuses.count(200)
        assert history["session"]["turns"] == statuses.count(200) and not history["session"]["busy"]


def test_sessions_survive_a_restart(make_npc_client, say, wait_ready, tiny_policy, tmp_path):
    db = tmp_path / "persist.db"
    with make_npc_client(tiny_policy, db) as c:
        wait_ready(c)
        sid = c.post("/v1/npcs/brom/sessions", json={"seed": 9}).json()["id"]
        first = say(c, sid, "Morning, Brom.")["content"]
    with make_npc_client(tiny_policy, db) as c:
        wait_ready(c)
        history = c.get(f"/v1/sessions/{sid}/messages").json()
        assert [m["content"] for m in history["data"]] == ["Morning, Brom.", first]
        assert say(c, sid, "Still grumpy?")["index"] == 3


def test_seeded_sessions_replay_the_same_lines_under_load(live_server, npc_examples, tiny_policy, tmp_path):
    import httpx

    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    lines = ["Hello there.", "Do you sell swords?", "What happened to the mine?"]
    settings = ServerSettings(policy=str(tiny_policy), ui=False, threads=1, engine_in_process=True,
                              npcs=str(npc_examples), database_url=f"sqlite:///{tmp_path / 'load.db'}")

    def conversation(url, seed, npc="brom"):
        sid = httpx.post(f"{url}/v1/npcs/{npc}/sessions", json={"seed": seed}).json()["id"]
        out = []
        for line in lines:
            r = httpx.post(f"{url}/v1/sessions/{sid}/messages", json={"content": line}, timeout=120)
            assert r.status_code == 200, r.text
            out.append(r.json()["content"])
        return out

    with live_server(create_app(settings)) as server:
        alone = conversation(server.url, seed=42)
        stop = threading.Event()
        errors = []

        def noise(i):
            while not stop.is_set():
                try:
                    conversation(server.url, seed=1000 + i, npc=["lysa", "captain-ardent"][i % 2])
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)
                    return

        crowd = [threading.Thread(target=noise, args=(i,)) for i in range(8)]
        [t.start() for t in crowd]
        try:
            under_load = conversation(server.url, seed=42)
        finally:
            stop.set()
            [t.join() for t in crowd]
        assert not errors
        assert under_load == alone
        assert conversation(server.url, seed=43) != alone  # the seed matters


# ------------------------------------------------------------------ safety
@pytest.fixture(scope="session")
def build_toxicity_apm(shared_path):
    """``build_toxicity_apm(directory, toxicity_mean)``: an untrained APM over (toxicity, humor)
    whose toxicity prediction sits at ``toxicity_mean``."""
    def build(directory: Path, toxicity_mean: float) -> Path:
        import torch
        from transformers import LlamaConfig, LlamaForSequenceClassification

        from steer.core.artifacts import save_steer_config
        from steer.core.attributes import Attribute, AttributeSchema
        from steer.core.template import PromptTemplate

        schema = AttributeSchema(name="tox", attributes=(Attribute("toxicity", 0, 4, 0, "t"), Attribute("humor", 0, 4, 0, "h")))
        tokenizer_dir = shared_path("models", "stories260K")
        torch.manual_seed(1)
        config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             num_labels=2, problem_type="regression")
        LlamaForSequenceClassification(config).save_pretrained(directory, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, directory / name)
        save_steer_config(directory, "apm", schema, PromptTemplate(schema).to_dict(), max_length=256,
                          label_normalization={"mean": [toxicity_mean, 1.0], "std": [0.01, 1.0]})
        return directory

    return build


def test_replies_above_the_toxicity_bound_are_redrawn_then_replaced(build_toxicity_apm, make_npc_client, npc_examples, say, wait_ready, tiny_policy, tmp_path):
    npcs = tmp_path / "npcs"
    shutil.copytree(npc_examples, npcs)
    rude = (npc_examples / "brom.yaml").read_text().replace("id: brom", "id: rude-brom") + "max_toxicity: 4\n"
    (npcs / "rude-brom.yaml").write_text(rude)
    apm = build_toxicity_apm(tmp_path / "apm", toxicity_mean=3.0)
    with make_npc_client(tiny_policy, tmp_path / "t.db", npcs=npcs, apm=str(apm)) as c:
        wait_ready(c)
        sid = c.post("/v1/npcs/brom/sessions", json={"seed": 5}).json()["id"]
        reply = say(c, sid, "You call that a sword?")
        assert reply["content"] == "Hmph. Buy something or move along."
        assert reply["safety"] == {"checked": True, "max_toxicity": 0, "toxicity": pytest.approx(3.0, abs=0.1),
                                   "regenerations": 2, "fallback": True}
        streamed = sse(c.post(f"/v1/sessions/{sid}/messages", json={"content": "Well?", "stream": True}).text)
        assert streamed[-2]["safety"]["fallback"] and streamed[0] == {"type": "delta",
                                                                       "content": "Hmph. Buy something or move along."}
        # A profile that allows toxicity 4 keeps the first draw.
        sid = c.post("/v1/npcs/rude-brom/sessions", json={"seed": 5}).json()["id"]
        reply = say(c, sid, "You call that a sword?")
        assert reply["safety"]["fallback"] is False and reply["safety"]["regenerations"] == 0
        assert reply["content"] != "Hmph. Buy something or move along."


def test_best_of_picks_the_candidate_closest_to_the_requested_attributes(build_toxicity_apm, make_npc_client, npc_examples, say, wait_ready, tiny_policy, tmp_path):
    from steer.npc import clean_line, dialogue_messages, load_profile, turn_seed

    apm = build_toxicity_apm(tmp_path / "apm", toxicity_mean=0.0)
    with make_npc_client(tiny_policy, tmp_path / "b.db", apm=str(apm)) as c:
        wait_ready(c)
        sid = c.post("/v1/npcs/lysa/sessions", json={"seed": 8}).json()["id"]
        reply = say(c, sid, "Tell me a rumour.", best_of=3, attributes={"humor": 3})
        assert reply["best_of"] == 3 and reply["safety"]["fallback"] is False
        # The same candidates, drawn through the chat API, and the same pick.
        profile = load_profile(npc_examples / "lysa.yaml")
        body = {"messages": dialogue_messages(profile, [], "Tell me a rumour."), "n": 3, "score": True,
                "seed": turn_seed(8, 0), "max_tokens": profile.max_tokens, "attributes": reply["attributes"]}
        choices = c.post("/v1/chat/completions", json=body).json()["choices"]
        best = min(choices, key=lambda ch: (ch["scores"]["humor"] - 3) ** 2)
        assert reply["content"] == clean_line(best["message"]["content"])
        assert reply["scores"] == best["scores"]


def test_old_turns_are_dropped_to_fit_the_context(make_npc_client, say, wait_ready, tiny_policy, tmp_path):
    from steer.npc import fit_history

    # The helper keeps the system prompt and the new line, dropping whole exchanges from the front.
    msgs = [{"role": "system", "content": "s"}] + [{"role": r, "content": str(i)} for i, r in
                                                   enumerate(["user", "assistant"] * 3)] + [{"role": "user", "content": "new"}]
    kept, dropped = fit_history(msgs, count_tokens=len, budget=4)
    assert dropped == 4 and [m["content"] for m in kept] == ["s", "4", "5", "new"]

    with make_npc_client(tiny_policy, tmp_path / "ctx.db", max_prompt_tokens=420) as c:
        wait_ready(c)
        sid = c.post("/v1/npcs/lysa/sessions", json={"seed": 1}).json()["id"]
        replies = [say(c, sid, f"Tell me more, part {i}.") for i in range(4)]
        assert replies[0]["dropped_turns"] is None
        assert any(r["dropped_turns"] for r in replies[1:])  # the profile alone is about 300 tokens
        assert len(c.get(f"/v1/sessions/{sid}/messages").json()["data"]) == 8  # nothing is lost from the history
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "word " * 300})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert c.get(f"/v1/sessions/{sid}").json()["busy"] is False


def test_toxicity_is_never_requested_above_the_profile_bound(npc_examples):
    from steer.core.attributes import BUILTIN_SCHEMAS
    from steer.npc import load_profile

    oasst = BUILTIN_SCHEMAS["oasst"]
    brom = load_profile(npc_examples / "brom.yaml").model_copy(update={"attributes": {}})
    values, clamped = brom.steer(oasst, {"toxicity": 3, "humour": 2})
    assert values["toxicity"] == 0 and values["humor"] == 1
    assert clamped == [{"attribute": "toxicity", "requested": 3, "applied": 0},
                       {"attribute": "humor", "requested": 2, "applied": 1}]
    rude = brom.model_copy(update={"max_toxicity": 2})
    assert rude.steer(oasst, {"toxicity": 3})[0]["toxicity"] == 2


def test_a_client_that_leaves_mid_stream_frees_the_session(live_server, npc_examples, tiny_policy, tmp_path):
    import time

    import httpx

    from steer.service.app import create_app
    from steer.service.settings import ServerSettings

    settings = ServerSettings(policy=str(tiny_policy), ui=False, threads=1, engine_in_process=True,
                              npcs=str(npc_examples), database_url=f"sqlite:///{tmp_path / 'gone.db'}")
    with live_server(create_app(settings)) as server:
        sid = httpx.post(f"{server.url}/v1/npcs/lysa/sessions", json={"seed": 2}).json()["id"]
        with httpx.stream("POST", f"{server.url}/v1/sessions/{sid}/messages",
                          json={"content": "Tell me everything.", "stream": True, "max_tokens": 500}) as r:
            next(r.iter_lines())  # the first piece arrived; now hang up
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v1/sessions/{sid}").json()["busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        session = httpx.get(f"{server.url}/v1/sessions/{sid}").json()
        assert not session["busy"]
        history = httpx.get(f"{server.url}/v1/sessions/{sid}/messages").json()["data"]
        assert len(history) == 2 * session["turns"]  # the reply was stored whole or not at all
        r = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json={"content": "Hello again."}, timeout=60)
        assert r.status_code == 200
