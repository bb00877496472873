"""Writing llama.cpp's GGUF format: a Llama model with its tokenizer, or a LoRA adapter for one.

Tensor names, the Q/K row order and the tokenizer keys follow llama.cpp's own converters
(``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``), so the files load in llama.cpp and,
through ``gguf_file=``, in transformers. Only the Llama architecture is written: it is the one
steer's bases (stories260K, SmolLM2, the demo's tiny model) share.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steer.models.gguf_files import GgufError, require_gguf

logger = logging.getLogger(__name__)

# Hugging Face module name inside a Llama decoder layer -> llama.cpp tensor name inside ``blk.N``.
LLAMA_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
LLAMA_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

DTYPES = ("f32", "f16", "q8_0")

# llama.cpp's token types (gguf.TokenType), spelled out where they are chosen.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GgufExportError(GgufError):
    pass


# ------------------------------------------------------------------ tensors
def permute_for_llama_cpp(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter stores the rows of Q and K interleaved for its rotary layout
    (transformers' GGUF loader undoes exactly this). Rows are the output dimension, so the same
    permutation applies to a LoRA ``B`` matrix."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_name(hf_name: str) -> tuple[str, str | None]:
    """(llama.cpp tensor name without ``.weight``, the HF layer module kind) of an HF parameter
    or module name such as ``model.layers.3.self_attn.q_proj``."""
    name = hf_name.removesuffix(".weight")
    if name in LLAMA_GLOBAL_TENSORS:
        return LLAMA_GLOBAL_TENSORS[name], None
    parts = name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        kind = ".".join(parts[3:])
        if kind in LLAMA_LAYER_TENSORS:
            return f"blk.{parts[2]}.{LLAMA_LAYER_TENSORS[kind]}", kind
    raise GgufExportError(f"tensor {hf_name!r} has no llama.cpp name (only plain Llama layers are exported)")


def check_llama_config(config) -> None:
    """The Llama variants llama.cpp's ``llama`` architecture runs as they are; anything else is refused
    rather than written into a file that would load and compute something different."""
    if getattr(config, "model_type", None) != "llama":
        raise GgufExportError(f"only Llama-architecture models can be exported to GGUF; this one is "
                              f"{getattr(config, 'model_type', None)!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GgufExportError(f"Llama models with {flag}=True are not supported by the GGUF exporter")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise GgufExportError(f"Llama models with rope scaling ({rope.get('rope_type')}) are not supported by the "
                              "GGUF exporter")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    return float(rope["rope_theta"] if rope and "rope_theta" in rope else getattr(config, "rope_theta", 10000.0))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def encode_tensor(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw GGML type or None) of one tensor at the requested file dtype. Like llama.cpp,
    1-D tensors (the norms) stay f32, and rows that Q8_0's 32-value blocks do not divide fall back
    to f16."""
    from gguf import GGMLQuantizationType

    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "f32" or array.ndim < 2:
        return array, None
    if dtype == "q8_0" and array.shape[-1] % 32 == 0:
        from gguf import quants

        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def file_type(dtype: str):
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[dtype]


def llama_tensors(model) -> Iterator[tuple[str, np.ndarray]]:
    """The model's weights under llama.cpp's names and layout (Q and K rows permuted). An output head
    equal to the embeddings (tied) is left out, as llama.cpp's converter does: llama.cpp then uses
    ``token_embd`` for it and transformers ties the two again."""
    config = model.config
    state = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    if "lm_head.weight" in state and torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        del state["lm_head.weight"]
    for hf_name in sorted(state, key=_tensor_order):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name, kind = llama_cpp_name(hf_name)
        weight = state[hf_name]
        if kind == "self_attn.q_proj":
            weight = permute_for_llama_cpp(weight, config.num_attention_heads)
        elif kind == "self_attn.k_proj":
            weight = permute_for_llama_cpp(weight, config.num_key_value_heads)
        yield f"{name}.weight", weight.contiguous().numpy()


def _tensor_order(hf_name: str) -> tuple[int, int, str]:
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 2 and parts[2].isdigit():
        return 1, int(parts[2]), hf_name
    return (0 if "embed" in hf_name else 2), 0, hf_name


def add_llama_hparams(writer, config) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(int(config.vocab_size))


# ---------------------------------------------------------------- tokenizer
def _backend_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GgufExportError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast (tokenizers) tokenizer, so "
                              "its vocabulary cannot be written to GGUF")
    return json.loads(backend.to_str())


def _components(node: Mapping[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer / pre-tokenizer and, for a Sequence, its members."""
    if not node:
        return []
    return [node, *[c for sub in node.get(key, []) or [] for c in _components(sub, key)]]


def tokenizer_kind(tokenizer) -> str:
    """``"llama"`` (sentencepiece-style BPE with byte fallback) or ``"gpt2"`` (byte-level BPE): the
    two tokenizer models llama.cpp runs that steer's bases use. Others raise a clear error."""
    spec = _backend_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GgufExportError(f"the tokenizer is a {model.get('type')} model; GGUF export supports BPE tokenizers "
                              "only (llama.cpp's 'llama' sentencepiece and 'gpt2' byte-level models)")
    pre = [c.get("type") for c in _components(spec.get("pre_tokenizer"), "pretokenizers")]
    if model.get("byte_fallback"):
        return "llama"
    if "ByteLevel" in pre:
        return "gpt2"
    raise GgufExportError(f"the tokenizer is BPE without byte fallback and without a byte-level pre-tokenizer "
                          f"(pre-tokenizers: {pre or 'none'}); llama.cpp has no tokenizer model that matches it")


def gpt2_pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how a byte-level vocabulary splits text before merging. GPT-2's own
    split (one ByteLevel pre-tokenizer with its regex) is ``gpt-2``; a custom regex has no name
    llama.cpp could map back, so it is refused."""
    pre = _backend_json(tokenizer).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    raise GgufExportError(f"the byte-level tokenizer splits text with a custom pre-tokenizer ({pre.get('type')}); "
                          "GGUF names only known splits, so this tokenizer cannot be exported")


def tokenizer_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[float], list[str]]:
    """(tokens, token types, scores, merges) in id order, padded to the model's ``n_vocab`` rows."""
    spec = _backend_json(tokenizer)
    kind = tokenizer_kind(tokenizer)
    model = spec["model"]
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    size = max([*by_id, *added, -1]) + 1
    if size > n_vocab:
        raise GgufExportError(f"the tokenizer has {size} tokens but the model only {n_vocab} embedding rows")
    tokens, types, scores = [], [], []
    rank = 0
    for i in range(n_vocab):
        if i in added:
            entry = added[i]
            tokens.append(entry["content"])
            types.append(CONTROL if entry.get("special") else USER_DEFINED)
            if entry["content"] == model.get("unk_token"):
                types[-1] = UNKNOWN
            scores.append(0.0)
        elif i in by_id:
            token = by_id[i]
            tokens.append(token)
            if kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types.append(BYTE)
                scores.append(0.0)
            else:
                types.append(UNKNOWN if token == model.get("unk_token") else NORMAL)
                # sentencepiece orders its pieces by score, best first: llama.cpp's tokenizer merges
                # by score, so the order is what must survive.
                scores.append(-float(rank))
                rank += 1
        else:  # rows the model has beyond the tokenizer (padding to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(0.0)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, scores, merges


def add_tokenizer(writer, tokenizer, n_vocab: int, pre: str | None = None) -> str:
    """The tokenizer as llama.cpp's ``tokenizer.ggml.*`` keys (and the chat template, when it has one).
    ``pre``: the llama.cpp pre-tokenizer name to record for a byte-level vocabulary (taken from a
    GGUF base when there is one). Returns the tokenizer model written."""
    kind = tokenizer_kind(tokenizer)
    tokens, types, scores, merges = tokenizer_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre or gpt2_pre_tokenizer_name(tokenizer))
    else:
        spec = _backend_json(tokenizer)
        normalizers = [c.get("type") for c in _components(spec.get("normalizer"), "normalizers")]
        metaspace = [c for c in _components(spec.get("pre_tokenizer"), "pretokenizers") if c.get("type") == "Metaspace"]
        writer.add_add_space_prefix("Prepend" in normalizers
                                    or any(m.get("prepend_scheme", "always") != "never" for m in metaspace))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    if merges:
        writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            add(int(token_id))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return kind


# -------------------------------------------------------------------- files
@contextmanager
def _gguf_writer(path: Path) -> Iterator[Any]:
    """A llama-architecture ``GGUFWriter`` on ``PATH.partial``: written out and renamed to ``path``
    when the block ends, so a reader never sees a half-written file under the final name; removed
    when the block fails."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def write_llama_gguf(model, tokenizer, path: str | Path, dtype: str = "f32", name: str | None = None,
                     metadata: Mapping[str, str] | None = None, tokenizer_pre: str | None = None) -> Path:
    """One GGUF file holding ``model`` (a Llama ``PreTrainedModel``), its tokenizer and ``metadata``
    (extra string keys, such as steer's ``steer.*``)."""
    require_gguf()
    import gguf

    if dtype not in DTYPES:
        raise GgufExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    config = model.config
    check_llama_config(config)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    path = Path(path)
    with _gguf_writer(path) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_llama_hparams(writer, config)
        add_tokenizer(writer, tokenizer, n_vocab, pre=tokenizer_pre)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for tensor_name, array in llama_tensors(model):
            data, raw_dtype = encode_tensor(array, dtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    return path


def lora_scale_alpha(adapter_config: Mapping[str, Any]) -> float:
    """The ``adapter.lora.alpha`` that makes llama.cpp's scale (alpha / rank) equal PEFT's."""
    r = float(adapter_config["r"])
    alpha = float(adapter_config.get("lora_alpha", r))
    if adapter_config.get("use_rslora"):
        return alpha * r ** 0.5  # PEFT scales by alpha / sqrt(r)
    return alpha


def write_lora_gguf(adapter_dir: str | Path, base_config, path: str | Path, dtype: str = "f32",
                    name: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """A PEFT LoRA adapter as llama.cpp's LoRA GGUF (``general.type = adapter``): for each adapted
    weight ``W`` of the base, ``blk.N.<name>.weight.lora_a`` (rank x in) and ``.lora_b`` (out x rank),
    Q/K ``B`` rows permuted like their base weight. Only pure LoRA adapters fit: one that also trains
    whole modules (resized embeddings, ``modules_to_save``) has weights the format cannot carry."""
    require_gguf()
    import gguf
    from safetensors.torch import load_file

    if dtype not in DTYPES:
        raise GgufExportError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    check_llama_config(base_config)
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise GgufExportError(f"the adapter is {adapter_config.get('peft_type')}, not LoRA")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise GgufExportError("the adapter has per-module ranks or alphas (rank_pattern/alpha_pattern); llama.cpp's "
                              "LoRA format has one alpha per file")
    if adapter_config.get("use_dora"):
        raise GgufExportError("DoRA adapters cannot be written as a llama.cpp LoRA")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    extra = sorted(k for k in weights if ".lora_A." not in k and ".lora_B." not in k)
    if extra:
        raise GgufExportError(f"the adapter also trains whole modules ({', '.join(extra[:3])}"
                              f"{' ...' if len(extra) > 3 else ''}), e.g. embeddings resized for added tokens; a "
                              "LoRA-only GGUF cannot carry them: export the merged model instead (without --adapter-only)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        pairs.setdefault(module, {})["A" if ".lora_A." in key else "B"] = tensor.to(torch.float32)
    path = Path(path)
    with _gguf_writer(path) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora_scale_alpha(adapter_config))
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type(dtype))
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for module in sorted(pairs, key=_tensor_order):
            a, b = pairs[module].get("A"), pairs[module].get("B")
            if a is None or b is None:
                raise GgufExportError(f"the adapter's {module} lacks its lora_A or lora_B matrix")
            cpp, kind = llama_cpp_name(module)
            if kind == "self_attn.q_proj":
                b = permute_for_llama_cpp(b, base_config.num_attention_heads)
            elif kind == "self_attn.k_proj":
                b = permute_for_llama_cpp(b, base_config.num_key_value_heads)
            for suffix, matrix in (("lora_a", a), ("lora_b", b)):
                data, raw_dtype = encode_tensor(matrix.contiguous().numpy(), dtype)
                writer.add_tensor(f"{cpp}.weight.{suffix}", data, raw_dtype=raw_dtype)
    return path
