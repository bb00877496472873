"""A KV cache that appends in place.

transformers' ``DynamicLayer`` grows by ``torch.cat`` on every decode step, copying each layer's
whole cache to add one column. For a small model decoding a batch of 16 on a CPU that copy was a
third of the step. :class:`PreallocatedLayer` keeps spare columns instead: ``keys``/``values`` are
views into larger buffers, a new token is written into the next free column, and the buffers are
reallocated (with room to spare) only when they fill up.

It stays a ``DynamicLayer`` for everything else (mask sizes, sequence length, the batch
operations), so models and code that handle a ``DynamicCache`` handle this one too. Code that
assigns ``keys``/``values`` directly (the server's cache merging, ``batch_select_indices``) is
fine: the next update sees the tensors are no longer its buffers' views and adopts them.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

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
    if not hasattr(config, "get_text_config"):
        cache = DynamicCache()
        cache.layer_class_to_replicate = PreallocatedLayer
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
