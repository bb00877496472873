import json

import pytest

from steer.training.demo.pipeline import NO_RESULT_SETTINGS, STAGE_SETTINGS, STAGES, DemoConfig, Stages, format_report, main


def _check_artifacts(work):
    from steer.core.artifacts import load_steer_config

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
    caplog.set_level("INFO", logger="steer.training.demo.pipeline")
    before = (work / "policy" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(DemoConfig(workdir=str(work), quick=True)) == 0
    assert (work / "policy" / "adapter_model.safetensors").stat().st_mtime_ns == before
    assert sum("already done" in r.getMessage() for r in caplog.records) == len(STAGES)
    assert json.loads((work / "report.json").read_text())["steerability"] == report["steerability"]

    # Other evaluation settings: the trained stages are reused, the evaluation runs again with them.
    caplog.clear()
    assert main(DemoConfig(workdir=str(work), quick=True, temperature=0.9, max_new_tokens=8)) == 0
    assert (work / "policy" / "adapter_model.safetensors").stat().st_mtime_ns == before
    reused = [r.getMessage().split()[1].rstrip(":") for r in caplog.records if "already done" in r.getMessage()]
    assert reused == ["apm", "relabel", "base", "sft"]
    assert any("stage evaluate: running again (settings changed: max_new_tokens 24 -> 8, temperature 0.7 -> 0.9)"
               in r.getMessage() for r in caplog.records)
    rerun = json.loads((work / "report.json").read_text())
    assert rerun["settings"]["evaluate"]["temperature"] == 0.9 and rerun["settings"]["evaluate"]["max_new_tokens"] == 8


def test_every_demo_setting_belongs_to_a_stage_or_changes_no_result():
    """A new DemoConfig field must be assigned, or a rerun with it changed would reuse stale stages."""
    from dataclasses import fields

    staged = {name for names in STAGE_SETTINGS.values() for name in names}
    assert {f.name for f in fields(DemoConfig)} == staged | set(NO_RESULT_SETTINGS)
    assert not staged & set(NO_RESULT_SETTINGS)


def test_a_stage_reruns_with_the_stages_after_it_when_its_settings_change(tmp_path):
    """`steer demo --quick` then `steer demo`: the quick run's stages must not be reported as the full run's."""
    calls = []

    def stage(name, out):
        def run():
            assert not out.exists()  # started over: the old output is gone
            out.write_text(name)
            calls.append(name)
        return run

    outs = {name: tmp_path / f"{name}.out" for name in ("a", "b", "c")}

    def run_all(settings):
        stages = Stages(tmp_path)
        for name in ("a", "b", "c"):
            stages.run(name, stage(name, outs[name]), settings[name], lambda name=name: [outs[name]])
        return stages

    quick = {"a": {"epochs": 1}, "b": {"epochs": 1.0}, "c": {"n": 3}}
    run_all(quick)
    assert calls == ["a", "b", "c"]
    run_all(quick)
    assert calls == ["a", "b", "c"]  # all reused
    run_all({**quick, "b": {"epochs": 6.0}})
    assert calls == ["a", "b", "c", "b", "c"]  # a reused; b changed, so b and c ran again
    run_all({**quick, "b": {"epochs": 6.0}})
    assert calls == ["a", "b", "c", "b", "c"]

    # Each stage reports its own peak RSS (Linux), also when reused.
    import numpy as np

    peaks = Stages(tmp_path)
    peaks.run("big", lambda: np.ones(40_000_000).sum(), {})  # 320 MB, freed when the stage ends
    peaks.run("small", lambda: None, {})
    if peaks.peak_rss_gb["small"] is not None:
        assert peaks.peak_rss_gb["big"] - peaks.peak_rss_gb["small"] > 0.25, peaks.peak_rss_gb
        reused = Stages(tmp_path)
        reused.run("big", lambda: None, {})
        assert reused.peak_rss_gb["big"] == peaks.peak_rss_gb["big"]

    # A stage cut short keeps its partial output when resumed with the same settings.
    (tmp_path / "stages" / "c.done").unlink()
    (tmp_path / "stages" / "c.started").write_text(json.dumps({"settings": quick["c"]}))
    outs["c"].write_text("partial")
    seen = []
    Stages(tmp_path).run("c", lambda: seen.append(outs["c"].read_text()), quick["c"], lambda: [outs["c"]])
    assert seen == ["partial"]

    # A marker written before settings were recorded (an older steer): the stage runs again.
    (tmp_path / "stages" / "a.done").write_text(json.dumps({"seconds": 1.0}))
    run_all({**quick, "b": {"epochs": 6.0}})
    assert calls[-3:] == ["a", "b", "c"]

    # A setting a newer steer added: unset, the older record still counts; set, the stage reruns.
    n = len(calls)
    run_all({**quick, "b": {"epochs": 6.0}, "c": {**quick["c"], "new_knob": None}})
    assert calls[n:] == []
    run_all({**quick, "b": {"epochs": 6.0}, "c": {**quick["c"], "new_knob": 3.0}})
    assert calls[n:] == ["c"]


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


@pytest.mark.slow
def test_smollm2_demo_steers_better_than_prompting_the_unmodified_model(shared_path, tmp_path):
    """The issue's run: ``steer demo --base-model`` on SmolLM2-135M-Instruct with its defaults
    (label contrast and label words included) and an OASST-trained judge. The policy beats prompt
    steering of the unmodified model, asked in the same words, on humor and creativity under the
    demo APM and on humor under the OASST judge, at best-of-1."""
    pytest.importorskip("gguf")
    base = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    work = tmp_path / "demo"
    assert main(DemoConfig(workdir=str(work), base_model=str(base),
                           judge_data=str(shared_path("data", "oasst1-en", "messages.jsonl")))) == 0
    report = json.loads((work / "report.json").read_text())
    rows = {(r["judge"], r["attribute"]): r for r in report["comparison"]}
    assert {judge for judge, _ in rows} == {"demo APM", "independent APM"}
    for attribute in ("humor", "creativity"):
        row = rows["demo APM", attribute]
        assert row["policy_best_of_1"] > row["prompt_baseline"], row
    row = rows["independent APM", "humor"]
    assert row["policy_best_of_1"] > row["prompt_baseline"], row
    assert report["sft_label_gain"]["after"] > 0.2, report["sft_label_gain"]


@pytest.mark.gpu
@pytest.mark.slow
def test_smollm2_demo_in_bf16_on_a_gpu(shared_path, tmp_path):
    """Issue 15's GPU run: the same ``steer demo --base-model`` on CUDA, where the GGUF base is
    de-quantised to bf16 for the SFT and the evaluation. Same comparison as on the CPU."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        pytest.skip("needs a CUDA GPU with bf16")
    pytest.importorskip("gguf")
    base = shared_path("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    work = tmp_path / "demo"
    torch.cuda.reset_peak_memory_stats()
    assert main(DemoConfig(workdir=str(work), base_model=str(base),
                           judge_data=str(shared_path("data", "oasst1-en", "messages.jsonl")))) == 0
    report = json.loads((work / "report.json").read_text())
    print("bf16 demo:", json.dumps({"timings": report["timings"], "comparison": report["comparison"],
                                    "label_gain": report["sft_label_gain"],
                                    "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
    rows = {(r["judge"], r["attribute"]): r for r in report["comparison"]}
    for attribute in ("humor", "creativity"):
        row = rows["demo APM", attribute]
        assert row["policy_best_of_1"] > row["prompt_baseline"], row
    assert report["sft_label_gain"]["after"] > 0.02, report["sft_label_gain"]


def test_quick_demo_on_a_pretrained_gguf_base_compares_with_prompt_steering(shared_path, tmp_path, capsys):
    """``--base-model``: LoRA on a real pretrained model (the stories260K GGUF) instead of a tiny
    one built here, with the policy set beside prompt steering of the unmodified base."""
    from steer.core.artifacts import load_steer_config

    pytest.importorskip("gguf")
    base = shared_path("models", "stories260K", "stories260K.gguf")
    work = tmp_path / "demo"
    assert main(DemoConfig(workdir=str(work), quick=True, base_model=str(base))) == 0
    config, _ = load_steer_config(work / "policy", kind="policy")
    assert config["base_model"] == str(base.resolve())  # recorded as given, so serve reloads it offline
    assert config["template"]["label_wording"] == "words"  # this mode's default
    assert not (work / "policy" / "base").exists() and not (work / "stages" / "base.done").exists()
    report = json.loads((work / "report.json").read_text())
    assert report["mode"] == "base_model"
    rows = {(r["judge"], r["attribute"]) for r in report["comparison"]}
    assert rows == {("demo APM", a) for a in ("helpfulness", "humor", "creativity")}
    assert {"prompt_baseline", "policy_best_of_1", "policy_best_of_2"} <= set(report["comparison"][0])
    assert {"difference", "ci95"} <= set(report["comparison"][0]["minus_baseline_best_of_1"])  # paired, over prompts
    assert len(report["general_answers"]) == 3 and all("policy" in a for a in report["general_answers"])
    sft = json.loads((work / "policy" / "sft_metrics.json").read_text())
    assert report["sft_label_gain"] == {"before": sft["eval_label_gain_before"], "after": sft["eval_label_gain_after"]}
    assert isinstance(report["sft_label_gain"]["after"], float)
    assert (work / "eval" / "report.json").exists()
    out = capsys.readouterr().out
    assert "prompt steering of the unmodified base" in out and "SFT label gain" in out


def test_bad_sft_choices_are_refused_before_any_stage_runs(tmp_path):
    from steer.training.demo.pipeline import DemoError

    for bad in ({"label_placement": "middle"}, {"sft_label_contrast_mirror": "both"}, {"label_wording": "emoji"}):
        with pytest.raises(DemoError) as e:
            DemoConfig(workdir=str(tmp_path / "w"), base_model="model.gguf", **bad)
        assert e.value.field == next(iter(bad)) and repr(next(iter(bad.values()))) in str(e.value)
    assert not (tmp_path / "w").exists()
    assert DemoConfig(base_model="model.gguf").sft_label_contrast_mirror == "all"
    assert DemoConfig().sft_label_contrast_mirror is None  # the tiny demo trains without the contrast
    assert DemoConfig(base_model="model.gguf").label_wording == "words"
    assert DemoConfig(base_model="model.gguf", label_wording="numbers").label_wording == "numbers"
    assert DemoConfig().label_wording is None  # the tiny model learns its label line from scratch
