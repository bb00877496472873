"""The ASGI middleware of the API: body size limit, admission (shutdown drain), API keys and the
request counter. Each answers its own errors with the same OpenAI-style bodies as the routes."""

from __future__ import annotations

import hmac

from steer.service.errors import as_response, error_response, invalid_api_key
from steer.service.metrics import ServerMetrics

KNOWN_ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/attributes", "/health", "/metrics")


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, whether or not they declare a Content-Length."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_big(self):
        # Built only when sent: a JSONResponse per request was 2% of the server's CPU per request.
        return error_response(413, f"request body is larger than {self.max_bytes} bytes", code="body_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_big()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client gone before the body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_big()(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as streaming needs

        await self.app(scope, replay, send)


class AdmissionMiddleware:
    """Counts the requests in flight and, once the server drains for shutdown, answers new ones
    with 503 + Retry-After. ``/health`` and ``/metrics`` stay open (probes see the drain), and the
    UI's long-lived streams (its heartbeat) are not counted, so an open tab never holds a shutdown."""

    def __init__(self, app, state, exempt_prefixes: tuple[str, ...]):
        self.app = app
        self.state = state
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or path in ("/health", "/metrics") or path.startswith(self.exempt_prefixes):
            return await self.app(scope, receive, send)
        if self.state.draining:
            retry = str(self.state.settings.retry_after_s)
            return await error_response(503, "the server is shutting down; retry on another instance or later",
                                        type="server_error", code="shutting_down",
                                        headers={"Retry-After": retry})(scope, receive, send)
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class AccessMiddleware:
    """With API keys on, every route but ``/health`` needs ``Authorization: Bearer KEY``:
    ``/metrics``, ``/docs``, ``/openapi.json`` and routes added by other routers included. The UI
    (``ui_prefix``) is left to Gradio's login, which asks for a key as the password. Gradio's file
    upload route is closed whether or not keys are on: the UI takes no files, and the route stores
    any number of them."""

    def __init__(self, app, keys: list[bytes], ui_prefix: str):
        self.app = app
        self.keys = keys
        self.ui_prefix = ui_prefix
        self.upload_path = f"{ui_prefix}gradio_api/upload"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.rstrip("/") == self.upload_path:
            return await error_response(403, "file uploads are disabled on this server", code="uploads_disabled")(
                scope, receive, send)
        if self.keys and path != "/health" and not path.startswith(self.ui_prefix) \
                and not key_matches(scope, self.keys):
            return await as_response(invalid_api_key())(scope, receive, send)
        return await self.app(scope, receive, send)


class RequestCountMiddleware:
    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()


def key_matches(scope, keys: list[bytes]) -> bool:
    """Whether the request's ``Authorization: Bearer KEY`` is one of ``keys``. Compared as bytes:
    ``hmac.compare_digest`` refuses str with non-ASCII characters, and a header is bytes anyway."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    matched = False
    for key in keys:  # every key is compared, so the time taken does not say which one matched
        matched |= hmac.compare_digest(token, key)
    return scheme.lower() == b"bearer" and matched
