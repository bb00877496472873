"""``steer eval preference``: the APM as a reward model, scored on preference pairs.

Accuracy is the share of pairs where ``reward(chosen) > reward(rejected)`` (a tie counts half),
with a 95% Wilson interval over pairs. The reward is :class:`steer.models.reward.ApmReward` (its
documented default weights unless ``--weights`` says otherwise).

Pairs:

- ``hh``: Anthropic hh-rlhf rows, ``chosen`` vs ``rejected`` (the same dialogue up to the last reply);
- ``helpsteer``: HelpSteer/HelpSteer2 rows grouped by prompt; for every two responses to one prompt
  with different helpfulness ratings, the more helpful one is chosen (equal ratings are skipped and
  counted in ``skipped_ties``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

PAIR_FORMATS = ("hh", "helpsteer")


class PreferenceError(SteerError, ValueError):
    pass


@dataclass
class PreferenceConfig:
    apm: str = field(default=None, metadata={"help": "APM directory (the reward model)."})
    data: str = field(default=None, metadata={"help": "Preference pairs: a JSONL/JSONL.GZ file (or hub dataset)."})
    format: str = field(default="hh", metadata={"help": "hh (chosen/rejected dialogues) or helpsteer (two rated "
                                                        "responses per prompt; the more helpful is chosen)."})
    weights: str | None = field(default=None, metadata={
        "help": "Reward weights as JSON, e.g. '{\"helpfulness\": 1, \"toxicity\": -1}' (default: "
                "steer.models.reward.DEFAULT_REWARD_WEIGHTS)."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many pairs."})
    batch_size: int = field(default=32, metadata={"help": "APM batch size."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)."})
    json: bool = field(default=False, metadata={"help": "Print {\"accuracy\", \"ci95\", \"n\", ...} as JSON."})


def wilson_interval(accuracy: float, n: int, z: float = 1.959964) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def load_pairs(path: str, format: str, limit: int | None = None) -> tuple[list[tuple[list, list]], dict[str, int]]:
    """``[(chosen conversation, rejected conversation)]``, each ending with the reply to reward."""
    from steer.data.formats import load_conversations

    if format not in PAIR_FORMATS:
        raise PreferenceError(f"--format must be one of {', '.join(PAIR_FORMATS)}, got {format!r}", "format")
    convs, _ = load_conversations(path, format)
    info = {"skipped_ties": 0}
    pairs = []
    if format == "hh":
        by_group: dict[str, dict[str, Any]] = defaultdict(dict)
        for c in convs:
            by_group[c.group][c.meta.get("preference")] = c.messages
        for sides in by_group.values():
            if "chosen" in sides and "rejected" in sides:
                pairs.append((sides["chosen"], sides["rejected"]))
    else:
        by_prompt = defaultdict(list)
        for c in convs:
            by_prompt[c.group].append(c.messages)
        for responses in by_prompt.values():
            for a, b in combinations(responses, 2):
                ha, hb = a[-1].labels.get("helpfulness"), b[-1].labels.get("helpfulness")
                if ha is None or hb is None:
                    continue
                if ha == hb:
                    info["skipped_ties"] += 1
                    continue
                pairs.append((a, b) if ha > hb else (b, a))
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise PreferenceError(f"{path} holds no preference pairs in the {format} format", "data")
    return pairs, info


def preference_accuracy(reward, pairs: list[tuple[list, list]], batch_size: int = 32) -> dict[str, Any]:
    """``reward``: anything with ``score(conversations) -> [n]`` (an :class:`~steer.models.reward.ApmReward`)."""
    items = [p[0] for p in pairs] + [p[1] for p in pairs]
    scores = np.asarray(reward.score(items, batch_size=batch_size, progress=len(items) > 256))
    chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
    wins = (chosen > rejected).astype(float) + 0.5 * (chosen == rejected)
    accuracy = float(wins.mean())
    return {"accuracy": round(accuracy, 4), "ci95": wilson_interval(accuracy, len(pairs)), "n": len(pairs),
            "mean_margin": round(float((chosen - rejected).mean()), 4)}


def main(config: PreferenceConfig) -> int:
    from steer.models.apm import AttributePredictor
    from steer.models.reward import ApmReward

    if not config.apm:
        raise PreferenceError("--apm is required", "apm")
    if not config.data:
        raise PreferenceError("--data is required", "data")
    weights = None
    if config.weights:
        try:
            weights = json.loads(config.weights)
        except json.JSONDecodeError as e:
            raise PreferenceError(f"--weights is not JSON: {e.msg}", "weights") from None
        if not isinstance(weights, dict):
            raise PreferenceError("--weights must be a JSON object of attribute -> weight", "weights")
    pairs, info = load_pairs(config.data, config.format, config.limit)
    reward = ApmReward(AttributePredictor.load(config.apm, device=config.device), weights)
    result = {**preference_accuracy(reward, pairs, config.batch_size), **info,
              "weights": reward.weights}
    if config.json:
        print(json.dumps(result))
    else:
        lo, hi = result["ci95"]
        print(f"accuracy {result['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {result['n']} pairs from {config.data}")
    return 0
