"""The Gradio chat UI: a client of the steer server, mounted into it at ``/ui`` or run on its own.

It never formats prompts or loads a model. Every reply comes from ``POST /v1/chat/completions``
(streamed), and the sliders come from ``GET /v1/attributes`` when the page loads, so the UI shows
whatever schema the served policy was trained with.

Gradio needs its components declared before the page is served, while the schema is only known
once the server answers. So the UI declares a fixed number of hidden slider slots per slider
group and the page-load event fills them (name, range, default, description) from the server.
Slot ``i`` always stands for ``slider_order(schema)[i]``, which handlers recompute from the
same cached schema, so no per-session state is needed and the Gradio API stays callable.

``build_ui`` puts three parts together: ``layout`` (the components), ``ChatHandlers`` (what the
events do, as methods) and ``connect`` (which event calls which handler).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from steer.ui.client import AttributeSpec, ChatResult, ServerError, ServerSchema, SteerClient
from steer.ui.npc import build_npc_tab

logger = logging.getLogger(__name__)

# Shown above the fold; everything else in the schema goes into the "More attributes" accordion.
FRONT_ATTRIBUTES = ("helpfulness", "humor", "creativity")
FRONT_SLOTS = 3
# Slider slots per group. The built-in schemas have at most 9 attributes; a larger schema's extra
# attributes keep the server's defaults (the status line says so).
MAX_ATTRIBUTES = 16
# How long the page-load event waits for a server that is still loading its model.
LOAD_WAIT_S = 60.0

PERSONAS: dict[str, str] = {
    "None (server default)": "",
    "Blacksmith": (
        "You are Brenna, the village blacksmith. You are gruff but fair, proud of your craft, and you "
        "know every blade, hinge and horseshoe in town. You speak plainly and briefly."
    ),
    "Innkeeper": (
        "You are Tobin, keeper of the Wayward Goose inn. You are warm and chatty, love gossip, and "
        "always know who is in town, what is on the stew pot and how much a room costs."
    ),
    "Guard": (
        "You are a city gate guard on a long shift. You are dutiful and suspicious of strangers, "
        "quote the town's rules, and give directions when asked politely."
    ),
    "Custom": "",
}
DEFAULT_PERSONA = "Innkeeper"

CSS = """
.steer-status p { margin: 0; font-size: 0.9em; }
.steer-compare-out { min-height: 6em; }
"""


def slider_order(schema: ServerSchema) -> list[AttributeSpec]:
    """The attribute behind each slider slot: the favourite three first, then schema order."""
    front = [schema.get(n) for n in FRONT_ATTRIBUTES if schema.get(n) is not None]
    rest = [a for a in schema.attributes if a not in front]
    # A schema without the favourites (e.g. helpsteer) still gets three sliders up front.
    while len(front) < FRONT_SLOTS and rest:
        front.append(rest.pop(0))
    return (front + rest)[:MAX_ATTRIBUTES]


def attributes_from_slots(schema: ServerSchema, values: Sequence[Any], names: Sequence[str] | None = None
                          ) -> dict[str, int]:
    """Slider values by attribute name. ``names``: the slots' attributes as the page was configured
    with (an empty list when it could not be, so hidden sliders never count); None (API calls,
    which skip the page-load event): the slots follow ``slider_order(schema)``."""
    if names is None:
        names = [a.name for a in slider_order(schema)]
    out = {}
    for name, value in zip(names, values):
        if value is None or schema.get(name) is None:
            continue
        out[name] = int(round(float(value)))
    return out


def message_text(message: dict[str, Any]) -> str:
    """Text of a Chatbot message, whose content Gradio 6 hands over as a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    parts = []
    for part in content or []:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def is_annotation(message: dict[str, Any]) -> bool:
    """The steering note under a reply is a titled message; it is the UI's, never the model's."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title"))


def conversation_for_server(history: Sequence[dict[str, Any]], system: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for message in history:
        if message.get("role") in ("user", "assistant") and not is_annotation(message):
            messages.append({"role": message["role"], "content": message_text(message)})
    return messages


def format_steering(order: Sequence[AttributeSpec], result: ChatResult, requested: dict[str, int],
                    seed: int | None, can_score: bool) -> dict[str, Any]:
    """The note shown under a reply: what it was generated with and, with an APM, what it measured."""
    applied = result.attributes or requested
    names = [a.name for a in order if a.name in applied] + [n for n in applied if n not in {a.name for a in order}]
    scores = result.scores or {}
    applied_text = ", ".join(f"{n} {applied[n]}" for n in names)
    title = f"applied: {applied_text}"
    if scores:
        title += " | measured: " + ", ".join(f"{n} {scores[n]:.1f}" for n in names if n in scores)
    rows = ["| attribute | applied | measured |", "|---|---|---|"]
    for n in names:
        measured = f"{scores[n]:.2f}" if n in scores else "–"
        rows.append(f"| {n} | {applied[n]} | {measured} |")
    notes = []
    if seed is not None:
        notes.append(f"seed {seed}")
    if result.finish_reason:
        notes.append(f"finish: {result.finish_reason}")
    if not scores:
        notes.append("measured values need a server started with --apm" if not can_score else "no scores returned")
    body = "\n".join(rows) + ("\n\n" + " · ".join(notes) if notes else "")
    return {"role": "assistant", "content": body, "metadata": {"title": title, "status": "done"}}


def split_best_of(slots: Sequence[Any]) -> tuple[Sequence[Any], int]:
    """The chat handlers' trailing inputs: the slider slots, then (when sent) the best-of control.
    Callers of the Gradio API that predate the control send only the slots and get best-of-1."""
    if len(slots) > MAX_ATTRIBUTES:
        value = slots[MAX_ATTRIBUTES]
        return slots[:MAX_ATTRIBUTES], int(value) if value else 1
    return slots, 1


def _seed(value: Any) -> int:
    text = "" if value is None else str(value).strip()
    if not text:
        return random.randrange(2**31)
    try:
        seed = int(text)
    except ValueError:
        raise gr.Error(f"seed: {text!r} is not a whole number (leave it blank for a random one)") from None
    if seed < 0:
        raise gr.Error("seed must be 0 or more (leave it blank for a random one)")
    return seed


class Backend:
    """Finds the server to talk to: a fixed URL, or (when mounted without one) the very server
    that received the page's request, reached on the address and port it was accepted on."""

    def __init__(self, server_url: str | None, api_key: str | None):
        self.server_url = server_url.rstrip("/") if server_url else None
        self.api_key = api_key
        self._clients: dict[str, SteerClient] = {}
        self._lock = threading.Lock()

    def url_for(self, request: gr.Request | None) -> str:
        if self.server_url:
            return self.server_url
        scope = getattr(getattr(request, "request", None), "scope", None) or {}
        server = scope.get("server")
        if not server:
            raise gr.Error("the UI does not know the server's address; start it with --server URL")
        host, port = server[0], server[1]
        if host in ("0.0.0.0", "", None):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        return f"{scheme}://{host}:{port}"

    def client(self, request: gr.Request | None) -> SteerClient:
        url = self.url_for(request)
        with self._lock:
            if url not in self._clients:
                self._clients[url] = SteerClient(url, api_key=self.api_key)
            return self._clients[url]


def slider_info(spec: AttributeSpec) -> str | None:
    """The line under a slider: the attribute's description and, when the schema words its
    values, what the two ends mean ("0 completely serious ... 4 hilarious and over the top")."""
    ends = f"{spec.min} {spec.levels[0]} ... {spec.max} {spec.levels[-1]}" if spec.levels else ""
    return " ".join(part for part in (spec.description, ends and f"({ends})") if part) or None


def _slot_updates(order: Sequence[AttributeSpec]) -> list[gr.Slider]:
    updates = []
    for i in range(MAX_ATTRIBUTES):
        if i < len(order):
            a = order[i]
            updates.append(gr.Slider(minimum=a.min, maximum=a.max, value=a.default, step=1, label=a.name,
                                     info=slider_info(a), visible=True, interactive=True))
        else:
            updates.append(gr.Slider(visible=False))
    return updates


def _slider_slots(prefix: str, count: int, start: int = 0) -> list[gr.Slider]:
    # Until the page-load event sets the schema's range, a wide one: API callers skip that event,
    # and the server (not the placeholder) should judge their values.
    return [
        gr.Slider(minimum=-1000, maximum=1000, value=0, step=1, label=f"attribute {start + i + 1}", visible=False,
                  elem_id=f"{prefix}-slot-{start + i}", elem_classes=["steer-attr"])
        for i in range(count)
    ]


class ChatHandlers:
    """The Chat and Compare tabs' event handlers. Plain methods of plain values (and the page's
    ``gr.Request``, which only picks the server to talk to): Gradio calls them with its
    components' values, and tests can call them without building a page."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def schema_for(self, request: gr.Request | None, key: str | None) -> tuple[SteerClient, ServerSchema]:
        client = self.backend.client(request)
        try:
            return client, client.schema(api_key=key or None)
        except ServerError as e:
            raise gr.Error(str(e)) from None

    def configure(self, request: gr.Request, key: str | None):
        # Page load (and the API key box): the status line, the slots' attribute names, and the
        # three groups of slider slots filled from the server's schema.
        client = self.backend.client(request)
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            try:
                schema = client.schema(api_key=key or None, refresh=True)
                model = client.model_name(api_key=key or None)
                break
            except ServerError as e:
                # 503 while the server is still loading its model: wait for it rather than
                # show a page without sliders.
                if e.status == 503 and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                status = f"**Not connected:** {e}"
                if e.status == 401:
                    status += " Enter the API key under *Settings* and press Enter."
                else:
                    status += " Reload the page to retry."
                hidden = [gr.Slider(visible=False)] * MAX_ATTRIBUTES
                return [status, [], *hidden, gr.Accordion(visible=False), *hidden, *hidden]
        order = slider_order(schema)
        apm = ("APM loaded: measured values are shown under each reply" if schema.can_score
               else "no APM: start the server with `--apm DIR` to see measured values")
        status = f"Model **{model or '?'}** at `{client.base_url}` · schema `{schema.name}` · {apm}"
        if len(schema.attributes) > MAX_ATTRIBUTES:
            status += f" · only the first {MAX_ATTRIBUTES} attributes have sliders; the rest use defaults"
        updates = _slot_updates(order)
        more = gr.Accordion(visible=len(order) > FRONT_SLOTS)
        return [status, [a.name for a in order], *updates, more, *updates, *updates]

    def stream_reply(self, request, history, system, temperature, max_tokens, seed, key, names, slot_values):
        """Shared by send and regenerate: stream one reply onto ``history`` (which ends with the
        user's message) and finish with the steering note."""
        client, schema = self.schema_for(request, key)
        slot_values, best_of = split_best_of(slot_values)
        if best_of > 1 and not schema.can_score:
            raise gr.Error("Best of needs an attribute prediction model: start the server with --apm DIR")
        attributes = attributes_from_slots(schema, slot_values, names)
        seed = _seed(seed)
        messages = conversation_for_server(history, system)
        reply = {"role": "assistant", "content": ""}
        shown = [*history, reply]
        yield shown
        result = None
        try:
            for event in client.stream_chat(messages, attributes, temperature=temperature,
                                            max_tokens=max_tokens, seed=seed, score=schema.can_score,
                                            api_key=key or None, best_of=best_of):
                if isinstance(event, ChatResult):
                    result = event
                else:
                    reply["content"] += event
                    yield shown
        except ServerError as e:
            yield list(history)
            raise gr.Error(str(e)) from None
        note = format_steering(slider_order(schema), result, attributes, seed, schema.can_score)
        if result is not None and result.candidates:
            note["metadata"]["title"] += f" | best of {result.candidates}"
        yield [*history, reply, note]

    def send(self, request: gr.Request, message, history, system, temperature, max_tokens, seed, key, names,
             *slots):
        # Yields (chat history, message box).
        message = (message or "").strip()
        if not message:
            yield history, ""
            return
        history = [*history, {"role": "user", "content": message}]
        try:
            for shown in self.stream_reply(request, history, system, temperature, max_tokens, seed, key, names,
                                           slots):
                yield shown, ""
        except gr.Error:
            # Give the message back so it can be resent once the problem is fixed.
            yield history[:-1], message
            raise

    def regenerate(self, request: gr.Request, history, system, temperature, max_tokens, seed, key, names, *slots):
        last_user = max((i for i, m in enumerate(history) if m.get("role") == "user"), default=None)
        if last_user is None:
            raise gr.Error("nothing to regenerate yet: send a message first")
        history = list(history[: last_user + 1])
        yield from self.stream_reply(request, history, system, temperature, max_tokens, seed, key, names, slots)

    def compare(self, request: gr.Request, message, system, temperature, max_tokens, seed, key, names, *slots):
        # Yields the two sides' texts (setting A's slots, then B's, in ``slots``). Comments, not
        # docstrings, on the API handlers: Gradio shows a docstring as the endpoint's description.
        message = (message or "").strip()
        if not message:
            raise gr.Error("type a message to compare")
        client, schema = self.schema_for(request, key)
        order = slider_order(schema)
        settings = [attributes_from_slots(schema, slots[:MAX_ATTRIBUTES], names),
                    attributes_from_slots(schema, slots[MAX_ATTRIBUTES:], names)]
        seed = _seed(seed)  # one seed for both sides: the sliders are the only difference
        messages = conversation_for_server([{"role": "user", "content": message}], system)
        texts, notes = ["", ""], ["", ""]
        for side, event in merge_streams([
            client.stream_chat(messages, attrs, temperature=temperature, max_tokens=max_tokens, seed=seed,
                               score=schema.can_score, api_key=key or None)
            for attrs in settings
        ]):
            if isinstance(event, ServerError):
                raise gr.Error(str(event))
            if isinstance(event, ChatResult):
                note = format_steering(order, event, settings[side], seed, schema.can_score)
                notes[side] = f"\n\n---\n**{note['metadata']['title']}**\n\n{note['content']}"
            else:
                texts[side] += event
            yield texts[0] + notes[0], texts[1] + notes[1]

    @staticmethod
    def on_persona(name: str, current: str):
        if name == "Custom":
            return gr.Textbox(value=current, interactive=True)
        return gr.Textbox(value=PERSONAS.get(name, ""), interactive=True)

    @staticmethod
    def clear():
        return [], ""


@dataclass
class ChatPage:
    """The components the handlers read and write (``layout`` builds them)."""

    status: gr.Markdown
    slot_names: gr.State
    chatbot: gr.Chatbot
    message: gr.Textbox
    send_btn: gr.Button
    regen_btn: gr.Button
    stop_btn: gr.Button
    clear_btn: gr.Button
    chat_slots: list[gr.Slider]
    more_accordion: gr.Accordion
    persona: gr.Dropdown
    system: gr.Textbox
    temperature: gr.Slider
    max_tokens: gr.Slider
    seed: gr.Textbox
    best_of: gr.Slider
    api_key: gr.Textbox
    compare_message: gr.Textbox
    compare_btn: gr.Button
    compare_stop: gr.Button
    a_slots: list[gr.Slider]
    b_slots: list[gr.Slider]
    out_a: gr.Markdown
    out_b: gr.Markdown


def layout(demo: gr.Blocks, backend: Backend) -> ChatPage:
    """The page's components, inside ``demo``: the Chat tab, the NPC tab and the Compare tab."""
    with gr.Row():
        gr.Markdown("## steer: attribute-steered chat")
    slot_names = gr.State(None)  # the attribute behind each slider slot, set when the page loads
    status = gr.Markdown("Connecting to the steer server…", elem_classes=["steer-status"], elem_id="steer-status")
    with gr.Tabs():
        with gr.Tab("Chat", id="chat"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=320):
                    chatbot = gr.Chatbot(label="Conversation", elem_id="steer-chatbot", height=460,
                                         buttons=["copy"], feedback_options=None,
                                         placeholder="Pick a persona, set the sliders, and say hello.")
                    with gr.Row():
                        message = gr.Textbox(placeholder="Say something to the NPC…",
                                             show_label=False, scale=5, min_width=180, elem_id="steer-message",
                                             submit_btn=False, lines=1, max_lines=6)
                        send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="steer-send")
                    with gr.Row():
                        regen_btn = gr.Button("Regenerate", size="sm", min_width=80, elem_id="steer-regenerate")
                        stop_btn = gr.Button("Stop", size="sm", variant="stop", min_width=80, elem_id="steer-stop")
                        clear_btn = gr.Button("Clear", size="sm", min_width=80, elem_id="steer-clear")
                with gr.Column(scale=2, min_width=280):
                    gr.Markdown("**Steering**: each slider sets the attribute value the reply is generated with.")
                    chat_slots = _slider_slots("chat", FRONT_SLOTS)
                    with gr.Accordion("More attributes", open=False, visible=False) as more_accordion:
                        chat_slots += _slider_slots("chat", MAX_ATTRIBUTES - FRONT_SLOTS, start=FRONT_SLOTS)
                    with gr.Accordion("Persona & sampling", open=True):
                        persona = gr.Dropdown(list(PERSONAS), value=DEFAULT_PERSONA, label="Persona",
                                              info="Fills the system prompt; edit it freely or pick Custom.")
                        system = gr.Textbox(value=PERSONAS[DEFAULT_PERSONA], label="System prompt", lines=3,
                                            max_lines=8, elem_id="steer-system")
                        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                                                info="0 = greedy (deterministic)")
                        max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max tokens",
                                               info="Longest reply; the server may cap it lower.")
                        # A textbox, not gr.Number: a number box cannot be blank, and blank means random.
                        seed = gr.Textbox(value="", label="Seed", placeholder="random", max_lines=1,
                                          info="Blank = a fresh random seed per reply (shown under it).")
                        best_of = gr.Slider(1, 8, value=1, step=1, label="Best of", elem_id="steer-best-of",
                                            info="Draw N replies and keep the one the APM measures closest to "
                                                 "the sliders (needs a server started with --apm).")
                    with gr.Accordion("Settings", open=False):
                        api_key = gr.Textbox(label="API key", type="password", value="",
                                             info="Only if the server was started with API keys; press Enter.")
        with gr.Tab("NPCs", id="npcs"):
            build_npc_tab(demo, backend.url_for, backend.api_key)
        with gr.Tab("Compare", id="compare"):
            gr.Markdown("The same message answered at two slider settings, with the same seed, side by side. "
                        "Persona, temperature, max tokens and seed come from the Chat tab.")
            with gr.Row():
                compare_message = gr.Textbox(placeholder="Message to send to both…", show_label=False, scale=5,
                                             min_width=180, elem_id="steer-compare-message", lines=1)
                compare_btn = gr.Button("Compare", variant="primary", scale=1, min_width=80, elem_id="steer-compare")
                compare_stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
            with gr.Row(equal_height=False):
                with gr.Column(min_width=260):
                    gr.Markdown("### Setting A")
                    a_slots = _slider_slots("a", MAX_ATTRIBUTES)
                    out_a = gr.Markdown(elem_classes=["steer-compare-out"], elem_id="steer-compare-a", container=True)
                with gr.Column(min_width=260):
                    gr.Markdown("### Setting B")
                    b_slots = _slider_slots("b", MAX_ATTRIBUTES)
                    out_b = gr.Markdown(elem_classes=["steer-compare-out"], elem_id="steer-compare-b", container=True)
    return ChatPage(status=status, slot_names=slot_names, chatbot=chatbot, message=message, send_btn=send_btn,
                    regen_btn=regen_btn, stop_btn=stop_btn, clear_btn=clear_btn, chat_slots=chat_slots,
                    more_accordion=more_accordion, persona=persona, system=system, temperature=temperature,
                    max_tokens=max_tokens, seed=seed, best_of=best_of, api_key=api_key,
                    compare_message=compare_message, compare_btn=compare_btn, compare_stop=compare_stop,
                    a_slots=a_slots, b_slots=b_slots, out_a=out_a, out_b=out_b)


def connect(demo: gr.Blocks, page: ChatPage, handlers: ChatHandlers) -> None:
    """The events: which handler each component triggers, with which inputs and outputs. The
    ``api_name``s are the UI's Gradio API (``/configure``, ``/send``, ``/regenerate``, ``/clear``,
    ``/compare``); their input order is part of it."""
    p = page
    config_outputs = [p.status, p.slot_names, *p.chat_slots, p.more_accordion, *p.a_slots, *p.b_slots]
    demo.load(handlers.configure, inputs=[p.api_key], outputs=config_outputs, api_name="configure")
    p.api_key.submit(handlers.configure, inputs=[p.api_key], outputs=config_outputs, api_visibility="private")
    p.persona.change(handlers.on_persona, inputs=[p.persona, p.system], outputs=[p.system], api_visibility="private")

    # best_of last: the handlers take it after the slider slots (split_best_of).
    settings_inputs = [p.system, p.temperature, p.max_tokens, p.seed, p.api_key, p.slot_names, *p.chat_slots,
                       p.best_of]
    send_inputs, send_outputs = [p.message, p.chatbot, *settings_inputs], [p.chatbot, p.message]
    send_event = p.send_btn.click(handlers.send, inputs=send_inputs, outputs=send_outputs, api_name="send")
    submit_event = p.message.submit(handlers.send, inputs=send_inputs, outputs=send_outputs,
                                    api_visibility="private")
    regen_event = p.regen_btn.click(handlers.regenerate, inputs=[p.chatbot, *settings_inputs], outputs=[p.chatbot],
                                    api_name="regenerate")
    p.stop_btn.click(None, cancels=[send_event, submit_event, regen_event])
    p.clear_btn.click(handlers.clear, outputs=[p.chatbot, p.message], api_name="clear",
                      cancels=[send_event, submit_event, regen_event])

    compare_inputs = [p.compare_message, p.system, p.temperature, p.max_tokens, p.seed, p.api_key, p.slot_names,
                      *p.a_slots, *p.b_slots]
    compare_event = p.compare_btn.click(handlers.compare, inputs=compare_inputs, outputs=[p.out_a, p.out_b],
                                        api_name="compare")
    compare_submit = p.compare_message.submit(handlers.compare, inputs=compare_inputs, outputs=[p.out_a, p.out_b],
                                              api_visibility="private")
    p.compare_stop.click(None, cancels=[compare_event, compare_submit])


def build_ui(server_url: str | None = None, api_key: str | None = None) -> gr.Blocks:
    """The Blocks app. ``server_url`` None: talk to the server this UI is mounted in."""
    backend = Backend(server_url, api_key)
    with gr.Blocks(title="steer chat", analytics_enabled=False, fill_width=True) as demo:
        connect(demo, layout(demo, backend), ChatHandlers(backend))
    return demo


def merge_streams(streams: Sequence[Iterator[Any]]) -> Iterator[tuple[int, Any]]:
    """Interleave several blocking iterators as ``(index, item)`` while they run in threads.

    A ``ServerError`` from one stream is yielded as an item. Closing this generator (Stop)
    closes every stream, which closes its HTTP connection so the server stops generating.
    """
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    done = object()

    def pump(index: int, stream: Iterator[Any]) -> None:
        try:
            for item in stream:
                if stop.is_set():
                    break
                events.put((index, item))
        except ServerError as e:
            events.put((index, e))
        except Exception as e:  # a bug must not hang the UI: report it like a server error
            logger.exception("compare stream %d failed", index)
            events.put((index, ServerError(f"internal error: {e}")))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            events.put((index, done))

    threads = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    remaining = len(threads)
    try:
        while remaining:
            index, item = events.get()
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:
        stop.set()


def mount_ui(app, path: str = "/ui", server_url: str | None = None, api_key: str | None = None, **gradio_kwargs):
    """Mount the UI into a FastAPI app (the steer server calls this). ``server_url`` None: the UI
    talks to the server it is mounted in. ``api_key``: sent with every request when the server
    requires keys and the UI should not ask users for one. ``gradio_kwargs`` go to
    ``gr.mount_gradio_app`` (the server passes ``auth`` when it requires keys)."""
    demo = build_ui(server_url=server_url, api_key=api_key)
    app = gr.mount_gradio_app(app, demo, path=path, css=CSS, ssr_mode=False, footer_links=["api", "settings"],
                               show_error=True, **gradio_kwargs)
    _route_favicon(app, path)
    return app


def _route_favicon(app, path: str) -> None:
    """Gradio's page names no icon, so browsers ask the server root for /favicon.ico and log a 404
    in the console; point that at Gradio's icon, unless the app already serves one."""
    if path.rstrip("/") == "" or any(getattr(r, "path", None) == "/favicon.ico" for r in app.router.routes):
        return
    from fastapi.responses import RedirectResponse

    target = f"{path.rstrip('/')}/favicon.ico"
    app.add_api_route("/favicon.ico", lambda: RedirectResponse(target), include_in_schema=False)
