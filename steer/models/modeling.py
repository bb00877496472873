"""Loading models and tokenizers: hub ids, local directories or GGUF files, safe by default.

safetensors only, ``trust_remote_code`` off unless the caller asks, 4-bit only on CUDA.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from steer.core.errors import SteerError
from steer.models.gguf_files import (forget_gguf_origin, gguf_location, is_gguf_path, repair_config, repair_tokenizer,
                              tolerant_gguf_reading)

logger = logging.getLogger(__name__)


class ModelLoadError(SteerError, RuntimeError):
    pass


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None


# cuDNN's fused attention compiles an execution plan per shape (pytorch/pytorch#155958), and an
# inference loop brings new shapes all the time: the KV cache grows by a column every decode step
# and each prompt batch has its own length. On an H200 (torch 2.11, bf16) a plain decode step of
# the demo policy took 50-68 ms under SDPA's default backend choice, against 6.8 ms for a mixed
# step of the same batch, whose per-row queries are a strided view. Inference leaves cuDNN out;
# training keeps the default.
INFERENCE_SDPA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def inference_attention() -> AbstractContextManager:
    """Scaled-dot-product attention backends for generation and scoring (no cuDNN attention)."""
    return sdpa_kernel(list(INFERENCE_SDPA_BACKENDS))


def check_4bit_available() -> None:
    """QLoRA needs bitsandbytes on a CUDA GPU; say so at once instead of failing mid-load."""
    if not torch.cuda.is_available():
        raise ModelLoadError("--load-in-4bit needs a CUDA GPU (bitsandbytes 4-bit); none is available on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("--load-in-4bit needs bitsandbytes: pip install 'steer[cuda]'") from None


SUPPORTED_MODELS = ("steer loads models in the transformers format (a directory with config.json, safetensors "
                    "weights and tokenizer files, what save_pretrained writes, or a hub id) or a .gguf file")


def unsupported_model_message(name_or_path: str | Path) -> str | None:
    """What a local model path is when it is not something steer loads (a lone weights file, a
    folder without config.json or with only pickled weights); None otherwise (GGUF files load)."""
    path = Path(name_or_path)
    if not path.exists() or is_gguf_path(path):
        return None  # a hub id or a GGUF file: the loader's own message says what went wrong
    if path.is_file():
        return f"{path} is a single file ({path.suffix or 'no extension'}), not a model directory; {SUPPORTED_MODELS}"
    files = sorted(p.name for p in path.iterdir() if p.is_file())
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if not (path / "config.json").exists():
        if ggufs:
            return (f"{path} has no config.json but holds GGUF file(s) {', '.join(ggufs)}: pass the .gguf file itself "
                    f"(for example {path / ggufs[0]})")
        found = f"{', '.join(files[:5])}{' ...' if len(files) > 5 else ''}" if files else "nothing"
        return f"{path} has no config.json, so it is not a transformers model directory (it holds {found}); " \
               f"{SUPPORTED_MODELS}"
    if not any(f.endswith(".safetensors") for f in files) and any(f.endswith((".bin", ".pt", ".pth")) for f in files):
        return (f"{path} holds only pickled PyTorch weights (.bin/.pt), which steer does not load (they can run "
                f"code); {SUPPORTED_MODELS} (save_pretrained(..., safe_serialization=True) converts them)")
    return None


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        if is_gguf_path(name_or_path):
            gguf_location(name_or_path)  # a clear error when the file or the gguf package is missing
            # Callers adjust their tokenizer (padding side, added tokens): each gets its own copy.
            tok = copy.deepcopy(_cached_gguf_tokenizer(*_file_version(Path(name_or_path)), trust_remote_code))
        else:
            tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(unsupported_model_message(name_or_path)
                             or f"could not load a tokenizer from {name_or_path!r}: {e}") from None
    if tok.pad_token is None:
        # Padding positions are masked out, so reusing EOS (or UNK) as the pad token is safe.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


@functools.lru_cache(maxsize=4)
def _cached_gguf_tokenizer(path: str, mtime_ns: int, size: int, trust_remote_code: bool):
    """A GGUF file's tokenizer, converted once per file version (7 s for SmolLM2-135M's 49,152
    tokens and merges; a copy takes 0.2 s)."""
    from transformers import AutoTokenizer

    with tolerant_gguf_reading():
        tok = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name,
                                            trust_remote_code=trust_remote_code)
    return repair_tokenizer(tok, path)


def load_causal_lm(
    name_or_path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
):
    from transformers import AutoModelForCausalLM

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    source, kwargs = pretrained_source(name_or_path, trust_remote_code)
    kwargs["trust_remote_code"] = trust_remote_code
    if load_in_4bit:
        check_4bit_available()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    else:
        kwargs["dtype"] = resolve_dtype(dtype, device)
    try:
        with tolerant_gguf_reading() if "gguf_file" in kwargs else nullcontext():
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(unsupported_model_message(name_or_path)
                             or f"could not load a causal LM from {name_or_path!r}: {e}") from None
    if "gguf_file" in kwargs:
        forget_gguf_origin(model)
    if not load_in_4bit:
        model.to(device)
    return model


def pretrained_source(name_or_path: str | Path, trust_remote_code: bool = False) -> tuple[str, dict]:
    """Where ``from_pretrained`` reads a model, and the arguments that say how: safetensors only for
    hub ids and directories; for a ``.gguf`` file, its folder, ``gguf_file`` and the configuration
    read (and repaired) from its metadata. A GGUF file is one self-describing file (no pickle
    inside), de-quantised on load into an ordinary model: fp32 on CPU, bf16 on CUDA."""
    if is_gguf_path(name_or_path):
        folder, file = gguf_location(name_or_path)
        return folder, {"gguf_file": file, "config": _gguf_config(folder, file, trust_remote_code)}
    return str(name_or_path), {"use_safetensors": True}


def load_pretrained(auto_class, name_or_path: str | Path, trust_remote_code: bool = False,
                    config_overrides: dict | None = None, **kwargs):
    """``auto_class.from_pretrained`` for a hub id, a directory or a ``.gguf`` file (the APM's
    backbones: ``AutoModel``, ``AutoModelForSequenceClassification``). ``config_overrides`` set
    configuration fields (``num_labels`` ...) either way. Errors pass through to the caller."""
    source, extra = pretrained_source(name_or_path, trust_remote_code)
    overrides = dict(config_overrides or {})
    if "config" in extra:
        # With a ready configuration, from_pretrained would hand these to the model's constructor.
        for key, value in overrides.items():
            setattr(extra["config"], key, value)
        overrides = {}
    with tolerant_gguf_reading() if "gguf_file" in extra else nullcontext():
        loaded = auto_class.from_pretrained(source, trust_remote_code=trust_remote_code, **extra, **overrides, **kwargs)
    if "gguf_file" in extra:
        forget_gguf_origin(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def load_gguf_config(path: str | Path, trust_remote_code: bool = False):
    """The model configuration a GGUF file describes, read from its metadata alone (no weights)."""
    folder, file = gguf_location(path)
    return _gguf_config(folder, file, trust_remote_code)


def _gguf_config(folder: str, file: str, trust_remote_code: bool):
    # transformers reads a llama-family GGUF's configuration by parsing the whole file, vocabulary
    # included (5 s for SmolLM2-135M); a pipeline loading the same base several times does it once.
    return copy.deepcopy(_cached_gguf_config(*_file_version(Path(folder) / file), trust_remote_code))


@functools.lru_cache(maxsize=8)
def _cached_gguf_config(path: str, mtime_ns: int, size: int, trust_remote_code: bool):
    from transformers import AutoConfig

    folder, file = str(Path(path).parent), Path(path).name
    try:
        with tolerant_gguf_reading():
            config = AutoConfig.from_pretrained(folder, gguf_file=file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"could not read the model configuration of GGUF file {file!r}: {e}") from None
    return repair_config(config)


def _file_version(path: Path) -> tuple[str, int, int]:
    """A cache key that changes when the file does."""
    resolved = path.resolve()
    stat = resolved.stat()
    return str(resolved), stat.st_mtime_ns, stat.st_size


def fit_embeddings(model, vocab_size: int | None) -> None:
    """Grow the embeddings to ``vocab_size`` rows when a policy added tokens (its template markers)
    to the base's vocabulary; the adapter then loads the trained rows over them."""
    if vocab_size and vocab_size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(int(vocab_size), mean_resizing=False)


def merge_adapter_into(model, adapter_dir: str | Path):
    """``model`` with the PEFT (LoRA) adapter in ``adapter_dir`` folded into its weights, so that
    inference runs at the base model's cost."""
    from peft import PeftModel

    with quiet_peft_deprecations():
        adapted = PeftModel.from_pretrained(model, str(adapter_dir))
    return adapted.merge_and_unload()


@contextmanager
def quiet_peft_deprecations():
    """PEFT 0.21 reads an attribute transformers 5 renamed (``is_gradient_checkpointing``) whenever
    it wraps a model: a deprecation between the two libraries that nobody using steer can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
