"""The SFT's ``Trainer``: the output head only where the loss is taken.

SFT trains on reply tokens alone; the system turn, the user's line and the label line are context
(label -100). A causal LM still projects every position onto its vocabulary, and for a small model
with a large vocabulary that projection is a large share of the work: SmolLM2-135M's head
(576 x 49,152) is about a fifth of its forward FLOPs, and the cross-entropy behind it runs over
49,152 logits per position. The demo's NPC conversations are 56% context. So the forward is asked
(``logits_to_keep``) for the logits of the last positions of the batch only, from the first that
predicts a reply token in any row, and the labels are cut to match: the same loss over the same
tokens, without the head and the softmax over the prompt.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from steer.core.template import IGNORE_INDEX
from steer.runtime.compat import forward_parameters


def reply_window(labels: torch.Tensor) -> int | None:
    """How many trailing positions of a right-padded batch hold every logit the loss uses: from
    the first position whose next token is trainable in any row. None when no token is."""
    trainable = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    if not len(trainable):
        return None
    return labels.shape[1] - int(trainable[0])


def keeps_logits(model) -> bool:
    """Whether the (PEFT-wrapped) model's forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in forward_parameters(type(base))


class SftTrainer(Trainer):
    """``Trainer`` that computes the LM head over the reply window only (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reply_logits_only = keeps_logits(self.model)

    def window(self, labels: torch.Tensor) -> int | None:
        """The reply window of ``labels`` when the model can use it and it saves anything."""
        if not self.reply_logits_only:
            return None
        keep = reply_window(labels)
        return keep if keep is not None and keep < labels.shape[1] else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep = self.window(inputs["labels"]) if "labels" in inputs else None
        if keep is not None:
            inputs = {**inputs, "labels": inputs["labels"][:, -keep:], "logits_to_keep": keep}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
