"""The APM as a reward model: one scalar per reply from its attribute predictions.

``reward = sum_a w_a * (prediction_a - min_a) / (max_a - min_a)``: each attribute is put on a 0-1
scale first, so a weight means the same on any schema. :data:`DEFAULT_REWARD_WEIGHTS` is the
documented default: the attributes that say a reply is good count for it, the ones that say it is
harmful count against it, and style attributes (humor, creativity, complexity, verbosity) are
neutral, since how much of those a user wants depends on the request. Attributes of the APM's
schema that the weights do not name count 0.

>>> reward = ApmReward(AttributePredictor.load("runs/apm"))
>>> reward.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
array([0.71])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steer.core.attributes import AttributeSchema
from steer.core.errors import SteerError

DEFAULT_REWARD_WEIGHTS: dict[str, float] = {
    "helpfulness": 1.0,
    "quality": 1.0,
    "correctness": 1.0,
    "coherence": 0.5,
    "toxicity": -1.0,
    "not_appropriate": -1.0,
    "violence": -0.5,
}


class RewardError(SteerError, ValueError):
    """Bad reward weights; ``field`` names the attribute."""


def reward_weights(schema: AttributeSchema, weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """One weight per schema attribute, in schema order. ``None`` means the default weights."""
    given = DEFAULT_REWARD_WEIGHTS if weights is None else weights
    out = np.zeros(len(schema), dtype=np.float64)
    for name, w in given.items():
        canonical = schema.canonical_name(name, strict=weights is not None)
        if canonical is None:  # a default for an attribute this schema does not have
            continue
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise RewardError(f"reward weight of {name!r} must be a finite number, got {w!r}", name)
        out[schema.names.index(canonical)] = float(w)
    if not out.any():
        raise RewardError(
            f"no reward weight applies to the APM's attributes ({', '.join(schema.names)}); pass weights, "
            "e.g. {\"helpfulness\": 1}", "weights")
    return out


def reward_from_predictions(predictions: np.ndarray, schema: AttributeSchema,
                            weights: Mapping[str, Any] | None = None) -> np.ndarray:
    """``[n, len(schema)]`` APM predictions (schema scale) -> ``[n]`` rewards."""
    predictions = np.asarray(predictions, dtype=np.float64)
    lo = np.array([a.min for a in schema.attributes], dtype=np.float64)
    hi = np.array([a.max for a in schema.attributes], dtype=np.float64)
    return ((predictions - lo) / (hi - lo)) @ reward_weights(schema, weights)


class ApmReward:
    """A reward model built on an :class:`~steer.models.apm.AttributePredictor`."""

    def __init__(self, apm, weights: Mapping[str, Any] | None = None):
        self.apm = apm
        vector = reward_weights(apm.schema, weights)  # fails early on bad weights
        # The weight of every APM attribute, as applied (0 for those the weights leave out).
        self.weights = {n: float(w) for n, w in zip(apm.schema.names, vector)}

    def score(self, conversations: Sequence[Sequence[Any]], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Each conversation ends with the assistant reply to reward; returns ``[n]`` floats."""
        preds = self.apm.predict(conversations, batch_size=batch_size, progress=progress)
        return reward_from_predictions(preds, self.apm.schema, self.weights)
