"""The UI's NPC tab: pick one of the server's NPCs and talk to it through a dialogue session.

The conversation lives on the server (``/v1/sessions``); the browser only remembers which
session belongs to which NPC (``gr.BrowserState``, in localStorage), so a reloaded page picks the
conversation up where it was. Handlers are plain functions of a ``steer.client.SteerClient`` so
they can be tested without a browser.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr

from steer.client import NpcLine, SteerAPIError, SteerClient

STORAGE_KEY = "steer-npc-sessions"


def npc_choices(client: SteerClient) -> list[tuple[str, str]]:
    return [(f"{n.name}, {n.role}" if n.role else n.name, n.id) for n in client.npcs()]


def _note(line: NpcLine) -> dict[str, Any] | None:
    notes = [f"{c['attribute']} clamped {c['requested']}→{c['applied']}" for c in line.clamped or []]
    if line.fell_back:
        notes.append(f"fallback line after {line.safety.get('regenerations', 0)} redraws (too toxic)")
    if not notes:
        return None
    return {"role": "assistant", "content": "; ".join(notes), "metadata": {"title": "NPC bounds"}}


def session_history(client: SteerClient, session_id: str | None) -> list[dict[str, Any]] | None:
    """The stored conversation as chatbot messages, or None when the session is gone."""
    if not session_id:
        return None
    try:
        history = client.history(session_id)
    except SteerAPIError as e:
        if e.status == 404:
            return None
        raise gr.Error(str(e.message)) from None
    return [{"role": m.role, "content": m.content} for m in history.messages]


def pick(client: SteerClient, npc_id: str | None, sessions: dict[str, str] | None):
    """Switch to ``npc_id``: its remembered conversation, or an empty one."""
    sessions = dict(sessions or {})
    if not npc_id:
        return [], "Pick an NPC.", sessions
    history = session_history(client, sessions.get(npc_id))
    if history is None:
        sessions.pop(npc_id, None)
        return [], f"A new conversation with **{npc_id}** starts with your first line.", sessions
    return history, f"Resumed session `{sessions[npc_id]}` with **{npc_id}** ({len(history) // 2} exchanges).", sessions


def send(client: SteerClient, npc_id: str | None, message: str, history: list[dict[str, Any]],
         sessions: dict[str, str] | None, player_name: str | None = None
         ) -> Iterator[tuple[list[dict[str, Any]], str, dict[str, str]]]:
    """Stream the NPC's reply to ``message``; yields (chatbot, textbox, sessions)."""
    sessions = dict(sessions or {})
    message = (message or "").strip()
    if not npc_id:
        raise gr.Error("pick an NPC first")
    if not message:
        yield history, "", sessions
        return
    try:
        if npc_id not in sessions:
            sessions[npc_id] = client.create_session(npc_id, player_name=player_name or None).id
        shown = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield shown, "", sessions
        for item in client.say_stream(sessions[npc_id], message):
            if isinstance(item, NpcLine):
                shown[-1]["content"] = item.content
                note = _note(item)
                if note:
                    shown.append(note)
            else:
                shown[-1]["content"] += item
            yield shown, "", sessions
    except SteerAPIError as e:
        yield history, message, sessions  # the line comes back to be resent
        raise gr.Error(e.message) from None


def build_npc_tab(demo: gr.Blocks, url_for, api_key: str | None = None) -> None:
    """The tab's components and events. ``url_for(request)``: the steer server's URL for a page
    request; ``api_key``: the UI's own key (a key typed into the tab wins)."""
    clients: dict[tuple[str, str | None], SteerClient] = {}
    lock = threading.Lock()

    def client_for(request: gr.Request, key_value: str | None) -> SteerClient:
        ident = (url_for(request), key_value or api_key)
        with lock:
            if ident not in clients:
                clients[ident] = SteerClient(ident[0], api_key=ident[1], timeout=300)
            return clients[ident]

    # A fixed secret: the stored value is only {npc id: session id}, and a per-start random one
    # (Gradio's default) would make the browser forget its conversations whenever the server restarts.
    sessions = gr.BrowserState({}, storage_key=STORAGE_KEY, secret=STORAGE_KEY)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            chat = gr.Chatbot(label="Conversation", elem_id="steer-npc-chatbot", height=420)
            with gr.Row():
                message = gr.Textbox(placeholder="Say something…", show_label=False, scale=5, min_width=180,
                                     elem_id="steer-npc-message", lines=1)
                send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="steer-npc-send")
        with gr.Column(scale=2, min_width=260):
            picker = gr.Dropdown([], label="Persona (the server's NPCs)", elem_id="steer-npc-picker",
                                 info="Conversations are kept on the server and resume after a reload.")
            player = gr.Textbox(label="Your name", max_lines=1, info="Used when a new conversation starts.")
            info = gr.Markdown("")
            new_btn = gr.Button("New conversation", size="sm")
            key = gr.Textbox(label="API key", type="password", value="", info="Only if the server requires one.")

    def on_load(request: gr.Request, key_value, stored):
        client = client_for(request, key_value)
        try:
            choices = npc_choices(client)
        except SteerAPIError as e:
            message = ("NPCs are off on this server (start it with `--npcs DIR`)." if e.status == 404
                       else f"Could not list NPCs: {e.message}")
            return gr.Dropdown(choices=[], value=None), [], message, stored
        if not choices:
            return gr.Dropdown(choices=[], value=None), [], "The server has no NPCs.", stored
        ids = [c[1] for c in choices]
        last = (stored or {}).get("_last")
        current = last if last in ids else ids[0]
        history, text, stored = pick(client, current, stored)
        return gr.Dropdown(choices=choices, value=current), history, text, stored

    def on_pick(request: gr.Request, npc_id, key_value, stored):
        history, text, stored = pick(client_for(request, key_value), npc_id, stored)
        stored["_last"] = npc_id
        return history, text, stored

    def on_send(request: gr.Request, npc_id, text, history, stored, name, key_value):
        yield from send(client_for(request, key_value), npc_id, text, history, stored, name)

    def on_new(npc_id, stored):
        stored = dict(stored or {})
        stored.pop(npc_id, None)
        return [], "A new conversation starts with your next line.", stored

    demo.load(on_load, inputs=[key, sessions], outputs=[picker, chat, info, sessions], api_name="npc_load")
    picker.input(on_pick, inputs=[picker, key, sessions], outputs=[chat, info, sessions], api_name="npc_pick")
    send_inputs = [picker, message, chat, sessions, player, key]
    send_btn.click(on_send, inputs=send_inputs, outputs=[chat, message, sessions], api_name="npc_send")
    message.submit(on_send, inputs=send_inputs, outputs=[chat, message, sessions], api_visibility="private")
    new_btn.click(on_new, inputs=[picker, sessions], outputs=[chat, info, sessions], api_visibility="private")
