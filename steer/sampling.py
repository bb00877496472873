"""Token sampling and stop strings, shared by single-request generation and the batched server.

Each request owns a ``torch.Generator`` and draws exactly one sample per step from its own row
of logits, so a seeded request produces the same text alone or inside any batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steer.errors import SteerError

MAX_STOP_STRINGS = 4


class SamplingError(SteerError, ValueError):
    """Invalid sampling settings; ``field`` names the request field."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    # 0 means greedy decoding.
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SamplingError("max_new_tokens must be a positive integer", "max_new_tokens")
        if not 0.0 <= float(self.temperature) <= 2.0:
            raise SamplingError("temperature must be between 0 and 2", "temperature")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise SamplingError("top_p must be in (0, 1]", "top_p")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError(f"at most {MAX_STOP_STRINGS} stop strings", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty text", "stop")

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(int(seed))


def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of one distribution outside the smallest set with mass >= top_p."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    # Keep a token if the mass before it is still below top_p (so the top token always stays).
    keep_sorted = (cumulative - sorted_probs) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return probs * keep


def sample_next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row of ``logits`` ([batch, vocab]) under that row's own params and RNG."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    logits = logits.float()
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            out[i] = torch.argmax(logits[i])
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        probs = filter_top_p(probs, p.top_p)
        out[i] = torch.multinomial(probs, 1, generator=gen)[0]
    return out


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def streamable_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` can be sent now: everything except a tail that might be the start
    of a stop string still being generated."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
