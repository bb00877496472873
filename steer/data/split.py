"""Train/eval splits that never put one conversation group on both sides."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from steer.core.conversation import Conversation


def _bucket(group: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def grouped_split(
    conversations: Sequence[Conversation], eval_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Split by hashing each conversation's group, so a group (an OpenAssistant tree, a HelpSteer
    prompt) lands wholly in one split, and the split is stable as data is added."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train, evaluation = [], []
    for conv in conversations:
        (evaluation if _bucket(conv.group or conv.id, seed) < eval_fraction else train).append(conv)
    return train, evaluation
