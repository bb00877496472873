"""Attribute-conditioned supervised fine-tuning (``steer sft``): LoRA on any causal LM.

Every assistant turn is rendered by :class:`steer.core.template.PromptTemplate` with its own labels
in front of it (``<extra_id_2>helpfulness:3,humor:4,...``), and the loss covers only what the
template marks trainable: the replies and the marker that ends them. The model thereby learns
to write a reply *with* the attribute values it is given, which is what makes it steerable.

Built on ``transformers.Trainer`` so ``accelerate launch -m steer.cli.main sft ...`` (or
``accelerate launch $(which steer) sft ...``) scales it to several GPUs, with real epochs,
an eval split that never shares a conversation group with training, step checkpoints and
``--resume`` after a crash. Batches are grouped by length so almost every token is real.

The output directory is a policy directory as :mod:`steer.models.policy` documents it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from steer.core.artifacts import load_steer_config, save_steer_config
from steer.core.attributes import AttributeSchema, get_schema
from steer.core.conversation import Conversation
from steer.data import format_histogram, grouped_split, label_histogram, load_conversations, trained_values, unseen_values
from steer.core.template import IGNORE_INDEX, ChatTemplatePrompt, PromptTemplate
from steer.training.model_card import policy_card
from steer.training.train_args import (
    SteerTrainingArguments,
    TrainingConfigError,
    on_main_process,
    save_training_config,
    trainer_arguments,
)

logger = logging.getLogger(__name__)

# Attention and MLP projections of the common decoder families (llama, mistral, qwen2/3,
# gemma, phi3 use the first seven; gpt2 the Conv1D trio; gpt-neox/falcon the rest).
PREFERRED_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "c_attn", "c_proj", "c_fc",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "qkv_proj", "gate_up_proj",
)
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "sft_metrics.json"
# torch asks for an explicit choice and recommends the non-reentrant implementation, which also
# handles inputs that need no gradient (a frozen, 4-bit base).
CHECKPOINTING_KWARGS = {"use_reentrant": False}
CONTRAST_MIRRORS = ("all", "one")


class SftError(TrainingConfigError):
    """Bad SFT input or settings; ``field`` names the flag."""


@dataclass
class SftConfig(SteerTrainingArguments):
    """``steer sft``: ``transformers.TrainingArguments`` (every Trainer option is a flag) with LoRA and
    steer's own settings. Defaults differ from the Trainer's where SFT wants them to."""

    error_class: ClassVar[type[TrainingConfigError]] = SftError

    base_model: str = field(kw_only=True, metadata={"help": "Base causal LM: a hub id or a local directory "
                                                            "(transformers format with safetensors weights)."})
    data: str = field(kw_only=True, metadata={"help": "Training conversations (what `steer relabel` writes)."})
    output_dir: str = field(
        kw_only=True,
        metadata={"help": "Policy directory to write (adapter, tokenizer, config; checkpoints in OUTPUT_DIR/checkpoints "
                          "while training).", "aliases": ["--output"]},
    )
    format: str = field(default="steer", metadata={"help": "Data format (steer, oasst, helpsteer, table, ...)."})
    schema: str | None = field(
        default=None,
        metadata={"help": "Attribute schema: a built-in name, a YAML/JSON file or a steer artifact directory "
                  "(e.g. the APM). Default: the attributes the data's labels use."},
    )
    template: str = field(
        default="steerlm", metadata={"help": "Prompt format: steerlm, or chat_template (the tokenizer's own)."}
    )
    label_placement: str = field(
        default="reply",
        metadata={"help": "With --template chat_template: where the attribute labels go. reply: SteerLM's place, "
                  "opening the assistant turn; system: closing the system message, so the reply stays in the base "
                  "model's own format (trains on the last reply of each conversation)."},
    )
    label_wording: str = field(
        default="numbers",
        metadata={"help": "How the label line writes the values. numbers: SteerLM's humor:0,creativity:3; words: each "
                  "value as its attribute's level word from the schema, (completely serious; vivid and imaginative), "
                  "which an instruction-tuned base reads before any training (docs/sft.md)."},
    )
    default_system: str = field(default="", metadata={"help": "System prompt used when a conversation has none."})
    add_marker_tokens: bool = field(
        default=True,
        metadata={"help": "When the base's tokenizer splits a template marker (<extra_id_1> ...) into several tokens, "
                  "add the markers to its vocabulary as single tokens (embeddings resized, trained in full and saved "
                  "with the policy), so replies end reliably. --no-add-marker-tokens only warns."},
    )
    max_length: int = field(default=1024, metadata={"help": "Longer examples are truncated to this many tokens."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of conversation groups held out for eval loss."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many conversations."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit (CUDA + bitsandbytes)."})
    dtype: str = field(default="auto", metadata={"help": "Base weights dtype: auto, float32, bfloat16, float16."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint in OUTPUT_DIR/checkpoints."})
    overwrite: bool = field(
        default=False, metadata={"help": "Train again into an OUTPUT_DIR that holds a policy steer sft wrote before "
                                         "(it is replaced only once the new one is complete)."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep OUTPUT_DIR/checkpoints after training ends."})
    merge: bool = field(default=False, metadata={"help": "Also write base + adapter merged into OUTPUT_DIR/merged."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    label_contrast: float = field(
        default=0.0,
        metadata={"help": "Weight of the label-contrast term (steer.training.label_contrast): each labelled reply is "
                          "also scored under mirrored labels, and the loss asks it to be likelier under its own by "
                          "--label-contrast-margin nats per token. Makes a pretrained base use its labels within "
                          "fewer steps; costs up to a second forward and backward pass. 0: plain SteerLM SFT."},
    )
    label_contrast_margin: float = field(
        default=0.3, metadata={"help": "Label-contrast margin in nats per reply token (the unit of the label gain)."}
    )
    label_contrast_mirror: str = field(
        default="all",
        metadata={"help": "What each contrast copy mirrors. all: every label at once (the attribute learned first "
                          "can then meet the margin for the rest); one: a single label per reply, taking turns among "
                          "the labels off their scale's midpoint, so every attribute has to earn the margin itself "
                          "(slower to start: each attribute gets a third of the copies), and the log shows the gap "
                          "per attribute."},
    )
    label_gain_by_attribute: bool = field(
        default=False,
        metadata={"help": "After training, also measure the label gain of each attribute alone (only its label "
                          "mirrored): which sliders the policy learned. One more pass over the labelled eval "
                          "replies per attribute."},
    )

    # TrainingArguments fields whose defaults differ for SFT.
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW).", "aliases": ["--lr"]})
    warmup_steps: float = field(
        default=0.03,
        metadata={"help": "Linear warmup: a number of steps, or a fraction of all steps when below 1.",
                  "aliases": ["--warmup-ratio", "--warmup_ratio"]},
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule (transformers SchedulerType names)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for the split, LoRA init and data order."})
    save_strategy: str = field(default="steps", metadata={"help": "When to checkpoint: steps, epoch or no."})
    save_steps: float = field(default=100, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept in OUTPUT_DIR/checkpoints."})
    eval_strategy: str = field(
        default="epoch",
        metadata={"help": "When to compute the held-out loss: epoch, steps (every --eval-steps) or no. A positive "
                          "--eval-steps with epoch switches it to steps."},
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "Batch order: group_by_length (examples of similar length together, little padding), "
                          "random, sequential or batch_rebalance."},
    )

    def __post_init__(self):
        for name in ("base_model", "data", "output_dir"):
            if not getattr(self, name):
                raise SftError(f"--{name.replace('_', '-')} is required", name)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise SftError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}", "eval_fraction")
        if self.max_length < 8:
            raise SftError(f"--max-length must be at least 8, got {self.max_length}", "max_length")
        if self.template not in ("steerlm", "chat_template"):
            raise SftError(f"unknown template {self.template!r}; use steerlm or chat_template", "template")
        if self.label_placement not in ChatTemplatePrompt.LABEL_PLACEMENTS:
            raise SftError(f"--label-placement must be reply or system, got {self.label_placement!r}", "label_placement")
        if self.label_wording not in PromptTemplate.LABEL_WORDINGS:
            raise SftError(f"--label-wording must be numbers or words, got {self.label_wording!r}", "label_wording")
        if self.label_contrast < 0:
            raise SftError(f"--label-contrast must be at least 0, got {self.label_contrast}", "label_contrast")
        if self.label_contrast_margin <= 0:
            raise SftError(f"--label-contrast-margin must be positive, got {self.label_contrast_margin}",
                           "label_contrast_margin")
        if self.label_contrast_mirror not in CONTRAST_MIRRORS:
            raise SftError(f"--label-contrast-mirror must be all or one, got {self.label_contrast_mirror!r}",
                           "label_contrast_mirror")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise SftError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "dtype")
        super().__post_init__()


# --------------------------------------------------------------------- data
@dataclass
class SftExample:
    input_ids: list[int]
    labels: list[int]
    # The same reply under mirrored labels, for the label-contrast term (None: not contrasted),
    # and the attributes that copy mirrors.
    contrast: SftExample | None = None
    contrast_names: tuple[str, ...] = ()
    # With --label-contrast-mirror one: the index of the mirrored attribute in the schema, for the log.
    contrast_attribute: int = -1


def resolve_schema(spec: str | None, conversations: Sequence[Conversation] = ()) -> AttributeSchema:
    """The schema to condition on: named, read from a file or artifact dir, or inferred from the labels."""
    if spec:
        path = Path(spec)
        if path.is_dir():
            return load_steer_config(path)[1]
        return get_schema(spec)
    used = {name for conv in conversations for m in conv.messages for name in m.labels}
    if not used:
        raise SftError("the data carries no attribute labels; relabel it first (steer relabel) or pass --schema",
                       "schema")
    from steer.core.attributes import BUILTIN_SCHEMAS

    for builtin in BUILTIN_SCHEMAS.values():
        if set(builtin.names) == used:
            return builtin
    union = _all_builtin_schema()
    return AttributeSchema(
        name="inferred", attributes=tuple(a for a in union.attributes if a.name in used), aliases=union.aliases
    )


def _all_builtin_schema() -> AttributeSchema:
    from steer.core.attributes import BUILTIN_SCHEMAS

    seen: dict[str, Any] = {}
    for schema in BUILTIN_SCHEMAS.values():
        for attr in schema.attributes:
            seen.setdefault(attr.name, attr)
    return AttributeSchema(name="all", attributes=tuple(seen.values()))


def relabel_schema(data: str) -> AttributeSchema | None:
    """The schema of the APM that labelled ``data``, from the sidecar ``steer relabel`` writes beside it."""
    from steer.training.relabel import SIDECAR_SUFFIX

    sidecar = Path(str(data) + SIDECAR_SUFFIX)
    try:
        return AttributeSchema.from_dict(json.loads(sidecar.read_text(encoding="utf-8"))["schema"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no sidecar (or an unreadable one): the labels themselves say which attributes


def load_sft_conversations(config: SftConfig) -> tuple[list[Conversation], AttributeSchema]:
    explicit = resolve_schema(config.schema) if config.schema else relabel_schema(config.data)
    if not Path(config.data).exists() and config.format not in ("hub",):
        raise SftError(f"training data {config.data!r} does not exist", "data")
    convs, report = load_conversations(config.data, config.format, schema=explicit or _all_builtin_schema(),
                                       limit=config.limit)
    if not convs:
        cause = f": {report.summary()}" if report.bad else ""
        raise SftError(f"no usable conversations in {config.data!r}{cause}", "data")
    schema = explicit or resolve_schema(None, convs)
    unlabeled = sum(1 for c in convs for m in c.messages if m.role == "assistant" and not m.labels)
    if unlabeled:
        logger.warning("%d assistant turns carry no labels; they are conditioned on the schema defaults", unlabeled)
    return convs, schema


def mirror_labels(conversations: Sequence[Conversation], schema: AttributeSchema,
                  names: Collection[str] | None = None) -> list[Conversation]:
    """The conversations with their labels mirrored on each scale (``v -> min + max - v``): the
    same replies, conditioned on the opposite values. ``names``: mirror only these attributes
    (default: all of the schema's). Unlabelled messages stay as they are."""
    from dataclasses import replace

    mirrored = set(schema.names if names is None else names) & set(schema.names)
    out = []
    for conv in conversations:
        messages = [replace(m, labels={k: schema[k].min + schema[k].max - v if k in mirrored else v
                                       for k, v in m.labels.items()}) if m.labels else m
                    for m in conv.messages]
        out.append(replace(conv, messages=messages))
    return out


def mirrorable_names(conv: Conversation, schema: AttributeSchema) -> list[str]:
    """The schema attributes that mirroring changes in this conversation: labelled somewhere off
    their scale's midpoint. In schema order."""
    return [name for name in schema.names
            if any(name in m.labels and 2 * m.labels[name] != schema[name].min + schema[name].max
                   for m in conv.messages if m.labels)]


@dataclass
class ContrastPicker:
    """Chooses what each label-contrast copy mirrors. ``all``: every attribute. ``one``: a single
    attribute per conversation, the least used so far among those it can mirror (ties in schema
    order), so the copies spread evenly over the attributes, deterministically."""

    schema: AttributeSchema
    mirror: str = "all"
    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, conv: Conversation) -> tuple[str, ...]:
        names = mirrorable_names(conv, self.schema)
        if self.mirror == "one" and names:
            names = [min(names, key=lambda n: self.counts.get(n, 0))]
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1
        return tuple(names)


def label_gain(trainer, labelled: SftDataset, mirrored: SftDataset, own_loss: float | None = None) -> float | None:
    """How much the policy's own labels lower its loss on the labelled eval replies: their loss
    under :func:`mirror_labels` minus under their own labels, in nats per reply token. A policy that
    learned the conditioning scores clearly above 0; one that ignores its labels scores about 0,
    however low its loss. (Replies rated at a scale's midpoint mirror to themselves and add 0.)
    ``own_loss``: the loss of ``labelled`` when the caller has it already (the eval split, when every
    eval conversation is labelled), which saves a pass."""
    if not len(labelled):
        return None
    if own_loss is None:
        own_loss = trainer.evaluate(eval_dataset=labelled, metric_key_prefix="labelled")["labelled_loss"]
    return round(trainer.evaluate(eval_dataset=mirrored, metric_key_prefix="mirrored")["mirrored_loss"] - own_loss, 4)


@dataclass
class TokenizeStats:
    """What truncation did, summed over the calls (train and eval split) and reported once."""

    conversations: int = 0
    truncated: int = 0
    dropped: int = 0  # no reply token left to learn from (after truncation, or none to begin with)

    def log(self, max_length: int) -> None:
        if self.truncated:
            logger.warning("%d of %d conversations were longer than --max-length %d tokens and were truncated",
                           self.truncated, self.conversations, max_length)
        if self.dropped:
            logger.warning("%d of %d conversations were dropped: no reply tokens left to train on within "
                           "--max-length %d (raise it to keep them)", self.dropped, self.conversations, max_length)


def tokenize_conversations(
    conversations: Sequence[Conversation], template: PromptTemplate, tokenizer, max_length: int,
    stats: TokenizeStats | None = None, contrast: ContrastPicker | None = None,
) -> list[SftExample]:
    """Template tokens and loss labels per conversation; truncated, and dropped if nothing is left to
    learn. Pass ``stats`` to sum several calls and report them once; without it, this call reports.
    With ``contrast`` each example also carries its conversation with the labels it picks mirrored
    (:func:`mirror_labels`), unless mirroring changes no token (unlabelled, or every value at its
    scale's midpoint)."""
    own = stats is None
    stats = TokenizeStats() if own else stats
    out = []
    for conv in conversations:
        stats.conversations += 1
        example = _tokenize_one(conv, template, tokenizer, max_length, stats)
        if example is None:
            stats.dropped += 1
            continue
        names = contrast(conv) if contrast is not None else ()
        if names:
            mirrored = _tokenize_one(mirror_labels([conv], contrast.schema, names)[0], template, tokenizer, max_length)
            if mirrored is not None and mirrored.input_ids != example.input_ids:
                example.contrast, example.contrast_names = mirrored, names
                if contrast.mirror == "one":
                    example.contrast_attribute = contrast.schema.names.index(names[0])
        out.append(example)
    if own:
        stats.log(max_length)
    return out


def _tokenize_one(conv: Conversation, template: PromptTemplate, tokenizer, max_length: int,
                  stats: TokenizeStats | None = None) -> SftExample | None:
    tok = template.tokenize(conv.messages, tokenizer, mode="train")
    ids, labels = tok.input_ids, tok.labels
    if len(ids) > max_length:
        if stats is not None:
            stats.truncated += 1
        ids, labels = ids[:max_length], labels[:max_length]
    # The model predicts token t from tokens < t, so a trainable first token teaches nothing.
    if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:
        return None
    return SftExample(ids, labels)


class SftDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[SftExample]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        item = {"input_ids": ex.input_ids, "labels": ex.labels}
        if ex.contrast is not None:
            item.update(contrast_input_ids=ex.contrast.input_ids, contrast_labels=ex.contrast.labels,
                        contrast_attribute=ex.contrast_attribute)
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(ex.input_ids) for ex in self.examples]


@dataclass
class SftCollator:
    """Right-pads a batch; padding gets attention 0 and label -100, prompt tokens keep the
    template's -100, so the loss only sees reply tokens. Examples with a label-contrast copy add
    ``contrast_input_ids/attention_mask/labels`` (one row per copy), ``contrast_rows``, the
    batch row each copy belongs to, and ``contrast_attribute``, what each copy mirrors."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self._pad([f["input_ids"] for f in features], [f["labels"] for f in features])
        rows = [i for i, f in enumerate(features) if "contrast_input_ids" in f]
        if rows:
            contrast = self._pad([features[i]["contrast_input_ids"] for i in rows],
                                 [features[i]["contrast_labels"] for i in rows])
            batch.update({f"contrast_{k}": v for k, v in contrast.items()})
            batch["contrast_rows"] = torch.tensor(rows, dtype=torch.long)
            batch["contrast_attribute"] = torch.tensor([features[i].get("contrast_attribute", -1) for i in rows],
                                                       dtype=torch.long)
        return batch

    def _pad(self, ids: Sequence[list[int]], labels_: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(x) for x in ids)
        n = len(ids)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels_)):
            input_ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(x)] = torch.tensor(y)
            attention_mask[i, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -------------------------------------------------------------------- model
def default_target_modules(model) -> list[str]:
    """Attention + MLP projections where the architecture has the usual names, else every
    Linear/Conv1D layer except the output head (adapting the vocab projection is costly and
    rarely helps)."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            names.add(full_name.rsplit(".", 1)[-1])
    # bitsandbytes 4-bit layers subclass nn.Linear, so the scan also works for QLoRA.
    preferred = [n for n in PREFERRED_TARGETS if n in names]
    chosen = preferred or sorted(names)
    if not chosen:
        raise SftError("found no Linear layers to adapt; pass --lora-target-modules", "lora_target_modules")
    return chosen


def build_template(config: SftConfig, schema: AttributeSchema, tokenizer) -> PromptTemplate:
    if config.template not in ("steerlm", "chat_template"):
        raise SftError(f"unknown template {config.template!r}; use steerlm or chat_template", "template")
    try:
        if config.template == "steerlm":
            return PromptTemplate(schema, default_system=config.default_system, label_wording=config.label_wording)
        return ChatTemplatePrompt(schema, tokenizer, default_system=config.default_system,
                                  label_placement=config.label_placement, label_wording=config.label_wording)
    except ValueError as e:
        # The template names the setting it refuses (label_wording); anything else is the template's.
        raise SftError(str(e), getattr(e, "field", None) or "template") from None


# A marker longer than this many tokens is one a short fine-tune rarely learns to write whole.
MARKER_PIECES_WARN = 2


def template_markers(template: PromptTemplate) -> list[str]:
    """The markers of the SteerLM format (a chat template's own turn tokens are the tokenizer's)."""
    if isinstance(template, ChatTemplatePrompt):
        return []
    return [template.system_marker, template.turn_marker, template.label_marker]


def prepare_marker_tokens(template: PromptTemplate, tokenizer, add: bool) -> list[str]:
    """Make each template marker one token (``add``), or warn that it is not; returns those added.

    A marker the tokenizer splits (stories260K writes ``<extra_id_1>`` as 11 pieces) ends a reply
    only when the model writes every piece in order: after a short fine-tune it rarely does, so
    replies run to the token limit and leak fragments of the marker."""
    split = {}
    vocab = tokenizer.get_vocab()
    for marker in template_markers(template):
        if marker in vocab:
            continue  # one token already (the demo's tokenizer), however a lone call splits off a space
        pieces = len(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if pieces > 1:
            split[marker] = pieces
    if not split:
        return []
    described = ", ".join(f"{m!r} is {n} tokens" for m, n in split.items())
    if not add:
        if max(split.values()) > MARKER_PIECES_WARN:
            logger.warning("this tokenizer splits the template's markers (%s): replies may not end reliably and may "
                           "leak pieces of them; drop --no-add-marker-tokens to add them as single tokens", described)
        return []
    from tokenizers import AddedToken

    tokenizer.add_tokens([AddedToken(m, special=False, normalized=False) for m in split])
    logger.info("added the template's markers to the vocabulary as single tokens (%s before); the embeddings are "
                "resized and trained in full", described)
    return list(split)


def embedding_module_names(model) -> list[str]:
    """Names (last component) of the input embedding and, when it is a separate matrix, the output head."""
    wanted = [model.get_input_embeddings()]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(text_config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        wanted.append(model.get_output_embeddings())
    return [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if any(module is w for w in wanted)]


def load_model_for_training(config: SftConfig, vocab_size: int | None = None):
    from peft import LoraConfig, get_peft_model

    from steer.models.modeling import load_causal_lm, quiet_peft_deprecations

    if config.load_in_4bit:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        model = load_causal_lm(config.base_model, device=f"cuda:{local_rank}", load_in_4bit=True,
                               trust_remote_code=config.trust_remote_code)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(config.activation_checkpointing),
                                                gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    else:
        # Loaded on the CPU; the Trainer moves it to its (per-process) device.
        dtype = config.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
        model = load_causal_lm(config.base_model, device="cpu", dtype=dtype,
                               trust_remote_code=config.trust_remote_code)
        if config.activation_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # its name from transformers 5.24
            if enable is not None:
                enable(activation_checkpointing_kwargs=CHECKPOINTING_KWARGS)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
            model.enable_input_require_grads()
    targets = list(config.lora_target_modules) or default_target_modules(model)
    modules_to_save = list(config.lora_modules_to_save)
    if vocab_size is not None and vocab_size > model.get_input_embeddings().num_embeddings:
        # New tokens (the template's markers): their rows start at the mean embedding and are trained in full.
        model.resize_token_embeddings(vocab_size)
        modules_to_save += [n for n in embedding_module_names(model) if n not in modules_to_save]
    logger.info("LoRA r=%d alpha=%d on %s", config.lora_r, config.lora_alpha, ", ".join(targets))
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save or None,
        ensure_weight_tying=trains_tied_embeddings(model, modules_to_save + targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora)
    except ValueError as e:
        raise SftError(f"cannot apply LoRA: {e}", "lora_target_modules") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def trains_tied_embeddings(model, module_names: list[str]) -> bool:
    """Whether the adapter trains an embedding of a model whose input and output embeddings are one
    matrix. PEFT must then keep them tied (``ensure_weight_tying``): otherwise the trained copy of
    ``embed_tokens`` reads the input while the output head keeps the base's matrix, so new label
    tokens get learned input vectors but untrained output rows, and every load warns about it."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(text_config, "tie_word_embeddings", False):
        return False
    return any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in module_names)


# ------------------------------------------------------------------ trainer
def _checkpoints(output: Path) -> list[Path]:
    root = output / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    ckpts = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(ckpts, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint the Trainer finished writing: its state (written after the weights,
    optimizer and RNG state) parses, and its weights are there."""
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any((path / name).exists() for name in ("adapter_model.safetensors", "model.safetensors"))


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones (a kill while saving) are skipped, with a
    warning that names them."""
    ckpts = _checkpoints(output)
    for path in reversed(ckpts):
        if checkpoint_is_complete(path):
            return path
        logger.warning("skipping %s: it is incomplete (the run was stopped while writing it)", path)
    return None


# ------------------------------------------------------------ run records
RUN_FILE = "sft_run.json"


def _file_digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sft_fingerprint(config: SftConfig) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the data (its contents), the base
    model (its config and weight files), the LoRA and template settings, and everything that shapes
    the optimizer's schedule."""
    data, base = Path(config.data), Path(config.base_model)
    if base.is_dir():
        base_id = {"path": str(base.resolve()),
                   "files": {p.name: (_file_digest(p) if p.suffix in (".json", ".model", ".txt") else p.stat().st_size)
                             for p in sorted(base.iterdir()) if p.is_file()}}
    else:
        base_id = config.base_model
    keys = ("format", "schema", "template", "label_placement", "label_wording", "default_system", "lora_r",
            "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "num_train_epochs", "max_steps",
            "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_length", "eval_fraction", "limit", "load_in_4bit", "dtype", "seed",
            "label_contrast", "label_contrast_margin", "label_contrast_mirror")
    return {
        "data": str(data.resolve()) if data.exists() else config.data,
        "data_sha256": _file_digest(data) if data.is_file() else None,
        "base_model": base_id,
        **{k: _enum_value(getattr(config, k)) for k in keys},
    }


def _enum_value(x: Any) -> Any:
    return getattr(x, "value", x)


def read_run_record(output: Path) -> dict[str, Any] | None:
    path = output / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (ValueError, UnicodeDecodeError) as e:
        raise SftError(f"{path} is damaged ({e}); move {output} away or choose another --output-dir", "output_dir") from None


def write_run_record(directory: Path, record: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(directory / RUN_FILE)


def _side_paths(output: Path) -> tuple[Path, Path]:
    """Where the finished policy is assembled, and where the previous contents wait while the
    new ones are renamed into place."""
    return output.with_name(f".{output.name}.staging"), output.with_name(f".{output.name}.previous")


def _base_inside(config: SftConfig, output: Path) -> Path | None:
    """The base model's path relative to ``output`` when it lives inside it (as `steer demo`
    lays a policy out), else None. That folder is the user's, and moves with the policy."""
    base = Path(config.base_model)
    if not base.exists():
        return None
    try:
        return base.resolve().relative_to(output.resolve())
    except ValueError:
        return None


def _swap_into_place(staging: Path, output: Path, previous: Path) -> None:
    shutil.rmtree(previous, ignore_errors=True)
    if output.exists():
        output.rename(previous)
    staging.rename(output)
    shutil.rmtree(previous, ignore_errors=True)


def recover_interrupted_swap(output: Path) -> None:
    """Finish a rename-into-place that a kill interrupted: a staging folder whose run record says
    "finished" holds the complete new policy (its record is the last file written into it)."""
    staging, previous = _side_paths(output)
    record = read_run_record(staging) if staging.is_dir() else None
    if record is not None and record.get("state") == "finished":
        _swap_into_place(staging, output, previous)
        logger.warning("completed the interrupted write of %s", output)
    elif output.exists() and previous.is_dir():
        shutil.rmtree(previous)


def added_setting_defaults(recorded: dict[str, Any], fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Settings that a newer steer added to the fingerprint and an older run's record lacks, at
    their defaults: the older run ran as if they had them, so it still resumes when they do."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default for f in fields(SftConfig) if f.default is not MISSING}
    return {k: _enum_value(defaults[k]) for k in fingerprint if k not in recorded and k in defaults}


def check_output(config: SftConfig, output: Path, fingerprint: dict[str, Any]) -> str:
    """What to do with ``output``: "fresh", "resume" or "finished"; raises for anything that would
    overwrite files steer did not write, continue a different run, or silently retrain."""
    recover_interrupted_swap(output)
    record = read_run_record(output)
    base = _base_inside(config, output)
    holds_files = output.is_dir() and any(base is None or p.name != base.parts[0] for p in output.iterdir())
    if record is None:
        if holds_files:
            kind = "a policy written by an older steer" if (output / "steer_config.json").exists() else "files"
            raise SftError(f"{output} already holds {kind} that this run did not write; steer sft will not overwrite "
                           "them: choose another --output-dir or move them away", "output_dir")
        if config.resume:
            logger.info("--resume: %s holds no run yet; starting one", output)
        return "fresh"
    recorded = {**added_setting_defaults(record.get("fingerprint", {}), fingerprint), **record.get("fingerprint", {})}
    changed = sorted(k for k in set(fingerprint) | set(recorded) if recorded.get(k) != fingerprint.get(k))
    finished = record.get("state") == "finished"
    if changed:
        if config.resume:
            raise SftError(f"--resume: {output} was trained with other settings (different: {', '.join(changed)}); "
                           "resume with the same command, or choose another --output-dir", "resume")
        if not config.overwrite:
            raise SftError(f"{output} holds {'a policy' if finished else 'an unfinished run'} trained with other "
                           f"settings (different: {', '.join(changed)}); choose another --output-dir, or pass --overwrite "
                           "to replace it", "output_dir")
        return "fresh"
    if finished:
        if config.resume:
            return "finished"
        if not config.overwrite:
            raise SftError(f"{output} already holds the finished policy of this run; pass --overwrite to train it "
                           "again", "output_dir")
        return "fresh"
    if config.resume:
        return "resume"
    if latest_checkpoint(output) is not None and not config.overwrite:
        raise SftError(f"{output} holds checkpoints of an unfinished run; pass --resume to continue it "
                       "or choose another --output-dir", "output_dir")
    return "fresh"


def _claim_output(config: SftConfig, output: Path, fingerprint: dict[str, Any]) -> str:
    """Decide what to do with ``output`` and record this run in it (once, on the main process)."""
    action = check_output(config, output, fingerprint)
    if action == "finished":
        return action
    if action != "resume":
        # A fresh start: checkpoints left here are this output's own (a run record says so) and
        # would be mistaken for this run's by the Trainer.
        shutil.rmtree(output / CHECKPOINT_DIR, ignore_errors=True)
    write_run_record(output, {"fingerprint": fingerprint, "state": "training"})
    return action


def training_arguments(config: SftConfig, output: Path, has_eval: bool):
    """The Trainer's arguments: the config's own, except where SFT decides (checkpoints go to
    OUTPUT_DIR/checkpoints, no eval without an eval split, activation checkpointing is set up on the
    model before LoRA wraps it)."""
    return trainer_arguments(
        config,
        output_dir=str(output / CHECKPOINT_DIR),
        per_device_eval_batch_size=config.per_device_train_batch_size,
        eval_strategy=config.eval_strategy if has_eval else "no",
        activation_checkpointing=False,
        remove_unused_columns=False,
    )


def validate_config(config: SftConfig) -> None:
    """Checks that need the machine (the field checks run when the config is built)."""
    if config.load_in_4bit:
        from steer.models.modeling import check_4bit_available

        check_4bit_available()


def stored_base_model(base_model: str, output: Path) -> str:
    """Hub ids stay as given; local paths become relative to the policy dir when inside it,
    absolute otherwise, so the policy loads from any working directory."""
    path = Path(base_model)
    if not path.exists():
        return base_model
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(output.resolve()))
    except ValueError:
        return str(resolved)


def main(config: SftConfig) -> dict[str, Any]:
    validate_config(config)
    from transformers import set_seed

    from steer.models.modeling import load_tokenizer
    from steer.training.sft_trainer import SftTrainer

    output = Path(config.output_dir)
    if not Path(config.data).exists() and config.format not in ("hub",):
        raise SftError(f"training data {config.data!r} does not exist", "data")
    fingerprint = sft_fingerprint(config)
    action = on_main_process(config.use_cpu, _claim_output, config, output, fingerprint)
    if action == "finished":
        logger.info("%s already holds the finished policy of this run; nothing to resume", output)
        metrics_file = output / METRICS_FILE
        return json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    resume_from = latest_checkpoint(output) if action == "resume" else None
    if action == "resume" and resume_from is None:
        logger.warning("no complete checkpoint in %s; training from the start", output / CHECKPOINT_DIR)
    set_seed(config.seed)

    convs, schema = load_sft_conversations(config)
    tokenizer = load_tokenizer(config.base_model, trust_remote_code=config.trust_remote_code)
    tokenizer.padding_side = "right"
    template = build_template(config, schema, tokenizer)
    added_tokens = prepare_marker_tokens(template, tokenizer, config.add_marker_tokens)
    train_convs, eval_convs = grouped_split(convs, config.eval_fraction, seed=config.seed)
    histogram = report_label_histogram(train_convs, schema)
    stats = TokenizeStats()
    train_set = SftDataset(tokenize_conversations(train_convs, template, tokenizer, config.max_length, stats,
                                                  ContrastPicker(schema, config.label_contrast_mirror)
                                                  if config.label_contrast else None))
    eval_set = SftDataset(tokenize_conversations(eval_convs, template, tokenizer, config.max_length, stats))
    stats.log(config.max_length)
    if len(train_set) == 0:
        raise SftError("no training examples left after tokenization (are there assistant turns?)", "data")
    logger.info("SFT on %d conversations (%d eval), schema %s: %s", len(train_set), len(eval_set),
                schema.name, ", ".join(schema.names))

    model = load_model_for_training(config, vocab_size=len(tokenizer) if added_tokens else None)
    args = training_arguments(config, output, has_eval=len(eval_set) > 0)
    trainer_class, contrast = SftTrainer, {}
    if config.label_contrast:
        from steer.training.label_contrast import LabelContrastTrainer

        trainer_class = LabelContrastTrainer
        contrast = {"label_contrast": config.label_contrast, "label_contrast_margin": config.label_contrast_margin,
                    "attribute_names": schema.names}
        contrasted = [ex.contrast_names for ex in train_set.examples if ex.contrast is not None]
        per_name = Counter(name for names in contrasted for name in names)
        logger.log(logging.INFO if contrasted else logging.WARNING,
                   "label contrast (weight %g, margin %g, mirroring %s) on %d of %d training examples%s",
                   config.label_contrast, config.label_contrast_margin, config.label_contrast_mirror, len(contrasted),
                   len(train_set),
                   f" ({', '.join(f'{n} {per_name[n]}' for n in schema.names if per_name[n])})" if contrasted else
                   ": no reply has labels off its scale's midpoint, so it changes nothing")
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set if len(eval_set) else None,
        data_collator=SftCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        **contrast,
    )
    metrics: dict[str, Any] = {"train_examples": len(train_set), "eval_examples": len(eval_set)}
    labelled = [c for c in eval_convs if any(m.labels for m in c.messages)]
    # Rated data usually labels every eval reply: then the eval set (and its loss) is theirs.
    eval_is_labelled = len(labelled) == len(eval_convs)
    label_sets = tuple(
        eval_set if convs is eval_convs else
        SftDataset(tokenize_conversations(convs, template, tokenizer, config.max_length, TokenizeStats()))
        for convs in (eval_convs if eval_is_labelled else labelled, mirror_labels(labelled, schema)))
    if len(eval_set) and resume_from is None:
        metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        logger.info("eval loss before training: %.4f", metrics["eval_loss_before"])
        metrics["eval_label_gain_before"] = label_gain(
            trainer, *label_sets, own_loss=metrics["eval_loss_before"] if eval_is_labelled else None)
    if resume_from is not None:
        logger.info("resuming from %s", resume_from)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # Checkpoints of a run that added marker tokens: the resized embedding is in modules_to_save,
        # and PEFT announces that it saves it (again) on every checkpoint.
        warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`")
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics["train_seconds"] = round(time.perf_counter() - start, 2)
    metrics["train_loss"] = result.training_loss
    metrics["global_step"] = result.global_step
    if len(eval_set):
        # The Trainer has often just evaluated on the last step (eval_strategy "epoch" evaluates where
        # max_steps cuts the epoch short): a second pass would give the same number.
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        metrics["eval_loss_after"] = (last["eval_loss"] if last is not None and last.get("step") == result.global_step
                                      else trainer.evaluate()["eval_loss"])
        logger.info("eval loss after training: %.4f", metrics["eval_loss_after"])
        metrics["eval_label_gain_after"] = label_gain(
            trainer, *label_sets, own_loss=metrics["eval_loss_after"] if eval_is_labelled else None)
        if metrics["eval_label_gain_after"] is not None:
            logger.info("label gain after training: %.4f nats per reply token (the eval replies' loss under "
                        "mirrored labels minus under their own; about 0 means the policy ignores its labels)",
                        metrics["eval_label_gain_after"])
        if config.label_gain_by_attribute and labelled:
            own = (metrics["eval_loss_after"] if eval_is_labelled else
                   trainer.evaluate(eval_dataset=label_sets[0], metric_key_prefix="labelled")["labelled_loss"])
            metrics["eval_label_gain_by_attribute"] = {
                name: label_gain(trainer, label_sets[0], SftDataset(tokenize_conversations(
                    mirror_labels(labelled, schema, [name]), template, tokenizer, config.max_length, TokenizeStats())),
                    own_loss=own)
                for name in schema.names}
            logger.info("label gain per attribute: %s", ", ".join(
                f"{name} {gain:.4f}" for name, gain in metrics["eval_label_gain_by_attribute"].items()))

    # Weights sharded over the processes (FSDP, ZeRO-3): all of them take part in gathering the full
    # state for the first one, which saves the adapter out of it.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if weights_are_sharded(trainer) else None
    if trainer.is_world_process_zero():
        extra = {"vocab_size": len(tokenizer), "added_tokens": added_tokens} if added_tokens else {}
        save_policy(trainer.accelerator.unwrap_model(trainer.model), tokenizer, template, schema, config, output,
                    metrics, histogram, state_dict=state_dict, **extra)
    return metrics


def weights_are_sharded(trainer) -> bool:
    """Whether no single process holds all the weights (FSDP, DeepSpeed ZeRO-3). Under plain data
    parallelism and ZeRO-1/2 every process holds them, and gathering would only copy the model."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(trainer.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)


def report_label_histogram(conversations: Sequence[Conversation], schema: AttributeSchema) -> dict[str, dict[int, int]]:
    """Log how often each value occurs in the training labels, and warn about values the schema
    allows that never occur: the policy cannot learn to follow a request for one of them."""
    histogram = label_histogram(conversations, schema)
    logger.info("training labels (value:count per attribute, '-' never):\n%s", format_histogram(histogram, schema))
    unseen = unseen_values(histogram, schema)
    if unseen:
        logger.warning("values that never occur in the training data (requests for them ask the policy for something "
                       "it never saw):\n%s", "\n".join(f"  attribute {name!r}: value(s) {', '.join(map(str, values))}"
                                                       for name, values in unseen.items()))
    return histogram


def save_policy(model, tokenizer, template: PromptTemplate, schema: AttributeSchema, config: SftConfig,
                output: Path, metrics: dict[str, Any], histogram: dict[str, dict[int, int]] | None = None,
                state_dict: dict[str, Any] | None = None, **extra: Any) -> None:
    """Write the policy into a staging folder beside ``output``, then rename it into place: a kill
    leaves the previous contents or the complete new policy, never a mix, and no file of an
    earlier policy survives in the new one."""
    staging, previous = _side_paths(output)
    shutil.rmtree(staging, ignore_errors=True)  # a staging folder of an earlier, killed finish
    staging.mkdir(parents=True)
    # Added marker tokens: the resized embedding is saved through modules_to_save already, so PEFT
    # need not (and need not warn that it will) save the embedding layers a second time.
    model.save_pretrained(str(staging), state_dict=state_dict,
                          save_embedding_layers=False if extra.get("added_tokens") else "auto")
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(str(staging))
    merged = None
    if config.merge:
        merged = "merged"
        merge_adapter(config, staging, staging / merged, tokenizer)
    base = stored_base_model(config.base_model, output)
    # The values each attribute took in training: generate and serve flag requests for others.
    seen = {"trained_values": trained_values(histogram), "label_histogram": histogram} if histogram else {}
    save_steer_config(staging, "policy", schema, template.to_dict(), base_model=base, adapter=".", merged=merged,
                      **seen, **extra)
    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    save_training_config(staging, config)
    # Replaces the blank card PEFT's save_pretrained leaves.
    card = policy_card(output.name, base, schema, template, training_summary(model, config), metrics)
    (staging / "README.md").write_text(card, encoding="utf-8")
    if config.keep_checkpoints and (output / CHECKPOINT_DIR).is_dir():
        (output / CHECKPOINT_DIR).rename(staging / CHECKPOINT_DIR)
    inside = _base_inside(config, output)
    if inside is not None:  # the base model lives in the policy folder: it moves over, untouched
        (staging / inside).parent.mkdir(parents=True, exist_ok=True)
        (output / inside).rename(staging / inside)
    record = read_run_record(output) or {}
    # Written last: a staging folder with a finished record is complete (recover_interrupted_swap).
    write_run_record(staging, {**record, "state": "finished"})
    _swap_into_place(staging, output, previous)
    logger.info("policy written to %s", output)


def training_summary(model, config: SftConfig) -> dict[str, Any]:
    """The settings a reader of the model card needs to judge or repeat the run."""
    lora = getattr(model, "peft_config", {}).get("default")
    return {
        "data": f"{config.data} ({config.format})",
        "epochs" if config.max_steps < 0 else "max steps":
            config.num_train_epochs if config.max_steps < 0 else config.max_steps,
        "learning rate": config.learning_rate,
        "schedule": f"{_enum_value(config.lr_scheduler_type)}, warmup {config.warmup_steps}",
        "batch size": f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps} accumulation",
        "max length": config.max_length,
        "LoRA r / alpha / dropout": f"{config.lora_r} / {config.lora_alpha} / {config.lora_dropout}",
        "LoRA targets": sorted(lora.target_modules) if lora is not None else list(config.lora_target_modules),
        "trained in full": list(config.lora_modules_to_save),
        "4-bit base (QLoRA)": config.load_in_4bit,
        "label contrast (weight / margin / mirror)": (
            f"{config.label_contrast} / {config.label_contrast_margin} / {config.label_contrast_mirror}"
            if config.label_contrast else "off"),
        "seed": config.seed,
    }


def merge_adapter(config: SftConfig, adapter_dir: Path, target: Path, tokenizer) -> None:
    """Fold the adapter into a full-precision copy of the base (never into 4-bit weights)."""
    from steer.models.modeling import fit_embeddings, load_causal_lm, merge_adapter_into

    dtype = "float32" if config.dtype == "auto" and not torch.cuda.is_available() else config.dtype
    base = load_causal_lm(config.base_model, device="cpu", dtype=dtype if dtype != "auto" else "bfloat16",
                          trust_remote_code=config.trust_remote_code)
    fit_embeddings(base, len(tokenizer))
    merged = merge_adapter_into(base, adapter_dir)
    merged.save_pretrained(str(target))  # safetensors is the default serialization
    tokenizer.save_pretrained(str(target))
