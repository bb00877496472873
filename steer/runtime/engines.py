"""Which engine decodes: ``torch`` (transformers, steer's own batch) or ``llama.cpp`` (a GGUF file
in llama.cpp). Both run under the one scheduler (:mod:`steer.runtime.scheduler`), so the steering
layer (template, attributes, sampling, stop strings, limits, best-of-n) is the same for both.
"""

from __future__ import annotations

from steer.core.errors import SteerError

ENGINES = ("torch", "llama.cpp")


class EngineChoiceError(SteerError, ValueError):
    pass


def check_engine(name: str, policy: str | None = None) -> str:
    """``name`` if it is an engine steer runs and ``policy`` suits it; else an error naming the field."""
    if name not in ENGINES:
        raise EngineChoiceError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}", "engine")
    if name == "llama.cpp":
        if policy is not None and not str(policy).lower().endswith(".gguf"):
            raise EngineChoiceError(f"the llama.cpp engine takes a .gguf file as --policy (got {policy}); write one "
                                    "with `steer export gguf --policy DIR --output FILE.gguf`", "policy")
        from steer.runtime.llamacpp import import_llama_cpp

        import_llama_cpp()  # a clear "pip install" error now rather than in the engine process
    return name
