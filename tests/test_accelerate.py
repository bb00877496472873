"""`steer sft` and `steer apm train` scaled out with `accelerate launch`: two CPU processes (gloo)
against one process with the same global batch. Each process of the launch records what it
trained on and wrote (tests/accelerate_probe.py); the checkpoints' trainer_state.json hold the
loss curves.

On CPU the launch is `accelerate launch --multi_gpu --num_processes 2` (torch.distributed.run;
without GPUs accelerate picks the gloo backend): `--cpu --num_processes 2` starts a single process
unless MPI is set up, which this also checks, so the docs do not tell CPU users to run it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from steer.demo_data import rated_path
from tests.support.assets import shared_path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "accelerate_probe.py"
STEPS = 4
PER_DEVICE = 4
# The same examples in the same order reach the model in both runs (checked below), so the curves
# differ only by float summation order across the two processes: measured |diff| < 1e-6.
LOSS_RTOL = 1e-4


def _env(probe_dir: Path) -> dict:
    env = dict(os.environ, STEER_PROBE_DIR=str(probe_dir), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], workdir: Path) -> tuple[dict, Path]:
    """One process with batch 2 x PER_DEVICE, and (at the same time) two with PER_DEVICE each;
    returns the probe records and output dirs as {"single": ..., "ddp": ...}."""
    runs = {}
    for name, prefix, batch in (
        ("single", [sys.executable, str(PROBE)], 2 * PER_DEVICE),
        ("ddp", [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(_free_port()), str(PROBE)], PER_DEVICE),
    ):
        out = workdir / name
        cmd = [*prefix, *args, "--per-device-train-batch-size", str(batch), "--output-dir", str(out / "artifact")]
        log = open(workdir / f"{name}.log", "w")
        runs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(out), stdout=log, stderr=subprocess.STDOUT), out, log)
    results = {}
    for name, (proc, out, log) in runs.items():
        rc = proc.wait(timeout=600)
        log.close()
        assert rc == 0, f"{name} run failed:\n{(workdir / f'{name}.log').read_text()[-4000:]}"
        results[name] = {"records": {r["rank"]: r for r in map(json.loads, map(Path.read_text,
                                                                                  out.glob("rank-*.json")))},
                         "artifact": out / "artifact"}
    return results


def _losses(checkpoint_root: Path) -> list[float]:
    (state,) = checkpoint_root.glob(f"checkpoint-{STEPS}/trainer_state.json")
    return [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h]


def _check_sharding(results: dict) -> None:
    """Every step, the two processes train on disjoint halves of the single process's batch (the
    runs stay inside the first epoch, so no shard is padded by wrapping around)."""
    ddp, single = results["ddp"]["records"], results["single"]["records"]
    assert sorted(ddp) == [0, 1] and list(single) == [0]
    assert {r["num_processes"] for r in ddp.values()} == {2} and single[0]["num_processes"] == 1
    assert {r["backend"] for r in ddp.values()} == {"gloo"}
    for step in range(STEPS):
        window = slice(step * PER_DEVICE, (step + 1) * PER_DEVICE)
        rank0, rank1 = ddp[0]["train_ids"][window], ddp[1]["train_ids"][window]
        assert len(rank0) == len(rank1) == PER_DEVICE
        assert not set(rank0) & set(rank1), f"step {step}: both processes trained on {set(rank0) & set(rank1)}"
        # Together the two shards are exactly the single process's batch of that step.
        assert sorted(rank0 + rank1) == sorted(single[0]["train_ids"][2 * step * PER_DEVICE:2 * (step + 1) * PER_DEVICE])


def _sft_args() -> list[str]:
    return ["sft", "--base-model", str(shared_path("models", "stories260K")), "--data", str(rated_path()),
            "--limit", "48", "--max-steps", str(STEPS), "--max-length", "128", "--eval-fraction", "0",
            # Same sampler on both sides (length grouping sizes its mega-batches per process), and no
            # dropout: each process would draw its own masks.
            "--train-sampling-strategy", "random", "--lora-dropout", "0", "--learning-rate", "5e-3",
            "--logging-steps", "1", "--save-steps", str(STEPS), "--keep-checkpoints"]


def test_sft_under_accelerate_launch_shards_the_data_and_matches_one_process(tmp_path):
    results = _launch(_sft_args(), tmp_path)
    _check_sharding(results)
    single, ddp = (_losses(results[k]["artifact"] / "checkpoints") for k in ("single", "ddp"))
    assert len(single) == len(ddp) == STEPS
    assert ddp == pytest.approx(single, rel=LOSS_RTOL)
    assert single[-1] < single[0]  # it trained
    # Only the first process writes the policy; it is complete and carries the full config.
    assert results["ddp"]["records"][0]["writes"] == ["save_policy"] and results["ddp"]["records"][1]["writes"] == []
    policy = results["ddp"]["artifact"]
    assert (policy / "adapter_model.safetensors").exists() and (policy / "steer_config.json").exists()
    saved = json.loads((policy / "training_config.json").read_text())
    assert saved["per_device_train_batch_size"] == PER_DEVICE and saved["lr_scheduler_type"] == "cosine"
    assert json.loads((policy / "sft_run.json").read_text())["state"] == "finished"


@pytest.fixture(scope="module")
def dropout_free_bert(tiny_bert_backbone, tmp_path_factory):
    """The tests' tiny random BERT without dropout (each process would draw its own masks)."""
    import shutil

    from transformers import BertModel

    out = tmp_path_factory.mktemp("bert")
    BertModel.from_pretrained(tiny_bert_backbone, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
                              ).save_pretrained(out)
    for path in tiny_bert_backbone.iterdir():
        if path.is_file() and not path.name.startswith(("model", "config")):
            shutil.copy(path, out / path.name)
    return out


def test_apm_finetune_under_accelerate_launch_shards_the_data_and_matches_one_process(tmp_path, dropout_free_bert):
    args = ["apm", "train", "--recipe", "finetune", "--backbone", str(dropout_free_bert),
            "--data", str(shared_path("data", "oasst1-en", "messages.jsonl")), "--format", "oasst", "--limit", "40",
            "--max-steps", str(STEPS), "--max-length", "64", "--learning-rate", "1e-3", "--eval-fraction", "0",
            "--logging-steps", "1", "--save-steps", str(STEPS), "--keep-checkpoints", "--device", "cpu"]
    results = _launch(args, tmp_path)
    _check_sharding(results)
    single, ddp = (_losses(results[k]["artifact"]) for k in ("single", "ddp"))
    assert len(single) == len(ddp) == STEPS
    assert ddp == pytest.approx(single, rel=LOSS_RTOL)
    records = results["ddp"]["records"]
    assert records[0]["writes"] == ["save_steer_config", "save_training_config"] and records[1]["writes"] == []
    apm = results["ddp"]["artifact"]
    assert (apm / "model.safetensors").exists() and (apm / "steer_config.json").exists()
    assert json.loads((apm / "training_config.json").read_text())["recipe"] == "finetune"


def test_accelerate_launch_cpu_flag_starts_one_process(tmp_path):
    """Why the docs and tests use --multi_gpu on CPU: `--cpu --num_processes 2` runs the script once."""
    script = tmp_path / "world.py"
    script.write_text("import os, sys\nprint('WORLD', os.environ.get('WORLD_SIZE', '1'))\n")
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                         capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("WORLD") == 1 and "WORLD 1" in out.stdout


def _doc_yaml_blocks() -> dict[str, str]:
    """The accelerate config files docs/sft.md shows, by the file name in their first comment."""
    text = (ROOT / "docs" / "sft.md").read_text(encoding="utf-8")
    blocks = {}
    for block in text.split("```yaml\n")[1:]:
        body = block.split("```")[0]
        blocks[body.splitlines()[0].lstrip("# ").strip()] = body
    return blocks


def test_the_deepspeed_and_fsdp_configs_in_the_docs_are_ones_accelerate_reads(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    blocks = _doc_yaml_blocks()
    assert set(blocks) == {"ds_zero2.yaml", "fsdp.yaml"}
    options = {a.dest for a in launch_command_parser()._actions}
    for name, body in blocks.items():
        path = tmp_path / name
        path.write_text(body)
        config = ClusterConfig.from_yaml_file(path)  # raises on a key accelerate does not know
        section = config.deepspeed_config if name.startswith("ds") else config.fsdp_config
        assert section and set(section) <= options, set(section) - options
        assert config.distributed_type.value == ("DEEPSPEED" if name.startswith("ds") else "FSDP")


def test_a_command_leaves_the_process_group_it_ran_in(tmp_path):
    """Each rank of a launch leaves its process group when the command ends, even on an error,
    rather than leaving the group to be torn down at interpreter exit."""
    import torch.distributed as dist

    from steer.cli.main import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        code = main(["sft", "--base-model", "unused", "--data", str(tmp_path / "missing.jsonl"),
                     "--output-dir", str(tmp_path / "out")])
        assert code == 2  # the missing data file, reported as a CLI error
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
