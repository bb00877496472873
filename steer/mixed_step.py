"""A decode step that also prefills the requests joining the batch, in the same forward.

A server that prefills each admitted request on its own stalls every running row for a whole
forward pass. For a small model on a CPU that pass is mostly fixed cost (transformers' Python
modules run the same at 1 token or 30), so under sustained load the engine spent a sixth of its
time in prefills that added little real work. :func:`mixed_step` instead packs everything into one
flat sequence: first the prompt tokens of each joining row except its last, then one token per batch
row (a running row's pending token, a free slot's padding, a joining row's last prompt token). The
linear layers see only those tokens; attention is done per part by :func:`_mixed_attention`:

- the per-row tokens attend over the batch's KV cache under the padding mask, exactly as in
  :func:`steer.generation.decode_step`;
- each joining prompt attends causally to itself only (a block-diagonal mask when several join).

A joining row takes over a free batch row. Its prompt is written right-aligned, ending at the new
column every row gets this step, over columns that row no longer uses, so the layout is the one
:func:`steer.generation.prefill` plus the server's slot placement would give.

Models whose attention goes through transformers' attention interface and whose cache is a
:mod:`steer.kv_cache` preallocated one can take this path (:func:`supports_mixed_step`); others
keep the separate prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from steer.generation import DecodeState
from steer.kv_cache import PreallocatedLayer

ATTENTION_NAME = "steer_mixed_step"
# Architectures whose attention modules project, rotate and then call the registered attention
# function with the model's own cache untouched when none is passed; checked against a separate
# prefill in tests/test_mixed_step.py for Llama.
MIXED_STEP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class _Layout:
    """Where each part of the flat sequence goes; built once per step, read by every layer."""

    layers: list[PreallocatedLayer]
    prefix_length: int  # joining prompts' tokens before the per-row tokens
    joins: list[tuple[int, int, int]]  # (batch row, offset in the flat sequence, prefix length)
    row_mask: torch.Tensor  # [batch, 1, 1, columns] bool: what each per-row token may attend to
    prefix_mask: torch.Tensor | None  # [1, 1, P, P] block-diagonal causal; None: one prompt, causal


def supports_mixed_step(model, state: DecodeState | None) -> bool:
    """Whether :func:`mixed_step` can run ``model`` on the batch ``state``."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(state, "past_key_values", None), "layers", None)
    return (
        getattr(config, "model_type", None) in MIXED_STEP_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and bool(layers)
        and all(isinstance(layer, PreallocatedLayer) for layer in layers)
    )


def fits(state: DecodeState, prompt_length: int) -> bool:
    """Whether a prompt of ``prompt_length`` tokens fits in the batch's columns after this step."""
    return 1 <= prompt_length <= state.attention_mask.shape[1] + 1


@torch.inference_mode()
def mixed_step(model, tokens: torch.Tensor, state: DecodeState, joining: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
    """Feed one token per batch row (``tokens``, [batch]) and prefill each ``(row, prompt_ids)`` of
    ``joining`` into its (free) batch row in the same forward. A joining row's entry in ``tokens``
    is ignored: its last prompt token takes that place. Returns the next logits for every batch row
    ([batch, vocab]) and advances ``state`` in place, as :func:`steer.generation.decode_step` does."""
    device = tokens.device
    batch, width = state.attention_mask.shape
    end = width  # the column every row writes this step
    tokens = tokens.clone()
    positions = state.next_positions.clone()
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((batch, 1))], dim=-1)
    prefix_ids: list[int] = []
    prefix_positions: list[int] = []
    joins: list[tuple[int, int, int]] = []
    for row, prompt in joining:
        length = len(prompt)
        if not 1 <= length <= end + 1:
            raise ValueError(f"a {length}-token prompt does not fit a batch of {width} columns")
        joins.append((row, len(prefix_ids), length - 1))
        prefix_ids.extend(prompt[:-1])
        prefix_positions.extend(range(length - 1))
        tokens[row] = prompt[-1]
        positions[row] = length - 1
        mask[row] = 0
        mask[row, end + 1 - length:] = 1
    prefix_length = len(prefix_ids)
    prefix_mask = None
    if len([j for j in joins if j[2]]) > 1:
        prefix_mask = torch.zeros((prefix_length, prefix_length), dtype=torch.bool, device=device)
        for _, offset, length in joins:
            prefix_mask[offset:offset + length, offset:offset + length] = torch.ones(
                (length, length), dtype=torch.bool, device=device).tril()
        prefix_mask = prefix_mask[None, None]
    flat_ids = torch.cat([torch.tensor(prefix_ids, dtype=torch.long, device=device), tokens])
    flat_positions = torch.cat([torch.tensor(prefix_positions, dtype=torch.long, device=device), positions])
    layout = _Layout(
        layers=list(state.past_key_values.layers),
        prefix_length=prefix_length,
        joins=joins,
        row_mask=mask[:, None, None, :].bool(),
        prefix_mask=prefix_mask,
    )
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        out = model(input_ids=flat_ids[None], position_ids=flat_positions[None], use_cache=False,
                    logits_to_keep=batch, steer_layout=layout)
    finally:
        config._attn_implementation = previous
    state.attention_mask = mask
    state.next_positions = positions + 1
    return out.logits[0]


def _mixed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    layout: _Layout | None = kwargs.pop("steer_layout", None)
    if layout is None:  # a forward that is not a mixed step
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    split = layout.prefix_length
    layer = layout.layers[module.layer_idx]
    # Per-row tokens: append one column to every batch row, as a decode step does.
    row_keys = key[0, :, split:].transpose(0, 1).unsqueeze(2)
    row_values = value[0, :, split:].transpose(0, 1).unsqueeze(2)
    keys, values = layer.update(row_keys, row_values)
    end = keys.shape[2] - 1
    # Joining prompts: written right-aligned into their batch rows, ending just before that column.
    for row, offset, length in layout.joins:
        if length:
            keys[row, :, end - length:end] = key[0, :, offset:offset + length]
            values[row, :, end - length:end] = value[0, :, offset:offset + length]
    rows_query = query[0, :, split:].transpose(0, 1).unsqueeze(2)
    rows_out, _ = sdpa_attention_forward(module, rows_query, keys, values, layout.row_mask, scaling=scaling)
    rows_out = rows_out.reshape(1, rows_out.shape[0], *rows_out.shape[2:])
    if not split:
        return rows_out, None
    prefix_out, _ = sdpa_attention_forward(
        module, query[:, :, :split], key[:, :, :split], value[:, :, :split], layout.prefix_mask,
        scaling=scaling, is_causal=layout.prefix_mask is None,
    )
    return torch.cat([prefix_out, rows_out], dim=1), None


AttentionInterface.register(ATTENTION_NAME, _mixed_attention)
