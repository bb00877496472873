"""A trained policy directory: base model reference + LoRA adapter + schema + template.

Layout written by ``steer sft`` (and read here)::

    policy/
      steer_config.json         kind "policy", schema, template, base_model, adapter, merged
      adapter_config.json       the PEFT adapter (PeftModel.from_pretrained loads it)
      adapter_model.safetensors
      tokenizer.json ...        the tokenizer the policy was trained with
      base/                     optional: a local base model shipped with the policy (the demo's)
      merged/                   optional: base + adapter merged (``--merge``)

``base_model`` is a hub id, an absolute path, or a path relative to the policy directory.

A single ``.gguf`` file written by ``steer export gguf`` loads as a policy too: the merged model
and tokenizer from the file, the schema and template from its ``steer.*`` metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steer.core.artifacts import ArtifactError, load_steer_config
from steer.core.attributes import AttributeSchema
from steer.models.gguf_files import is_gguf_path
from steer.models.modeling import fit_embeddings, load_causal_lm, load_tokenizer, merge_adapter_into, resolve_device
from steer.core.template import PromptTemplate, build_template

logger = logging.getLogger(__name__)


@dataclass
class Policy:
    model: Any
    tokenizer: Any
    schema: AttributeSchema
    template: PromptTemplate
    name: str
    device: torch.device
    config: dict[str, Any] = field(default_factory=dict)


def resolve_base_model(policy_dir: Path, base_model: str) -> str:
    local = policy_dir / base_model
    return str(local) if not Path(base_model).is_absolute() and local.exists() else base_model


def load_policy(
    path: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    use_merged: bool | None = None,
    trust_remote_code: bool = False,
    load_model: bool = True,
    schema: str | AttributeSchema | None = None,
) -> Policy:
    """Load a policy directory for inference. ``use_merged=None`` uses ``merged/`` when present.

    ``load_model=False`` loads everything but the weights (``model`` is None): what a process that
    only renders prompts and tokenizes them needs, such as the server's HTTP side (or any process
    whose engine is llama.cpp). ``schema`` (a built-in name, a file or a schema) makes a GGUF model
    without steer metadata a policy: one not written by ``steer export gguf``."""
    policy_dir = Path(path)
    if is_gguf_path(policy_dir):
        return _load_gguf_policy(policy_dir, device, dtype, trust_remote_code, load_model, schema)
    config, schema = load_steer_config(policy_dir, kind="policy")
    dev = resolve_device(device)
    model = _load_policy_model(policy_dir, config, dev, dtype, use_merged, trust_remote_code) if load_model else None
    tokenizer = load_tokenizer(policy_dir, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    template = build_template(config.get("template"), schema, tokenizer)
    return Policy(
        model=model,
        tokenizer=tokenizer,
        schema=schema,
        template=template,
        name=config.get("name") or policy_dir.resolve().name,
        device=dev,
        config=config,
    )


def _load_policy_model(policy_dir: Path, config: dict[str, Any], dev: torch.device, dtype: str | None,
                       use_merged: bool | None, trust_remote_code: bool):
    merged = config.get("merged")
    if use_merged is None:
        use_merged = bool(merged) and (policy_dir / merged).is_dir()
    if use_merged:
        if not merged or not (policy_dir / merged).is_dir():
            raise ArtifactError(f"{policy_dir} has no merged model; train with --merge or load the adapter")
        model = load_causal_lm(policy_dir / merged, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
    else:
        base = resolve_base_model(policy_dir, config["base_model"])
        model = load_causal_lm(base, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)
        fit_embeddings(model, config.get("vocab_size"))  # SFT added tokens: the template's markers
        if config.get("adapter"):
            model = merge_adapter_into(model, policy_dir / config["adapter"])
    return model.eval()


def policy_config(path: str | Path, schema: str | AttributeSchema | None = None) -> tuple[dict[str, Any], AttributeSchema]:
    """The saved config and schema of a policy: a directory, a GGUF file from ``steer export gguf``
    (its ``steer.*`` metadata), or any other GGUF model given ``schema``. A GGUF without steer
    metadata and no ``schema`` is an error naming ``--schema``.

    Such a model is prompted in its own chat format when the file carries a chat template, with the
    attribute labels closing the system message (the layout ``steer demo --base-model`` trains):
    an instruction-tuned model reads its system message as instructions, its replies stay in the
    format it was tuned on, and prompts of one session share their opening tokens, which llama.cpp
    keeps cached. Without a chat template it gets the SteerLM template."""
    if not is_gguf_path(path):
        return load_steer_config(path, kind="policy")
    from steer.core.attributes import get_schema
    from steer.models.gguf_files import CHAT_TEMPLATE_KEY, STEER_SCHEMA_KEY, gguf_location, read_steer_metadata

    gguf_location(path)  # a clear error when the file or the gguf package is missing
    metadata = read_steer_metadata(path)
    if STEER_SCHEMA_KEY in metadata:
        if schema is not None:
            logger.warning("%s carries its own schema (steer export gguf); --schema is ignored", path)
        return load_steer_config(path, kind="policy")
    if schema is None:
        raise ArtifactError(f"{path} is a GGUF model without steer metadata: pass --schema (a built-in schema name "
                            "such as helpsteer, or a schema file) to steer it, or export a policy with "
                            "`steer export gguf`", "schema")
    schema = get_schema(schema) if not isinstance(schema, AttributeSchema) else schema
    template = {"type": "chat_template", "label_placement": "system"} if metadata.get(CHAT_TEMPLATE_KEY) else None
    return {"kind": "policy", "schema": schema.to_dict(), "template": template, "name": Path(path).stem,
            "base_model": str(path), "adapter": None, "merged": None}, schema


def _load_gguf_policy(path: Path, device: str | None, dtype: str | None, trust_remote_code: bool,
                      load_model: bool, schema: str | AttributeSchema | None = None) -> Policy:
    """A policy exported as one GGUF file (``steer export gguf``): the merged model and tokenizer
    from the file, schema and template from its ``steer.*`` metadata (or ``schema`` and the default
    template for a GGUF model that has none)."""
    config, schema = policy_config(path, schema)
    dev = resolve_device(device)
    model = load_causal_lm(path, device=dev, dtype=dtype, trust_remote_code=trust_remote_code).eval() \
        if load_model else None
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    return Policy(model=model, tokenizer=tokenizer, schema=schema,
                  template=build_template(config.get("template"), schema, tokenizer),
                  name=config["name"], device=dev, config=config)
