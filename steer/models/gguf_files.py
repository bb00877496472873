"""GGUF files as base models: llama.cpp's single-file format, read through transformers.

transformers de-quantises a GGUF checkpoint into an ordinary model (``gguf_file=``), so everything
downstream (LoRA, merging, the decode runtime) sees a plain ``PreTrainedModel``. This module holds
what that path needs beyond transformers: recognising a GGUF path, a clear error when the optional
``gguf`` package is missing, and the repairs real files need (unset token ids written as 2^32-1,
special tokens that the tokenizer conversion leaves unnamed).
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# The ids a GGUF file may carry for special tokens, and the tokenizer attribute each one names.
SPECIAL_TOKEN_FIELDS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
# steer's own settings inside a GGUF that `steer export gguf` wrote (JSON strings where structured).
STEER_FORMAT_KEY = "steer.format_version"
STEER_VERSION_KEY = "steer.version"
STEER_KIND_KEY = "steer.kind"
STEER_NAME_KEY = "steer.name"
STEER_SCHEMA_KEY = "steer.schema"
STEER_TEMPLATE_KEY = "steer.core.template"
STEER_TRAINED_VALUES_KEY = "steer.trained_values"


class GgufError(SteerError, RuntimeError):
    pass


def is_gguf_path(name_or_path: str | Path) -> bool:
    return str(name_or_path).lower().endswith(GGUF_SUFFIX)


def gguf_location(name_or_path: str | Path) -> tuple[str, str]:
    """(folder, file name) of a local GGUF file, the two halves ``from_pretrained(..., gguf_file=)`` takes."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise GgufError(f"GGUF file {str(name_or_path)!r} does not exist (a .gguf base must be a local file)")
    require_gguf()
    return str(path.resolve().parent), path.name


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufError("reading .gguf files needs the gguf package: pip install 'steer[gguf]'") from None


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's metadata without its arrays' contents: numbers, strings and booleans as they
    are; arrays of strings (the vocabulary, the merges) as their lengths. Read with transformers'
    header reader, which walks past those arrays (0.04 s for SmolLM2-135M, against 6 s for
    ``gguf.GGUFReader``, which decodes all 49,152 tokens and merges), and once per version of a
    file however many loaders ask."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return dict(_gguf_metadata(str(resolved), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _gguf_metadata(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, Any], ...]:
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # transformers without its own reader: the gguf package's, slower
        from gguf import GGUFReader

        out = []
        for key, field in GGUFReader(path).fields.items():
            if not field.data:
                continue
            if len(field.types) > 1:  # an array
                out.append((key, len(field.data)))
                continue
            part = field.parts[field.data[0]]
            out.append((key, bytes(part).decode("utf-8") if field.types[0].name == "STRING" else part[0].item()))
        return tuple(out)
    metadata, _ = read_gguf_metadata(path)
    return tuple((k, len(v) if isinstance(v, list) else v) for k, v in metadata.items())


def read_special_token_ids(path: str | Path) -> dict[str, int]:
    """Special-token ids recorded in the file's metadata, unset ones (2^32-1 and friends) left out."""
    metadata = gguf_metadata(path)
    return {attr: metadata[key] for key, attr in SPECIAL_TOKEN_FIELDS.items()
            if isinstance(metadata.get(key), int) and 0 <= metadata[key] < 2**31}


def read_string_field(path: str | Path, key: str) -> str | None:
    """One string-valued metadata key of a GGUF file, or None when the file does not set it."""
    value = gguf_metadata(path).get(key)
    return value if isinstance(value, str) else None


def read_steer_metadata(path: str | Path) -> dict[str, str]:
    """The ``steer.*`` keys, ``general.type`` and the chat template of a GGUF file, as strings
    (absent keys left out)."""
    return {key: value for key, value in gguf_metadata(path).items()
            if (key.startswith("steer.") or key in ("general.type", CHAT_TEMPLATE_KEY)) and isinstance(value, str)}


def steer_config_from_gguf(path: str | Path) -> dict:
    """What ``steer_config.json`` says, rebuilt from the ``steer.*`` metadata of a GGUF file that
    ``steer export gguf`` wrote: a policy that is one file."""
    import json

    gguf_location(path)  # a clear error when the file or the gguf package is missing
    meta = read_steer_metadata(path)
    if meta.get("general.type") == "adapter":
        raise GgufError(f"{path} is a LoRA adapter GGUF: it needs its base model (llama.cpp's --lora); steer loads "
                        "the merged export (`steer export gguf` without --adapter-only)")
    if STEER_SCHEMA_KEY not in meta:
        raise GgufError(f"{path} is a GGUF file without steer metadata ({STEER_SCHEMA_KEY}), so it is not a policy; "
                        "write one with `steer export gguf` (a plain GGUF model is a --base-model for `steer sft`)")
    try:
        return {"format_version": int(meta.get(STEER_FORMAT_KEY, "1")), "kind": meta.get(STEER_KIND_KEY, "policy"),
                "schema": json.loads(meta[STEER_SCHEMA_KEY]),
                "template": json.loads(meta.get(STEER_TEMPLATE_KEY) or '{"type": "steerlm"}'),
                "name": meta.get(STEER_NAME_KEY) or Path(path).stem, "base_model": str(path), "adapter": None,
                "merged": None,
                **({"trained_values": json.loads(meta[STEER_TRAINED_VALUES_KEY])}
                   if STEER_TRAINED_VALUES_KEY in meta else {})}
    except (ValueError, TypeError) as e:
        raise GgufError(f"{path}: its steer metadata is unreadable: {e}") from None


def repair_tokenizer(tokenizer, path: str | Path):
    """Name the special tokens the GGUF metadata gives by id when the conversion left them unset
    (stories260K's ``<s>`` and ``</s>`` come back as ``None``)."""
    for attr, token_id in read_special_token_ids(path).items():
        if getattr(tokenizer, attr) is None and token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    _prefix_space_like_llama_cpp(tokenizer, path)
    return tokenizer


def _prefix_space_like_llama_cpp(tokenizer, path: str | Path) -> None:
    """A sentencepiece ("llama") vocabulary prefixes a space to every stretch of text, at the start
    and after each added token, in llama.cpp and in the original Llama ``tokenizer.json``.
    transformers' GGUF conversion prefixes one only at the very start (Metaspace, "first"), so
    ``<extra_id_1>User`` and ``"  hi"`` came out differently from the model's own tokenizer (a
    steer policy's template markers are such added tokens). The original normalizer is restored."""
    from tokenizers import normalizers

    metadata = gguf_metadata(path)
    if metadata.get("tokenizer.ggml.model") != "llama" or metadata.get("general.architecture") != "llama":
        return
    if metadata.get("tokenizer.ggml.add_space_prefix") is not None and not metadata["tokenizer.ggml.add_space_prefix"]:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None


def repair_config(config):
    """Token ids outside the vocabulary mean "unset" in GGUF files (llama.cpp writes 2^32-1);
    transformers would build an embedding with an impossible padding index from them."""
    vocab = getattr(config, "vocab_size", None)
    for name in list(config.to_dict()):
        value = getattr(config, name, None)
        if name.endswith("_token_id") and isinstance(value, int) and vocab is not None and not 0 <= value < vocab:
            setattr(config, name, None)
    return config


def forget_gguf_origin(model):
    """transformers marks a model de-quantised from GGUF as quantised, so ``Trainer`` refuses to
    fine-tune it and ``save_pretrained`` records a GGUF quantisation config. Its weights are plain
    tensors by now: clear the marks."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for module in model.modules():
        if hasattr(module, "config") and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False
    return model


@contextmanager
def tolerant_gguf_reading():
    """Load GGUF metadata the way llama.cpp means it.

    llama.cpp writes 2^32-1 for a special token the model does not have (stories260K's padding
    token); transformers 5 indexes the vocabulary with it while converting the tokenizer and fails
    with an IndexError. Unset ids are dropped from the metadata it reads, and its warning about the
    same id in the model config is silenced, since :func:`repair_config` clears that id."""
    from transformers.integrations.gguf import reader
    from transformers.utils import logging as hf_logging

    read = reader.read_gguf_metadata

    def read_without_unset_ids(*args, **kwargs):
        metadata, rest = read(*args, **kwargs)
        tokens = metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list):
            for key in [k for k in metadata if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")]:
                if not (isinstance(metadata[key], int) and 0 <= metadata[key] < len(tokens)):
                    del metadata[key]
        return metadata, rest

    class _DropPadWarning(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "_token_id must be `None` or an integer within the vocabulary" not in record.getMessage()

    import gguf

    hf_logger = hf_logging.get_logger("transformers.configuration_utils")
    drop = _DropPadWarning()
    reader.read_gguf_metadata = read_without_unset_ids
    # transformers builds gguf's tensor-name map once per tensor of the model (397 times for
    # SmolLM2-135M, about 4 s); it depends only on the architecture and the number of blocks.
    name_map = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = _cached_tensor_name_map
    hf_logger.addFilter(drop)
    try:
        yield
    finally:
        reader.read_gguf_metadata = read
        gguf.get_tensor_name_map = name_map
        hf_logger.removeFilter(drop)


@functools.lru_cache(maxsize=16)
def _cached_tensor_name_map(arch, n_blocks):
    from gguf.tensor_mapping import get_tensor_name_map

    return get_tensor_name_map(arch, n_blocks)
