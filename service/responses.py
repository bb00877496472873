"""The streaming response of the API's server-sent events (chat completions, NPC turns)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


class EventStreamResponse(StreamingResponse):
    """``text/event-stream``, uncached and unbuffered by proxies, with plain asyncio tasks around it.

    Starlette's ``StreamingResponse`` streams inside an anyio task group, next to a task that
    waits for the client to leave; when the stream ends it cancels that group, and anyio formats
    the current task's ``repr`` into the cancel reason. With 16 streaming clients that machinery
    was about 8% of the server process's CPU, in the same thread that parses new requests. Here the
    stream runs in the request's own task and a second task waits for the disconnect; whichever
    ends first stops the other. The chunk that ends with ``data: [DONE]`` also ends the response
    body in the same message."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: Mapping[str, str] | None = None):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait((stream, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # The stream ended (stop watching), the client left (stop streaming: the body
            # iterator's cleanup frees its rows), or this request's task was cancelled.
            watcher.cancel()
            stream.cancel()
            await asyncio.gather(stream, watcher, return_exceptions=True)
        if not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()
        if self.background is not None:
            await self.background()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:
            if ended:
                continue  # nothing is sent after [DONE]; the iterator still runs to its end
            if not isinstance(chunk, bytes):
                chunk = chunk.encode(self.charset)
            ended = chunk.endswith(DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
