"""The shipped demo data is exactly what its generator writes (the builder lives outside the package)."""

from __future__ import annotations

from steer.demo_data import DEMO_DATA_DIR
from steer.training.demo import build_data


def test_shipped_demo_files_are_the_builders_output(tmp_path):
    build_data.build(tmp_path)
    for name in ("rated.jsonl", "unrated.jsonl", "prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO_DATA_DIR / name).read_bytes(), name


def test_fragment_levels_load_as_ints():
    fragments = build_data.load_fragments()
    humor = next(iter(fragments["npcs"].values()))["humor"]
    assert sorted(humor) == [1, 2, 3, 4]
    assert all(len(p) == 5 for p in fragments["prompts"])
