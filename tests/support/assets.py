"""The real assets in the shared folder (see /work/shared/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("STEER_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
REPO = Path(__file__).resolve().parents[2]


def shared_path(*parts: str) -> Path:
    """The path of a shared asset; skips the calling test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared asset {path} is absent (set STEER_SHARED to the shared/ folder)")
    return path
