"""Rated items for the APM: what ``steer apm train``, ``eval`` and ``cv`` all score.

Every assistant turn with at least one label becomes an item: the conversation up to that turn and
its values on each schema attribute (NaN where unlabelled), tagged with its conversation group (an
OpenAssistant tree, a HelpSteer prompt) so splits and cross-validation never put one group on both
sides. Kept apart from training and evaluation so those two import it, not each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from steer.core.attributes import AttributeSchema
from steer.core.conversation import Conversation, Message

# The attributes the headline figure averages, per schema: OpenAssistant's toxicity, violence and
# not_appropriate are nearly always 0 on the shared data, so their correlations say little about a
# model, and the README/docs quote the mean over these four. Other schemas: all their attributes.
HEADLINE_ATTRIBUTES = {"oasst": ("quality", "helpfulness", "humor", "creativity")}
# A held-out figure from fewer rated replies than this swings by +-0.2 between splits on OASST
# (0.07 to 0.48 over three 14-16-tree splits of ~95 replies), so it is printed with a warning.
MIN_MEANINGFUL_HELD_OUT = 300


def headline_attributes(schema: AttributeSchema) -> list[str]:
    names = HEADLINE_ATTRIBUTES.get(schema.name)
    if names and all(n in schema.names for n in names):
        return list(names)
    return list(schema.names)


@dataclass
class RatedItem:
    """One assistant reply to score: ``messages`` ends with it; ``values`` has NaN where unlabelled."""

    messages: list[Message]
    values: np.ndarray
    id: str
    group: str | None = None


def rated_items(conversations: Sequence[Conversation], schema: AttributeSchema, use_scores: bool) -> list[RatedItem]:
    """Every assistant turn with at least one label in ``schema``, once per message id (OpenAssistant
    conversations share prefixes, so one reply is in several conversations)."""
    seen: set[str] = set()
    items = []
    for conv in conversations:
        for i in conv.assistant_indices():
            msg = conv.messages[i]
            key = msg.id if msg.id is not None else f"{conv.id}#{i}"
            if key in seen:
                continue
            values = np.full(len(schema), np.nan)
            for j, name in enumerate(schema.names):
                if use_scores and name in msg.scores:
                    values[j] = msg.scores[name]
                elif name in msg.labels:
                    values[j] = msg.labels[name]
            if np.isnan(values).all():
                continue
            seen.add(key)
            items.append(RatedItem(messages=conv.messages[: i + 1], values=values, id=key,
                                   group=conv.group or conv.id))
    return items


def label_matrix(items, schema: AttributeSchema) -> np.ndarray:
    """[N, k] integer labels of each item's last message (NaN where unlabelled)."""
    out = np.full((len(items), len(schema)), np.nan)
    for i, item in enumerate(items):
        labels = item.messages[-1].labels
        for j, name in enumerate(schema.names):
            if name in labels:
                out[i, j] = labels[name]
    return out


def target_normalization(values: np.ndarray, schema: AttributeSchema, enabled: bool) -> dict[str, list[float]]:
    """Per-attribute mean and standard deviation of the training targets (identity when disabled or
    when an attribute has too few labels to estimate them)."""
    k = len(schema)
    mean, std = np.zeros(k), np.ones(k)
    if enabled:
        for j, attr in enumerate(schema.attributes):
            col = values[:, j][~np.isnan(values[:, j])]
            if len(col) >= 2 and col.std() > 1e-6:
                mean[j], std[j] = col.mean(), col.std()
            elif len(col):
                mean[j] = col.mean()
            else:
                mean[j] = attr.default
    return {"mean": mean.tolist(), "std": std.tolist()}
