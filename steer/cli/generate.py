"""``steer generate``: a reply from a policy, with attribute values set on the command line; or,
with ``--input``/``--output``, one reply per line of a request file (:mod:`steer.cli.batch`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from steer.core.attributes import AttributeSchema, AttributeValueError

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    policy: str = field(metadata={"help": "Policy directory (written by `steer sft` or `steer demo`), or a .gguf file "
                                          "(`steer export gguf`)."})
    prompt: str = field(default=None, metadata={"help": "The user's message."})
    system: str | None = field(default=None, metadata={"help": "System prompt (default: the policy's own)."})
    attr: list[str] = field(
        default_factory=list,
        metadata={"help": "Attribute value, repeatable: --attr humor=4 --attr creativity=2. Unset ones use "
                  "the schema's defaults."},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Sampling seed (same seed and inputs, same text). With --input, lines without a seed get "
                  "this seed plus their line number minus one."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens to generate."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    stop: list[str] = field(default_factory=list, metadata={"help": "Extra stop string, repeatable."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)."})
    engine: str = field(default="torch", metadata={
        "help": "What decodes: torch (transformers) or llama.cpp (a .gguf --policy in llama.cpp; the [llamacpp] extra)."})
    schema: str | None = field(default=None, metadata={
        "help": "Attribute schema (built-in name or file) for a .gguf --policy without steer metadata."})
    threads: int = field(default=0, metadata={"help": "llama.cpp engine: CPU threads (0: every core)."})
    upstream: str | None = field(default=None, metadata={
        "help": "URL of a vLLM server (--engine vllm) or llama-server (--engine llama.cpp) that decodes; its API key "
                "from STEER_UPSTREAM_API_KEY."})
    upstream_model: str | None = field(default=None, metadata={
        "help": "The model or LoRA adapter name on the vLLM upstream (default: the one it serves)."})
    json: bool = field(default=False, metadata={"help": "Print the result as JSON (text, tokens, attributes)."})
    input: str | None = field(
        default=None,
        metadata={"help": "JSONL of requests instead of --prompt, one per line: {\"id\", \"prompt\" (and \"system\") "
                  "or \"messages\", \"attributes\", \"seed\", \"max_new_tokens\", \"temperature\", \"top_p\", "
                  "\"stop\"}; the flags fill what a line leaves out. Needs --output."},
    )
    output: str | None = field(
        default=None,
        metadata={"help": "JSONL the --input replies are appended to, with the seed each was drawn with. "
                  "Rerunning the command skips the ids already there."},
    )
    batch_size: int = field(default=16, metadata={
        "help": "With --input: requests decoded together (a waiting one takes the slot of the first to end)."})
    best_of: int = field(default=1, metadata={
        "help": "APM-guided best-of-n: draw N candidates in one batch and print the one --apm measures closest to "
                "the --attr values (all attributes when no --attr is given). Needs --apm."})
    apm: str | None = field(default=None, metadata={"help": "APM directory that picks the --best-of winner."})


def parse_attr_flags(items: list[str], schema: AttributeSchema) -> dict[str, int]:
    """``["humor=4", "creativity=2"]`` -> validated values; errors name the flag or attribute."""
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise AttributeValueError(f"--attr {item!r} must look like name=value, e.g. humor=4", "attr")
        canonical = schema.canonical_name(name)
        if canonical in values:
            raise AttributeValueError(f"--attr gives {canonical!r} twice", canonical)
        values[canonical] = value.strip()
    return schema.validate(values, fill_defaults=False)


def main(config: GenerateConfig) -> int:
    from steer.models.policy import policy_config
    from steer.runtime.engines import check_engine
    from steer.runtime.generator import GenerationError, SteerGenerator

    if not config.policy:
        raise GenerationError("--policy is required", "policy")
    if config.input and config.prompt:
        raise GenerationError("give --prompt or --input, not both", "input")
    if config.input and not config.output:
        raise GenerationError("--input needs --output (the JSONL the replies go to)", "output")
    if not config.prompt and not config.input:
        raise GenerationError("--prompt is required (or --input with a file of requests)", "prompt")
    if config.best_of != 1:
        if not config.apm:
            raise GenerationError("--best-of needs --apm DIR (the model that measures the candidates)", "best_of")
        if config.input:
            raise GenerationError("--best-of works with --prompt, not --input", "best_of")
    # Check the flags (and the request file) against the saved schema before loading the model.
    check_engine(config.engine, config.policy, config.upstream)
    _, schema = policy_config(config.policy, config.schema)
    engine = {"engine": config.engine, "schema": config.schema, "threads": config.threads,
              "upstream": config.upstream, "upstream_model": config.upstream_model}
    attributes = parse_attr_flags(config.attr, schema)
    if config.input:
        from steer.cli.batch import generate_file, read_requests

        defaults = {"system": config.system, "attributes": attributes, "max_new_tokens": config.max_new_tokens,
                    "temperature": config.temperature, "top_p": config.top_p, "stop": config.stop, "seed": config.seed}
        items = read_requests(config.input, defaults)
        generator = SteerGenerator.load(config.policy, device=config.device, max_batch_size=config.batch_size, **engine)
        summary = generate_file(generator, items, config.output, batch_size=config.batch_size)
        if config.json:
            print(json.dumps(summary))
        return 0
    generator = SteerGenerator.load(config.policy, device=config.device, apm=config.apm if config.best_of != 1 else None,
                                    max_batch_size=max(1, config.best_of), **engine)
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": config.prompt}
    ]
    result = generator.generate(
        messages,
        attributes=attributes,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        stop=config.stop or None,
        best_of=config.best_of,
    )
    for warning in result.warnings:
        logger.warning(warning)
    if config.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.text)
        logger.info(
            "attributes %s; %d prompt + %d completion tokens; finish %s",
            ",".join(f"{k}:{v}" for k, v in result.attributes.items()),
            result.prompt_tokens, result.completion_tokens, result.finish_reason,
        )
        if result.measured is not None:
            logger.info("best of %d candidates; the APM measures the winner at %s", result.candidates,
                        ", ".join(f"{k} {v:.2f}" for k, v in result.measured.items()))
    return 0
