"""The model's forward passes for decoding: prefill and one decode step.

:func:`left_pad` builds a batch from token lists, :func:`prefill` runs the prompts once and returns
the last logits plus a :class:`~steer.runtime.kv_cache.DecodeState` (the KV cache, the attention
mask and each row's next position), and :func:`decode_step` feeds one new token per row and
returns the next logits. Positions come from the attention mask, so a left-padded row sees exactly
the positions it would see alone. The scheduler (:mod:`steer.runtime.scheduler`) is their caller;
:mod:`steer.runtime.mixed_step` is the decode step that also prefills joining rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.models.modeling import inference_attention
from steer.runtime.compat import attention_implementation, has_sliding_layers, last_logits_only, returned_cache, \
    with_cache
from steer.runtime.kv_cache import DecodeState, new_kv_cache


def left_pad(token_lists: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"):
    """``(input_ids, attention_mask)`` with every row right-aligned, as decoding needs."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        if tokens:
            ids[i, width - len(tokens):] = torch.tensor(list(tokens), dtype=torch.long)
            mask[i, width - len(tokens):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
    """Run left-padded prompts through the model once: last-position logits [batch, vocab] and
    the state to continue from. The cache appends in place (:mod:`steer.runtime.kv_cache`)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with inference_attention():
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **with_cache(model, new_kv_cache(model.config)), **last_logits_only(model))
    state = DecodeState(returned_cache(out), attention_mask, positions[:, -1] + 1)
    return out.logits[:, -1, :], state


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
    """Feed one token per row ([batch]); returns the next logits and advances ``state`` in place."""
    state.attention_mask = torch.cat(
        [state.attention_mask, state.attention_mask.new_ones((state.attention_mask.shape[0], 1))], dim=-1
    )
    with inference_attention():
        out = model(
            input_ids=tokens.view(-1, 1),
            attention_mask=_one_token_mask(model, state.attention_mask, state.past_key_values),
            position_ids=state.next_positions.view(-1, 1),
            use_cache=True,
            **with_cache(model, state.past_key_values),
        )
    state.past_key_values = returned_cache(out)
    state.next_positions = state.next_positions + 1
    return out.logits[:, -1, :]


def _one_token_mask(model, attention_mask: torch.Tensor, cache=None) -> torch.Tensor:
    """The mask for a step that feeds one token per row. That token may attend to every real token
    before it, so under SDPA the finished [batch, 1, 1, length] boolean mask is just the padding
    mask; handing it over skips transformers' general mask builder, a sixteenth of a batch-16 step
    on a CPU. A single row has no padding, and transformers then needs no mask at all. Caches with
    sliding-window layers keep fewer columns than the mask has, so they get transformers' masks."""
    if attention_mask.shape[0] > 1 and attention_implementation(model) == "sdpa" and not has_sliding_layers(cache):
        return attention_mask[:, None, None, :].bool()
    return attention_mask


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every token that ends a reply: the tokenizer's EOS and the model's generation config's."""
    ids: set[int] = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids |= set(eos) if isinstance(eos, (list, tuple, set)) else {eos}
    return {int(t) for t in ids if t is not None}


def context_limit(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
