"""APM-guided best-of-n: draw N candidate replies, measure each with the attribute prediction model
(APM), keep the one closest to the requested attribute values.

This module is the one definition of that choice. :class:`steer.runtime.generator.SteerGenerator`
(``best_of=N``), the server's ``best_of`` request field and ``steer eval steerability`` all call it,
so a reply picked in one is the reply picked in the others.

- Candidate ``i`` of a seeded request is drawn with seed ``seed + i`` (:func:`candidate_seed`), so
  candidate 0 is the reply the request gives without best-of, and best-of-4 looks at the first four
  of best-of-8's candidates. The whole choice is reproducible from the seed.
- The distance covers the attributes the caller set explicitly (all of the policy's attributes at
  their applied values when the caller set none) that the APM also measures: a weighted mean of
  squared differences between measured and requested values. Weights default to 1.
- Ties go to the lowest index, so the choice never depends on floating-point noise in the order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steer.core.errors import SteerError

SEED_MODULUS = 2**63
# A request with best_of above this is refused: the candidates are decoded as one batch.
MAX_BEST_OF = 64


class BestOfError(SteerError, ValueError):
    """Bad best-of settings; ``field`` names the request field."""


@dataclass(frozen=True)
class BestOfChoice:
    """The winner of one best-of-n draw."""

    index: int  # which candidate won (0-based)
    distance: float  # its weighted mean squared distance to the target
    measured: dict[str, float]  # the winner's APM measurements, every APM attribute
    distances: tuple[float, ...]  # every candidate's distance, in candidate order
    target: dict[str, int]  # the attribute values the distance was measured against

    @property
    def candidates(self) -> int:
        return len(self.distances)


def check_best_of(best_of: Any, field: str = "best_of") -> int:
    if isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= MAX_BEST_OF:
        raise BestOfError(f"{field} must be an integer from 1 to {MAX_BEST_OF}, got {best_of!r}", field)
    return best_of


def candidate_seed(seed: int | None, index: int) -> int | None:
    """The seed candidate ``index`` is drawn with (``None`` stays ``None``: a fresh random stream)."""
    return None if seed is None else (seed + index) % SEED_MODULUS


def best_of_target(
    applied: Mapping[str, int],
    explicit: Iterable[str] | None,
    measured_names: Sequence[str],
) -> dict[str, int]:
    """The values a candidate is compared with: the explicitly set attributes (all applied ones when
    none were set) that the APM measures. ``applied`` holds validated, canonical names."""
    explicit = [n for n in (explicit or []) if n in applied]
    names = explicit or list(applied)
    target = {n: int(applied[n]) for n in names if n in measured_names}
    if not target:
        raise BestOfError(
            f"best_of needs a requested attribute the attribute prediction model measures; it measures "
            f"{', '.join(measured_names)}, the request sets {', '.join(names) or 'none'}", "best_of")
    return target


def check_weights(weights: Mapping[str, Any] | None, target: Mapping[str, int],
                  field: str = "best_of_weights") -> dict[str, float]:
    """Validated weights for ``target``'s attributes (1.0 where not given)."""
    weights = dict(weights or {})
    out = {}
    for name, w in weights.items():
        if name not in target:
            raise BestOfError(f"{field}: {name!r} is not one of the attributes compared ({', '.join(target)})",
                              field)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise BestOfError(f"{field}: the weight of {name!r} must be a number 0 or more, got {w!r}", field)
        out[name] = float(w)
    full = {n: out.get(n, 1.0) for n in target}
    if sum(full.values()) <= 0:
        raise BestOfError(f"{field}: at least one weight must be above 0", field)
    return full


def candidate_distance(measured: Mapping[str, float], target: Mapping[str, int],
                       weights: Mapping[str, float] | None = None) -> float:
    """Weighted mean of squared differences between measured and requested values."""
    weights = weights or {}
    total = sum(weights.get(n, 1.0) for n in target)
    return sum(weights.get(n, 1.0) * (float(measured[n]) - v) ** 2 for n, v in target.items()) / total


def select_best(measured: Sequence[Mapping[str, float]], target: Mapping[str, int],
                weights: Mapping[str, float] | None = None) -> BestOfChoice:
    """The candidate whose measurements are closest to ``target`` (ties: the lowest index)."""
    if not measured:
        raise BestOfError("no candidates to choose from", "best_of")
    weights = check_weights(weights, target)
    distances = tuple(candidate_distance(m, target, weights) for m in measured)
    best = min(range(len(distances)), key=lambda i: (distances[i], i))
    return BestOfChoice(index=best, distance=distances[best], measured=dict(measured[best]),
                        distances=distances, target=dict(target))


@dataclass
class CandidateGroup:
    """One request's candidates: the conversation they answer, their texts and what to aim for."""

    messages: Sequence[Any]
    texts: Sequence[str]
    target: Mapping[str, int]
    weights: Mapping[str, float] | None = None


def measure(apm, messages: Sequence[Any], texts: Sequence[str]) -> list[dict[str, float]]:
    """The APM's measurements of each reply to ``messages`` (every APM attribute)."""
    items = [list(messages) + [{"role": "assistant", "content": t}] for t in texts]
    preds = apm.predict(items) if items else []
    return [{n: float(v) for n, v in zip(apm.schema.names, row)} for row in preds]


def choose_best(apm, groups: Sequence[CandidateGroup]) -> list[BestOfChoice]:
    """Score every candidate of every group in one APM call, then pick each group's winner."""
    items = [list(g.messages) + [{"role": "assistant", "content": t}] for g in groups for t in g.texts]
    preds = apm.predict(items) if items else []
    names = apm.schema.names
    choices, at = [], 0
    for g in groups:
        rows = preds[at:at + len(g.texts)]
        at += len(g.texts)
        choices.append(select_best([{n: float(v) for n, v in zip(names, row)} for row in rows], g.target, g.weights))
    return choices
