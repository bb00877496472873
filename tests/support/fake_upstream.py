"""A small stand-in for vLLM's OpenAI server and llama.cpp's llama-server, for the upstream engine's
tests (steer.runtime.upstream): it speaks vLLM's streaming ``/v1/completions`` (token ids as
``logprobs.tokens`` "token_id:N", or as ``token_ids`` when asked) and llama-server's streaming
``/completion`` (``tokens``), decoding from a real (tiny) causal LM, greedily or seeded, so the ids
are real. It records every request and how its stream ended: tokens sent, and whether the client
closed it before the reply was done.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from steer.runtime.compat import returned_cache, with_cache


@dataclass
class StreamRecord:
    """One completion request: its body and headers, and what the fake did with it."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    sent: int = 0  # tokens sent
    completed: bool = False  # the fake sent the whole reply
    last: int | None = None  # the last token sent
    decoded: int = 0  # llama-server: tokens decoded, sent or not
    ended: threading.Event = field(default_factory=threading.Event)  # set once the stream is over, either way

    @property
    def closed_early(self) -> bool:
        return self.ended.is_set() and not self.completed


class FakeUpstream:
    """The fake's model and settings; ``app()`` is its FastAPI app."""

    def __init__(self, model, tokenizer, *, name: str = "policy", max_context: int = 512):
        self.model, self.tokenizer, self.name, self.max_context = model, tokenizer, name, max_context
        self.api_key: str | None = None
        self.fail: tuple[int, str] | None = None  # answer completions with this status and message
        self.token_ids_field = False  # vLLM: send "token_ids" when the request asks (newer vLLM)
        self.tokens_per_event = 1
        self.delay_s = 0.005  # between events, so a client has time to close a stream early
        self.eos_token_id = tokenizer.eos_token_id
        self.records: list[StreamRecord] = []
        # Token ids to send instead of the model's (then the reply ends as if out of budget).
        self.script: list[int] | None = None
        self.inject: str | None = None  # a raw line sent after the first event (a broken upstream)

    # --------------------------------------------------------------- decoding
    def _tokens(self, prompt: list[int], max_tokens: int, temperature: float, seed: int | None,
                ignore_eos: bool, logit_bias: dict[int, float]):
        if self.script is not None:
            yield from self.script[:max_tokens]
            return
        generator = torch.Generator().manual_seed(seed if seed is not None else 12345)
        past, ids = None, torch.tensor([prompt])
        for _ in range(max_tokens):
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True, **with_cache(self.model, past))
            past = returned_cache(out)
            logits = out.logits[0, -1].float().clone()
            for token, bias in logit_bias.items():
                logits[token] += bias
            if temperature <= 0:
                token = int(torch.argmax(logits))
            else:
                token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
            yield token
            if token == self.eos_token_id and not ignore_eos:
                return
            ids = torch.tensor([[token]])

    # -------------------------------------------------------------------- app
    def app(self):
        app = FastAPI()
        fake = self

        def refused(request: Request):
            if fake.api_key is not None and request.headers.get("authorization") != f"Bearer {fake.api_key}":
                return JSONResponse({"error": {"message": "invalid API key", "type": "authentication_error",
                                               "code": 401}}, status_code=401)
            return None

        @app.get("/health")
        def health():
            return {"status": "ok"}

        @app.get("/v1/models")
        def models(request: Request):
            return refused(request) or {"object": "list", "data": [
                {"id": fake.name, "object": "model", "max_model_len": fake.max_context}]}

        @app.get("/props")
        def props(request: Request):
            return refused(request) or {"default_generation_settings": {"n_ctx": fake.max_context}}

        async def completion(request: Request, api: str):
            body = await request.json()
            record = StreamRecord(request.url.path, body, dict(request.headers))
            fake.records.append(record)
            if (answer := refused(request)) is not None:
                record.ended.set()
                return answer
            if fake.fail is not None:
                record.ended.set()
                status, message = fake.fail
                return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                                    status_code=status)
            llama = api == "llama-server"
            tokens = fake._tokens(
                body["prompt"], body["n_predict"] if llama else body["max_tokens"], float(body["temperature"]),
                body.get("seed"), bool(body.get("ignore_eos")),
                {int(t): b for t, b in (body.get("logit_bias") or [])} if llama
                else {int(t): b for t, b in (body.get("logit_bias") or {}).items()})
            return StreamingResponse(fake._events(record, tokens, llama), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def vllm(request: Request):
            return await completion(request, "vllm")

        @app.post("/completion")
        async def llama_server(request: Request):
            return await completion(request, "llama-server")

        return app

    async def _events(self, record: StreamRecord, tokens, llama: bool):
        try:
            batch: list[int] = []
            pending = b""  # llama-server: bytes of tokens it sent no event for (an unfinished character)
            for token in tokens:
                if llama:
                    # Like llama-server: a token that leaves a UTF-8 character unfinished gets no
                    # event (its id is never sent); the event that finishes it carries all their text.
                    pending += self._piece(token)
                    record.decoded += 1
                    try:
                        content = pending.decode("utf-8")
                    except UnicodeDecodeError as e:
                        if e.reason == "unexpected end of data":
                            continue
                        content = pending.decode("utf-8", "replace")
                    pending = b""
                    yield self._llama_event(record, token, content)
                    yield self._injected(record)
                    await asyncio.sleep(self.delay_s)
                    continue
                batch.append(token)
                if len(batch) < self.tokens_per_event:
                    continue
                yield self._event(record, batch)
                yield self._injected(record)
                batch = []
                await asyncio.sleep(self.delay_s)
            if batch:
                yield self._event(record, batch)
            reason = "eos" if record.last == self.eos_token_id else "limit"
            if llama:
                yield _sse({"content": "", "tokens": [], "stop": True, "stop_type": reason})
            else:
                yield _sse({"choices": [{"index": 0, "text": "", "finish_reason": "stop" if reason == "eos" else
                                         "length", "logprobs": {"tokens": []}}]})
                yield "data: [DONE]\n\n"
            record.completed = True
        finally:
            record.ended.set()

    def _injected(self, record: StreamRecord) -> str:
        return f"{self.inject}\n\n" if self.inject is not None and record.sent == 1 else ""

    def _piece(self, token: int) -> bytes:
        """The bytes llama.cpp's token_to_piece gives for a SentencePiece token."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def _llama_event(self, record: StreamRecord, token: int, content: str) -> str:
        record.sent += 1
        record.last = token
        return _sse({"content": content, "tokens": [token], "stop": False, "tokens_predicted": record.decoded})

    def _event(self, record: StreamRecord, batch: list[int]) -> str:
        record.sent += len(batch)
        record.last = batch[-1]
        text = self.tokenizer.decode(batch)
        choice = {"index": 0, "text": text, "finish_reason": None,
                  "logprobs": {"tokens": [f"token_id:{t}" for t in batch], "token_logprobs": [-1.0] * len(batch)}}
        if self.token_ids_field and record.body.get("return_token_ids"):
            choice["token_ids"] = batch
            choice["logprobs"] = None
        return _sse({"id": "cmpl-fake", "object": "text_completion", "model": self.name, "choices": [choice]})


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"
