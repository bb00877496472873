"""Attribute-conditioned generation with a KV-cached decode loop.

Two layers:

- decode primitives, reusable by a scheduler: :func:`left_pad` builds a batch from token lists,
  :func:`prefill` runs the prompts once and returns the last logits plus a :class:`DecodeState`
  (the KV cache, the attention mask and each row's next position), and :func:`decode_step`
  feeds one new token per row and returns the next logits. Positions come from the attention
  mask, so a left-padded row sees exactly the positions it would see alone;
- :class:`SteerGenerator`, which validates attributes, renders the prompt with the policy's
  template (``mode="inference"``), samples with :mod:`steer.sampling` (one random stream
  per request, so a seeded request gives the same text alone or batched) and stops at the
  template's end marker, a stop string, EOS or the token budget.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.data.histogram import unseen_request_warnings
from steer.detokenize import IncrementalDetokenizer, TokenDecoder
from steer.errors import SteerError
from steer.kv_cache import new_kv_cache
from steer.modeling import inference_attention
from steer.sampling import SamplingParams, sample_next_tokens

logger = logging.getLogger(__name__)


class GenerationError(SteerError, ValueError):
    """Bad generation input; ``field`` names it."""


# ----------------------------------------------------------------- primitives
@dataclass
class DecodeState:
    """What the next :func:`decode_step` needs: the model's KV cache, the attention mask over
    every position so far ([batch, length], 0 on left padding) and each row's next position id."""

    past_key_values: Any
    attention_mask: torch.Tensor
    next_positions: torch.Tensor


def left_pad(token_lists: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """``(input_ids, attention_mask)`` with every row right-aligned, as decoding needs."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        if tokens:
            ids[i, width - len(tokens):] = torch.tensor(list(tokens), dtype=torch.long)
            mask[i, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    # Read once per model class: prefill and every decode step ask.
    return frozenset(inspect.signature(model_type.forward).parameters)


def _last_logits_only(model) -> dict:
    # Only the last position's logits are sampled from: the LM head over a whole prompt is wasted
    # work in every prefill. Models whose forward lacks the argument compute them all.
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(type(model)) else {}


def _with_cache(model, cache) -> dict:
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is
    # accepted, with a warning, until 5.40); wrappers that take **kwargs get the old name.
    return {"cache" if "cache" in _forward_parameters(type(model)) else "past_key_values": cache}


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
    """Run left-padded prompts through the model once: last-position logits [batch, vocab] and
    the state to continue from. The cache appends in place (:mod:`steer.kv_cache`)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with inference_attention():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **_with_cache(model, new_kv_cache(model.config)), **_last_logits_only(model))
    state = DecodeState(_returned_cache(out), attention_mask, positions[:, -1] + 1)
    return out.logits[:, -1, :], state


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row ([batch]); returns the next logits and advances ``state`` in place."""
    state.attention_mask = torch.cat(
        [state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))], dim=-1
    )
    with inference_attention():
        out = model(
            input_ids=tokens.view(-1, 1),
            attention_mask=_one_token_mask(model, state.attention_mask, state.past_key_values),
            position_ids=state.next_positions.view(-1, 1),
            use_cache=True,
            **_with_cache(model, state.past_key_values),
        )
    state.past_key_values = _returned_cache(out)
    state.next_positions = state.next_positions + 1
    return out.logits[:, -1, :]


def _one_token_mask(model, attention_mask: torch.Tensor, cache=None) -> torch.Tensor:
    """The mask for a step that feeds one token per row. That token may attend to every real token
    before it, so under SDPA the finished [batch, 1, 1, length] boolean mask is just the padding
    mask; handing it over skips transformers' general mask builder, a sixteenth of a batch-16 step
    on a CPU. A single row has no padding, and transformers then needs no mask at all. Caches with
    sliding-window layers keep fewer columns than the mask has, so they get transformers' masks."""
    if (
        attention_mask.shape[0] > 1
        and getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa"
        and not any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ()))
    ):
        return attention_mask[:, None, None, :].bool()
    return attention_mask


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids |= set(eos) if isinstance(eos, (list, tuple, set)) else {eos}
    return {int(t) for t in ids if t is not None}


def context_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


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
    # APM-guided best-of-n (steer.best_of): draw this many candidates in one batch and return the
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


class _Row:
    """Decoding bookkeeping for one request."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], end_marker: str,
                 attributes: dict[str, int], rng: random.Random, budget: int, detok: IncrementalDetokenizer):
        self.prompt_ids = prompt_ids
        self.params = params
        self.stops = stops
        self.end_marker = end_marker
        self.attributes = attributes
        self.rng = rng
        self.budget = budget
        self.tokens: list[int] = []
        self.detok = detok
        self.text = ""
        self.finish_reason: str | None = None
        self.warnings: list[str] = []

    def result(self) -> GenerationResult:
        return GenerationResult(self.text, len(self.prompt_ids), len(self.tokens), self.attributes,
                                self.finish_reason or "length", warnings=list(self.warnings))


# ----------------------------------------------------------------- generator
class SteerGenerator:
    """Generate replies from a policy with requested attribute values."""

    def __init__(self, model, tokenizer, schema, template, device: torch.device | str = "cpu", name: str = "policy",
                 apm=None, trained_values: Mapping[str, list[int]] | None = None):
        self.model = model
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
        self.max_context = context_limit(model)
        self._decoder = TokenDecoder.for_tokenizer(tokenizer)

    @classmethod
    def load(cls, policy_dir: str | Path, device: str | None = None, dtype: str | None = None,
             apm=None) -> SteerGenerator:
        """``apm``: an APM directory or :class:`~steer.apm.AttributePredictor`, for ``best_of``."""
        from steer.policy import load_policy

        policy = load_policy(policy_dir, device=device, dtype=dtype)
        if apm is not None and not hasattr(apm, "predict"):
            from steer.apm import AttributePredictor

            apm = AttributePredictor.load(apm, device=policy.device)
        return cls(policy.model, policy.tokenizer, policy.schema, policy.template, policy.device, policy.name, apm=apm,
                   trained_values=policy.config.get("trained_values"))

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
    def prepare(self, request: GenerationRequest) -> _Row:
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
        prompt = self.template.tokenize(request.messages, self.tokenizer, mode="inference", attributes=applied)
        budget = params.max_new_tokens
        if self.max_context:
            room = self.max_context - len(prompt.input_ids)
            if room < 1:
                raise GenerationError(
                    f"the prompt is {len(prompt.input_ids)} tokens; this model's context is {self.max_context}",
                    "messages",
                )
            budget = min(budget, room)
        stops = list(self.template.stop_strings) + params.stop
        row = _Row(prompt.input_ids, params, stops, self.template.end_marker, applied,
                   params.make_rng(), budget, IncrementalDetokenizer(self._decoder))
        # Only what the request asked for: a default it left alone is the policy's own choice.
        asked = self.schema.validate(request.attributes, fill_defaults=False) if request.attributes else {}
        row.warnings = unseen_request_warnings(asked, self.trained_values)
        return row

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Decode several requests in one left-padded batch. A seeded request gives the same text
        here as through :meth:`generate`, because each row samples from its own generator."""
        if any(r.best_of != 1 for r in requests):
            return self._generate_best_of(requests)
        return self.generate_prepared([self.prepare(r) for r in requests])

    def _generate_best_of(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every request's candidates (seeds ``seed + i``) decoded as one batch, then one APM call
        scores them all and :func:`steer.best_of.choose_best` keeps each request's closest."""
        from dataclasses import replace

        from steer.best_of import BestOfError, CandidateGroup, best_of_target, candidate_seed, check_best_of, \
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
                params = replace(first.params, seed=candidate_seed(r.seed, i))
                rows.append(_Row(first.prompt_ids, params, first.stops, first.end_marker, first.attributes,
                                 params.make_rng(), first.budget, IncrementalDetokenizer(self._decoder)))
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

    def generate_prepared(self, rows: Sequence[_Row]) -> list[GenerationResult]:
        """:meth:`generate_batch` for requests already through :meth:`prepare` (each row once)."""
        if not rows:
            return []
        input_ids, mask = left_pad([r.prompt_ids for r in rows], self.pad_token_id, self.device)
        logits, state = prefill(self.model, input_ids, mask)
        active = list(range(len(rows)))
        while True:
            next_tokens = torch.full((len(rows),), self.pad_token_id, dtype=torch.long, device=self.device)
            # Only unfinished rows draw from their random streams, so a row's stream never
            # depends on what else is in the batch.
            sampled = sample_next_tokens(
                logits[active], [rows[i].params for i in active], [rows[i].rng for i in active],
                [rows[i].tokens for i in active],
            )
            for i, token in zip(active, sampled.tolist()):
                next_tokens[i] = token
                self._advance(rows[i], token)
            active = [i for i in active if rows[i].finish_reason is None]
            if not active:
                break
            logits = decode_step(self.model, next_tokens, state)
        return [r.result() for r in rows]

    def _advance(self, row: _Row, token: int) -> None:
        row.tokens.append(token)
        if token in self.eos_ids and not row.params.ignore_eos:
            row.detok.finish()
            row.text = row.detok.text
            row.finish_reason = "stop"
            return
        # Text settles a token at a time (steer.detokenize), so multi-byte characters and merges
        # come out right without decoding the whole completion every step.
        spent = len(row.tokens) >= row.budget
        cut = row.detok.advance(token, row.stops, last=spent)
        if cut >= 0:
            row.text = self._strip_marker(row.detok.text[:cut], row)
            row.finish_reason = "stop"
        else:
            row.text = row.detok.text
            if spent:
                row.finish_reason = "length"

    @staticmethod
    def _strip_marker(text: str, row: _Row) -> str:
        # The end marker is "\n<extra_id_1>": drop the part of it that precedes the stop string.
        for s in row.stops:
            idx = row.end_marker.find(s)
            if idx > 0 and text.endswith(row.end_marker[:idx]):
                return text[: len(text) - idx]
        return text
