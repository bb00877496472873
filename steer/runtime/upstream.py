"""Decoding on an inference server steer does not run: vLLM's OpenAI server or llama.cpp's
``llama-server``, reached over HTTP. :class:`UpstreamEngine` has the interface of
:class:`~steer.runtime.scheduler.Scheduler` (``start``, ``stop``, ``submit``, ``cancel``, ``run``,
``stats``, ``stalled_for``), so ``steer.service.serving.ChatServing`` drives either the same way.

The steering layer stays steer's. A row's prompt arrives as token ids rendered by steer's one
template (attributes included); the upstream gets those ids, the row's sampling settings and its
budget, and no stop strings. It streams back the TOKEN IDS it samples, and every id goes through
the row's :class:`~steer.runtime.stopping.ReplyState` (via :class:`~steer.runtime.rows.RowBook`,
the bookkeeping the Scheduler shares), so EOS, the end marker, stop strings and the budget end a
reply exactly as on the torch engine, and text is detokenized by steer. When steer ends a reply
first (a stop string, EOS, a cancel), the HTTP stream is closed, which makes both servers stop
decoding that request.

Concurrency: one asyncio loop on one background thread, one ``httpx.AsyncClient`` with a
connection per streaming row. A stream spends its life waiting on a socket, so a thread per row
would hold up to ``max_batch_size`` threads doing nothing, and cancelling a row would have to
interrupt a blocking read from another thread; on the loop a cancel is ``task.cancel()``, which
closes that row's connection at once. Up to ``max_batch_size`` rows stream at a time (the
upstream batches them), the rest wait in the queue, which holds ``max_queue`` more.

Retries are only for setting up a connection (httpx's transport ``retries``): a reply that has
begun streaming is never sent again, since its text has reached the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from steer.core.errors import SteerError
from steer.runtime.detokenize import TokenDecoder
from steer.runtime.rows import (
    STOPPED_MESSAGE,
    EngineFailedError,
    EngineStats,
    Row,
    RowBook,
    check_admission,
)

logger = logging.getLogger(__name__)

APIS = ("vllm", "llama-server")
# Connection attempts beyond the first (httpx retries connect errors only, with backoff).
CONNECT_RETRIES = 2
# llama.cpp takes a 32-bit seed, and 0xFFFFFFFF there means "random".
LLAMA_SEED_RANGE = 2**32 - 1
# The most start() waits for each of the upstream's answers.
PROBE_TIMEOUT_S = 30.0


class UpstreamError(SteerError, RuntimeError):
    """A reply failed on the upstream server; the message names the server."""


@dataclass(frozen=True)
class UpstreamInfo:
    """What :meth:`UpstreamEngine.start` learned from the server."""

    model: str | None
    max_context: int | None


@dataclass
class StreamEvent:
    """What one event of an upstream stream says."""

    tokens: list[int]
    end: str | None = None  # the upstream's finish reason, on its last event
    # llama-server: tokens decoded so far, and the text this event settles. Its stream withholds
    # the ids of tokens that end inside a UTF-8 character; these two tell how many and their text.
    predicted: int | None = None
    content: str = ""


# ------------------------------------------------------------------ the two APIs
class VllmCompletions:
    """vLLM's OpenAI ``/v1/completions``: a prompt of token ids, ids back either as the chunk's
    ``token_ids`` (``return_token_ids``, newer vLLM) or as ``logprobs.tokens`` spelled
    ``"token_id:N"`` (``logprobs: 0`` with ``return_tokens_as_token_ids``)."""

    name = "vllm"
    path = "/v1/completions"

    async def probe(self, engine: UpstreamEngine, client: httpx.AsyncClient) -> UpstreamInfo:
        cards = (await engine.get_json(client, "/v1/models")).get("data") or []
        ids = [c.get("id") for c in cards]
        model = engine.model
        if model is None:
            if len(ids) != 1:
                raise EngineFailedError(f"the vllm upstream at {engine.url} serves {ids}; say which one with model=")
            model = ids[0]
        elif model not in ids:
            raise EngineFailedError(f"the vllm upstream at {engine.url} does not serve {model!r}; it serves {ids}")
        card = cards[ids.index(model)]
        # A LoRA adapter's card may leave the context to its base model's card.
        parent = next((c for c in cards if c.get("id") == card.get("parent")), {})
        return UpstreamInfo(model, card.get("max_model_len") or parent.get("max_model_len"))

    def body(self, row: Row, model: str | None) -> dict[str, Any]:
        p = row.params
        body = {
            "model": model, "prompt": list(row.prompt_ids), "stream": True, "n": 1,
            "max_tokens": p.max_new_tokens, "temperature": float(p.temperature), "top_p": float(p.top_p),
            # Explicit, so the server's defaults (a model's generation_config) cannot add samplers.
            "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": float(p.presence_penalty), "frequency_penalty": float(p.frequency_penalty),
            # Ends are steer's: vLLM decodes past EOS (it does not bias it away) and steer stops at it.
            "stop": [], "stop_token_ids": [], "ignore_eos": True, "skip_special_tokens": False,
            "logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True,
        }
        if p.seed is not None:
            body["seed"] = int(p.seed)
        if p.logit_bias:
            body["logit_bias"] = {str(t): float(b) for t, b in p.logit_bias.items()}
        return body

    def read(self, event: dict[str, Any]) -> StreamEvent:
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise ValueError("no choices")
        if not choices:
            return StreamEvent([])  # a usage-only chunk
        choice = choices[0]
        ids = choice.get("token_ids")
        if ids is None:
            tokens = (choice.get("logprobs") or {}).get("tokens")
            if tokens is None:
                if choice.get("text"):
                    raise ValueError("text without token ids (is this vLLM with return_tokens_as_token_ids?)")
                tokens = []
            ids = [int(t.removeprefix("token_id:")) if t.startswith("token_id:") else _bad_token(t) for t in tokens]
        return StreamEvent([int(t) for t in ids], choice.get("finish_reason"))


class LlamaServerCompletion:
    """llama.cpp's native ``/completion``: a prompt of token ids, each event's ``tokens``
    (``return_tokens``), ``stop: true`` with ``stop_type`` on the last."""

    name = "llama-server"
    path = "/completion"

    async def probe(self, engine: UpstreamEngine, client: httpx.AsyncClient) -> UpstreamInfo:
        await engine.get_json(client, "/health")
        props = await engine.get_json(client, "/props")
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        return UpstreamInfo(engine.model, int(n_ctx) if n_ctx else None)

    def body(self, row: Row, model: str | None) -> dict[str, Any]:
        p = row.params
        body = {
            "prompt": list(row.prompt_ids), "stream": True, "return_tokens": True, "cache_prompt": True,
            "n_predict": p.max_new_tokens, "temperature": float(p.temperature), "top_p": float(p.top_p),
            # steer's sampling: penalties over the whole reply, temperature, then the nucleus. No
            # top-k, min-p, repeat penalty, DRY or XTC (llama-server turns some on by default).
            "samplers": ["penalties", "temperature", "top_p"],
            # The penalties' window: everything so far (the prompt too, as llama.cpp counts); 0 turns
            # it off when there is nothing to penalise (llama-server refuses the older -1).
            "top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0,
            "repeat_last_n": len(row.prompt_ids) + p.max_new_tokens if p.presence_penalty or p.frequency_penalty else 0,
            "dry_multiplier": 0.0, "xtc_probability": 0.0,
            "presence_penalty": float(p.presence_penalty), "frequency_penalty": float(p.frequency_penalty),
            # llama-server's ignore_eos bans EOS outright, so it is sent only when the row asks for it;
            # otherwise the server stops after sending the EOS id, which ends the reply here too.
            "stop": [], "ignore_eos": bool(p.ignore_eos),
        }
        if model is not None:
            body["model"] = model
        if p.seed is not None:
            body["seed"] = int(p.seed) % LLAMA_SEED_RANGE
        if p.logit_bias:
            body["logit_bias"] = [[int(t), float(b)] for t, b in p.logit_bias.items()]
        return body

    def read(self, event: dict[str, Any]) -> StreamEvent:
        tokens = event.get("tokens")
        if not isinstance(tokens, list):
            raise ValueError("no tokens (is this llama-server with return_tokens?)")
        predicted = event.get("tokens_predicted")
        return StreamEvent([int(t) for t in tokens], (event.get("stop_type") or "stop") if event.get("stop") else None,
                           int(predicted) if isinstance(predicted, int) and not event.get("stop") else None,
                           str(event.get("content") or ""))


def _bad_token(token: str) -> int:
    raise ValueError(f"token {token!r} is not spelled token_id:N")


PROTOCOLS = {"vllm": VllmCompletions, "llama-server": LlamaServerCompletion}


# ------------------------------------------------------------------ the engine
class UpstreamEngine:
    def __init__(
        self,
        url: str,
        *,
        api: str,
        tokenizer,
        model: str | None = None,
        api_key: str | None = None,
        max_batch_size: int = 16,
        max_queue: int = 64,
        eos_token_ids: Sequence[int] = (),
        max_context: int | None = None,
        timeout_s: float = 600.0,
        on_token: Callable[[int], None] | None = None,
    ):
        if api not in PROTOCOLS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, not {api!r}")
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be at least 1 and max_queue at least 0")
        url = url.rstrip("/")
        self.url = url.removesuffix("/v1") if api == "vllm" else url
        self.api = PROTOCOLS[api]()
        self.tokenizer = tokenizer
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        # None: learned from the upstream at start() (vLLM's max_model_len, llama-server's n_ctx).
        self.max_context = max_context
        self.timeout_s = timeout_s
        # Called with the number of tokens each stream event brought (the server's token counter).
        self.on_token = on_token
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._book = RowBook(TokenDecoder.for_tokenizer(tokenizer), eos_token_ids)
        self.eos_token_ids = self._book.eos_token_ids
        # Guards the queue, the active set and ``_stop``; ``_done`` wakes run() as rows end.
        # Reentrant: rows' sinks run under it and may cancel rows.
        self._lock = threading.RLock()
        self._done = threading.Condition(self._lock)
        self._waiting: deque[Row] = deque()
        self._active: dict[Row, asyncio.Task] = {}
        # Every stream task until it is over, also one whose row has ended while it closes its connection.
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._stop = False
        # The Scheduler's supervision attributes: an upstream is not restarted by steer, so
        # ``error`` is set only when start() failed, and restarts_total stays 0.
        self.error: str | None = None
        self.restarts_total = 0
        self._events_total = 0  # stream events read: the "steps" of an upstream
        self._max_batch_seen = 0
        self._last_progress = time.monotonic()
        self._byte_ids: dict[int, int] | None = None  # byte -> token id, worked out when first needed

    def __repr__(self) -> str:
        return f"UpstreamEngine({self.url!r}, api={self.api.name!r}, model={self.model!r})"

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the loop thread and check that the upstream answers; raises ``EngineFailedError``
        naming the URL when it does not (or does not serve ``model``)."""
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="steer-upstream", daemon=True)
        thread.start()
        try:
            info = asyncio.run_coroutine_threadsafe(self._open(), loop).result()
        except BaseException as e:
            self.error = str(e)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            if isinstance(e, EngineFailedError):
                raise
            raise EngineFailedError(f"{self._where()} could not be used: {type(e).__name__}: {e}") from e
        self.model = info.model
        if self.max_context is None:
            self.max_context = info.max_context
        with self._lock:
            self._loop, self._thread, self.error = loop, thread, None
            self._stop = False
        loop.call_soon_threadsafe(self._pump)
        logger.info("decoding on the %s upstream at %s (model %s, context %s)", self.api.name, self.url,
                    self.model, self.max_context)

    async def _open(self) -> UpstreamInfo:
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
        limits = httpx.Limits(max_connections=self.max_batch_size + 2, max_keepalive_connections=self.max_batch_size)
        self._client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(retries=CONNECT_RETRIES), timeout=timeout,
                                         limits=limits, headers=self._headers)
        try:
            return await self.api.probe(self, self._client)
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise

    async def get_json(self, client: httpx.AsyncClient, path: str) -> dict[str, Any]:
        """GET ``path`` on the upstream; ``EngineFailedError`` naming the URL for anything but 200 JSON."""
        try:
            response = await client.get(self.url + path, timeout=min(self.timeout_s, PROBE_TIMEOUT_S))
        except httpx.HTTPError as e:
            raise EngineFailedError(f"{self._where()} is unreachable: {type(e).__name__}: {e}") from None
        if response.status_code != 200:
            raise EngineFailedError(f"{self._where()} answered GET {path} with HTTP {response.status_code}: "
                                    f"{_error_text(response.text)}")
        try:
            out = response.json()
        except ValueError:
            raise EngineFailedError(f"{self._where()} answered GET {path} with something that is not JSON: "
                                    f"{response.text[:200]!r}") from None
        return out if isinstance(out, dict) else {}

    def stop(self, timeout: float = 10.0) -> None:
        """Close every stream (their rows end "cancelled", told the server stopped) and the loop."""
        with self._lock:
            self._stop = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except Exception:  # a shutdown that hangs must not keep the server from exiting
                logger.exception("the upstream engine did not shut down cleanly")
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
        with self._lock:
            for row in list(self._waiting) + list(self._active):
                self._finish(row, "cancelled", STOPPED_MESSAGE)
            self._waiting.clear()
            self._active.clear()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --------------------------------------------------------------- client
    def submit(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` together (a request's ``n`` choices), or none of them."""
        self._enqueue(rows, limit=True)

    def _enqueue(self, rows: Sequence[Row], limit: bool) -> None:
        now = time.perf_counter()
        with self._lock:
            check_admission(stopping=self._stop, error=self.error, adding=len(rows), waiting=len(self._waiting),
                            running=len(self._active), max_queue=self.max_queue if limit else float("inf"),
                            max_batch_size=self.max_batch_size)
            if self._book.enqueue(rows, self._waiting, now):
                self._last_progress = time.monotonic()  # the stall clock starts with the first row
            loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._pump)

    def cancel(self, rows: Sequence[Row]) -> None:
        """End the rows; a streaming row's connection is closed, so the upstream stops decoding it."""
        with self._lock:
            for row in rows:
                if not row.done:
                    row.cancelled = True
            loop = self._loop
            if loop is None:  # not started: nothing streams, the rows leave the queue now
                self._drop_cancelled()
        if loop is not None:
            loop.call_soon_threadsafe(self._drop_cancelled)

    def run(self, rows: Sequence[Row], on_done: Callable[[Row], None] | None = None) -> list[Row]:
        """Decode ``rows`` to their end while the calling thread waits (all of them, past the queue
        limit; ``max_batch_size`` stream at a time). An engine not started is started for the call
        and stopped after. A row that failed raises ``UpstreamError``; each row's ``reply`` holds its
        text. ``on_done(row)`` is called on the calling thread as each row ends."""
        started_here = self._thread is None
        if started_here:
            self.start()
        try:
            self._enqueue(rows, limit=False)
            pending = list(rows)
            while pending:
                with self._done:
                    self._done.wait_for(lambda: any(r.done for r in pending))
                finished = [r for r in pending if r.done]
                pending = [r for r in pending if not r.done]
                for row in finished:
                    if on_done is not None and row.finish_reason != "error":  # a failed row raises below
                        on_done(row)
        finally:
            if started_here:
                self.stop()
        failed = next((r for r in rows if r.finish_reason == "error"), None)
        if failed is not None:
            raise UpstreamError(failed.error or f"{self._where()} failed")
        return list(rows)

    def stats(self) -> EngineStats:
        with self._lock:
            return self._book.stats(waiting=len(self._waiting), active=len(self._active),
                                    steps_total=self._events_total, max_batch_seen=self._max_batch_seen)

    def stalled_for(self) -> float:
        """Seconds since the upstream last sent anything while rows were waiting or streaming (0 when
        idle). A long prompt the upstream is still reading counts as a stall until its first token."""
        return time.monotonic() - self._last_progress if self._book.in_flight > 0 else 0.0

    # ------------------------------------------------------------ on the loop
    def _pump(self) -> None:
        """Start streaming waiting rows while fewer than ``max_batch_size`` stream."""
        with self._lock:
            if self._stop or self._loop is None:
                return
            while self._waiting and len(self._active) < self.max_batch_size:
                row = self._waiting.popleft()
                if row.cancelled:
                    self._finish(row, "cancelled")
                    continue
                task = self._active[row] = self._loop.create_task(self._stream(row))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._max_batch_seen = max(self._max_batch_seen, len(self._active))

    def _drop_cancelled(self) -> None:
        with self._lock:
            for row in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(row)
                self._finish(row, "cancelled")
            tasks = [task for row, task in self._active.items() if row.cancelled]
        for task in tasks:
            task.cancel()

    def _finish(self, row: Row, reason: str, error: str | None = None) -> None:
        """Under the lock: end ``row`` (once), out of the active set (its task may still be closing
        the connection), and wake run()."""
        self._active.pop(row, None)
        if not row.done:
            self._book.finish(row, reason, error)
            self._done.notify_all()

    def _where(self) -> str:
        return f"the {self.api.name} upstream at {self.url}"

    async def _stream(self, row: Row) -> None:
        """Stream one row from the upstream to its end, whoever decides it."""
        reason, error = "error", None
        try:
            reason, error = await self._decode(row)
        except asyncio.CancelledError:
            reason = "cancelled"
            error = STOPPED_MESSAGE if self._stop and not row.cancelled else None
        except httpx.TimeoutException as e:
            error = (f"{self._where()} did not answer within {self.timeout_s:g} s ({type(e).__name__}); "
                     "the reply was abandoned")
        except httpx.HTTPError as e:
            error = f"{self._where()} failed: {type(e).__name__}: {e}"
        except Exception as e:  # a bug here must fail the row, not leave its client waiting
            logger.exception("streaming from %s failed", self._where())
            error = f"{self._where()}: generation failed ({type(e).__name__}: {e})"
        finally:
            with self._lock:
                self._active.pop(row, None)
                if not row.done:
                    self._finish(row, reason, error)
                self._last_progress = time.monotonic()
            self._pump()

    async def _decode(self, row: Row) -> tuple[str, str | None]:
        """Read the row's stream, feeding every id to its ``ReplyState``. Returns how the row ends
        when the stream ends first; leaving the ``async with`` early closes the connection."""
        body = self.api.body(row, self.model)
        received = 0  # tokens the upstream has decoded for this row, by its count
        async with self._client.stream("POST", self.url + self.api.path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return "error", f"{self._where()} answered HTTP {response.status_code}: {_error_text(text)}"
            # aclosing: a reply steer ends early leaves the line iterator at once, not at loop exit.
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (": ping"), event names
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    end, received = self._take(row, payload, received)
                    if end is not None:
                        return end
        return "error", f"{self._where()} closed the stream before the reply was finished"

    def _take(self, row: Row, payload: str, received: int) -> tuple[tuple[str, str | None] | None, int]:
        """One stream event: its ids to the row's ``ReplyState``. Returns how the row ends (None
        while it goes on) and the upstream's count of tokens decoded so far."""
        try:
            event = json.loads(payload)
            if not isinstance(event, dict):
                raise ValueError("not an object")
            if "error" in event:
                return ("error", f"{self._where()} reported an error: {_error_text(payload)}"), received
            read = self.api.read(event)
        except ValueError as e:
            return ("error", f"{self._where()} sent a malformed stream event ({e}): {payload[:200]!r}"), received
        tokens = read.tokens
        if read.predicted is not None and read.predicted > received + len(tokens):
            tokens = self._spell_withheld(row, read, received)
            if tokens is None:
                return ("error", f"{self._where()} withheld the ids of tokens inside a UTF-8 character, and this "
                                 "tokenizer cannot spell their bytes as tokens"), received
        received = read.predicted if read.predicted is not None else received + len(read.tokens)
        now = time.perf_counter()
        accepted, ended = 0, False
        with self._lock:
            self._events_total += 1
            self._last_progress = time.monotonic()
            for token in tokens:
                accepted += 1
                if self._book.accept(row, token, now):
                    self._active.pop(row, None)
                    self._done.notify_all()
                    ended = True
                    break
        if accepted and self.on_token is not None:
            self.on_token(accepted)
        if ended:
            return (row.finish_reason, row.error), received
        if read.end is not None:
            return self._ended_upstream(row, read.end), received
        return None, received

    def _spell_withheld(self, row: Row, read: StreamEvent, received: int) -> list[int] | None:
        """llama-server sends no event for a token that leaves a UTF-8 character unfinished, so its
        id never arrives; the event that finishes the character carries the text of all of them.
        That text is fed as byte tokens (``<0xE2>``, or byte-level BPE's byte symbols), which decode
        to the same bytes, so the reply's text and stop strings come out as the upstream decoded them.
        The budget is widened by the extra tokens, so it still counts the upstream's tokens."""
        if self._byte_ids is None:
            self._byte_ids = byte_token_ids(self.tokenizer)
        if not self._byte_ids:
            return None
        ids = [self._byte_ids[b] for b in read.content.encode("utf-8")]
        extra = len(ids) - (read.predicted - received)
        if extra > 0:
            row.reply.max_tokens += extra
        return ids

    def _ended_upstream(self, row: Row, upstream_end: str) -> tuple[str, str | None]:
        """The upstream stopped before steer's rules ended the reply: its context ran out (or its
        own end-of-generation token that steer does not count as EOS): end with the text so far."""
        if upstream_end in ("error", "abort"):
            return "error", f"{self._where()} ended the reply with finish reason {upstream_end!r}"
        row.reply.close("length" if upstream_end in ("length", "limit") else "stop")
        return row.reply.finish_reason, None


def byte_token_ids(tokenizer) -> dict[int, int]:
    """Each byte's own token: SentencePiece byte fallback (``<0xE2>``) or byte-level BPE's byte
    symbols; empty when the vocabulary cannot spell every byte."""
    vocab = tokenizer.get_vocab()
    spelled = {b: vocab.get(f"<0x{b:02X}>") for b in range(256)}
    if None in spelled.values():
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        spelled = {b: vocab.get(symbol) for b, symbol in bytes_to_unicode().items()}
    return spelled if None not in spelled.values() else {}


def _error_text(text: str) -> str:
    """The message of an upstream error body (OpenAI's ``{"error": {"message": ...}}``, vLLM's
    ``{"message": ...}``, FastAPI's ``{"detail": ...}``), else the body itself, shortened."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500] or "(no body)"
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail")
            if message:
                return str(message)[:500]
        elif isinstance(inner, str):
            return inner[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return text.strip()[:500]
