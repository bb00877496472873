"""The UI's NPC tab: handlers against a live server with NPCs, and the tab's Gradio endpoints."""

from __future__ import annotations

import pytest


pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'steer[ui]')")


def test_npc_tab_talks_through_a_session_and_resumes_it(npc_live_server):
    from steer.client import SteerClient
    from steer.ui import npc

    client = SteerClient(npc_live_server.url)
    assert [c[1] for c in npc.npc_choices(client)] == ["brom", "captain-ardent", "lysa"]
    history, info, sessions = npc.pick(client, "brom", {})
    assert history == [] and "new conversation" in info
    frames = list(npc.send(client, "brom", "Hello!", history, sessions, "Ana"))
    chat, textbox, sessions = frames[-1]
    assert textbox == "" and set(sessions) == {"brom"} and len(frames) >= 3
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[0]["content"] == "Hello!"
    chat, _, sessions = list(npc.send(client, "brom", "Funny?", chat, sessions))[-1]
    # The page is reloaded: the browser still has `sessions`, the server has the conversation.
    resumed, info, _ = npc.pick(client, "brom", sessions)
    assert "Resumed" in info and [m["content"] for m in resumed] == [m["content"] for m in chat
                                                                     if not m.get("metadata")]
    assert client.session(sessions["brom"]).player_name == "Ana"
    # A session deleted on the server: the tab starts a new one instead of failing.
    client.end_session(sessions["brom"])
    history, info, sessions = npc.pick(client, "brom", sessions)
    assert history == [] and "brom" not in sessions


def test_the_ui_has_the_npc_endpoints():
    from steer.ui.app import build_ui

    demo = build_ui("http://127.0.0.1:9")
    names = {d.api_name for d in demo.fns.values()}
    assert {"npc_load", "npc_pick", "npc_send"} <= names
