"""Label contrast: an SFT loss term that makes a policy rely on its attribute labels.

Plain SteerLM SFT only asks for ``p(reply | labels)`` to be high. A pretrained model can meet that
by learning the replies' text and ignoring the labels, and it does so first: the conditioning is
learned later, after the text (``eval_label_gain`` in ``sft_metrics.json`` shows when). On a CPU
budget the run can end before that phase starts. Following sequence-likelihood contrast for
controllable generation (CLICK, Zheng et al. 2023), each labelled training reply is also scored
under *mirrored* labels (``v -> min + max - v``, :func:`steer.training.sft.mirror_labels`), and a
hinge asks its mean log-likelihood under its own labels to exceed that under the mirrored ones by
a margin (in nats per reply token, the unit of the label gain):

    loss = CE(reply | labels) + weight * mean(max(0, margin - (NLL(reply | mirrored) - NLL(reply | labels))))

The mirrored labels of one reply are ordinary labels of others, so the term teaches *which* reply
goes with which values rather than making any label set unusual. It costs one more forward and
backward pass per labelled example whose labels are not all at their scale's midpoint, but not over
the whole copy: a copy and its own row agree up to the first label token (the system message and
the user's turn, 44% of the SmolLM2 demo's copies), so the copies start from that part of the own
rows' KV cache and only their tails run again (:func:`copy_tails`). Same loss and gradients as
running the copies in full; a training step of the SmolLM2 demo 1.49x faster
(``bench/label_contrast_step.py``: 16.40 -> 11.04 s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from steer.core.template import IGNORE_INDEX
from steer.runtime.compat import forward_parameters, has_sliding_layers, leading_columns, returned_cache, with_cache
from steer.training.sft_trainer import SftTrainer

logger = logging.getLogger(__name__)


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss of each row's trainable tokens (shifted as a causal LM predicts them).
    Returns the token losses (rows, T-1), the mask of trainable positions and the mean loss per row."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")
    per_row = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)
    return token_loss, mask, per_row


def contrast_loss(logits: torch.Tensor, labels: torch.Tensor, n_own: int, contrast_rows: torch.Tensor,
                  margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SFT loss and the label-contrast hinge for one batch whose first ``n_own`` rows are the
    examples under their own labels and whose other rows are mirrored copies of the rows
    ``contrast_rows`` names. Returns (token-mean CE of the own rows, mean hinge, each pair's gap),
    a gap being the pair's NLL under mirrored labels minus under its own (detached)."""
    token_loss, mask, per_row = row_nll(logits, labels)
    ce = token_loss[:n_own][mask[:n_own]].mean()
    if not len(contrast_rows):
        return ce, ce.new_zeros(()), ce.new_zeros(0)
    gap = per_row[n_own:] - per_row[contrast_rows]
    return ce, F.relu(margin - gap).mean(), gap.detach()


@dataclass
class CopyTails:
    """The label-contrast copies from where each parts from its own row: ``start[j]`` tokens of
    copy ``j`` are read from its own row's KV cache (the first ``shared`` columns, masked per copy),
    and its tail runs from there, right-padded."""

    input_ids: torch.Tensor  # (copies, tail width)
    labels: torch.Tensor  # (copies, tail width)
    attention_mask: torch.Tensor  # (copies, shared + tail width): the cached columns, then the tail
    position_ids: torch.Tensor  # (copies, tail width)
    start: torch.Tensor  # (copies,)
    shared: int


def copy_tails(own_ids: torch.Tensor, own_mask: torch.Tensor, copy_ids: torch.Tensor, copy_mask: torch.Tensor,
               copy_labels: torch.Tensor, rows: torch.Tensor) -> CopyTails:
    """Cut each copy after the tokens it shares with its own row ``rows[j]``. The tail starts one
    token early, at the last shared one: the logit there predicts the first token that differs."""
    own_ids, own_mask = own_ids[rows], own_mask[rows]
    width = min(own_ids.shape[1], copy_ids.shape[1])
    same = (own_ids[:, :width] == copy_ids[:, :width]) & (own_mask[:, :width] > 0) & (copy_mask[:, :width] > 0)
    start = (same.long().cumprod(1).sum(1) - 1).clamp(min=0)
    lengths = copy_mask.sum(1)
    tail = int((lengths - start).max())
    offsets = torch.arange(tail, device=copy_ids.device)
    real = offsets < (lengths - start)[:, None]
    source = (start[:, None] + offsets).clamp(max=copy_ids.shape[1] - 1)
    shared = int(start.max())
    cached = torch.arange(shared, device=copy_ids.device) < start[:, None]
    return CopyTails(
        input_ids=torch.where(real, copy_ids.gather(1, source), 0),
        labels=torch.where(real, copy_labels.gather(1, source), IGNORE_INDEX),
        attention_mask=torch.cat([cached, real], 1).long(),
        position_ids=start[:, None] + offsets,
        start=start, shared=shared)


def tail_contrast_loss(own_logits: torch.Tensor, own_labels: torch.Tensor, own_width: int, tail_logits: torch.Tensor,
                       tails: CopyTails, rows: torch.Tensor, margin: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`contrast_loss` for copies run as :class:`CopyTails`. ``own_logits``/``own_labels``
    are the last positions of rows ``own_width`` wide (the reply window), ``tail_logits`` the last
    of the tails. A copy's reply tokens up to its ``start`` (earlier labelled turns of a
    conversation mirrored further on) were predicted from the same context as its own row's: their
    losses are taken from there."""
    token_loss, mask, own_nll = row_nll(own_logits, own_labels)
    ce = token_loss[mask].mean()
    tail_loss, tail_mask, _ = row_nll(tail_logits, tails.labels[:, -tail_logits.shape[1]:])
    # Column c of token_loss is the target at position own_width - own_logits.shape[1] + 1 + c.
    first_target = own_width - own_logits.shape[1] + 1
    losses, counts = (token_loss * mask).cumsum(1)[rows], mask.long().cumsum(1)[rows]
    last = (tails.start - first_target).clamp(max=losses.shape[1] - 1)
    before = last >= 0
    index = last.clamp(min=0)[:, None]
    head_sum = torch.where(before, losses.gather(1, index)[:, 0], 0.0)
    head_count = torch.where(before, counts.gather(1, index)[:, 0], 0)
    copy_nll = ((tail_loss * tail_mask).sum(1) + head_sum) / (tail_mask.sum(1) + head_count).clamp(min=1)
    gap = copy_nll - own_nll[rows]
    return ce, F.relu(margin - gap).mean(), gap.detach()


@dataclass
class ContrastStats:
    """Running sums between two log lines; per attribute for copies that mirror one label."""

    hinge: float = 0.0
    gap: float = 0.0
    batches: int = 0
    attribute_gap: dict[int, float] = field(default_factory=dict)
    attribute_pairs: dict[int, int] = field(default_factory=dict)

    def add(self, hinge: float, gaps: torch.Tensor, attributes: torch.Tensor | None) -> None:
        self.hinge += hinge
        self.gap += float(gaps.mean()) if len(gaps) else 0.0
        self.batches += 1
        if attributes is None:
            return
        for index, gap in zip(attributes.tolist(), gaps.tolist()):
            if index >= 0:
                self.attribute_gap[index] = self.attribute_gap.get(index, 0.0) + gap
                self.attribute_pairs[index] = self.attribute_pairs.get(index, 0) + 1


class LabelContrastTrainer(SftTrainer):
    """``Trainer`` whose training loss adds the label-contrast hinge (module docstring). Batches
    carry the mirrored copies as ``contrast_*`` tensors (:class:`steer.training.sft.SftCollator`);
    evaluation batches have none and get the plain loss, so eval losses compare with plain SFT.
    When each copy mirrors one label (``contrast_attribute``: its index in ``attribute_names``),
    the log also shows the gap per attribute (``label_contrast_gap_<name>``): which sliders the
    policy has learned so far."""

    # The training loss below is a per-batch mean; the Trainer divides it over accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, label_contrast: float, label_contrast_margin: float,
                 attribute_names: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.label_contrast = label_contrast
        self.label_contrast_margin = label_contrast_margin
        self.attribute_names = tuple(attribute_names)
        self._contrast = ContrastStats()
        self.shares_prefix = self._can_share_prefix()

    def _can_share_prefix(self) -> bool:
        """Whether the copies can run from their own rows' KV cache (:func:`copy_tails`): a decoder
        whose forward takes a cache and positions, no activation checkpointing (which turns the cache
        off) and one process (DDP and FSDP expect one forward per backward)."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        params = forward_parameters(type(base))
        checkpointing = getattr(base, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(base, "is_gradient_checkpointing", False)
        return (not getattr(base.config, "is_encoder_decoder", False) and "position_ids" in params
                and "use_cache" in params and bool({"cache", "past_key_values"} & params)
                and not checkpointing and self.args.world_size == 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        contrast_ids = inputs.pop("contrast_input_ids", None)
        contrast_mask = inputs.pop("contrast_attention_mask", None)
        contrast_labels = inputs.pop("contrast_labels", None)
        contrast_rows = inputs.pop("contrast_rows", None)
        contrast_attribute = inputs.pop("contrast_attribute", None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        if contrast_ids is not None and self.shares_prefix:
            tails = copy_tails(ids, mask, contrast_ids, contrast_mask, contrast_labels, contrast_rows)
            outputs = self._forward(model, ids, mask, labels, use_cache=tails.shared > 0)
            cache = returned_cache(outputs) if tails.shared else None
            if tails.shared and (cache is None or has_sliding_layers(cache)):
                # Sliding-window layers keep fewer columns than the copies need: run them in full.
                logger.warning("label contrast: this model's KV cache cannot be shared with the mirrored copies; "
                               "running them in full")
                self.shares_prefix = False
            else:
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                extra = {} if cache is None else with_cache(
                    base, leading_columns(cache, contrast_rows, tails.shared, base.config))
                tail = self._forward(model, tails.input_ids, tails.attention_mask, tails.labels,
                                     position_ids=tails.position_ids, use_cache=False, **extra)
                ce, hinge, gap = tail_contrast_loss(outputs.logits, labels[:, -outputs.logits.shape[1]:], ids.shape[1],
                                                    tail.logits, tails, contrast_rows, self.label_contrast_margin)
                return self._finish(ce, hinge, gap, contrast_attribute, outputs, return_outputs)
        n_own = ids.shape[0]
        if contrast_ids is None:
            contrast_rows = torch.zeros(0, dtype=torch.long, device=ids.device)
        else:
            # One forward over both halves: right padding to a common width changes no real token.
            width = max(ids.shape[1], contrast_ids.shape[1])
            ids, contrast_ids = _pad_to(ids, width, 0), _pad_to(contrast_ids, width, 0)
            mask, contrast_mask = _pad_to(mask, width, 0), _pad_to(contrast_mask, width, 0)
            ids, mask = torch.cat([ids, contrast_ids]), torch.cat([mask, contrast_mask])
            labels = torch.cat([_pad_to(labels, width, IGNORE_INDEX), _pad_to(contrast_labels, width, IGNORE_INDEX)])
        outputs = self._forward(model, ids, mask, labels)
        ce, hinge, gap = contrast_loss(outputs.logits, labels[:, -outputs.logits.shape[1]:], n_own, contrast_rows,
                                       self.label_contrast_margin)
        return self._finish(ce, hinge, gap, contrast_attribute, outputs, return_outputs)

    def _forward(self, model, ids, mask, labels, **kwargs):
        keep = self.window(labels)  # the LM head over the reply window only (steer.training.sft_trainer)
        return model(input_ids=ids, attention_mask=mask, **({"logits_to_keep": keep} if keep else {}), **kwargs)

    def _finish(self, ce, hinge, gap, contrast_attribute, outputs, return_outputs):
        self._contrast.add(float(hinge.detach()), gap, contrast_attribute)
        loss = ce + self.label_contrast * hinge
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._contrast.batches and "loss" in logs:
            logs["label_contrast_hinge"] = round(self._contrast.hinge / self._contrast.batches, 4)
            logs["label_contrast_gap"] = round(self._contrast.gap / self._contrast.batches, 4)
            for index, total in sorted(self._contrast.attribute_gap.items()):
                if index < len(self.attribute_names):
                    logs[f"label_contrast_gap_{self.attribute_names[index]}"] = round(
                        total / self._contrast.attribute_pairs[index], 4)
            self._contrast = ContrastStats()
        super().log(logs, *args, **kwargs)


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value) if x.shape[1] < width else x
