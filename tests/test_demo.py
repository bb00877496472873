import json

import pytest

from steer.demo import STAGES, DemoConfig, format_report, main


def _check_artifacts(work):
    from steer.artifacts import load_steer_config

    config, schema = load_steer_config(work / "policy", kind="policy")
    assert schema.names == ["helpfulness", "humor", "creativity"]
    assert config["base_model"] == "base" and (work / "policy" / "base" / "model.safetensors").exists()
    assert (work / "policy" / "adapter_model.safetensors").exists()
    load_steer_config(work / "apm", kind="apm")
    report = json.loads((work / "report.json").read_text())
    assert set(report) >= {"steerability", "samples", "timings"}
    for name in ("helpfulness", "humor", "creativity"):
        assert "spearman" in report["steerability"][name]
    assert report["samples"] and {"user", "low", "high"} <= set(report["samples"][0])
    return report


def test_quick_demo_writes_artifacts_and_rerun_skips_stages(tmp_path, capsys, caplog):
    work = tmp_path / "demo"
    assert main(DemoConfig(workdir=str(work), quick=True)) == 0
    report = _check_artifacts(work)
    assert set(report["timings"]) >= set(STAGES)
    out = capsys.readouterr().out
    assert "Steerability" in out and "humor" in out
    for stage in STAGES:
        assert (work / "stages" / f"{stage}.done").exists()

    # A rerun reuses every finished stage: nothing is retrained or regenerated.
    caplog.set_level("INFO", logger="steer.demo")
    before = (work / "policy" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(DemoConfig(workdir=str(work), quick=True)) == 0
    assert (work / "policy" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(STAGES)
    assert json.loads((work / "report.json").read_text())["steerability"] == report["steerability"]


def test_format_report_shows_both_settings_side_by_side():
    report = {
        "samples": [{"npc": "guard", "user": "Can I pass?", "low": {"attributes": {"humor": 0, "creativity": 0},
                                                                     "reply": "Yes."},
                     "high": {"attributes": {"humor": 4, "creativity": 4}, "reply": "Ho ho, only if you dance!"}}],
        "steerability": {"humor": {"spearman": 0.81, "n": 10, "mean_apm_score_by_value": {"0": 0.1, "4": 3.2}}},
        "timings": {"apm": 1.0},
    }
    text = format_report(report)
    line = next(x for x in text.splitlines() if "Yes." in x)
    assert "Ho ho" in line
    assert "0.810" in text


@pytest.mark.slow
def test_full_demo_is_steerable(tmp_path):
    """The README's quickstart: humor and creativity come out steerable."""
    assert main(DemoConfig(workdir=str(tmp_path / "demo"))) == 0
    report = _check_artifacts(tmp_path / "demo")
    assert report["steerability"]["humor"]["spearman"] >= 0.5
    assert report["steerability"]["creativity"]["spearman"] >= 0.5


def test_quick_demo_on_a_pretrained_gguf_base_compares_with_prompt_steering(shared_path, tmp_path, capsys):
    """``--base-model``: LoRA on a real pretrained model (the stories260K GGUF) instead of a tiny
    one built here, with the policy set beside prompt steering of the unmodified base."""
    from steer.artifacts import load_steer_config

    pytest.importorskip("gguf")
    base = shared_path("models", "stories260K", "stories260K.gguf")
    work = tmp_path / "demo"
    assert main(DemoConfig(workdir=str(work), quick=True, base_model=str(base))) == 0
    config, _ = load_steer_config(work / "policy", kind="policy")
    assert config["base_model"] == str(base.resolve())  # recorded as given, so serve reloads it offline
    assert not (work / "policy" / "base").exists() and not (work / "stages" / "base.done").exists()
    report = json.loads((work / "report.json").read_text())
    assert report["mode"] == "base_model"
    rows = {(r["judge"], r["attribute"]) for r in report["comparison"]}
    assert rows == {("demo APM", a) for a in ("helpfulness", "humor", "creativity")}
    assert {"prompt_baseline", "policy_best_of_1", "policy_best_of_2"} <= set(report["comparison"][0])
    assert len(report["general_answers"]) == 3 and all("policy" in a for a in report["general_answers"])
    assert (work / "eval" / "report.json").exists()
    out = capsys.readouterr().out
    assert "prompt steering of the unmodified base" in out
