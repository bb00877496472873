"""The ``steer_config.json`` every trained artifact carries beside its weights.

It records the attribute schema and the prompt template settings the artifact was trained
with, so loading it restores exactly the conditioning it understands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steer.core.attributes import AttributeSchema, AttributeValueError
from steer.core.errors import SteerError
from steer.models.gguf_files import is_gguf_path, steer_config_from_gguf

STEER_CONFIG = "steer_config.json"
FORMAT_VERSION = 1


class ArtifactError(SteerError, ValueError):
    """A directory that is not a usable steer artifact."""


def save_steer_config(
    directory: str | Path, kind: str, schema: AttributeSchema, template: dict[str, Any] | None = None, **extra: Any
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "schema": schema.to_dict(),
        "template": template or {"type": "steerlm"},
        **extra,
    }
    path = directory / STEER_CONFIG
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_steer_config(directory: str | Path, kind: str | None = None) -> tuple[dict[str, Any], AttributeSchema]:
    """The saved config and its schema; ``kind`` (``"apm"``/``"policy"``) is checked if given.
    A ``.gguf`` file from ``steer export gguf`` carries the same settings as metadata."""
    if is_gguf_path(directory):
        data = steer_config_from_gguf(directory)
        try:
            schema = AttributeSchema.from_dict(data["schema"])
        except (KeyError, AttributeValueError) as e:
            raise ArtifactError(f"{directory}: its steer.schema is unreadable: {e}") from None
    else:
        path = Path(directory) / STEER_CONFIG
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a steer artifact: {STEER_CONFIG} is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            schema = AttributeSchema.from_dict(data["schema"])
        except (json.JSONDecodeError, KeyError, AttributeValueError) as e:
            raise ArtifactError(f"{path} is unreadable: {e}") from None
    if kind is not None and data.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {data.get('kind')!r} artifact, not a {kind!r}")
    return data, schema
