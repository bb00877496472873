"""steer sft never loses or mixes up work: half-written checkpoints are skipped, a resume must
match the run it continues, a finished run says so, and the policy is renamed into place whole."""

from __future__ import annotations

import json
import logging

import pytest

from steer.training.sft import RUN_FILE, SftConfig, SftError, main


@pytest.fixture
def sft_cfg(tiny_base, sft_conversations, write_conversations):
    """``sft_cfg(tmp_path, **kw)``: SftConfig fields for a 4-step run on 24 conversations in ``tmp_path``."""
    def cfg(tmp_path, **kw):
        data = tmp_path / "train.jsonl"
        if not data.exists():
            write_conversations(data, sft_conversations(24))
        return dict(base_model=str(tiny_base), data=str(data), output_dir=str(tmp_path / "policy"), max_steps=4,
                    per_device_train_batch_size=4, save_steps=2, eval_fraction=0.0, logging_steps=1, **kw)

    return cfg


def test_a_half_written_checkpoint_is_skipped_on_resume(sft_cfg, tiny_base, tmp_path, monkeypatch, caplog):
    from transformers import Trainer

    cfg = sft_cfg(tmp_path)
    save = Trainer._save_optimizer_and_scheduler
    saves = []

    def killed_while_saving_the_second(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed while writing a checkpoint")
        return save(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_while_saving_the_second)
    with pytest.raises(KeyboardInterrupt):
        main(SftConfig(**cfg))
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    checkpoints = tmp_path / "policy" / "checkpoints"
    assert (checkpoints / "checkpoint-4").is_dir() and not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()
    with caplog.at_level(logging.WARNING, logger="steer.training.sft"):
        metrics = main(SftConfig(**cfg, resume=True))
    assert metrics["global_step"] == 4
    assert any("checkpoint-4" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "policy" / "adapter_model.safetensors").exists()


def test_resume_with_other_settings_or_data_is_refused(sft_cfg, sft_conversations, write_conversations, tiny_base, tmp_path, monkeypatch):
    from transformers import Trainer

    cfg = sft_cfg(tmp_path)
    step = Trainer.training_step
    calls = []

    def dies_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(SftConfig(**cfg))
    monkeypatch.setattr(Trainer, "training_step", step)
    with pytest.raises(SftError, match="lora_r") as info:
        main(SftConfig(**{**cfg, "lora_r": 4}, resume=True))
    assert info.value.field == "resume"
    data = tmp_path / "train.jsonl"
    original = data.read_bytes()
    write_conversations(data, sft_conversations(25))
    with pytest.raises(SftError, match="data_sha256"):
        main(SftConfig(**cfg, resume=True))
    data.write_bytes(original)
    # A run begun by an older steer, whose record lacks settings added since: at their defaults it
    # resumes; set otherwise it is another run.
    record_file = tmp_path / "policy" / RUN_FILE
    record = json.loads(record_file.read_text())
    for added in ("label_contrast", "label_contrast_margin", "label_contrast_mirror"):
        del record["fingerprint"][added]
    record_file.write_text(json.dumps(record))
    with pytest.raises(SftError, match="label_contrast"):
        main(SftConfig(**cfg, resume=True, label_contrast=1.0))
    assert main(SftConfig(**cfg, resume=True))["global_step"] == 4


def test_a_finished_run_is_finished_and_another_run_never_overwrites_it(sft_cfg, tiny_base, tmp_path, monkeypatch):
    from transformers import Trainer

    cfg = sft_cfg(tmp_path)
    first = main(SftConfig(**cfg))
    out = tmp_path / "policy"
    adapter = (out / "adapter_model.safetensors").read_bytes()

    trained = []
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: trained.append(1))
    assert main(SftConfig(**cfg, resume=True)) == first  # says it is finished, trains nothing
    assert trained == []
    with pytest.raises(SftError, match="already holds the finished policy"):
        main(SftConfig(**cfg))
    with pytest.raises(SftError, match="other settings"):
        main(SftConfig(**{**cfg, "learning_rate": 1e-3}))
    assert trained == [] and (out / "adapter_model.safetensors").read_bytes() == adapter
    monkeypatch.undo()

    # Files steer did not write are never replaced.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SftError, match="did not write"):
        main(SftConfig(**{**cfg, "output_dir": str(foreign), "overwrite": True}))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_overwrite_renames_the_new_policy_into_place_and_leaves_nothing_old(sft_cfg, tiny_base, tmp_path, monkeypatch):
    from steer.training import sft

    cfg = sft_cfg(tmp_path, merge=True)
    main(SftConfig(**cfg))
    out = tmp_path / "policy"
    assert (out / "merged").is_dir()
    old_adapter = (out / "adapter_model.safetensors").read_bytes()

    # A kill while the new policy is written: the old one is untouched.
    card = sft.policy_card
    monkeypatch.setattr(sft, "policy_card", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        main(SftConfig(**{**cfg, "merge": False, "learning_rate": 5e-3}, overwrite=True))
    monkeypatch.setattr(sft, "policy_card", card)
    assert (out / "adapter_model.safetensors").read_bytes() == old_adapter and (out / "merged").is_dir()

    main(SftConfig(**{**cfg, "merge": False, "learning_rate": 5e-3}, overwrite=True))
    assert not (out / "merged").exists(), "a file of the previous policy survived in the new one"
    assert (out / "adapter_model.safetensors").read_bytes() != old_adapter
    assert (out / RUN_FILE).exists()
    assert not list(tmp_path.glob(".policy.*"))
