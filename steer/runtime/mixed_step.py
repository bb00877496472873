"""A decode step that also prefills the requests joining the batch, in the same forward.

A server that prefills each admitted request on its own stalls every running row for a whole
forward pass. For a small model on a CPU that pass is mostly fixed cost (transformers' Python
modules run the same at 1 token or 30), so under sustained load the engine spent a sixth of its
time in prefills that added little real work. :func:`mixed_step` instead packs everything into one
flat sequence: first the prompt tokens of each joining row except its last, then one token per batch
row (a running row's pending token, a free slot's padding, a joining row's last prompt token). The
linear layers see only those tokens; attention is done per part by :func:`_mixed_attention`:

- the per-row tokens attend over the batch's KV cache under the padding mask, exactly as in
  :func:`steer.runtime.model_runner.decode_step`;
- each joining prompt attends causally to itself only; several joining prompts are gathered into
  a right-padded batch for that (a block-diagonal mask over all of them would cost the square of
  their total length: 400 ms for 15 prompts of 117 tokens, against 8 ms padded).

A joining row takes over a free batch row. Its prompt is written right-aligned, ending at the new
column every row gets this step, over columns that row no longer uses, so the layout is the one
:func:`steer.runtime.model_runner.prefill` plus the scheduler's slot placement (:func:`steer.runtime.kv_cache.place_row`) would give.

Prompts of one policy start alike (the system turn and the template around the user's words; all of
a best-of-n request's choices are one prompt), so a joining row may name a running ``source`` row
whose cache already holds its first ``copied`` tokens. Those keys and values are copied into the
joining row's columns before the forward (a token's keys and values depend only on the tokens
before it and its position, which are the same), and only the rest of the prompt is fed; its tokens
then attend to the copied columns too. When every joining prompt is copied but its last token (a
client's next request with the same opening, the choices of a best-of-n), nothing is fed ahead of
the per-row tokens, and the step is :func:`~steer.runtime.model_runner.decode_step` itself.
``bench/decode_step.py`` times a mixed step with one joining prompt fed whole and copied: on the
SmolLM2-135M demo policy, sharing 23 of 42 tokens, 201 against 176 ms on the 2-core CPU; on
stories260K, where the model is too small for the tokens saved to outweigh the gathered attention,
no gain.

Models whose attention goes through transformers' attention interface and whose cache is a
:mod:`steer.runtime.kv_cache` preallocated one can take this path (:func:`supports_mixed_step`); others
keep the separate prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from steer.models.modeling import inference_attention
from steer.runtime.compat import attention_implementation, register_attention, sdpa_attention_forward, \
    using_attention
from steer.runtime.kv_cache import DecodeState, PreallocatedLayer, is_preallocated
from steer.runtime.model_runner import decode_step

ATTENTION_NAME = "steer_mixed_step"
# Architectures whose attention modules project, rotate and then call the registered attention
# function, leaving the cache alone when none is passed; each is checked against a separate
# prefill in tests/test_mixed_step.py.
MIXED_STEP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass
class _Layout:
    """Where each part of the flat sequence goes; built once per step, read by every layer."""

    layers: list[PreallocatedLayer]
    prefix_length: int  # joining prompts' tokens before the per-row tokens
    joins: list[tuple[int, int, int]]  # (batch row, offset in the flat sequence, tokens fed there)
    row_mask: torch.Tensor  # [batch, 1, 1, columns] bool: what each per-row token may attend to
    # Several prompts, or copied prefixes: flat prefix index of each (prompt, position) of the padded
    # queries, the padded position of each flat prefix token, the batch rows the prompts' keys are
    # read from (their last ``context`` columns before the new one), and the mask over those.
    # None: one prompt fed whole, which attends causally to itself alone.
    prefix_gather: torch.Tensor | None = None
    prefix_scatter: torch.Tensor | None = None
    prefix_rows: torch.Tensor | None = None
    single_row: int | None = None
    context: int = 0
    prefix_mask: torch.Tensor | None = None


class JoiningPrompt(NamedTuple):
    """A prompt joining the batch in free batch row ``row``; its first ``copied`` tokens are already
    cached in batch row ``source``, and are copied rather than fed. The source is a running row, or
    a free one (``row`` itself included) whose cache still holds an ended request's tokens: a row's
    tokens always end where its position count says, ``next_positions`` columns before the end,
    since every step appends one column and one position to every row, free ones included."""

    row: int
    prompt_ids: Sequence[int]
    source: int = -1
    copied: int = 0


def supports_mixed_step(model, state: DecodeState | None) -> bool:
    """Whether :func:`mixed_step` can run ``model`` on the batch ``state``."""
    return (
        getattr(getattr(model, "config", None), "model_type", None) in MIXED_STEP_MODEL_TYPES
        and attention_implementation(model) in ("sdpa", "eager")
        and is_preallocated(getattr(state, "past_key_values", None))
    )


def fits(state: DecodeState, prompt_length: int) -> bool:
    """Whether a prompt of ``prompt_length`` tokens fits in the batch's columns after this step."""
    return 1 <= prompt_length <= state.attention_mask.shape[1] + 1


@torch.inference_mode()
def mixed_step(model, tokens: torch.Tensor, state: DecodeState, joining: Sequence[JoiningPrompt | tuple]) -> torch.Tensor:
    """Feed one token per batch row (``tokens``, [batch]) and prefill each :class:`JoiningPrompt` (or
    ``(row, prompt_ids)``) of ``joining`` into its (free) batch row in the same forward. A joining
    row's entry in ``tokens`` is ignored: its last prompt token takes that place. Returns the next
    logits for every batch row ([batch, vocab]) and advances ``state`` in place, as
    :func:`steer.runtime.model_runner.decode_step` does."""
    device = tokens.device
    batch, width = state.attention_mask.shape
    end = width  # the column every row writes this step
    tokens = tokens.clone()
    positions = state.next_positions.clone()
    mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((batch, 1))], dim=-1)
    prefix_ids: list[int] = []
    prefix_positions: list[int] = []
    joins: list[tuple[int, int, int]] = []
    contexts: list[int] = []  # each join's columns before the new one: copied plus fed tokens
    copies = []
    cached = None
    for row, prompt, source, copied in (JoiningPrompt(*j) for j in joining):
        length = len(prompt)
        if not 1 <= length <= end + 1:
            raise ValueError(f"a {length}-token prompt does not fit a batch of {width} columns")
        if copied:
            cached = state.next_positions.tolist() if cached is None else cached
            if not 0 < copied < length or copied > cached[source] or cached[source] > end:
                raise ValueError(f"row {source} cannot lend {copied} tokens to a {length}-token prompt")
            copies.append((row, end - (length - 1), source, end - cached[source], copied))
        joins.append((row, len(prefix_ids), length - 1 - copied))
        contexts.append(length - 1)
        prefix_ids.extend(prompt[copied:-1])
        prefix_positions.extend(range(copied, length - 1))
        tokens[row] = prompt[-1]
        positions[row] = length - 1
        mask[row] = 0
        mask[row, end + 1 - length:] = 1
    if copies:
        _copy_columns(state, copies)
    if not prefix_ids:
        # Every joining prompt was copied but its last token (the same prompt again: a client's next
        # turn, a best-of-n's choices), which goes where a running row's pending token goes: this is
        # a plain decode step over the joined rows' masks and positions. It skips the flat layout's
        # cost (up to 0.3 ms of a 6-8 ms batch-16 step on stories260K), which the engine paid for
        # each arrival under sustained load.
        state.attention_mask = mask[:, :-1]
        state.next_positions = positions
        return decode_step(model, tokens, state)
    flat_ids = torch.cat([torch.tensor(prefix_ids, dtype=torch.long, device=device), tokens])
    flat_positions = torch.cat([torch.tensor(prefix_positions, dtype=torch.long, device=device), positions])
    layout = _Layout(
        layers=list(state.past_key_values.layers),
        prefix_length=len(prefix_ids),
        joins=joins,
        row_mask=mask[:, None, None, :].bool(),
    )
    fed = [(row, offset, length, context) for (row, offset, length), context in zip(joins, contexts) if length]
    if len(fed) > 1 or copies and fed:
        _pad_prefixes(layout, fed, device)
    with using_attention(model, ATTENTION_NAME), inference_attention():
        out = model(input_ids=flat_ids[None], position_ids=flat_positions[None], use_cache=False,
                    logits_to_keep=batch, steer_layout=layout)
    state.attention_mask = mask
    state.next_positions = positions + 1
    return out.logits[0]


def _copy_columns(state: DecodeState, copies: list[tuple[int, int, int, int, int]]) -> None:
    """Copy cached keys and values between batch rows: each ``(row, to, source, start, copied)``
    writes ``copied`` columns of row ``source`` from column ``start`` into row ``row`` from column
    ``to``. Every source is read before any row is written: a free row may lend what its cache
    still holds to the prompt that takes it over, or to another joining row, in the same step.
    Sources that no copy writes are copied straight, without a copy of their own first (15 against
    23 us for a slice of 115 columns on this CPU; a joining row copies one per layer for keys and
    one for values)."""
    written = {row for row, *_ in copies}
    hazard = any(source in written for _, _, source, _, _ in copies)
    for layer in state.past_key_values.layers:
        for cache in (layer.keys, layer.values):
            lent = [cache[source, :, start:start + copied] for _, _, source, start, copied in copies]
            if hazard:
                lent = [columns.clone() for columns in lent]
            for (row, to, _, _, copied), columns in zip(copies, lent):
                cache[row, :, to:to + copied] = columns


def _pad_prefixes(layout: _Layout, fed: list[tuple[int, int, int, int]], device) -> None:
    """The padded attention of the fed prompt tokens: each ``(row, offset, length, context)`` feeds
    ``length`` tokens from ``offset`` of the flat sequence, and they attend to the last ``context``
    columns of batch row ``row`` (copied tokens, then themselves, causally)."""
    longest = max(length for _, _, length, _ in fed)
    widest = max(context for _, _, _, context in fed)
    gather = torch.zeros((len(fed), longest), dtype=torch.long)
    scatter = torch.empty(layout.prefix_length, dtype=torch.long)
    allowed = torch.zeros((len(fed), longest, widest), dtype=torch.bool)
    queries = torch.arange(longest)[:, None]
    columns = torch.arange(widest)[None, :]
    for i, (_, offset, length, context) in enumerate(fed):
        gather[i, :length] = torch.arange(offset, offset + length)
        scatter[offset:offset + length] = torch.arange(i * longest, i * longest + length)
        own = columns >= widest - context
        # Query q is prompt token (context - length + q): it sees the columns up to its own. Padding
        # queries see the whole prompt, so no row of the mask is empty.
        causal = columns <= widest - length + queries.clamp(max=length - 1)
        allowed[i] = own & (causal | (queries >= length))
    layout.prefix_mask = allowed[:, None].to(device)
    layout.prefix_gather = gather.view(-1).to(device)
    layout.prefix_scatter = scatter.to(device)
    layout.prefix_rows = torch.tensor([row for row, *_ in fed], dtype=torch.long, device=device)
    layout.single_row = fed[0][0] if len(fed) == 1 else None
    layout.context = widest


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
    if layout.prefix_gather is None:
        prefix_out, _ = sdpa_attention_forward(module, query[:, :, :split], key[:, :, :split],
                                               value[:, :, :split], None, scaling=scaling, is_causal=True)
    else:
        prompts, longest = layout.prefix_mask.shape[0], layout.prefix_mask.shape[-2]
        padded_query = query[0, :, :split].index_select(1, layout.prefix_gather)
        padded_query = padded_query.view(padded_query.shape[0], prompts, longest, -1).transpose(0, 1)
        # Keys and values from the joining rows' cache: copied columns and the fed tokens just written.
        context = slice(end - layout.context, end)
        if layout.single_row is not None:  # a view of the one row, not a copy
            row = layout.single_row
            context_keys, context_values = keys[row:row + 1, :, context], values[row:row + 1, :, context]
        else:
            context_keys = keys[:, :, context].index_select(0, layout.prefix_rows)
            context_values = values[:, :, context].index_select(0, layout.prefix_rows)
        prefix_out, _ = sdpa_attention_forward(module, padded_query, context_keys, context_values,
                                               layout.prefix_mask, scaling=scaling)
        prefix_out = prefix_out.reshape(prompts * longest, *prefix_out.shape[2:])
        prefix_out = prefix_out.index_select(0, layout.prefix_scatter).unsqueeze(0)
    return torch.cat([prefix_out, rows_out], dim=1), None


register_attention(ATTENTION_NAME, _mixed_attention)
