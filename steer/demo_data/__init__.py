"""The small, game-flavoured dataset bundled with steer for ``steer demo``.

Players talk to NPCs (a blacksmith, an innkeeper, a guard, ...) and the NPC replies are rated
0-4 on helpfulness, humor and creativity. The files are generated deterministically by
:mod:`steer.training.demo.build_data` from a hand-written fragment library (data, not library
code, so it stays out of the installed package); see README.md here.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DATA_DIR = Path(__file__).parent

__all__ = ["DEMO_DATA_DIR", "rated_path", "unrated_path", "prompts_path"]


def rated_path() -> Path:
    """Rated conversations (assistant turns carry ``labels``), native steer JSONL."""
    return DEMO_DATA_DIR / "rated.jsonl"


def unrated_path() -> Path:
    """Unrated conversations (no ``labels``) for the APM to relabel, native steer JSONL."""
    return DEMO_DATA_DIR / "unrated.jsonl"


def prompts_path() -> Path:
    """Held-out player lines with NPC personas (``npc``, ``system``, ``user``) for evaluation."""
    return DEMO_DATA_DIR / "prompts.jsonl"
