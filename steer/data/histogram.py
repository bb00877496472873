"""How often each attribute value occurs in labelled data: printed by ``steer relabel`` and
``steer sft``, and recorded with a policy so a request for a value it never saw can be flagged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from steer.core.attributes import AttributeSchema
from steer.core.conversation import Conversation


def label_histogram(conversations: Iterable[Conversation], schema: AttributeSchema) -> dict[str, dict[int, int]]:
    """``{attribute: {value: count}}`` over every labelled assistant turn, values in ascending order."""
    counts = {name: Counter() for name in schema.names}
    for conv in conversations:
        for m in conv.messages:
            if m.role != "assistant":
                continue
            for name, value in m.labels.items():
                if name in counts:
                    counts[name][int(value)] += 1
    return {name: dict(sorted(c.items())) for name, c in counts.items()}


def unseen_values(histogram: Mapping[str, Mapping[int, int]], schema: AttributeSchema) -> dict[str, list[int]]:
    """Values the schema allows that never occur, per attribute (only attributes with some)."""
    out = {}
    for attr in schema.attributes:
        seen = {int(v) for v, n in histogram.get(attr.name, {}).items() if n}
        missing = [v for v in range(attr.min, attr.max + 1) if v not in seen]
        if missing:
            out[attr.name] = missing
    return out


def format_histogram(histogram: Mapping[str, Mapping[int, int]], schema: AttributeSchema) -> str:
    """One line per attribute: ``humor  0:812 1:301 2:17 3:- 4:-`` (``-``: never occurs)."""
    width = max((len(n) for n in schema.names), default=0)
    lines = []
    for attr in schema.attributes:
        counts = histogram.get(attr.name, {})
        cells = " ".join(f"{v}:{counts.get(v) or counts.get(str(v)) or '-'}" for v in range(attr.min, attr.max + 1))
        lines.append(f"  {attr.name:<{width}}  {cells}")
    return "\n".join(lines)


def trained_values(histogram: Mapping[str, Mapping[int, int]]) -> dict[str, list[int]]:
    """``{attribute: [values that occur]}``: what a policy records about its training labels."""
    return {name: sorted(int(v) for v, n in counts.items() if n) for name, counts in histogram.items()}


def unseen_request_warnings(requested: Mapping[str, int], trained: Mapping[str, list[int]] | None) -> list[str]:
    """One message per requested value the policy never saw in training (empty when it saw them
    all, or when the policy predates this record)."""
    if not trained:
        return []
    out = []
    for name, value in requested.items():
        seen = trained.get(name)
        if seen is not None and int(value) not in seen:
            shown = ", ".join(map(str, seen)) or "none"
            out.append(f"attribute {name!r}: value {value} never occurred in this policy's training data "
                       f"(seen: {shown}); the reply may not follow it")
    return out
