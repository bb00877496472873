"""Every place the runtime leans on transformers internals, in one module.

The decode runtime goes below transformers' public ``generate``: it passes its own KV cache into
the forward, appends to cache layers in place, swaps a model's attention function for one step
and hands SDPA a finished mask. Those touch names that transformers moves between minor versions
(5.24 renamed the forward's ``past_key_values`` to ``cache``). They live here, so a new
transformers release breaks one module, and ``tests/test_runtime_compat.py`` says which shim broke
(:func:`check_transformers`) instead of a decode failing somewhere deep in a server.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import transformers
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# The transformers releases these shims were checked against (tests/test_runtime_compat.py runs
# check_transformers on whatever is installed; a release outside this list that passes it is fine).
TESTED_TRANSFORMERS_VERSIONS = ("5.24.0",)

__all__ = [
    "DynamicCache", "DynamicLayer", "TESTED_TRANSFORMERS_VERSIONS", "attention_implementation", "cache_layers",
    "check_transformers", "forward_parameters", "has_sliding_layers", "last_logits_only", "leading_columns",
    "new_dynamic_cache", "register_attention", "returned_cache", "sdpa_attention_forward", "using_attention",
    "with_cache",
]


# ------------------------------------------------------------------ forward
@functools.cache
def forward_parameters(model_type: type) -> frozenset[str]:
    # Read once per model class: prefill and every decode step ask.
    return frozenset(inspect.signature(model_type.forward).parameters)


def last_logits_only(model) -> dict:
    """Only the last position's logits are sampled from: the LM head over a whole prompt is wasted
    work in every prefill. Models whose forward lacks the argument compute them all."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(type(model)) else {}


def with_cache(model, cache) -> dict:
    """The forward's cache argument. transformers 5.24 renamed ``past_key_values`` to ``cache`` (the
    old name is accepted, with a warning, until 5.40); wrappers that take **kwargs get the old name."""
    return {"cache" if "cache" in forward_parameters(type(model)) else "past_key_values": cache}


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


# ------------------------------------------------------------------ attention
def attention_implementation(model) -> str | None:
    """``"sdpa"``, ``"eager"``, ... as the model's config says (private in transformers)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def register_attention(name: str, function: Callable) -> None:
    """Make ``function`` selectable as attention implementation ``name``."""
    AttentionInterface.register(name, function)


@contextmanager
def using_attention(model, name: str) -> Iterator[None]:
    """Run the model's attention modules through the registered function ``name`` for one forward.
    transformers reads the (private) config field on every forward, so switching it is enough."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


# ------------------------------------------------------------------ cache
def new_dynamic_cache(config, layer_class: type[DynamicLayer]) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers are ``layer_class``; other
    layer kinds (sliding windows, linear attention) stay as transformers builds them. Without a
    transformers config, every layer is a ``layer_class``, created on first use."""
    if not hasattr(config, "get_text_config"):
        cache = DynamicCache()
        cache.layer_class_to_replicate = layer_class
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [layer_class() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_layers(cache) -> list[Any]:
    """The cache's per-layer objects (each with ``keys``/``values`` [batch, heads, seq, dim])."""
    return list(getattr(cache, "layers", None) or ())


def has_sliding_layers(cache) -> bool:
    """Whether any layer keeps fewer columns than the attention mask has (sliding windows)."""
    return any(getattr(layer, "is_sliding", False) for layer in cache_layers(cache))


def leading_columns(cache, rows: Any, width: int, config) -> DynamicCache:
    """A new cache holding the first ``width`` columns of the given batch ``rows`` of ``cache``, for a
    forward that continues those rows from there. Slices, not copies: in training, gradients flow
    back into the forward that filled ``cache``."""
    out = DynamicCache(config=config) if hasattr(config, "get_text_config") else DynamicCache()
    for i, layer in enumerate(cache_layers(cache)):
        out.update(layer.keys[rows, :, :width], layer.values[rows, :, :width], i)
    return out


# ------------------------------------------------------------------ check
def check_transformers() -> list[str]:
    """What the installed transformers lacks of what the shims above use; empty when all is there."""
    problems: list[str] = []
    version = transformers.__version__
    for cls, names in ((DynamicLayer, ("update", "lazy_initialization", "get_seq_length", "reset",
                                       "batch_select_indices", "is_sliding")),
                       (DynamicCache, ("batch_select_indices", "get_seq_length"))):
        problems += [f"{cls.__name__}.{n} is gone" for n in names if not hasattr(cls, n)]
    layer = DynamicLayer()
    for name in ("keys", "values", "is_initialized"):
        if not hasattr(layer, name):
            problems.append(f"DynamicLayer instances have no {name!r} attribute")
    if not hasattr(DynamicCache(), "layer_class_to_replicate"):
        problems.append("DynamicCache() has no 'layer_class_to_replicate' (how a config-less cache makes layers)")
    if not hasattr(DynamicCache(), "layers"):
        problems.append("DynamicCache() has no 'layers' list")
    if not callable(getattr(AttentionInterface, "register", None)):
        problems.append("AttentionInterface.register is gone (custom attention functions)")
    sdpa = inspect.signature(sdpa_attention_forward).parameters
    problems += [f"sdpa_attention_forward lost its {n!r} argument" for n in
                 ("module", "query", "key", "value", "attention_mask", "scaling", "is_causal") if n not in sdpa]
    from transformers import LlamaConfig, LlamaForCausalLM

    forward = forward_parameters(LlamaForCausalLM)
    if not {"cache", "past_key_values"} & forward and "kwargs" not in forward:
        problems.append("LlamaForCausalLM.forward takes neither 'cache' nor 'past_key_values'")
    for name in ("logits_to_keep", "position_ids", "attention_mask", "use_cache"):
        if name not in forward:
            problems.append(f"LlamaForCausalLM.forward lost its {name!r} argument")
    if not hasattr(LlamaConfig(), "_attn_implementation"):
        problems.append("model configs have no '_attn_implementation' (attention switching)")
    # steer.core.template.backend_encoder (the prompt tokenizer's fast path; it imports no
    # transformers, so it recognises the method by name and falls back to a plain call without it).
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if getattr(TokenizersBackend, "_encode_plus", None) is None:
        problems.append("TokenizersBackend._encode_plus is gone (the prompt tokenizer's fast path)")
    return [f"transformers {version} (tested: {', '.join(TESTED_TRANSFORMERS_VERSIONS)}): {p}" for p in problems]
