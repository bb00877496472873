"""The attribute schema: which attributes a model is steered by, their ranges and defaults.

This is the only place attribute names, ranges and the SteerLM label string
(``quality:4,toxicity:0,humor:3``) are defined. Training, relabeling and serving all
call it, so a value that is valid in one is valid in all.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from steer.core.errors import SteerError

# Names users commonly type for the same attribute. Keys are aliases, values canonical names.
DEFAULT_ALIASES: dict[str, str] = {"humour": "humor"}


class AttributeValueError(SteerError, ValueError):
    """A bad attribute name, value or label string. ``field`` names the offending attribute."""


class _AttributeEntry(BaseModel):
    """One attribute as a schema file writes it. Integers are strict: ``4.7``, ``"4"`` or ``true``
    is an error, never silently rounded or converted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    min: int = 0
    max: int = 4
    default: int = 0
    description: str = ""
    levels: list[str] | None = None


class _SchemaFile(BaseModel):
    """A schema file: ``{"name", "attributes": [...], "aliases": {...}}``; an attribute may be
    given by its name alone (range 0-4, default 0)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    attributes: list[_AttributeEntry]
    aliases: dict[str, str] | None = None

    @field_validator("attributes", mode="before")
    @classmethod
    def _names_alone(cls, value: Any) -> Any:
        return [{"name": item} if isinstance(item, str) else item for item in value] if isinstance(value, list) else value


@dataclass(frozen=True)
class Attribute:
    name: str
    min: int = 0
    max: int = 4
    default: int = 0
    description: str = ""
    # Optional words for each value, min to max ("completely serious" ... "hilarious and over the
    # top"): the label text of ``--label-wording words``, which an instruction-tuned base already reads.
    levels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise AttributeValueError(
                f"attribute name {self.name!r} must be letters, digits and underscores", self.name
            )
        if self.min >= self.max:
            raise AttributeValueError(f"attribute {self.name!r}: min {self.min} must be below max {self.max}", self.name)
        if not self.min <= self.default <= self.max:
            raise AttributeValueError(
                f"attribute {self.name!r}: default {self.default} is outside {self.min}-{self.max}", self.name
            )
        levels = tuple(self.levels or ())
        object.__setattr__(self, "levels", levels)
        if levels and len(levels) != self.max - self.min + 1:
            raise AttributeValueError(f"attribute {self.name!r}: levels gives {len(levels)} words for the "
                                      f"{self.max - self.min + 1} values {self.min}-{self.max}", self.name)
        bad = next((w for w in levels if not isinstance(w, str) or not w.strip() or any(c in w for c in "\n;()")),
                   None)
        if bad is not None:
            raise AttributeValueError(f"attribute {self.name!r}: level word {bad!r} must be non-empty text on one "
                                      "line, without ';' or parentheses", self.name)

    def level_word(self, value: int) -> str:
        if not self.levels:
            raise AttributeValueError(f"attribute {self.name!r} has no level words (the schema's \"levels\")",
                                      self.name)
        return self.levels[value - self.min]


@dataclass(frozen=True)
class AttributeSchema:
    """An ordered set of attributes. Order matters: it is the order of the label string
    and of the APM's outputs."""

    name: str
    attributes: tuple[Attribute, ...]
    aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))

    def __post_init__(self) -> None:
        names = [a.name for a in self.attributes]
        if not names:
            raise AttributeValueError(f"schema {self.name!r} has no attributes")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise AttributeValueError(f"schema {self.name!r} repeats attribute(s): {', '.join(dupes)}", dupes[0])
        object.__setattr__(self, "attributes", tuple(self.attributes))
        object.__setattr__(self, "aliases", dict(self.aliases))

    # ----------------------------------------------------------------- lookup
    @property
    def names(self) -> list[str]:
        return [a.name for a in self.attributes]

    def __len__(self) -> int:
        return len(self.attributes)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical_name(name, strict=False) is not None

    def canonical_name(self, name: str, strict: bool = True) -> str | None:
        """Map a user-typed name (any case, aliases such as ``humour``) to the schema's name."""
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        if key in self.names:
            return key
        if strict:
            raise AttributeValueError(
                f"unknown attribute {name!r}; this schema ({self.name}) has: {', '.join(self.names)}", name
            )
        return None

    def __getitem__(self, name: str) -> Attribute:
        canonical = self.canonical_name(name)
        return next(a for a in self.attributes if a.name == canonical)

    @property
    def defaults(self) -> dict[str, int]:
        return {a.name: a.default for a in self.attributes}

    # ------------------------------------------------------------- validation
    def validate_value(self, name: str, value: Any) -> int:
        attr = self[name]
        if isinstance(value, bool):
            raise AttributeValueError(f"attribute {attr.name!r}: expected an integer, got a boolean", attr.name)
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text)
            except ValueError:
                raise AttributeValueError(
                    f"attribute {attr.name!r}: expected an integer, got {text!r}", attr.name
                ) from None
        elif isinstance(value, float):
            if not math.isfinite(value) or not value.is_integer():
                raise AttributeValueError(f"attribute {attr.name!r}: expected an integer, got {value!r}", attr.name)
            value = int(value)
        elif not isinstance(value, int):
            raise AttributeValueError(
                f"attribute {attr.name!r}: expected an integer, got {type(value).__name__}", attr.name
            )
        if not attr.min <= value <= attr.max:
            raise AttributeValueError(
                f"attribute {attr.name!r}: value {value} is outside its range {attr.min}-{attr.max}", attr.name
            )
        return value

    def validate(self, values: Mapping[str, Any] | None, fill_defaults: bool = True) -> dict[str, int]:
        """Check user-supplied values; return them keyed by canonical name, in schema order.

        With ``fill_defaults`` every attribute is present (missing ones take their default),
        which is what conditioning needs: the model always sees a full label string.
        """
        values = values or {}
        if not isinstance(values, Mapping):
            raise AttributeValueError(f"attributes must be a mapping of name to integer, got {type(values).__name__}")
        checked: dict[str, int] = {}
        for raw_name, value in values.items():
            if not isinstance(raw_name, str):
                raise AttributeValueError(f"attribute names must be strings, got {raw_name!r}")
            name = self.canonical_name(raw_name)
            if name in checked:
                raise AttributeValueError(f"attribute {name!r} given twice (as {raw_name!r} and its alias)", name)
            checked[name] = self.validate_value(name, value)
        out = {}
        for attr in self.attributes:
            if attr.name in checked:
                out[attr.name] = checked[attr.name]
            elif fill_defaults:
                out[attr.name] = attr.default
        return out

    def round_and_clip(self, predictions: Mapping[str, float]) -> dict[str, int]:
        """Turn raw float predictions (e.g. from the APM) into valid integer values."""
        out = {}
        for name, value in predictions.items():
            attr = self[name]
            out[attr.name] = int(min(attr.max, max(attr.min, round(float(value)))))
        return out

    # ----------------------------------------------------------- label string
    def format_labels(self, values: Mapping[str, Any], fill_defaults: bool = True) -> str:
        """``{"humor": 3, "quality": 4}`` -> ``"quality:4,...,humor:3"`` in schema order."""
        checked = self.validate(values, fill_defaults=fill_defaults)
        return ",".join(_label_item(name, value) for name, value in checked.items())

    def describe_labels(self, values: Mapping[str, Any], fill_defaults: bool = True) -> list[str]:
        """``{"humor": 0, "creativity": 3}`` -> ``["completely serious", "vivid and imaginative"]``
        in schema order: each value as its attribute's level word."""
        checked = self.validate(values, fill_defaults=fill_defaults)
        return [self[name].level_word(value) for name, value in checked.items()]

    def without_level_words(self) -> list[str]:
        return [a.name for a in self.attributes if not a.levels]

    def label_items(self) -> list[str]:
        """Every ``name:value`` item a label string of this schema can contain.

        A tokenizer built for a steered model can make these atomic tokens: a tiny model then
        finds "humor is 3" in one token instead of assembling it from ``h``, ``um``, ``or``, ``:``, ``3``."""
        return [_label_item(a.name, v) for a in self.attributes for v in range(a.min, a.max + 1)]

    def parse_labels(self, text: str, fill_defaults: bool = False) -> dict[str, int]:
        """Inverse of :meth:`format_labels`. Whitespace around items is ignored."""
        if not isinstance(text, str):
            raise AttributeValueError(f"label string must be text, got {type(text).__name__}")
        stripped = text.strip()
        if not stripped:
            return self.validate({}, fill_defaults=fill_defaults)
        values: dict[str, str] = {}
        for item in stripped.split(","):
            name, sep, value = item.partition(":")
            if not sep or not name.strip() or not value.strip():
                raise AttributeValueError(
                    f"malformed label string {text!r}: item {item.strip()!r} is not of the form name:value"
                )
            canonical = self.canonical_name(name)
            if canonical in values:
                raise AttributeValueError(f"label string {text!r} gives {canonical!r} twice", canonical)
            values[canonical] = value
        return self.validate(values, fill_defaults=fill_defaults)

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        # Level words are written only where an attribute has them, so schema files from before
        # they existed read and compare the same.
        return {
            "name": self.name,
            "attributes": [{k: (list(v) if k == "levels" else v) for k, v in asdict(a).items()
                            if k != "levels" or v} for a in self.attributes],
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "schema") -> AttributeSchema:
        """A schema from its dict form (``to_dict``, or a schema file's content). ``where`` (say,
        the file's name) starts every error message."""
        from pydantic import ValidationError

        from steer.core.errors import validation_error_text

        try:
            spec = _SchemaFile.model_validate(data)
        except ValidationError as e:
            message, field = validation_error_text(e, where)
            raise AttributeValueError(message, field) from None
        attrs = []
        for item in spec.attributes:
            try:
                attrs.append(Attribute(**item.model_dump()))
            except AttributeValueError as e:
                raise AttributeValueError(f"{where}: {e}", e.field) from None
        aliases = dict(DEFAULT_ALIASES)
        aliases.update({k.lower(): v for k, v in (spec.aliases or {}).items()})
        names = {a.name for a in attrs}
        # Only keep aliases whose target exists, so e.g. "humour" is harmless in a schema without humor.
        aliases = {k: v for k, v in aliases.items() if v in names}
        try:
            return cls(name=spec.name or "custom", attributes=tuple(attrs), aliases=aliases)
        except AttributeValueError as e:
            raise AttributeValueError(f"{where}: {e}", e.field) from None

    @classmethod
    def from_file(cls, path: str | Path) -> AttributeSchema:
        """A schema from a JSON or YAML file; every error names the file (and the field or line)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AttributeValueError(f"cannot read schema file {path}: {getattr(e, 'strerror', None) or e}",
                                      "schema") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f" line {mark.line + 1}" if mark is not None else ""
                raise AttributeValueError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})",
                                          "schema") from None
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise AttributeValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg})", "schema") from None
        schema = cls.from_dict(data, where=str(path))
        if "name" not in data:
            schema = cls(name=path.stem, attributes=schema.attributes, aliases=schema.aliases)
        return schema

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


def _label_item(name: str, value: int) -> str:
    return f"{name}:{value}"


def _schema(name: str, specs: Iterable[tuple[str, int, str, tuple[str, ...]]]) -> AttributeSchema:
    return AttributeSchema(
        name=name,
        attributes=tuple(Attribute(name=n, default=d, description=desc, levels=lv) for n, d, desc, lv in specs),
    )


_DESCRIPTIONS = {
    "quality": "Overall quality of the reply.",
    "toxicity": "Rude, disrespectful or harmful language.",
    "humor": "How funny or playful the reply is.",
    "creativity": "Originality and imagination of the reply.",
    "helpfulness": "How well the reply serves the user's actual need.",
    "violence": "Violent content or encouragement of violence.",
    "not_appropriate": "Content inappropriate for a general audience.",
    "correctness": "Factual accuracy; no hallucinated or wrong information.",
    "coherence": "Clarity and logical consistency of the reply.",
    "complexity": "Intellectual depth needed to write the reply (simple to expert).",
    "verbosity": "Amount of detail relative to what was asked (terse to long).",
}

# Words for the values 0-4, plain adjectives an instruction-tuned model reads as they are: written
# so, SmolLM2-135M-Instruct's replies depended on the labels about six times more before any
# training than with "humor:0" (docs/sft.md, "Label words").
LEVEL_WORDS = {
    "quality": ("very poor", "poor", "fair", "good", "excellent"),
    "toxicity": ("perfectly polite", "a little rude", "rude", "offensive", "extremely toxic"),
    "humor": ("completely serious", "mostly serious, with a dry aside", "lightly playful", "funny, with a joke",
              "hilarious and over the top"),
    "creativity": ("plain and literal", "a little descriptive", "somewhat imaginative", "vivid and imaginative",
                   "wildly imaginative"),
    "helpfulness": ("unhelpful", "vague", "somewhat helpful", "helpful", "as helpful and specific as possible"),
    "violence": ("free of violence", "mildly violent", "somewhat violent", "violent", "extremely violent"),
    "not_appropriate": ("fit for everyone", "mostly fit for everyone", "somewhat inappropriate", "inappropriate",
                        "wholly inappropriate"),
    "correctness": ("wrong", "mostly wrong", "partly correct", "mostly correct", "entirely correct"),
    "coherence": ("incoherent", "hard to follow", "somewhat clear", "clear", "perfectly clear and consistent"),
    "complexity": ("very simple", "simple", "moderately complex", "complex", "expert-level"),
    "verbosity": ("as brief as possible", "brief", "moderately detailed", "detailed", "very long and detailed"),
}

# Defaults are what a well-behaved assistant should be asked for when the user sets nothing.
_DEFAULTS = {
    "quality": 4,
    "toxicity": 0,
    "humor": 0,
    "creativity": 0,
    "helpfulness": 4,
    "violence": 0,
    "not_appropriate": 0,
    "correctness": 4,
    "coherence": 4,
    "complexity": 2,
    "verbosity": 2,
}


def _builtin(name: str, names: list[str]) -> AttributeSchema:
    return _schema(name, [(n, _DEFAULTS[n], _DESCRIPTIONS[n], LEVEL_WORDS[n]) for n in names])


BUILTIN_SCHEMAS: dict[str, AttributeSchema] = {
    "oasst": _builtin(
        "oasst", ["quality", "toxicity", "humor", "creativity", "helpfulness", "violence", "not_appropriate"]
    ),
    "helpsteer": _builtin("helpsteer", ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]),
    # NeMo-Aligner's SteerLM order.
    "steerlm": _builtin(
        "steerlm",
        [
            "quality",
            "toxicity",
            "humor",
            "creativity",
            "helpfulness",
            "correctness",
            "coherence",
            "complexity",
            "verbosity",
        ],
    ),
}


def get_schema(name_or_path: str | AttributeSchema) -> AttributeSchema:
    """A built-in schema by name (``oasst``, ``helpsteer``, ``steerlm``) or a YAML/JSON file."""
    if isinstance(name_or_path, AttributeSchema):
        return name_or_path
    if name_or_path in BUILTIN_SCHEMAS:
        return BUILTIN_SCHEMAS[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return AttributeSchema.from_file(path)
    raise AttributeValueError(
        f"unknown schema {name_or_path!r}: use one of {', '.join(BUILTIN_SCHEMAS)} or a path to a YAML/JSON file",
        "schema",
    )
