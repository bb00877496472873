"""Attribute-conditioned generation, as a library call: :class:`SteerGenerator`.

It validates attributes, renders the prompt with the policy's template (``mode="inference"``) and
hands the requests to the runtime's scheduler (:mod:`steer.runtime.scheduler`) to decode as one
batch on the calling thread: the same prefill, sampling (one random stream per request, so a
seeded request gives the same text alone, batched or served), stopping and detokenizing as
``steer serve``. This module holds no decode loop of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from steer.data.histogram import unseen_request_warnings
from steer.core.errors import SteerError
from steer.core.template import SegmentIds
from steer.runtime.detokenize import TokenDecoder
from steer.runtime.model_runner import context_limit, eos_token_ids
from steer.runtime.sampling import SamplingParams
from steer.runtime.scheduler import Row, Scheduler
from steer.runtime.stopping import reply_stops, token_budget

logger = logging.getLogger(__name__)


class GenerationError(SteerError, ValueError):
    """Bad generation input; ``field`` names it."""


# ------------------------------------------------------------------ requests
@dataclass
class GenerationRequest:
    messages: Sequence[Any]
    attributes: Mapping[str, Any] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    stop: Sequence[str] | None = None
    ignore_eos: bool = False
    # APM-guided best-of-n (steer.runtime.best_of): draw this many candidates in one batch and return the
    # one the generator's APM measures closest to the explicitly requested values.
    best_of: int = 1
    best_of_weights: Mapping[str, float] | None = None


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # Every schema attribute, validated, as it was applied (defaults filled in).
    attributes: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "length"  # "stop" | "length"
    # Best-of-n only: how many candidates were drawn, and the APM's measurements of the winner.
    candidates: int = 1
    measured: dict[str, float] | None = None
    # Not errors: e.g. a requested attribute value the policy never saw in training.
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "attributes": dict(self.attributes),
            "finish_reason": self.finish_reason,
        }
        if self.measured is not None:
            out["candidates"] = self.candidates
            out["measured"] = dict(self.measured)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


@dataclass
class PreparedRequest:
    """A validated request with its prompt tokens, ready to decode (:meth:`SteerGenerator.prepare`)."""

    prompt_ids: list[int]
    # The request's sampling settings, max_new_tokens capped by the model's context.
    params: SamplingParams
    stops: list[str]
    # Every schema attribute, validated, as applied (defaults filled in).
    attributes: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    def row(self, params: SamplingParams | None = None) -> Row:
        return Row(prompt_ids=list(self.prompt_ids), params=params or self.params, stops=self.stops)


# ----------------------------------------------------------------- generator
class SteerGenerator:
    """Generate replies from a policy with requested attribute values."""

    def __init__(self, model, tokenizer, schema, template, device: torch.device | str = "cpu", name: str = "policy",
                 apm=None, trained_values: Mapping[str, list[int]] | None = None, engine=None):
        self.model = model
        # What decodes: None, a scheduler over ``model`` built per batch; else any engine with
        # ``run(rows)`` and ``max_context`` (a Scheduler over llama.cpp, an upstream server...).
        self.engine = engine
        # An AttributePredictor; needed only for best_of > 1.
        self.apm = apm
        # Attribute values seen in training (steer_config.json); requests for others get a warning.
        self.trained_values = trained_values
        self.tokenizer = tokenizer
        self.schema = schema
        self.template = template
        self.device = torch.device(device)
        self.name = name
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_context = context_limit(model) if engine is None else engine.max_context
        self._decoder = TokenDecoder.for_tokenizer(tokenizer)
        self.segment_ids = SegmentIds(tokenizer)  # prompts repeat their system message and earlier turns

    @classmethod
    def load(cls, policy_dir: str | Path, device: str | None = None, dtype: str | None = None,
             apm=None, engine: str = "torch", schema: str | None = None, threads: int = 0,
             max_batch_size: int = 16, upstream: str | None = None, upstream_model: str | None = None,
             upstream_api_key: str | None = None) -> SteerGenerator:
        """``apm``: an APM directory or :class:`~steer.models.apm.AttributePredictor`, for ``best_of``.
        ``engine``: ``torch``, ``llama.cpp`` for a ``.gguf`` policy (``schema`` for one without
        steer metadata; ``threads`` and ``max_batch_size``, its rows decoded together), or with
        ``upstream`` (a URL) ``vllm`` / ``llama.cpp`` for a vLLM server / llama-server that decodes
        (``upstream_model``: the model or adapter name there; ``upstream_api_key``, default the
        ``STEER_UPSTREAM_API_KEY`` variable)."""
        from steer.models.policy import load_policy
        from steer.runtime.engines import check_engine, upstream_engine

        check_engine(engine, str(policy_dir), upstream)
        runner = None
        if upstream:
            policy = load_policy(policy_dir, device=device, load_model=False, schema=schema)
            runner = upstream_engine(engine, upstream, policy.tokenizer, model=upstream_model,
                                     api_key=upstream_api_key or os.environ.get("STEER_UPSTREAM_API_KEY"),
                                     max_batch_size=max_batch_size, max_queue=1 << 30)
            runner.start()  # learns the upstream's context length; fails naming the URL
        elif engine == "llama.cpp":
            from steer.runtime.llamacpp import llamacpp_engine

            policy = load_policy(policy_dir, device=device, load_model=False, schema=schema)
            runner = llamacpp_engine(policy_dir, policy.tokenizer, max_batch_size=max_batch_size, max_queue=1 << 30,
                                     threads=threads)
        else:
            policy = load_policy(policy_dir, device=device, dtype=dtype, schema=schema)
        if apm is not None and not hasattr(apm, "predict"):
            from steer.models.apm import AttributePredictor

            apm = AttributePredictor.load(apm, device=policy.device)
        generator = cls(policy.model, policy.tokenizer, policy.schema, policy.template, policy.device, policy.name,
                        apm=apm, trained_values=policy.config.get("trained_values"), engine=runner)
        if runner is not None:
            generator.eos_ids = set(runner.eos_token_ids)
        return generator

    # -- one request
    def generate(
        self,
        messages: Sequence[Any],
        attributes: Mapping[str, Any] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.95,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        ignore_eos: bool = False,
        best_of: int = 1,
        best_of_weights: Mapping[str, float] | None = None,
    ) -> GenerationResult:
        request = GenerationRequest(messages, attributes, max_new_tokens, temperature, top_p, seed, stop, ignore_eos,
                                    best_of, best_of_weights)
        return self.generate_batch([request])[0]

    # -- many requests, decoded together
    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Validate one request and render its prompt; raises SteerError subclasses naming the field."""
        applied = self.schema.validate(request.attributes)  # AttributeValueError names the attribute
        params = SamplingParams(
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop or []),
            ignore_eos=request.ignore_eos,
        )
        prompt = self.template.tokenize(request.messages, self.tokenizer, mode="inference", attributes=applied,
                                        segment_ids=self.segment_ids)
        budget = token_budget(params.max_new_tokens, len(prompt.input_ids), self.max_context)
        if budget < 1:
            raise GenerationError(
                f"the prompt is {len(prompt.input_ids)} tokens; this model's context is {self.max_context}", "messages")
        if budget != params.max_new_tokens:
            params = replace(params, max_new_tokens=budget)
        # Only what the request asked for: a default it left alone is the policy's own choice.
        asked = self.schema.validate(request.attributes, fill_defaults=False) if request.attributes else {}
        return PreparedRequest(list(prompt.input_ids), params, reply_stops(self.template, params.stop), applied,
                               unseen_request_warnings(asked, self.trained_values))

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode several requests as one batch. A seeded request gives the same text here as
        through :meth:`generate` or ``steer serve``, because each row samples from its own stream."""
        if any(r.best_of != 1 for r in requests):
            return self._generate_best_of(requests)
        return self.generate_prepared([self.prepare(r) for r in requests])

    def _generate_best_of(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every request's candidates (seeds ``seed + i``) decoded as one batch, then one APM call
        scores them all and :func:`steer.runtime.best_of.choose_best` keeps each request's closest."""
        from steer.runtime.best_of import BestOfError, CandidateGroup, best_of_target, candidate_seed, check_best_of, \
            check_weights, choose_best

        if self.apm is None:
            raise GenerationError("best_of needs an attribute prediction model: SteerGenerator.load(policy, apm=DIR)",
                                  "best_of")
        rows, spans, groups = [], [], []
        for r in requests:
            first = self.prepare(replace(r, best_of=1))
            explicit = [self.schema.canonical_name(k) for k in (r.attributes or {})]
            try:
                n = check_best_of(r.best_of)
                target = best_of_target(first.attributes, explicit, self.apm.schema.names)
                weights = check_weights(r.best_of_weights, target)
            except BestOfError as e:
                raise GenerationError(str(e), e.field) from None
            spans.append((len(rows), n))
            rows.append(first)
            for i in range(1, n):  # the same prompt tokens; only the random stream differs
                rows.append(replace(first, params=replace(first.params, seed=candidate_seed(r.seed, i))))
            groups.append((r, target, weights))
        results = self.generate_prepared(rows)
        choices = choose_best(self.apm, [
            CandidateGroup(r.messages, [res.text for res in results[at:at + n]], target, weights)
            for (r, target, weights), (at, n) in zip(groups, spans)])
        out = []
        for (at, n), choice in zip(spans, choices):
            winner = results[at + choice.index]
            winner.candidates = n
            winner.measured = {k: round(v, 4) for k, v in choice.measured.items()}
            out.append(winner)
        return out

    def generate_prepared(
        self,
        prepared: Sequence[PreparedRequest],
        max_batch_size: int | None = None,
        on_result: Callable[[int, GenerationResult], None] | None = None,
    ) -> list[GenerationResult]:
        """:meth:`generate_batch` for requests already through :meth:`prepare` (each once), decoded
        to their ends by the runtime's scheduler. With ``max_batch_size`` (torch engine) at most
        that many decode together, a waiting request taking the place of the first to finish;
        ``on_result(index, result)`` is called as each one ends, in the order they end."""
        if not prepared:
            return []
        rows = [p.row() for p in prepared]
        index = {id(row): i for i, row in enumerate(rows)}

        def result(i: int, row: Row) -> GenerationResult:
            return GenerationResult(row.reply.text, len(row.prompt_ids), len(row.generated), prepared[i].attributes,
                                    row.finish_reason or "length", warnings=list(prepared[i].warnings))

        engine = self.engine or Scheduler(
            self.model, self.tokenizer, max_batch_size=min(len(rows), max_batch_size or len(rows)),
            max_queue=len(rows), eos_token_ids=self.eos_ids, device=self.device, decoder=self._decoder)
        on_done = None if on_result is None else (lambda row: on_result(index[id(row)], result(index[id(row)], row)))
        engine.run(rows, on_done=on_done)
        return [result(i, row) for i, row in enumerate(rows)]
