"""A KV cache that appends in place.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every decode step, copying each layer's
whole cache to add one column. For a small model decoding a batch of 16 on a CPU that copy was a
third of the step. :class:`PreallocatedLayer` keeps spare columns instead: ``keys``/``values`` are
views into larger buffers, a new token is written into the next free column, and the buffers are
reallocated (with room to spare) only when they fill up.

It stays a ``DynamicLayer`` for everything else (mask sizes, sequence length, the batch
operations), so models and code that handle a ``DynamicCache`` handle this one too. Code that
assigns ``keys``/``values`` directly (the batch operations below, ``batch_select_indices``) is
fine: the next update sees the tensors are no longer its buffers' views and adopts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from steer.runtime.compat import DynamicCache, DynamicLayer, new_dynamic_cache

# Spare columns on reallocation: at least this many, or half the length, whichever is more,
# so copies stay rare for long sequences without doubling the memory of short ones.
MIN_SPARE_COLUMNS = 32


class PreallocatedLayer(DynamicLayer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._owns_current() or end > self._key_buffer.shape[-2]:
            self._reallocate(key_states, value_states, end)
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _owns_current(self) -> bool:
        """Whether ``keys``/``values`` are still the views this layer handed out."""
        if self._key_buffer is None or self.keys is None or self.keys.numel() == 0:
            return False
        return (
            self.keys.data_ptr() == self._key_buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
            and self.keys.shape[0] == self._key_buffer.shape[0]
            and self.keys.stride() == self._key_buffer.stride()
        )

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        length = self.get_seq_length()
        capacity = needed + max(MIN_SPARE_COLUMNS, needed // 2)
        batch, heads, _, key_dim = key_states.shape
        key_buffer = key_states.new_empty((batch, heads, capacity, key_dim))
        value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if length:
            key_buffer[:, :, :length] = self.keys
            value_buffer[:, :, :length] = self.values
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def new_kv_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers append in place; other
    layer kinds (sliding windows, linear attention) are left as transformers builds them. Without a
    transformers config, every layer is a :class:`PreallocatedLayer`, created on first use."""
    return new_dynamic_cache(config, PreallocatedLayer)


def is_preallocated(cache) -> bool:
    """Whether every layer of ``cache`` is a :class:`PreallocatedLayer`: plain ``[batch, heads, seq,
    dim]`` tensors the scheduler may write rows into, merge and slice (``steer.runtime.scheduler``)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(isinstance(layer, PreallocatedLayer) for layer in layers)


# ------------------------------------------------------------ the batch's state
# Everything below relies on the layout PreallocatedLayer keeps: per layer, ``keys``/``values`` of
# [batch, heads, columns, dim], every row right-aligned (its last token in the last column) and the
# attention mask [batch, columns] saying which columns hold real tokens. steer.runtime.mixed_step
# writes joining prompts into the same layout.
@dataclass
class DecodeState:
    """What the next decode step needs: the model's KV cache, the attention mask over every
    position so far ([batch, columns], 0 on left padding) and each row's next position id."""

    past_key_values: Any
    attention_mask: torch.Tensor
    next_positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def columns(self) -> int:
        return self.attention_mask.shape[1]


def add_free_rows(state: DecodeState, n: int) -> None:
    """Append ``n`` empty rows to the batch (nothing in their cache columns is attended to)."""
    for layer in state.past_key_values.layers:
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((n, *layer.keys.shape[1:]))])
        layer.values = torch.cat([layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))])
    state.attention_mask = torch.cat(
        [state.attention_mask, state.attention_mask.new_zeros((n, state.attention_mask.shape[1]))])
    state.next_positions = torch.cat([state.next_positions, state.next_positions.new_zeros(n)])


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` zero columns in front: of a layer's [batch, heads, columns, dim] keys or values, or of
    a [batch, columns] attention mask."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[-2 if t.dim() == 4 else -1] = n
    return torch.cat([t.new_zeros(shape), t], dim=-2 if t.dim() == 4 else -1)


def add_columns(state: DecodeState, n: int) -> None:
    """Put ``n`` empty columns in front of every row (nothing attends to them): room on the left
    for a prompt longer than the batch's columns to be written right-aligned."""
    for layer in state.past_key_values.layers:
        layer.keys, layer.values = _pad_left(layer.keys, n), _pad_left(layer.values, n)
    state.attention_mask = _pad_left(state.attention_mask, n)


def place_row(state: DecodeState, new: DecodeState, j: int, slot: int, length: int) -> None:
    """Write row ``j`` of the freshly prefilled ``new`` (``length`` real tokens) into batch row
    ``slot`` of ``state``, right-aligned like every row."""
    width = state.columns
    for layer, added in zip(state.past_key_values.layers, new.past_key_values.layers):
        layer.keys[slot, :, width - length:] = added.keys[j, :, -length:]
        layer.values[slot, :, width - length:] = added.values[j, :, -length:]
    state.attention_mask[slot] = 0
    state.attention_mask[slot, width - length:] = 1
    state.next_positions[slot] = new.next_positions[j]


def select_new_rows(new: DecodeState, rows: list[int]) -> None:
    """Keep only rows ``rows`` of a freshly prefilled state (any cache kind)."""
    index = torch.tensor(rows, dtype=torch.long, device=new.attention_mask.device)
    new.past_key_values.batch_select_indices(index)
    new.attention_mask = new.attention_mask.index_select(0, index)
    new.next_positions = new.next_positions.index_select(0, index)


def merge_states(old: DecodeState, new: DecodeState) -> None:
    """Append ``new``'s rows to ``old``, left-padding the shorter cache."""
    old_len, new_len = old.columns, new.columns
    width = max(old_len, new_len)
    for layer, added in zip(old.past_key_values.layers, new.past_key_values.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width - old_len), _pad_left(added.keys, width - new_len)])
        layer.values = torch.cat([_pad_left(layer.values, width - old_len), _pad_left(added.values, width - new_len)])
    old.attention_mask = torch.cat(
        [_pad_left(old.attention_mask, width - old_len), _pad_left(new.attention_mask, width - new_len)])
    old.next_positions = torch.cat([old.next_positions, new.next_positions])


def select_rows(state: DecodeState, keep: list[int], preallocated: bool, trim: bool = True) -> None:
    """Keep only batch rows ``keep``; on a preallocated cache, also drop the columns no row uses
    (unless not ``trim``: free rows kept for what their cache still holds attend to nothing)."""
    index = torch.tensor(keep, dtype=torch.long, device=state.attention_mask.device)
    state.attention_mask = state.attention_mask.index_select(0, index)
    state.next_positions = state.next_positions.index_select(0, index)
    if not preallocated:
        state.past_key_values.batch_select_indices(index)
        return
    for layer in state.past_key_values.layers:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
    if trim:
        trim_columns(state, min_columns=1)


def trim_columns(state: DecodeState, min_columns: int, keep_from: int | None = None) -> None:
    """Cut leading cache columns no row attends to any more, if there are ``min_columns`` of them;
    never column ``keep_from`` or any after it."""
    first = int(state.attention_mask.any(0).int().argmax())
    if keep_from is not None:
        first = min(first, keep_from)
    if first >= min_columns:
        state.attention_mask = state.attention_mask[:, first:]
        for layer in state.past_key_values.layers:
            layer.keys, layer.values = layer.keys[:, :, first:, :], layer.values[:, :, first:, :]
