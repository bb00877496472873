"""The Gradio chat UI against the real steer server, in-process on a free port.

The policy is stories260K (a real tiny pretrained Llama) and the APM a random tiny Llama
classifier: the tests check the plumbing (sliders from the schema, streamed replies, applied and
measured values, compare), not the quality of either model.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest


pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'steer[ui]')")

# Five attributes: three up front, two folded away in the accordion. Defaults and descriptions
# are distinctive so a test can tell they came from the server, not from the UI's code.


@pytest.fixture(scope="module")
def gradio_client(ui_server):
    from gradio_client import Client

    return Client(f"{ui_server.url}/ui/", verbose=False, download_files=False)


# --------------------------------------------------------------------------- pure helpers
@pytest.fixture
def server_schema(ui_schema):
    """The UI's view of ``ui_schema``, as the server would describe it."""
    from steer.ui.client import AttributeSpec, ServerSchema

    specs = tuple(AttributeSpec(a.name, a.min, a.max, a.default, a.description) for a in ui_schema.attributes)
    return ServerSchema("ui-test", specs, specs)


def test_slider_order_puts_favourites_first_then_schema_order(server_schema):
    from steer.ui.app import slider_order

    assert [a.name for a in slider_order(server_schema)] == ["helpfulness", "humor", "creativity", "quality", "verbosity"]


def test_slider_info_adds_what_the_ends_of_a_worded_scale_mean():
    from steer.ui.app import slider_info
    from steer.ui.client import AttributeSpec

    worded = AttributeSpec("humor", 0, 4, 0, "How funny the reply is.",
                           ("completely serious", "dry", "playful", "funny", "hilarious and over the top"))
    assert slider_info(worded) == "How funny the reply is. (0 completely serious ... 4 hilarious and over the top)"
    assert slider_info(AttributeSpec("menace", 0, 4, 0, "Threat.")) == "Threat."
    assert slider_info(AttributeSpec("menace", 0, 4, 0)) is None


def test_slider_order_fills_the_front_from_a_schema_without_favourites():
    from steer.ui.app import slider_order
    from steer.ui.client import AttributeSpec, ServerSchema

    specs = tuple(AttributeSpec(n, 0, 4, 0) for n in ("correctness", "coherence", "complexity", "verbosity"))
    assert [a.name for a in slider_order(ServerSchema("hs", specs, None))] == [
        "correctness", "coherence", "complexity", "verbosity"]


def test_attributes_from_slots_maps_by_configured_names_and_ignores_unconfigured(server_schema):
    from steer.ui.app import attributes_from_slots

    schema = server_schema
    assert attributes_from_slots(schema, [4, 2.0, 1, 3, 5]) == {
        "helpfulness": 4, "humor": 2, "creativity": 1, "quality": 3, "verbosity": 5}
    # The page configured its sliders in another order: names win over the default order.
    assert attributes_from_slots(schema, [1, 2], names=["humor", "quality"]) == {"humor": 1, "quality": 2}
    # The page could not reach the server: hidden sliders must not be sent as values.
    assert attributes_from_slots(schema, [0, 0, 0], names=[]) == {}


def test_conversation_for_server_drops_ui_notes_and_joins_parts():
    from steer.ui.app import conversation_for_server

    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Well met.", "metadata": None},
        {"role": "assistant", "content": "| attribute | applied |", "metadata": {"title": "applied: humor 3"}},
        {"role": "user", "content": "Any rooms?"},
    ]
    assert conversation_for_server(history, "  You are an innkeeper. ") == [
        {"role": "system", "content": "You are an innkeeper."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Well met."},
        {"role": "user", "content": "Any rooms?"},
    ]
    assert conversation_for_server(history[:1], "")[0]["role"] == "user"


def test_format_steering_shows_applied_and_measured_values(server_schema):
    from steer.ui.app import format_steering, slider_order
    from steer.ui.client import ChatResult

    schema = server_schema
    result = ChatResult(text="hi", finish_reason="stop", attributes={"humor": 3, "helpfulness": 2},
                        scores={"humor": 2.345, "helpfulness": 1.0})
    note = format_steering(slider_order(schema), result, {"humor": 0}, seed=7, can_score=True)
    assert note["metadata"]["title"] == "applied: helpfulness 2, humor 3 | measured: helpfulness 1.0, humor 2.3"
    assert "| humor | 3 | 2.35 |" in note["content"] and "seed 7" in note["content"]
    no_apm = format_steering(slider_order(schema), ChatResult(text="x"), {"humor": 4}, seed=None, can_score=False)
    assert no_apm["metadata"]["title"] == "applied: humor 4"
    assert "--apm" in no_apm["content"]


def test_ui_config_rejects_bad_urls_and_ports():
    from steer.ui.cli import UiConfig, UiConfigError

    UiConfig(server="http://gpu:8000").validate()
    for kwargs, field in [({"server": "gpu:8000"}, "server"), ({"server": "http://gpu:8000/v1"}, "server"),
                          ({"port": 70000}, "port")]:
        with pytest.raises(UiConfigError) as err:
            UiConfig(**kwargs).validate()
        assert err.value.field == field


def test_client_reports_an_unreachable_server_clearly():
    from steer.ui.client import ServerError, SteerClient

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerError, match="cannot reach the steer server"):
        SteerClient(f"http://127.0.0.1:{port}").schema()


def test_merge_streams_interleaves_and_closing_it_closes_every_stream():
    from steer.ui.app import merge_streams
    from steer.ui.client import ServerError

    closed = []

    def stream(name, n, fail=False):
        try:
            for i in range(n):
                yield f"{name}{i}"
            if fail:
                raise ServerError(f"{name} broke")
        finally:
            closed.append(name)

    items = list(merge_streams([stream("a", 3), stream("b", 2, fail=True)]))
    assert [x for i, x in items if i == 0] == ["a0", "a1", "a2"]
    assert [str(x) for i, x in items if i == 1] == ["b0", "b1", "b broke"]
    closed.clear()
    merged = merge_streams([stream("x", 10**9), stream("y", 10**9)])
    next(merged)
    merged.close()  # what Stop does to the compare handler
    deadline = time.monotonic() + 5
    while len(closed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(closed) == ["x", "y"]


# --------------------------------------------------------------------------- handlers, no page
class FakeClient:
    """Stands in for ``SteerClient``: a fixed schema and a scripted stream, recording what it was asked."""

    base_url = "http://fake:1"

    def __init__(self, schema, pieces=("Hel", "lo"), error=None):
        self._schema, self.pieces, self.error, self.calls = schema, pieces, error, []

    def schema(self, api_key=None, refresh=False):
        if self.error is not None:
            raise self.error
        return self._schema

    def model_name(self, api_key=None):
        return "fake-model"

    def stream_chat(self, messages, attributes, **kwargs):
        from steer.ui.client import ChatResult

        self.calls.append((messages, attributes, kwargs))
        yield from self.pieces
        yield ChatResult(text="".join(self.pieces), finish_reason="stop", attributes=attributes,
                         scores={n: 1.0 for n in attributes})


class FakeBackend:
    api_key = None

    def __init__(self, client):
        self._client = client

    def client(self, request):
        return self._client


def test_chat_handlers_work_without_a_page(server_schema):
    """The handlers are plain methods: called directly, with the values Gradio would pass."""
    import gradio as gr

    from steer.ui.app import MAX_ATTRIBUTES, ChatHandlers, slider_order

    schema = server_schema
    client = FakeClient(schema)
    handlers = ChatHandlers(FakeBackend(client))
    names = [a.name for a in slider_order(schema)]
    slots = [4, 0, 2, 5, 1] + [0] * (MAX_ATTRIBUTES - 5)
    outputs = list(handlers.send(None, " Hi! ", [], "You are terse.", 0.0, 8, "7", "", names, *slots, 1))
    history, box = outputs[-1]
    assert box == ""
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert history[1]["content"] == "Hello" and "seed 7" in history[2]["content"]
    messages, attributes, kwargs = client.calls[0]
    assert messages == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    assert attributes == dict(zip(names, [4, 0, 2, 5, 1])) and kwargs["seed"] == 7
    # Regenerate drops the last reply and its note, and streams a new one.
    again = list(handlers.regenerate(None, history, "", 0.0, 8, "7", "", names, *slots))[-1]
    assert [m["role"] for m in again] == ["user", "assistant", "assistant"]
    with pytest.raises(gr.Error, match="nothing to regenerate"):
        list(handlers.regenerate(None, [], "", 0.0, 8, "", "", names, *slots))
    # A bad seed gives the message back so it can be resent.
    sent = handlers.send(None, "again", history, "", 0.0, 8, "lucky", "", names, *slots)
    with pytest.raises(gr.Error, match="seed"):
        for shown in sent:
            pass
    assert shown == (history, "again")
    left, right = list(handlers.compare(None, "Hi", "", 0.0, 8, "3", "", names, *slots, *slots))[-1]
    assert left.startswith("Hello") and right.startswith("Hello")
    assert handlers.clear() == ([], "")


def test_chat_handlers_configure_reports_an_unreachable_server(server_schema):
    from steer.ui.app import MAX_ATTRIBUTES, ChatHandlers
    from steer.ui.client import ServerError

    handlers = ChatHandlers(FakeBackend(FakeClient(server_schema, error=ServerError("bad key", status=401))))
    status, names, *rest = handlers.configure(None, "wrong")
    assert status.startswith("**Not connected:** bad key") and "API key" in status
    assert names == [] and len(rest) == 3 * MAX_ATTRIBUTES + 1
    ok = ChatHandlers(FakeBackend(FakeClient(server_schema)))
    status, names, *rest = ok.configure(None, "")
    assert "fake-model" in status and names[:3] == ["helpfulness", "humor", "creativity"]


# --------------------------------------------------------------------------- against the server
def test_client_streams_from_the_real_server(ui_schema, ui_server):
    from steer.ui.client import ChatResult, ServerError, SteerClient

    client = SteerClient(ui_server.url)
    schema = client.schema()
    assert schema.names == ui_schema.names and schema.can_score
    events = list(client.stream_chat([{"role": "user", "content": "Once upon a time"}], {"humor": 3},
                                     temperature=0.0, max_tokens=12, seed=1, score=True))
    result = events[-1]
    assert isinstance(result, ChatResult)
    assert len(events) > 2 and "".join(events[:-1]) == result.text and result.text
    assert result.attributes["humor"] == 3 and result.attributes["quality"] == 4  # defaults filled by the server
    assert set(result.scores) == set(ui_schema.names)
    with pytest.raises(ServerError, match="humor") as err:
        list(client.stream_chat([{"role": "user", "content": "hi"}], {"humor": 9}, max_tokens=4))
    assert err.value.status == 400


def test_gradio_api_lists_the_ui_endpoints(gradio_client):
    endpoints = gradio_client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/send", "/regenerate", "/clear", "/compare", "/configure"} <= set(endpoints)


def test_configure_builds_sliders_from_the_server_schema(gradio_client):
    status, *rest = gradio_client.predict(api_name="/configure")
    assert "stories-ui" in status and "ui-test" in status and "APM loaded" in status


def test_send_streams_a_reply_with_the_applied_and_measured_values(gradio_client):
    # Slots follow slider_order: helpfulness, humor, creativity, quality, verbosity.
    slots = [2, 4, 0, 3, 5] + [0] * 11
    job = gradio_client.submit("Hello, innkeeper!", [], "You are an innkeeper.", 0.0, 16, "5", "", *slots,
                               api_name="/send")
    outputs = job.outputs()
    history, textbox = job.result(timeout=60)
    assert textbox == ""
    # Streaming: the chatbot was sent more than once before the final value.
    assert len(outputs) >= 3
    user, reply, note = history
    assert user["role"] == "user" and "Hello, innkeeper!" in str(user["content"])
    reply_text = str(reply["content"])
    assert reply["role"] == "assistant" and reply_text.strip()
    title = note["metadata"]["title"]
    assert title.startswith("applied: helpfulness 2, humor 4, creativity 0, quality 3, verbosity 5 | measured: ")
    assert "seed 5" in str(note["content"])

    # Same settings and seed: the regenerated reply is the same text (greedy anyway).
    regenerated = gradio_client.predict(history, "You are an innkeeper.", 0.0, 16, "5", "", *slots,
                                        api_name="/regenerate")
    assert len(regenerated) == 3 and str(regenerated[1]["content"]) == reply_text

    # A second turn goes out with the first reply but without the UI's note.
    history2, _ = gradio_client.predict("And a hot meal?", history, "", 0.0, 8, "5", "", *slots, api_name="/send")
    assert [m["role"] for m in history2] == ["user", "assistant", "assistant", "user", "assistant", "assistant"]
    assert history2[:3] == history and history2[5]["metadata"]["title"].startswith("applied: ")


def test_send_with_best_of_reports_the_candidates_drawn(gradio_client):
    slots = [2, 4, 0, 3, 5] + [0] * 11
    history, _ = gradio_client.predict("Hello, innkeeper!", [], "", 1.0, 8, "5", "", *slots, 3, api_name="/send")
    title = history[2]["metadata"]["title"]
    assert "| measured: " in title and title.endswith("| best of 3")
    # Best-of-1 (the control's default) is an ordinary reply.
    history, _ = gradio_client.predict("Hello, innkeeper!", [], "", 1.0, 8, "5", "", *slots, 1, api_name="/send")
    assert "best of" not in history[2]["metadata"]["title"]


def test_send_with_a_bad_value_shows_the_server_error(ui_server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    # A fresh session, whose sliders were never configured: the server judges the value.
    client = Client(f"{ui_server.url}/ui/", verbose=False, download_files=False)
    slots = [2, 9] + [0] * 14  # humor 9 is outside 0-4
    with pytest.raises(AppError, match="humor"):
        client.predict("hi", [], "", 0.0, 4, "", "", *slots, api_name="/send")
    with pytest.raises(AppError, match="seed"):
        client.predict("hi", [], "", 0.0, 4, "lucky", "", *([0] * 16), api_name="/send")
    with pytest.raises(AppError, match="nothing to regenerate"):
        client.predict([], "", 0.0, 4, "", "", *([0] * 16), api_name="/regenerate")


def test_compare_answers_one_message_at_two_settings(gradio_client):
    a = [3, 0, 2, 4, 2] + [0] * 11
    b = [3, 4, 2, 4, 2] + [0] * 11
    left, right = gradio_client.predict("Tell me about the town.", "", 0.0, 12, "11", "", *a, *b,
                                        api_name="/compare")
    assert "applied: helpfulness 3, humor 0," in left and "applied: helpfulness 3, humor 4," in right
    assert "measured:" in left and "measured:" in right and "seed 11" in left


def test_standalone_ui_talks_to_a_remote_server(live_server, ui_server):
    """``steer ui --server URL``: the UI alone at /, its handlers calling the given server."""
    from gradio_client import Client

    from steer.ui.cli import UiConfig, build_app

    with live_server(build_app(UiConfig(server=ui_server.url, port=7860)), health="/") as ui:
        client = Client(f"{ui.url}/", verbose=False, download_files=False)
        status = client.predict(api_name="/configure")[0]
        assert f"`{ui_server.url}`" in status and "ui-test" in status
        history, _ = client.predict("Hi!", [], "", 0.0, 6, "3", "", *([3, 2, 1, 4, 2] + [0] * 11), api_name="/send")
        assert history[-1]["metadata"]["title"].startswith("applied: helpfulness 3, humor 2, creativity 1")


def _generated_tokens(url: str) -> float:
    import re

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r"^steer_generated_tokens_total (\S+)", text, re.M).group(1))


def test_stop_ends_the_generation_on_the_server(ui_server, gradio_client):
    from steer.ui.client import SteerClient

    slots = [3, 2, 1, 4, 2] + [0] * 11
    args = dict(temperature=1.5, max_tokens=120, seed=3)
    # Uncancelled, this request generates many tokens (same seed: the same reply).
    full = [e for e in SteerClient(ui_server.url).stream_chat(
        [{"role": "user", "content": "Tell me a long story"}], dict(zip(
            ["helpfulness", "humor", "creativity", "quality", "verbosity"], slots)), **args)][-1]
    assert full.finish_reason == "length", "pick a seed whose reply runs long"
    before = _generated_tokens(ui_server.url)
    job = gradio_client.submit("Tell me a long story", [], "", args["temperature"], args["max_tokens"],
                               str(args["seed"]), "", *slots, api_name="/send")
    deadline = time.monotonic() + 30
    while len(job.outputs()) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    job.cancel()  # what the Stop button does
    time.sleep(1.5)
    stopped_at = _generated_tokens(ui_server.url) - before
    time.sleep(1.0)
    assert _generated_tokens(ui_server.url) - before == stopped_at, "the server kept generating after Stop"
    assert stopped_at < args["max_tokens"]
