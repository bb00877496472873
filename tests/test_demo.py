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
    """The README's quickstart: under 10 minutes on 2 cores, humor and creativity steerable."""
    import time

    start = time.perf_counter()
    assert main(DemoConfig(workdir=str(tmp_path / "demo"))) == 0
    elapsed = time.perf_counter() - start
    report = _check_artifacts(tmp_path / "demo")
    assert report["steerability"]["humor"]["spearman"] >= 0.5
    assert report["steerability"]["creativity"]["spearman"] >= 0.5
    assert elapsed < 600
