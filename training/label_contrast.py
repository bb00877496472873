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
backward pass per labelled example whose labels are not all at their scale's midpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from steer.core.template import IGNORE_INDEX
from steer.training.sft_trainer import SftTrainer


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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        contrast_ids = inputs.pop("contrast_input_ids", None)
        contrast_mask = inputs.pop("contrast_attention_mask", None)
        contrast_labels = inputs.pop("contrast_labels", None)
        contrast_rows = inputs.pop("contrast_rows", None)
        contrast_attribute = inputs.pop("contrast_attribute", None)
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
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
        keep = self.window(labels)  # the LM head over the reply window only (steer.training.sft_trainer)
        outputs = model(input_ids=ids, attention_mask=mask, **({"logits_to_keep": keep} if keep else {}))
        labels = labels[:, -keep:] if keep else labels
        ce, hinge, gap = contrast_loss(outputs.logits, labels, n_own, contrast_rows, self.label_contrast_margin)
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
