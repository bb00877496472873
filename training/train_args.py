"""What ``steer sft`` and ``steer apm train`` share: their configs are ``transformers.TrainingArguments``
(as TRL's are), plus one LoRA dataclass, so a setting has one name in both, every Trainer option
(``--lr-scheduler-type``, ``--save-total-limit``, ``--report-to wandb``, ``--deepspeed``, ...) is a
flag of both, and each config is saved whole, as JSON, beside what it trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

from transformers import TrainingArguments

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

TRAINING_CONFIG_FILE = "training_config.json"
# Deprecated TrainingArguments spellings that __post_init__ folds into their new fields; copying
# them again would repeat the deprecation warning.
_DEPRECATED_FIELDS = ("gradient_checkpointing", "gradient_checkpointing_kwargs")


class TrainingConfigError(SteerError, ValueError):
    """A bad training setting; ``field`` names it."""


@dataclass
class LoraArguments:
    """LoRA settings, the same for ``steer sft`` (always LoRA) and ``steer apm train --lora``."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the adapter's scale is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Module names to adapt (repeatable; peft names, or all-linear). Default: steer sft adapts "
                          "the attention + MLP projections of the architecture (else every Linear layer except the "
                          "output head); steer apm train adapts all-linear.",
                  "aliases": ["--target-modules", "--target_modules"]},
    )
    lora_modules_to_save: list[str] = field(
        default_factory=list,
        metadata={"help": "Modules trained in full and saved with the adapter (repeatable), e.g. embed_tokens when "
                          "the label tokens are new to the base model.",
                  "aliases": ["--modules-to-save", "--modules_to_save"]},
    )


@dataclass
class SteerTrainingArguments(LoraArguments, TrainingArguments):
    """``TrainingArguments`` with steer's defaults; subclasses add their own fields and checks.

    ``__post_init__`` turns every bad value into ``error_class`` naming the field, so the CLI prints
    one line instead of a traceback."""

    error_class: ClassVar[type[TrainingConfigError]] = TrainingConfigError

    output_dir: str = field(
        kw_only=True,
        metadata={"help": "Directory to write (the trained artifact, and checkpoints while training).",
                  "aliases": ["--output"]},
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs.", "aliases": ["--epochs"]})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Examples per device per step.", "aliases": ["--batch-size", "--batch_size"]}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Steps whose gradients are summed before each optimizer update.",
                             "aliases": ["--grad-accum", "--grad_accum"]}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW).", "aliases": ["--lr"]})
    warmup_steps: float = field(
        default=0.0,
        metadata={"help": "Linear warmup: a number of steps, or a fraction of all steps when below 1.",
                  "aliases": ["--warmup-ratio", "--warmup_ratio"]},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    report_to: str | None = field(
        default="none",
        metadata={"help": "Where to send the training logs: none, or an installed integration (wandb, tensorboard, "
                          "mlflow, trackio, ...), several separated by commas, or all."},
    )
    save_steps: float = field(
        default=0,
        metadata={"help": "Write a resumable checkpoint every N steps (a fraction below 1: of all steps). A positive "
                          "value with --save-strategy epoch switches it to steps."},
    )

    def __post_init__(self):
        err = self.error_class
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise err(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}", name)
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise err("--num-train-epochs must be positive (or give --max-steps)", "num_train_epochs")
        if self.learning_rate <= 0:
            raise err(f"--learning-rate must be positive, got {self.learning_rate}", "learning_rate")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise err(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}", "lora_dropout")
        if self.warmup_steps < 0:
            raise err(f"--warmup-steps must not be negative, got {self.warmup_steps}", "warmup_steps")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise err(f"--save-total-limit must be at least 1, got {self.save_total_limit}", "save_total_limit")
        if self.logging_steps <= 0:
            raise err(f"--logging-steps must be positive, got {self.logging_steps}", "logging_steps")
        if isinstance(self.report_to, str) and "," in self.report_to:
            self.report_to = [s.strip() for s in self.report_to.split(",") if s.strip()]
        self._check_choices()
        if self.save_steps and _value(self.save_strategy) == "epoch":
            self.save_strategy = "steps"
        if self.eval_steps and _value(self.eval_strategy) == "epoch":
            self.eval_strategy = "steps"
        if not self.save_steps and _value(self.save_strategy) == "steps":
            raise err("--save-steps must be positive with --save-strategy steps", "save_steps")
        if not self.use_cpu:
            import torch

            # Said outright where it is so: accelerate's process state is built from this flag, and
            # without it, processes launched on a machine without GPUs would not see each other.
            self.use_cpu = not torch.cuda.is_available()
        try:
            super().__post_init__()
        except (ValueError, ImportError) as e:  # TrainingArguments' own checks (a missing integration, ...)
            raise err(f"invalid training arguments: {e}", None) from None

    def _check_choices(self) -> None:
        from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType
        from transformers.training_args import OptimizerNames

        for name, enum in (("lr_scheduler_type", SchedulerType), ("save_strategy", SaveStrategy),
                           ("eval_strategy", IntervalStrategy), ("logging_strategy", IntervalStrategy),
                           ("optim", OptimizerNames)):
            allowed = [e.value for e in enum]
            if _value(getattr(self, name)) not in allowed:
                raise self.error_class(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                       f"got {getattr(self, name)!r}", name)
        strategies = ("random", "sequential", "group_by_length", "batch_rebalance")
        if self.train_sampling_strategy not in strategies:
            raise self.error_class(f"--train-sampling-strategy must be one of {', '.join(strategies)}, "
                                   f"got {self.train_sampling_strategy!r}", "train_sampling_strategy")


def _value(x):
    return x.value if isinstance(x, Enum) else x


def trainer_arguments(config: TrainingArguments, **overrides) -> TrainingArguments:
    """A plain ``TrainingArguments`` holding the config's Trainer settings, with ``overrides``
    (where steer decides for the Trainer: the checkpoint folder, columns it must keep, ...)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainingArguments)
              if f.init and f.name not in _DEPRECATED_FIELDS}
    values.update(overrides)
    return TrainingArguments(**values)


def config_dict(config: TrainingArguments) -> dict:
    """Every field of the config as JSON values (tokens masked, as ``TrainingArguments.to_dict`` does)."""
    values = config.to_dict()
    return {k: v for k, v in values.items() if k not in _DEPRECATED_FIELDS}


def save_training_config(directory: str | Path, config: TrainingArguments) -> Path:
    """Write the full config beside an artifact, so a reader can see (and repeat) every setting."""
    path = Path(directory) / TRAINING_CONFIG_FILE
    path.write_text(json.dumps(config_dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def world_size() -> int:
    """Processes in this run (``accelerate launch`` / ``torchrun`` set WORLD_SIZE)."""
    import os

    return int(os.environ.get("WORLD_SIZE", 1))


def distributed_state(cpu: bool):
    """accelerate's process state, set up as the Trainer will set it up. It is one object per
    process, fixed by its first creation: created without ``cpu=True`` on a machine without GPUs it
    would not see the other processes (a plain ``PartialState()`` there is never distributed)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def is_main_process(cpu: bool) -> bool:
    return world_size() == 1 or distributed_state(cpu).is_main_process


def on_main_process(cpu: bool, fn, *args, **kwargs):
    """Run ``fn`` on the main process only and hand its result to every process.

    For what must happen once before training (checking the output directory, writing the run
    record): each rank doing it at once races on the same files. A ``SteerError`` raised on the
    main process is raised on every process, so none waits forever for the others."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    state = distributed_state(cpu)
    if state.num_processes != world_size():
        raise RuntimeError(f"WORLD_SIZE is {world_size()} but accelerate sees {state.num_processes} processes")
    payload = [None]
    if state.is_main_process:
        try:
            payload = [("ok", fn(*args, **kwargs))]
        except SteerError as e:
            payload = [("error", (type(e), str(e), e.field))]
    broadcast_object_list(payload, from_process=0)
    kind, value = payload[0]
    if kind == "error":
        cls, message, name = value
        raise cls(message, name)
    return value
