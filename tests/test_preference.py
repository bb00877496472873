"""The APM as a reward model: the reward, preference pairs and their accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steer.core.attributes import Attribute, AttributeSchema
from steer.models.reward import RewardError, reward_from_predictions
from steer.training.preference import load_pairs, preference_accuracy, wilson_interval

SCHEMA = AttributeSchema(name="t", attributes=(Attribute("helpfulness", 0, 4, 2), Attribute("toxicity", 0, 4, 0),
                                               Attribute("humor", 0, 4, 0)))


def test_reward_weights_attributes_on_a_common_scale():
    preds = np.array([[4.0, 0.0, 4.0], [2.0, 2.0, 0.0], [0.0, 4.0, 1.0]])
    # Default: helpfulness +1, toxicity -1, humor neutral; each on 0-1.
    assert reward_from_predictions(preds, SCHEMA).tolist() == pytest.approx([1.0, 0.0, -1.0])
    assert reward_from_predictions(preds, SCHEMA, {"humor": 2}).tolist() == pytest.approx([2.0, 0.0, 0.5])
    with pytest.raises(RewardError):
        reward_from_predictions(preds, AttributeSchema(name="s", attributes=(Attribute("humor"),)))
    with pytest.raises(Exception) as e:
        reward_from_predictions(preds, SCHEMA, {"spam": 1})
    assert getattr(e.value, "field", None) == "spam"


class LengthReward:
    """Longer replies score higher."""

    def score(self, conversations, **_):
        return np.array([len(c[-1].content if hasattr(c[-1], "content") else c[-1]["content"])
                         for c in conversations], dtype=float)


def _write_pairs(tmp_path):
    hh = tmp_path / "hh.jsonl"
    rows = [("a much longer and kinder answer", "no"), ("sure thing, here you go", "nope"),
            ("ok", "a long rambling reply that was rejected"), ("yes indeed, friend", "yes indeed, friend")]
    hh.write_text("".join(json.dumps({"chosen": f"\n\nHuman: hi {i}\n\nAssistant: {c}",
                                      "rejected": f"\n\nHuman: hi {i}\n\nAssistant: {r}"}) + "\n"
                          for i, (c, r) in enumerate(rows)))
    hs = tmp_path / "helpsteer.jsonl"
    base = {"correctness": 2, "coherence": 3, "complexity": 1, "verbosity": 1}
    hs_rows = [("What is 2+2?", "4, because two and two make four.", 4), ("What is 2+2?", "5", 0),
               ("Name a colour.", "Blue", 3), ("Name a colour.", "A nice deep red colour", 1),
               ("Say hi.", "hi", 2), ("Say hi.", "hello", 2)]
    hs.write_text("".join(json.dumps({"prompt": p, "response": r, "helpfulness": h, **base}) + "\n"
                          for p, r, h in hs_rows))
    return hh, hs


def test_preference_pairs_and_accuracy_on_a_made_up_set(tmp_path):
    hh, hs = _write_pairs(tmp_path)
    pairs, info = load_pairs(str(hh), "hh")
    assert len(pairs) == 4
    result = preference_accuracy(LengthReward(), pairs)
    # Longer wins in pairs 0 and 1, loses pair 2, ties pair 3 (counted half): 2.5 / 4.
    assert result["accuracy"] == pytest.approx(0.625) and result["n"] == 4
    assert result["ci95"] == wilson_interval(0.625, 4)
    lo, hi = result["ci95"]
    assert lo < 0.625 < hi

    pairs, info = load_pairs(str(hs), "helpsteer")
    assert len(pairs) == 2 and info["skipped_ties"] == 1  # "Say hi." responses are rated alike
    assert [p[0][-1].content for p in pairs] == ["4, because two and two make four.", "Blue"]
    result = preference_accuracy(LengthReward(), pairs)
    assert result["accuracy"] == pytest.approx(0.5)


def test_wilson_interval_known_values():
    assert wilson_interval(0.5, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson_interval(1.0, 10)[1] == 1.0


def test_eval_preference_cli_prints_accuracy_json(tmp_path, tiny_apm_dir, capsys):
    from steer.cli.main import main as cli

    _, hs = _write_pairs(tmp_path)
    assert cli(["eval", "preference", "--apm", str(tiny_apm_dir), "--data", str(hs), "--format", "helpsteer",
                "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0 and len(out["ci95"]) == 2
    assert cli(["eval", "preference", "--apm", str(tiny_apm_dir), "--data", str(hs), "--format", "oasst"]) == 2
    assert "[format]" in capsys.readouterr().err
