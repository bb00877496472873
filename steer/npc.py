"""NPC profiles for game dialogue: who a character is, how it talks, and what it may be steered to.

A profile is a YAML file (one per NPC) validated by ``NpcProfile``. It becomes a system prompt
(``system_prompt``) and a conversation (``dialogue_messages``) that the policy's one prompt
template (``steer.core.template``) renders; nothing here writes prompt markup of its own.

Bounds are what a game designer promises about a character: a town guard never jokes above
humor 2, and no NPC is asked for (or allowed to say) anything above toxicity 0 unless its
profile raises ``max_toxicity``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steer.core.attributes import AttributeSchema
from steer.core.errors import SteerError

PROFILE_SUFFIXES = (".yaml", ".yml")
NPC_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class NpcError(SteerError, ValueError):
    """A profile that cannot be used: unreadable file, bad field, attribute the policy lacks."""


class AttributeBounds(BaseModel):
    """The range a request may steer one attribute to; either end may be left open."""

    model_config = ConfigDict(extra="forbid")
    min: int | None = Field(default=None, description="Lowest value a request may ask for.")
    max: int | None = Field(default=None, description="Highest value a request may ask for.")

    @model_validator(mode="after")
    def _ordered(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class NpcProfile(BaseModel):
    """One NPC, as written in its YAML file or sent to ``POST /v1/npcs``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=NPC_ID_PATTERN, description="Stable id used in URLs: lowercase letters, digits, - and _.")
    name: str = Field(min_length=1, max_length=100, description="What the NPC is called in the game.")
    role: str = Field(default="", max_length=200, description="One line: 'the village blacksmith'.")
    persona: str = Field(min_length=1, max_length=4000, description="Who the NPC is, in the second person or prose.")
    speaking_style: str = Field(default="", max_length=1000, description="How the NPC talks.")
    knowledge: list[str] = Field(default_factory=list, description="Facts the NPC knows and may bring up.")
    sample_lines: list[str] = Field(default_factory=list, description="A few lines in the NPC's voice.")
    attributes: dict[str, int] = Field(default_factory=dict,
                                       description="Default attribute values of the NPC's replies.")
    bounds: dict[str, AttributeBounds] = Field(
        default_factory=dict, description="Per-attribute range a request may steer to; overrides are clamped into it.")
    max_toxicity: int = Field(default=0, ge=0, description="Highest toxicity the NPC may be asked for or say "
                              "(measured by the server's APM when it has a toxicity attribute).")
    fallback_line: str = Field(default="...", min_length=1, max_length=1000,
                               description="Said instead of a reply that stays above max_toxicity after retries.")
    best_of: int = Field(default=1, ge=1, le=16, description="Candidates drawn per reply; the APM picks the one "
                         "closest to the requested attributes (needs --apm).")
    max_regenerations: int = Field(default=2, ge=0, le=8,
                                   description="Redraws of a reply measured above max_toxicity before the fallback line.")
    max_tokens: int = Field(default=64, ge=1, description="Longest reply, in tokens.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Sampling temperature (server default).")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling (server default).")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, value in data.items():
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, str) and "\x00" in v for v in values):
                    raise ValueError(f"{key} must not contain NUL characters")
        return data

    @field_validator("knowledge", "sample_lines")
    @classmethod
    def _non_empty_items(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"item {i} must be a non-empty string")
        return value

    # ------------------------------------------------------------ bounds
    def bounds_for(self, name: str, schema: AttributeSchema) -> tuple[int, int]:
        """The range ``name`` may take for this NPC: the profile's bounds inside the schema's range."""
        attr = schema[name]
        b = next((v for k, v in self.bounds.items() if schema.canonical_name(k, strict=False) == attr.name), None)
        low = attr.min if b is None or b.min is None else max(attr.min, b.min)
        high = attr.max if b is None or b.max is None else min(attr.max, b.max)
        if name == "toxicity":
            high = min(high, self.max_toxicity)
        return low, high

    def check_against(self, schema: AttributeSchema) -> None:
        """Raise ``NpcError`` naming the field when an attribute is not in the policy's schema or
        a default falls outside the NPC's bounds."""
        for section in ("attributes", "bounds"):
            for name in getattr(self, section):
                if name not in schema:
                    raise NpcError(f"{section}.{name}: the policy has no attribute {name!r} "
                                   f"(it has {', '.join(schema.names)})", f"{section}.{name}")
        for name in self.bounds:
            low, high = self.bounds_for(name, schema)
            if low > high:
                raise NpcError(f"bounds.{name}: the range is empty inside the policy's "
                               f"{schema[name].min}-{schema[name].max}", f"bounds.{name}")
        for name, value in self.attributes.items():
            low, high = self.bounds_for(name, schema)
            if not low <= value <= high:
                raise NpcError(f"attributes.{name}: {value} is outside this NPC's range {low}-{high}",
                               f"attributes.{name}")

    def steer(self, schema: AttributeSchema, overrides: Mapping[str, Any] | None = None
              ) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """The attribute values of one reply: schema defaults, then the profile's, then ``overrides``,
        each clamped into the NPC's bounds. Returns the values and what was clamped
        (``[{"attribute", "requested", "applied"}]``). Raises ``AttributeValueError`` for unknown names
        or values outside the schema's own range (a request error, not a clamp)."""
        requested = schema.validate(overrides or {}, fill_defaults=False)
        values = {**schema.defaults, **schema.validate(self.attributes, fill_defaults=False), **requested}
        clamped = []
        for name in schema.names:
            low, high = self.bounds_for(name, schema)
            applied = min(max(values[name], low), high)
            if applied != values[name]:
                if name in requested:  # a default the designer left outside the bounds is not news
                    clamped.append({"attribute": name, "requested": values[name], "applied": applied})
                values[name] = applied
        return values, clamped

    # ------------------------------------------------------------ prompt
    def system_prompt(self, player_name: str | None = None) -> str:
        """The NPC as one short system message: persona, style, knowledge and sample lines. Kept to a
        paragraph because small policies are trained on short system prompts."""
        parts = [f"You are {self.name}" + (f", {self.role}" if self.role else "") + ".", self.persona.strip()]
        if self.speaking_style:
            parts.append(self.speaking_style.strip())
        if self.knowledge:
            parts.append("You know: " + " ".join(_sentence(k) for k in self.knowledge))
        if self.sample_lines:
            parts.append("You might say: " + " ".join(f'"{s.strip()}"' for s in self.sample_lines))
        if player_name:
            parts.append(f"You are talking to {player_name}.")
        return " ".join(parts)


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?" else text + "."


def dialogue_messages(profile: NpcProfile, history: Sequence[Mapping[str, str]], player_line: str,
                      player_name: str | None = None) -> list[dict[str, str]]:
    """The conversation the template renders: the NPC's system prompt, earlier turns, the new line."""
    turns = [{"role": m["role"], "content": m["content"]} for m in history if m["role"] in ("user", "assistant")]
    return [{"role": "system", "content": profile.system_prompt(player_name)}, *turns,
            {"role": "user", "content": player_line}]


def fit_history(messages: list[dict[str, str]], count_tokens: Callable[[list[dict[str, str]]], int],
                budget: int) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest player/NPC exchanges until ``count_tokens(messages) <= budget``.

    The system prompt and the newest player line always stay; returns the messages and how many
    earlier turns were dropped. Raises ``NpcError`` when even those two do not fit.
    """
    system, turns, last = messages[0], list(messages[1:-1]), messages[-1]
    dropped = 0
    while True:
        candidate = [system, *turns, last]
        if count_tokens(candidate) <= budget:
            return candidate, dropped
        if not turns:
            raise NpcError(f"the NPC's profile and the player's line need more than the {budget} prompt tokens "
                           "this server allows; shorten the line or the profile", "content")
        # Exchanges go in pairs so the conversation still alternates user/assistant.
        turns = turns[2:]
        dropped += 2


def clean_line(text: str) -> str:
    """A generated line as stored and shown: without NUL characters, which a random or badly
    tuned model can emit and databases (PostgreSQL text) cannot hold."""
    return text.replace("\x00", "")


def turn_seed(session_seed: int, turn: int, attempt: int = 0) -> int:
    """The sampling seed of one reply: a hash of the session's seed, the turn and the retry, so a
    session replays the same lines whatever else the server is doing, and turns do not share a stream."""
    digest = hashlib.sha256(f"steer-npc:{session_seed}:{turn}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


# ------------------------------------------------------------------ files
def _field_path(loc: Sequence[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def parse_profile(data: Any, source: str = "profile") -> NpcProfile:
    """Validate a mapping as a profile; ``NpcError`` names ``source`` and the first bad field."""
    if not isinstance(data, Mapping):
        raise NpcError(f"{source}: a profile must be a mapping of fields (id, name, persona, ...)")
    try:
        return NpcProfile.model_validate(dict(data))
    except ValidationError as e:
        first = e.errors()[0]
        where = _field_path(first["loc"]) or "profile"
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise NpcError(f"{source}: {where}: {first['msg']}{more}", where) from None


def load_profile(path: str | Path) -> NpcProfile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise NpcError(f"{path}: cannot read the file: {e}") from None
    except yaml.YAMLError as e:
        raise NpcError(f"{path}: not valid YAML: {e}") from None
    return parse_profile(data, str(path))


def load_profiles(directory: str | Path, schema: AttributeSchema | None = None) -> dict[str, NpcProfile]:
    """Every ``*.yaml``/``*.yml`` profile in ``directory`` by id; checked against ``schema`` if given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NpcError(f"{directory} is not a directory of NPC profiles", "npcs")
    profiles: dict[str, NpcProfile] = {}
    sources: dict[str, Path] = {}
    for path in sorted(p for p in directory.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file()):
        profile = load_profile(path)
        if profile.id in profiles:
            raise NpcError(f"{path}: id: {profile.id!r} is already used by {sources[profile.id]}", "id")
        if schema is not None:
            try:
                profile.check_against(schema)
            except NpcError as e:
                raise NpcError(f"{path}: {e}", e.field) from None
        profiles[profile.id] = profile
        sources[profile.id] = path
    return profiles
