"""Which engine decodes: ``torch`` (transformers, steer's own batch), ``llama.cpp`` (a GGUF file in
llama.cpp, or a ``llama-server`` given by ``--upstream URL``) or ``vllm`` (a vLLM server given by
``--upstream URL``). torch and in-process llama.cpp run under the one scheduler
(:mod:`steer.runtime.scheduler`); an upstream server decodes on its own and
:class:`~steer.runtime.upstream.UpstreamEngine` reads its tokens. For every engine the steering
layer (template, attributes, stop strings, limits, detokenizing, best-of-n) is steer's.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from steer.core.errors import SteerError

ENGINES = ("torch", "llama.cpp", "vllm")
# The HTTP API an engine's upstream speaks (steer.runtime.upstream).
UPSTREAM_API = {"vllm": "vllm", "llama.cpp": "llama-server"}


class EngineChoiceError(SteerError, ValueError):
    pass


def check_engine(name: str, policy: str | None = None, upstream: str | None = None) -> str:
    """``name`` if it is an engine steer runs and ``policy`` / ``upstream`` suit it; else an error
    naming the field."""
    if name not in ENGINES:
        raise EngineChoiceError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}", "engine")
    if upstream:
        if name not in UPSTREAM_API:
            raise EngineChoiceError("--upstream decodes on a server you run: use it with --engine vllm (a vLLM "
                                    "server) or --engine llama.cpp (a llama-server)", "upstream")
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EngineChoiceError(f"--upstream must be an http:// or https:// URL, got {upstream!r}", "upstream")
        return name
    if name == "vllm":
        raise EngineChoiceError("--engine vllm decodes on a vLLM server you run: pass --upstream URL (its OpenAI "
                                "API, e.g. http://gpu-host:8000)", "upstream")
    if name == "llama.cpp":
        if policy is not None and not str(policy).lower().endswith(".gguf"):
            raise EngineChoiceError(f"the llama.cpp engine takes a .gguf file as --policy (got {policy}); write one "
                                    "with `steer export gguf --policy DIR --output FILE.gguf`", "policy")
        from steer.runtime.llamacpp import import_llama_cpp

        import_llama_cpp()  # a clear "pip install" error now rather than in the engine process
    return name


def upstream_engine(name: str, url: str, tokenizer, *, model: str | None = None, api_key: str | None = None,
                    max_batch_size: int = 16, max_queue: int = 64, on_token=None):
    """An :class:`~steer.runtime.upstream.UpstreamEngine` for engine ``name`` at ``url``, not started.
    Without the policy's weights, a reply ends at the tokenizer's EOS (and at the template's end
    marker and stop strings, as on every engine)."""
    from steer.runtime.model_runner import eos_token_ids
    from steer.runtime.upstream import UpstreamEngine

    return UpstreamEngine(url, api=UPSTREAM_API[name], tokenizer=tokenizer, model=model, api_key=api_key,
                          max_batch_size=max_batch_size, max_queue=max_queue,
                          eos_token_ids=eos_token_ids(None, tokenizer), on_token=on_token)
