"""The chat-completions logic, without FastAPI: validate a request, build its prompt with the
policy's template, hand its rows to the engine, and assemble responses or stream chunks.

Every user error becomes a ``ServingError`` carrying an HTTP status and OpenAI's error fields
(``message``, ``type``, ``param``, ``code``); the app turns it into a JSON response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from steer.service.engine_process import EngineFailedError, EngineProcess
from steer.service.metrics import ServerMetrics
from steer.service.protocol import (
    AttributeInfo,
    AttributesResponse,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    Choice,
    ChunkChoice,
    DeltaMessage,
    ModelCard,
    ModelList,
    Usage,
    completion_id,
    error_body,
)
from steer.service.settings import ServerSettings
from steer.runtime.best_of import BestOfError, CandidateGroup, best_of_target, check_weights, choose_best
from steer.data.histogram import unseen_request_warnings
from steer.core.errors import SteerError
from steer.core.template import SegmentIds
from steer.runtime.sampling import SamplingParams
from steer.runtime.scheduler import EngineStoppedError, QueueFullError, Row, RowEvent, Scheduler
from steer.runtime.stopping import reply_stops, token_budget

logger = logging.getLogger(__name__)


class ServingError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServingError:
    return ServingError(400, message, param=param, code=code)


def _param_from_steer_error(e: SteerError, prefix: str = "") -> str | None:
    name = getattr(e, "field", None)
    if not name:
        return prefix.rstrip(".") or None
    return f"{prefix}{name}"


class EventDispatcher:
    """Hands engine events to asyncio queues with one loop wake-up per batch of events.

    The engine emits one event per row per step; waking the event loop for each (one
    ``call_soon_threadsafe`` apiece) costs more than the decode step itself at batch 16.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, RowEvent]] = []

    def sink(self, queue: asyncio.Queue):
        def put(event: RowEvent) -> None:
            with self._lock:
                wake = not self._pending
                self._pending.append((queue, event))
            if wake:
                try:
                    self.loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # the loop is closed: the server is shutting down
                    pass

        return put

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


def merge_deltas(events: list[RowEvent]) -> list[RowEvent]:
    """Join consecutive text of the same choice, so a slow reader gets one chunk, not one per token."""
    merged: list[RowEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if last is not None and not last.finished and last.index == event.index and event.delta:
            merged[-1] = RowEvent(index=event.index, delta=last.delta + event.delta, finished=event.finished,
                                  finish_reason=event.finish_reason, completion_tokens=event.completion_tokens,
                                  text=event.text, error=event.error)
        else:
            merged.append(event)
    return merged


@dataclass
class PreparedRequest:
    """A validated request and its tokenized prompt, ready for the engine."""

    request: ChatCompletionRequest
    messages: list[dict[str, str]]
    attributes: dict[str, int]
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    # best_of (steer.runtime.best_of): candidates per choice, the values they are measured against, weights.
    best_of: int = 1
    best_of_target: dict[str, int] | None = None
    best_of_weights: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a requested value never seen in training


def check_unicode(text: str, param: str) -> None:
    """400 for text holding a lone UTF-16 surrogate (JSON allows "\\ud800"; no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} holds a lone surrogate ({text[e.start]!r} at position {e.start}), "
                          "which is not valid Unicode text", param, "invalid_unicode") from None


def _unsupported(param: str, what: str) -> ServingError:
    return bad_request(f"{param} is not supported: {what}", param, "unsupported_parameter")


def check_supported(req: ChatCompletionRequest) -> None:
    """400 naming the first OpenAI field that asks for something steer does not do. The same fields
    at their defaults (what client libraries send unasked) pass."""
    if req.logprobs:
        raise _unsupported("logprobs", "steer does not return log probabilities")
    if req.top_logprobs:
        raise _unsupported("top_logprobs", "steer does not return log probabilities")
    if req.tools:
        raise _unsupported("tools", "steer does not call tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "steer does not call tools")
    if req.functions:
        raise _unsupported("functions", "steer does not call functions")
    if req.function_call not in (None, "none", "auto"):
        raise _unsupported("function_call", "steer does not call functions")
    if req.response_format is not None and req.response_format.type != "text":
        raise _unsupported("response_format", f"only {{\"type\": \"text\"}}, not {req.response_format.type!r}")
    if req.modalities is not None and any(m != "text" for m in req.modalities):
        raise _unsupported("modalities", "steer writes text only")
    if req.audio is not None:
        raise _unsupported("audio", "steer writes text only")
    if req.prediction is not None:
        raise _unsupported("prediction", "predicted outputs are not implemented")
    if req.web_search_options is not None:
        raise _unsupported("web_search_options", "steer does not search the web")
    if req.store:
        raise _unsupported("store", "steer does not store completions")
    if req.reasoning_effort is not None:
        raise _unsupported("reasoning_effort", "steer's models do not reason in hidden tokens")
    if req.verbosity is not None:
        raise _unsupported("verbosity", "steer is steered by attributes instead")
    if req.moderation is not None:
        raise _unsupported("moderation", "steer does not moderate")
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("tool", "function"):
            raise _unsupported(f"{where}.role", f"{m.role!r} messages need tool calling, which steer does not do")
        if m.tool_calls:
            raise _unsupported(f"{where}.tool_calls", "steer does not call tools")
        for name in ("tool_call_id", "function_call", "audio", "refusal"):
            if getattr(m, name) is not None:
                raise _unsupported(f"{where}.{name}", "steer does not call tools, write audio or refuse")
        if m.content is None:
            raise bad_request(f"{where}.content: a message needs text content", f"{where}.content")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type != "text" or part.text is None:
                raise _unsupported(f"{where}.content[{j}]", f"content parts of type {part.type!r}; send text parts")


def max_token_chars(tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (its longest vocabulary entry;
    byte-level entries spell a byte per character, so this is an upper bound)."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except Exception:  # a tokenizer without a vocabulary listing: no cheap bound
        return 1 << 20


@dataclass
class Generation:
    """One accepted request: its rows in the engine and the queue their events arrive on."""

    request: ChatCompletionRequest
    messages: list[dict[str, str]]
    attributes: dict[str, int]
    prompt_tokens: int
    rows: list[Row]
    events: asyncio.Queue
    id: str = field(default_factory=completion_id)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    chunk_prefix: str = ""  # "data: {...,"choices":[{"index":" for content chunks (ChatServing._content_chunk)
    # best_of: rows c * best_of .. (c + 1) * best_of - 1 are choice c's candidates (steer.runtime.best_of).
    best_of: int = 1
    best_of_target: dict[str, int] | None = None
    best_of_weights: dict[str, float] | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a requested value never seen in training


class ChatServing:
    def __init__(self, policy, engine: Scheduler | EngineProcess, settings: ServerSettings, metrics: ServerMetrics, apm=None):
        self.policy = policy
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.apm = apm
        self.model_name = settings.model_name or policy.name
        self.created = int(time.time())
        self.max_context = engine.max_context
        self._apm_lock = threading.Lock()
        self._events: EventDispatcher | None = None
        self._prompt_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steer-prompt")
        # Held while a prompt is built: the tokenizer is never used from two threads at once.
        self._prompt_lock = threading.Lock()
        # A chat sends its system message and earlier turns again with every request.
        self.segment_ids = SegmentIds(policy.tokenizer)
        self.max_chars_per_token = max_token_chars(policy.tokenizer)

    # ---------------------------------------------------------------- info
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    def attributes(self) -> AttributesResponse:
        def info(schema) -> list[AttributeInfo]:
            return [AttributeInfo(name=a.name, min=a.min, max=a.max, default=a.default, description=a.description,
                                  levels=list(a.levels) or None) for a in schema.attributes]

        schema = self.policy.schema
        return AttributesResponse(
            schema_name=schema.name,
            attributes=info(schema),
            aliases=dict(schema.aliases),
            score_attributes=info(self.apm.schema) if self.apm is not None else None,
        )

    # ---------------------------------------------------------- validation
    def _sampling_params(self, req: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        s = self.settings
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise bad_request("give max_tokens or max_completion_tokens, not two different values", "max_tokens")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        if requested is not None and requested > s.max_tokens_limit:
            raise bad_request(f"{param} is {requested}; this server allows at most {s.max_tokens_limit}", param)
        max_new = requested if requested is not None else min(s.default_max_tokens, s.max_tokens_limit)
        max_new = token_budget(max_new, prompt_tokens, self.max_context)
        if max_new < 1:
            raise bad_request(f"the prompt has {prompt_tokens} tokens; the model's context is {self.max_context}",
                              "messages", "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=max_new,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed,
                stop=stops,
                ignore_eos=req.ignore_eos,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=self._logit_bias(req.logit_bias),
            )
        except SteerError as e:
            raise bad_request(str(e), _param_from_steer_error(e)) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab = len(self.policy.tokenizer)
        out = {}
        for key, value in bias.items():
            token = int(key) if key.strip().isdigit() else -1
            if not 0 <= token < vocab:
                raise bad_request(f"logit_bias keys must be token ids of this model (0 to {vocab - 1}), got {key!r}",
                                  "logit_bias")
            out[token] = value
        return out

    def check(self, req: ChatCompletionRequest) -> int:
        """The cheap checks, run on the event loop before any tokenizing: a prompt that cannot fit
        is refused by counting messages and characters, so one huge body cannot hold up the loop
        (24,000 one-word messages used to block every stream for about 2 s). Returns the messages'
        characters."""
        if req.model is not None and req.model != self.model_name:
            raise ServingError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                               param="model", code="model_not_found")
        if req.n > min(self.settings.max_n, self.settings.max_batch_size):
            limit = min(self.settings.max_n, self.settings.max_batch_size)
            raise bad_request(f"n is {req.n}; this server allows at most {limit}", "n")
        if req.score and self.apm is None:
            raise bad_request("score: true needs an attribute prediction model; start the server with --apm DIR",
                              "score")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")
        check_supported(req)
        if len(req.messages) > self.settings.max_messages:
            raise bad_request(f"messages holds {len(req.messages)} messages; this server allows at most "
                              f"{self.settings.max_messages}", "messages", "too_many_messages")
        chars = 0
        for i, m in enumerate(req.messages):
            text = m.text()
            check_unicode(text, f"messages[{i}].content")
            if m.name is not None:
                check_unicode(m.name, f"messages[{i}].name")
            chars += len(text)
        # No token covers more characters than the vocabulary's longest entry.
        if chars > self.settings.max_prompt_tokens * self.max_chars_per_token:
            raise bad_request(f"the messages hold {chars} characters, more than fit in this server's limit of "
                              f"{self.settings.max_prompt_tokens} prompt tokens", "messages", "context_length_exceeded")
        for i, s in enumerate([req.stop] if isinstance(req.stop, str) else (req.stop or [])):
            check_unicode(s, "stop" if isinstance(req.stop, str) else f"stop[{i}]")
        return chars

    def prepare(self, req: ChatCompletionRequest) -> PreparedRequest:
        """Validate ``req`` and tokenize its prompt (no engine involved; safe off the event loop)."""
        self.check(req)
        return self._build_locked(req)

    def _build(self, req: ChatCompletionRequest) -> PreparedRequest:
        """``prepare`` after ``check``, with the prompt lock held."""
        # "developer" is OpenAI's newer name for the system message.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        schema = self.policy.schema
        try:
            attributes = schema.validate(req.attributes)
        except SteerError as e:
            raise bad_request(str(e), _param_from_steer_error(e, "attributes.")) from None
        try:
            prompt = self.policy.template.tokenize(messages, self.policy.tokenizer, mode="inference",
                                                   attributes=attributes, segment_ids=self.segment_ids)
        except SteerError as e:
            raise bad_request(str(e), _param_from_steer_error(e) or "messages") from None
        except Exception as e:
            # A template that cannot render these messages (a chat template raising, text the
            # tokenizer refuses): the request's fault as far as the client can tell, never a 500.
            logger.warning("could not build a prompt: %s: %s", type(e).__name__, e)
            raise bad_request(f"could not build a prompt from these messages: {type(e).__name__}: {e}",
                              "messages", "invalid_prompt") from None
        prompt_tokens = len(prompt.input_ids)
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise bad_request(f"the prompt has {prompt_tokens} tokens; this server allows at most "
                              f"{self.settings.max_prompt_tokens}", "messages", "context_length_exceeded")
        params = self._sampling_params(req, prompt_tokens)
        best_of, target, weights = self._best_of(req, attributes)
        template = self.policy.template
        stops = reply_stops(template, params.stop)
        warnings = unseen_request_warnings(
            schema.validate(req.attributes, fill_defaults=False) if req.attributes else {},
            (getattr(self.policy, "config", None) or {}).get("trained_values"))
        return PreparedRequest(request=req, messages=messages, attributes=attributes,
                               prompt_ids=list(prompt.input_ids), params=params, stops=stops, best_of=best_of,
                               best_of_target=target, best_of_weights=weights, warnings=warnings)

    def submit(self, prepared: PreparedRequest) -> Generation:
        """Queue a prepared request's rows; raises ``ServingError`` (429/503). On the event loop."""
        req, params = prepared.request, prepared.params
        events: asyncio.Queue = asyncio.Queue()
        sink = self._dispatcher().sink(events)

        rows = []
        for i in range(req.n * prepared.best_of):
            # n > 1 with a seed: each choice gets its own stream (seed + i), still reproducible; with
            # best_of, row i is candidate i % best_of of choice i // best_of (steer.runtime.best_of.candidate_seed).
            row_params = params if (params.seed is None or i == 0) else replace(
                params, seed=(params.seed + i) % 2**63)
            rows.append(Row(prompt_ids=list(prepared.prompt_ids), params=row_params, stops=prepared.stops,
                            sink=sink, index=i))
        try:
            self.engine.submit(rows)
        except QueueFullError as e:
            raise ServingError(429, str(e), type="rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineFailedError as e:
            raise ServingError(503, str(e), type="server_error", code="engine_failed",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineStoppedError as e:
            raise ServingError(503, str(e), type="server_error", code="shutting_down",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        return Generation(request=req, messages=prepared.messages, attributes=prepared.attributes,
                          prompt_tokens=len(prepared.prompt_ids), rows=rows, events=events,
                          best_of=prepared.best_of, best_of_target=prepared.best_of_target,
                          best_of_weights=prepared.best_of_weights, warnings=prepared.warnings)

    def start(self, req: ChatCompletionRequest) -> Generation:
        """Validate ``req`` and queue its rows, tokenizing on the calling thread; raises ``ServingError``
        (400/404/429/503). Routes use ``start_async``."""
        return self.submit(self.prepare(req))

    # Prompts of up to this many characters are built on the event loop. Handed to the worker
    # thread, a prompt waited for the interpreter lock while the loop served other requests: when
    # 16 replies ended in one step, their clients' next requests reached the engine up to 8 ms
    # after their bodies were read, against well under a millisecond to build such a prompt.
    INLINE_PROMPT_CHARS = 4096

    async def start_async(self, req: ChatCompletionRequest) -> Generation:
        """``start``, with a long prompt built on one worker thread so that the event loop keeps
        streaming other replies meanwhile."""
        if self.check(req) <= self.INLINE_PROMPT_CHARS and self._prompt_lock.acquire(blocking=False):
            try:
                prepared = self._build(req)
            finally:
                self._prompt_lock.release()
        else:
            prepared = await asyncio.get_running_loop().run_in_executor(self._prompt_worker, self._build_locked, req)
        return self.submit(prepared)

    def _build_locked(self, req: ChatCompletionRequest) -> PreparedRequest:
        with self._prompt_lock:
            return self._build(req)

    def _best_of(self, req: ChatCompletionRequest, attributes: dict[str, int]):
        """``(best_of, target, weights)`` for the request; 400s name ``best_of``/``best_of_weights``."""
        if req.best_of is None:
            if req.best_of_weights is not None:
                raise bad_request("best_of_weights needs best_of", "best_of_weights")
            return 1, None, None
        if self.apm is None:
            raise bad_request("best_of needs an attribute prediction model to pick the candidates; start the server "
                              "with --apm DIR", "best_of")
        limit = min(self.settings.max_n, self.settings.max_batch_size)
        if req.n * req.best_of > self.settings.max_batch_size or req.best_of > limit:
            raise bad_request(f"best_of is {req.best_of} with n {req.n}: {req.n * req.best_of} candidates; this server "
                              f"decodes at most {self.settings.max_batch_size} together and allows best_of up to "
                              f"{limit}", "best_of")
        schema = self.policy.schema
        explicit = [schema.canonical_name(k) for k in (req.attributes or {})]
        try:
            target = best_of_target(attributes, explicit, self.apm.schema.names)
            weights = check_weights(req.best_of_weights, target)
        except BestOfError as e:
            raise bad_request(str(e), e.field) from None
        return req.best_of, target, weights

    async def _pick_best(self, gen: Generation, texts: dict[int, str]):
        """Each choice's winning row index and its :class:`steer.runtime.best_of.BestOfChoice`."""
        k = gen.best_of
        groups = [CandidateGroup(gen.messages, [texts[c * k + j] for j in range(k)], gen.best_of_target,
                                 gen.best_of_weights) for c in range(len(gen.rows) // k)]

        def run():
            with self._apm_lock:
                return choose_best(self.apm, groups)

        picks = await asyncio.get_running_loop().run_in_executor(None, run)
        return [(c * k + p.index, p) for c, p in enumerate(picks)]

    def _dispatcher(self) -> EventDispatcher:
        loop = asyncio.get_running_loop()
        if self._events is None or self._events.loop is not loop:
            self._events = EventDispatcher(loop)
        return self._events

    def cancel(self, gen: Generation) -> None:
        self.engine.cancel(gen.rows)

    # ------------------------------------------------------------- results
    def _observe_first_token(self, gen: Generation) -> None:
        if gen.first_token_at is None:
            gen.first_token_at = time.perf_counter()
            self.metrics.ttft.observe(gen.first_token_at - gen.started)

    async def _score(self, gen: Generation, texts: list[str]) -> list[dict[str, float]]:
        items = [gen.messages + [{"role": "assistant", "content": t}] for t in texts]

        def run():
            with self._apm_lock:
                preds = self.apm.predict(items)
            return [{name: round(float(v), 4) for name, v in zip(self.apm.schema.names, row)} for row in preds]

        return await asyncio.get_running_loop().run_in_executor(None, run)

    def _event_error(self, event: RowEvent) -> ServingError | None:
        """The error a row's end means for its client: the engine failed it, or stopped (shutdown,
        engine restart) before it was done. A client's own cancellation never reaches here."""
        if event.finish_reason == "error":
            return ServingError(500, event.error or "generation failed", type="server_error", code="generation_failed")
        if event.finish_reason == "cancelled":
            return ServingError(503, event.error or "the request was cancelled: the server is shutting down; retry",
                                type="server_error", code="request_cancelled",
                                headers={"Retry-After": str(self.settings.retry_after_s)})
        return None

    def _check_error(self, event: RowEvent) -> None:
        error = self._event_error(event)
        if error is not None:
            raise error

    async def complete(self, gen: Generation) -> ChatCompletionResponse:
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        tokens = 0
        try:
            while len(reasons) < len(gen.rows):
                event: RowEvent = await gen.events.get()
                if event.delta:
                    self._observe_first_token(gen)
                if event.finished:
                    self._check_error(event)
                    texts[event.index] = event.text
                    reasons[event.index] = event.finish_reason
                    tokens += event.completion_tokens
        finally:
            # Client gone or server error: free the rows that are still decoding.
            if len(reasons) < len(gen.rows):
                self.cancel(gen)
        if gen.best_of_target is not None:
            picks = await self._pick_best(gen, texts)
            self.metrics.latency.observe(time.perf_counter() - gen.started)
            return ChatCompletionResponse(
                id=gen.id, created=gen.created, model=self.model_name,
                choices=[Choice(index=c, message=ChatMessageOut(content=texts[row]), finish_reason=reasons[row],
                                scores={n: round(v, 4) for n, v in pick.measured.items()}, candidates=gen.best_of)
                         for c, (row, pick) in enumerate(picks)],
                usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=tokens,
                            total_tokens=gen.prompt_tokens + tokens),
                attributes=gen.attributes,
            )
        scores = await self._score(gen, [texts[i] for i in range(len(gen.rows))]) if gen.request.score else None
        self.metrics.latency.observe(time.perf_counter() - gen.started)
        return ChatCompletionResponse(
            id=gen.id,
            created=gen.created,
            model=self.model_name,
            choices=[
                Choice(index=i, message=ChatMessageOut(content=texts[i]), finish_reason=reasons[i],
                       scores=scores[i] if scores else None)
                for i in range(len(gen.rows))
            ],
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=tokens,
                        total_tokens=gen.prompt_tokens + tokens),
            attributes=gen.attributes,
            warnings=gen.warnings or None,
        )

    def _chunk(self, gen: Generation, choices: list[ChunkChoice], **extra) -> str:
        chunk = ChatCompletionChunk(id=gen.id, created=gen.created, model=self.model_name, choices=choices, **extra)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    def _content_chunk(self, gen: Generation, index: int, content: str) -> str:
        """``_chunk`` for a content delta, the one sent per token: the same JSON, built from a prefix
        rendered once per request (pydantic per chunk cost as much as a sixth of a batch-16 step)."""
        if not gen.chunk_prefix:
            probe = self._chunk(gen, [ChunkChoice(index=0, delta=DeltaMessage(content=""))])
            gen.chunk_prefix = probe[:probe.index('"choices":[{"index":') + len('"choices":[{"index":')]
        return f'{gen.chunk_prefix}{index},"delta":{{"content":{json.dumps(content, ensure_ascii=False)}}}}}]}}\n\n'

    async def stream(self, gen: Generation) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, content deltas, a finish chunk per choice,
        an optional usage chunk, then ``[DONE]``. Cancelled (client gone) when the caller stops iterating."""
        if gen.best_of_target is not None:
            async for chunk in self._stream_best_of(gen):
                yield chunk
            return
        done = 0
        tokens = 0
        try:
            for i in range(len(gen.rows)):
                # The first chunk also reports the attribute values the reply is conditioned on.
                yield self._chunk(gen, [ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                                  attributes=gen.attributes if i == 0 else None,
                                  warnings=(gen.warnings or None) if i == 0 else None)
            while done < len(gen.rows):
                arrived = [await gen.events.get()]
                while not gen.events.empty():
                    arrived.append(gen.events.get_nowait())
                # Everything that arrived together goes out in one write: one ASGI send per engine
                # step per client, however many events the step produced.
                out: list[str] = []
                for event in merge_deltas(arrived):
                    if event.delta:
                        self._observe_first_token(gen)
                        out.append(self._content_chunk(gen, event.index, event.delta))
                    if not event.finished:
                        continue
                    done += 1
                    tokens += event.completion_tokens
                    error = self._event_error(event)
                    if error is not None:
                        # The stream has begun (200 sent): the error travels as an event, and
                        # [DONE] still ends the stream so clients stop reading cleanly.
                        out.append(f"data: {json.dumps(error.body())}\n\n")
                        out.append("data: [DONE]\n\n")
                        yield "".join(out)
                        return
                    if gen.request.score:
                        if out:  # the text goes out before the client waits for the scores
                            yield "".join(out)
                            out = []
                        scores = (await self._score(gen, [event.text]))[0]
                    else:
                        scores = None
                    out.append(self._chunk(gen, [ChunkChoice(index=event.index, delta=DeltaMessage(),
                                                             finish_reason=event.finish_reason, scores=scores)]))
                if done == len(gen.rows):
                    # The last finish chunk, the usage and [DONE] go out in the same write: the
                    # client's next request waits on [DONE].
                    out += self._stream_end(gen, Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=tokens,
                                                       total_tokens=gen.prompt_tokens + tokens))
                if out:
                    yield "".join(out)
            self.metrics.latency.observe(time.perf_counter() - gen.started)
        finally:
            if done < len(gen.rows):
                self.cancel(gen)

    async def _stream_best_of(self, gen: Generation) -> AsyncIterator[str]:
        """best_of with stream: the winner is only known once every candidate is done, so each
        choice's text arrives as one content chunk, followed by its finish chunk (scores, candidates)."""
        for c in range(len(gen.rows) // gen.best_of):
            yield self._chunk(gen, [ChunkChoice(index=c, delta=DeltaMessage(role="assistant", content=""))],
                              attributes=gen.attributes if c == 0 else None)
        try:
            response = await self.complete(gen)
        except ServingError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        for choice in response.choices:
            yield self._content_chunk(gen, choice.index, choice.message.content)
            yield self._chunk(gen, [ChunkChoice(index=choice.index, delta=DeltaMessage(),
                                                finish_reason=choice.finish_reason, scores=choice.scores,
                                                candidates=choice.candidates)])
        yield "".join(self._stream_end(gen, response.usage))

    def _stream_end(self, gen: Generation, usage: Usage) -> list[str]:
        """What ends a stream: the usage chunk when ``stream_options.include_usage`` asks for it, and ``[DONE]``."""
        opts = gen.request.stream_options
        end = [self._chunk(gen, [], usage=usage)] if opts is not None and opts.include_usage else []
        return end + ["data: [DONE]\n\n"]
