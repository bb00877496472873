"""The server-sent events response (``steer.service.responses.EventStreamResponse``) at the ASGI level."""

import asyncio

import pytest

from steer.service.responses import EventStreamResponse


def _run(events, receive):
    sent = []

    async def send(message):
        sent.append(message)

    async def main():
        await EventStreamResponse(events(sent))({"type": "http"}, lambda: receive(sent), send)

    asyncio.run(main())
    return sent


async def _never_leaves(sent):
    await asyncio.Event().wait()


def test_done_ends_the_body_in_its_own_message_and_the_stream_still_runs_to_its_end():
    after = []

    async def events(sent):
        yield "data: {}\n\n"
        yield 'data: {"usage": 1}\n\ndata: [DONE]\n\n'
        after.append("ran")  # what a stream does after its last chunk (the server's latency metric)

    sent = _run(events, _never_leaves)
    assert [(m["type"], m.get("more_body")) for m in sent] == [
        ("http.response.start", None), ("http.response.body", True), ("http.response.body", False)]
    assert sent[-1]["body"] == b'data: {"usage": 1}\n\ndata: [DONE]\n\n'
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert after == ["ran"]


def test_a_stream_without_done_ends_with_an_empty_last_message():
    async def events(sent):
        yield "data: {}\n\n"

    sent = _run(events, _never_leaves)
    assert [(m.get("body"), m.get("more_body")) for m in sent[1:]] == [(b"data: {}\n\n", True), (b"", False)]


def test_a_client_that_leaves_stops_the_stream_and_its_cleanup_runs():
    cleaned = []

    async def events(sent):
        try:
            yield "data: {}\n\n"
            await asyncio.Event().wait()  # an engine that has nothing more for now
            yield "never sent\n\n"
        finally:
            cleaned.append(True)  # the server cancels the request's rows here

    async def leaves_after_the_first_chunk(sent):
        while len(sent) < 2:
            await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    sent = _run(events, leaves_after_the_first_chunk)
    assert cleaned == [True]
    assert [m.get("body") for m in sent[1:]] == [b"data: {}\n\n"]


def test_an_error_in_the_stream_propagates():
    async def events(sent):
        yield "data: {}\n\n"
        raise RuntimeError("the stream broke")

    with pytest.raises(RuntimeError, match="the stream broke"):
        _run(events, _never_leaves)
