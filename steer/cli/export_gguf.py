"""``steer export gguf``: a policy as one GGUF file, for llama.cpp and for steer itself.

The default writes the policy's base with its LoRA merged, the tokenizer (and chat template) and
steer's own settings as metadata (``steer.schema``, ``steer.core.template``, ...), so ``steer generate
--policy FILE.gguf`` and ``steer serve`` steer the file without the policy directory.
``--adapter-only`` writes just the LoRA as a llama.cpp adapter GGUF, for a policy trained on a
GGUF base (``llama-cli -m base.gguf --lora adapter.gguf``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from steer.core.artifacts import ArtifactError, load_steer_config
from steer.models.gguf_files import (GGUF_SUFFIX, STEER_FORMAT_KEY, STEER_KIND_KEY, STEER_NAME_KEY, STEER_SCHEMA_KEY,
                              STEER_TEMPLATE_KEY, STEER_TRAINED_VALUES_KEY, STEER_VERSION_KEY, is_gguf_path, read_string_field)
from steer.models.gguf_writer import DTYPES, GgufExportError, write_llama_gguf, write_lora_gguf

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class ExportGgufConfig:
    policy: str = field(metadata={"help": "Policy directory (what `steer sft` writes)."})
    output: str = field(metadata={"help": "GGUF file to write (FILE.gguf)."})
    dtype: str = field(default="f32", metadata={"help": "Weight type in the file: f32, f16 or q8_0 (norms stay f32)."})
    adapter_only: bool = field(
        default=False,
        metadata={"help": "Write only the LoRA adapter as a llama.cpp adapter GGUF (the policy's base must be a "
                  ".gguf file; load with llama.cpp's --lora over that base)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace OUTPUT if it exists."})


def steer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steer")
    except PackageNotFoundError:
        return "unknown"


def steer_metadata(config: dict, name: str) -> dict[str, str]:
    """steer's settings as GGUF string keys: what ``load_policy`` needs to steer the file."""
    metadata = {
        STEER_FORMAT_KEY: str(FORMAT_VERSION),
        STEER_VERSION_KEY: steer_version(),
        STEER_KIND_KEY: "policy",
        STEER_NAME_KEY: name,
        STEER_SCHEMA_KEY: json.dumps(config["schema"]),
        STEER_TEMPLATE_KEY: json.dumps(config.get("template") or {"type": "steerlm"}),
    }
    if config.get("trained_values"):  # the generator warns about values training never saw
        metadata[STEER_TRAINED_VALUES_KEY] = json.dumps(config["trained_values"])
    return metadata


def _check(config: ExportGgufConfig) -> tuple[Path, Path]:
    if config.dtype not in DTYPES:
        raise GgufExportError(f"--dtype {config.dtype!r} is not one of {', '.join(DTYPES)}", "dtype")
    policy_dir = Path(config.policy)
    if not policy_dir.is_dir():
        raise ArtifactError(f"--policy {config.policy!r} is not a directory (a policy directory from `steer sft`)",
                            "policy")
    output = Path(config.output)
    if not is_gguf_path(output):
        raise GgufExportError(f"--output {config.output!r} must end in {GGUF_SUFFIX}", "output")
    if output.exists() and not config.overwrite:
        raise GgufExportError(f"--output {config.output!r} exists; pass --overwrite to replace it", "output")
    return policy_dir, output


def export_policy(config: ExportGgufConfig) -> Path:
    from steer.models.policy import load_policy, resolve_base_model

    policy_dir, output = _check(config)
    steer_config, _ = load_steer_config(policy_dir, kind="policy")
    name = steer_config.get("name") or policy_dir.resolve().name
    base = resolve_base_model(policy_dir, steer_config["base_model"])
    metadata = steer_metadata(steer_config, name)
    if config.adapter_only:
        if not is_gguf_path(base):
            raise GgufExportError(f"--adapter-only needs a policy trained on a .gguf base; this one's base is {base!r} "
                                  "(export the merged model instead)", "adapter_only")
        if not steer_config.get("adapter"):
            raise GgufExportError(f"{policy_dir} has no LoRA adapter to export", "adapter_only")
        from steer.models.modeling import load_gguf_config

        base_config = load_gguf_config(base)
        return write_lora_gguf(policy_dir / steer_config["adapter"], base_config, output, dtype=config.dtype,
                               name=name, metadata=metadata)
    # Merged in float32 whatever the file's dtype: rounding happens once, when the file is written.
    policy = load_policy(policy_dir, device="cpu", dtype="float32", use_merged=None)
    pre = read_string_field(base, "tokenizer.ggml.pre") if is_gguf_path(base) else None
    return write_llama_gguf(policy.model, policy.tokenizer, output, dtype=config.dtype, name=name,
                            metadata=metadata, tokenizer_pre=pre)


def main(config: ExportGgufConfig) -> int:
    path = export_policy(config)
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, {'LoRA adapter' if config.adapter_only else 'merged model'}, "
          f"{config.dtype})")
    return 0
