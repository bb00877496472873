"""The training configs: TrainingArguments subclasses with one LoRA dataclass, the same names in
`steer sft` and `steer apm train`, checks that name the field, and no import cycle in training/."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from steer.cli.main import build_parser
from steer.cli.main import main as cli_main
from steer.training.apm import ApmCvConfig, ApmTrainConfig, ApmTrainError
from steer.training.sft import SftConfig, SftError
from steer.training.train_args import LoraArguments, config_dict, save_training_config, trainer_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (SftConfig, ApmTrainConfig, ApmCvConfig)


def _sft(**kw) -> SftConfig:
    return SftConfig(base_model="base", data="data.jsonl", output_dir="out", **kw)


def _apm(**kw) -> ApmTrainConfig:
    return ApmTrainConfig(data="data.jsonl", output_dir="out", **kw)


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_help(cls):
    missing = [f.name for f in dataclasses.fields(cls) if f.init and not f.metadata.get("help")]
    assert not missing


def test_sft_and_apm_share_the_trainer_and_lora_fields_by_name():
    sft = {f.name for f in dataclasses.fields(SftConfig)}
    apm = {f.name for f in dataclasses.fields(ApmTrainConfig)}
    shared = {"learning_rate", "gradient_accumulation_steps", "per_device_train_batch_size", "num_train_epochs",
              "max_steps", "warmup_steps", "lr_scheduler_type", "weight_decay", "save_steps", "save_total_limit",
              "logging_steps", "seed", "report_to", "output_dir", *(f.name for f in dataclasses.fields(LoraArguments))}
    assert shared <= sft and shared <= apm
    for old in ("lr", "grad_accum", "target_modules", "modules_to_save", "epochs", "batch_size", "output",
                "warmup_ratio", "lr_scheduler", "group_by_length", "num_workers"):
        assert old not in sft and old not in apm, old


def test_defaults_are_the_behaviour_before_the_move():
    sft, apm = _sft(), _apm()
    assert (sft.learning_rate, sft.lr_scheduler_type.value, sft.warmup_steps, sft.save_total_limit) == (2e-4, "cosine",
                                                                                                         0.03, 2)
    assert (sft.per_device_train_batch_size, sft.weight_decay, sft.seed, sft.save_steps, sft.logging_steps) == (
        8, 0.0, 0, 100, 10)
    assert sft.train_sampling_strategy == "group_by_length" and sft.save_strategy.value == "steps"
    assert (apm.learning_rate, apm.lr_scheduler_type.value, apm.warmup_steps, apm.save_total_limit) == (1e-4, "linear",
                                                                                                        0.1, 1)
    assert (apm.per_device_train_batch_size, apm.weight_decay, apm.seed, apm.save_strategy.value) == (16, 0.01, 42,
                                                                                                       "epoch")
    assert sft.report_to == apm.report_to == []  # "none": no experiment tracker unless asked
    assert _apm(save_steps=5).save_strategy.value == "steps"  # --save-steps N alone still means every N steps


def test_trainer_receives_the_configs_settings():
    config = _sft(lr_scheduler_type="constant_with_warmup", save_total_limit=5, warmup_steps=7,
                  report_to="tensorboard", learning_rate=3e-3)
    args = trainer_arguments(config, output_dir="elsewhere")
    assert args.output_dir == "elsewhere" and args.lr_scheduler_type.value == "constant_with_warmup"
    assert (args.save_total_limit, args.warmup_steps, args.learning_rate) == (5, 7, 3e-3)
    assert args.report_to == ["tensorboard"]
    assert _sft(report_to="wandb,tensorboard").report_to == ["wandb", "tensorboard"]


def test_cli_flags_come_from_the_dataclass_and_old_spellings_still_parse():
    parser = build_parser(SftConfig, prog="steer sft", description="")
    (config,) = parser.parse_args_into_dataclasses(args=[
        "--base-model", "b", "--data", "d", "--output", "o", "--lr", "0.01", "--grad-accum", "3", "--epochs", "2",
        "--batch-size", "4", "--target-modules", "q_proj", "--target-modules", "v_proj", "--warmup-ratio", "0.2",
        "--modules-to-save", "embed_tokens", "--report-to", "none"])
    assert (config.output_dir, config.learning_rate, config.gradient_accumulation_steps) == ("o", 0.01, 3)
    assert (config.num_train_epochs, config.per_device_train_batch_size, config.warmup_steps) == (2, 4, 0.2)
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.lora_modules_to_save == ["embed_tokens"]
    (new,) = parser.parse_args_into_dataclasses(args=[
        "--base-model", "b", "--data", "d", "--output-dir", "o", "--learning-rate", "0.01",
        "--gradient-accumulation-steps", "3", "--lora-target-modules", "q_proj", "--lr-scheduler-type", "linear",
        "--save-total-limit", "4"])
    assert (new.learning_rate, new.gradient_accumulation_steps, new.lora_target_modules) == (0.01, 3, ["q_proj"])
    assert new.lr_scheduler_type.value == "linear" and new.save_total_limit == 4
    help_text = parser.format_help()
    assert "--lr-scheduler-type" in help_text and "--report-to" in help_text and "--lora-target-modules" in help_text


@pytest.mark.parametrize("make, kwargs, field, error", [
    (_sft, {"lr_scheduler_type": "sometimes"}, "lr_scheduler_type", SftError),
    (_sft, {"learning_rate": 0}, "learning_rate", SftError),
    (_sft, {"per_device_train_batch_size": 0}, "per_device_train_batch_size", SftError),
    (_sft, {"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", SftError),
    (_sft, {"lora_dropout": 1.5}, "lora_dropout", SftError),
    (_sft, {"lora_r": 0}, "lora_r", SftError),
    (_sft, {"save_total_limit": 0}, "save_total_limit", SftError),
    (_sft, {"eval_fraction": 1.0}, "eval_fraction", SftError),
    (_sft, {"template": "jinja"}, "template", SftError),
    (_sft, {"train_sampling_strategy": "shuffled"}, "train_sampling_strategy", SftError),
    (_sft, {"num_train_epochs": 0}, "num_train_epochs", SftError),
    (_apm, {"recipe": "magic"}, "recipe", ApmTrainError),
    (_apm, {"warmup_steps": -1}, "warmup_steps", ApmTrainError),
    (_apm, {"save_strategy": "hourly"}, "save_strategy", ApmTrainError),
    (_apm, {"cv": 1}, "cv", ApmTrainError),
])
def test_bad_settings_raise_an_error_naming_the_field(make, kwargs, field, error):
    with pytest.raises(error) as caught:
        make(**kwargs)
    assert caught.value.field == field


def test_cli_prints_one_line_naming_the_field(capsys):
    assert cli_main(["sft", "--base-model", "b", "--data", "d", "--output-dir", "o", "--lr-scheduler-type", "x"]) == 2
    assert "error [lr_scheduler_type]" in capsys.readouterr().err
    assert cli_main(["apm", "train", "--data", "d", "--output-dir", "o", "--per-device-train-batch-size", "0"]) == 2
    assert "error [per_device_train_batch_size]" in capsys.readouterr().err


def test_saved_config_holds_every_field_as_json(tmp_path):
    config = _sft(learning_rate=1e-3, lora_target_modules=["q_proj"], hub_token="secret")
    saved = json.loads(save_training_config(tmp_path, config).read_text())
    assert set(saved) == set(config_dict(config)) >= {f.name for f in dataclasses.fields(SftConfig)
                                                     if f.init and "gradient_checkpointing" not in f.name}
    assert saved["learning_rate"] == 1e-3 and saved["lora_target_modules"] == ["q_proj"]
    assert saved["lr_scheduler_type"] == "cosine" and saved["base_model"] == "base"
    assert "secret" not in json.dumps(saved)  # tokens are masked, as TrainingArguments.to_dict does


PACKAGE = "steer.training"  # training/ installs as steer.training


def _training_imports() -> dict[str, set[str]]:
    """Module -> the training modules it imports anywhere (top level or inside functions)."""
    graph = {}
    for path in (ROOT / "training").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                deps |= {f"{PACKAGE}.{a.name}" for a in node.names} if node.module == PACKAGE else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith(PACKAGE + ".")}
        graph[f"{PACKAGE}.{path.stem}"] = deps
    return graph


def test_training_modules_import_each_other_without_cycles():
    graph = _training_imports()
    assert "steer.training.apm" not in graph["steer.training.apm_eval"] and "steer.training.apm_eval" in graph["steer.training.apm"]
    state: dict[str, str] = {}

    def visit(module, trail):
        if state.get(module) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [module])}")
        if state.get(module) == "done":
            return
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, trail + [module])
        state[module] = "done"

    for module in graph:
        visit(module, [])


def test_apm_eval_and_apm_data_import_alone_in_a_fresh_interpreter():
    code = ("import sys, steer.training.apm_eval, steer.training.apm_data, steer.training.train_args; "
            "assert 'steer.training.apm' not in sys.modules and 'steer.training.sft' not in sys.modules, sorted(sys.modules); "
            "import steer.training.apm, steer.training.sft; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_apm_uses_the_one_evaluate():
    import steer.training.apm as apm
    import steer.training.apm_eval as apm_eval

    assert apm.evaluate is apm_eval.evaluate
    source = (ROOT / "training" / "apm.py").read_text(encoding="utf-8")
    assert "attribute_metrics(" not in source and "def evaluate" not in source
