"""Server settings, declared once: ``ServerSettings`` (pydantic-settings).

Each field gives its default, its bounds and its description; from that one declaration come the
``STEER_*`` environment variables (pydantic-settings reads them), the ``steer serve`` flags
(``steer.service.cli`` builds its config class from the fields) and the table in docs/serving.md
(``python -m steer.service.settings`` prints it; a test checks the file holds it). A flag wins over the
environment, the environment over the default. A bad value from any of them is a ``SettingsError``
naming the field, its flag and its variable.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from steer.core.errors import SteerError

ENV_PREFIX = "STEER_"


class SettingsError(SteerError, ValueError):
    """Invalid server settings (flag or environment variable)."""


def setting(default: Any = None, description: str = "", *, shown_default: str | None = None, flag: str | None = None,
            env: str | None = None, **bounds: Any) -> Any:
    """A settings field. ``shown_default`` is what docs and ``--help`` say for a default computed
    at run time; ``flag`` and ``env`` replace the names derived from the field's name (kept for the
    names users already have)."""
    extra = {k: v for k, v in (("shown_default", shown_default), ("flag", flag)) if v is not None}
    kwargs: dict[str, Any] = {"validation_alias": env} if env else {}
    if isinstance(default, list):
        kwargs["default_factory"] = lambda: list(default)
    else:
        kwargs["default"] = default
    return Field(description=description, json_schema_extra=extra or None, **kwargs, **bounds)


class ServerSettings(BaseSettings):
    # By name: Python callers and flags use field names; the aliases only keep the older, shorter
    # variable names of four settings (STEER_RETRY_AFTER for retry_after_s ...).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, validate_by_name=True,
                                      validate_by_alias=True, extra="forbid")

    policy: str = setting("", "policy directory (steer sft / steer demo output), or a .gguf file (steer export gguf; "
                              "the llama.cpp engine takes only these)", shown_default="(required)")
    engine: str = setting("torch", "what decodes: torch (transformers), llama.cpp (the --policy .gguf file in "
                                   "llama.cpp, the [llamacpp] extra; or a llama-server at --upstream) or vllm (a "
                                   "vLLM server at --upstream); steer stops and steers for all")
    upstream: str | None = setting(None, "URL of a server that decodes for steer: a vLLM OpenAI server (--engine vllm) "
                                         "or a llama-server (--engine llama.cpp); steer keeps the template, stop rules "
                                         "and detokenizing")
    upstream_model: str | None = setting(None, "the model (or LoRA adapter) name on the vLLM upstream",
                                         shown_default="the one it serves")
    upstream_api_key: str | None = setting(None, "Bearer key the upstream expects")
    # Not "schema": pydantic's BaseModel has an attribute of that name.
    attribute_schema: str | None = setting(None, "attribute schema (a built-in name or a file) for a .gguf --policy "
                                                 "that has no steer metadata, i.e. one not written by steer export gguf",
                                           flag="schema", env="STEER_SCHEMA")
    apm: str | None = setting(None, "attribute prediction model directory; enables `score: true`")
    npcs: str | None = setting(None, "directory of NPC profile files (*.yaml) served under /v1/npcs with dialogue "
                                     "sessions (docs/npc.md)")
    database_url: str | None = setting(None, "where NPC sessions are kept: sqlite:///path or "
                                             "postgresql://user:pass@host/db", shown_default="sqlite:///steer-sessions.db")
    host: str = setting("127.0.0.1", "interface to bind (a non-loopback one needs an API key or --allow-no-auth)")
    port: int = setting(8000, "TCP port", gt=0, lt=65536)
    device: str | None = setting(None, "cpu, cuda, cuda:1 ...", shown_default="cuda if available")
    dtype: str | None = setting(None, "float32, bfloat16 or float16", shown_default="bf16 on GPU, fp32 on CPU")
    # Threads that outnumber free cores spin against each other, hence one core left to HTTP.
    threads: int = setting(0, "CPU threads of the engine: torch's (the last core serves HTTP; 1 is fastest for tiny "
                              "models on a busy CPU) or llama.cpp's (every core by default)",
                           shown_default="all cores but one (torch), all cores (llama.cpp)", ge=0)
    model_name: str | None = setting(None, "the name /v1/models reports (and a request's `model` is checked against)",
                                     shown_default="the policy's name")
    max_batch_size: int = setting(16, "rows decoded together", ge=1)
    max_queue: int = setting(64, "rows that may wait for a slot; beyond this, 429", ge=0)
    max_tokens_limit: int = setting(1024, "the largest `max_tokens` a request may ask for", ge=1)
    default_max_tokens: int = setting(256, "`max_tokens` when a request gives none", ge=1)
    max_prompt_tokens: int = setting(2048, "the longest prompt accepted, in tokens; replies are also cut at the "
                                           "model's context length", ge=1)
    max_body_bytes: int = setting(1_000_000, "the largest request body (413 beyond)", ge=1)
    max_messages: int = setting(512, "the most messages in one request (400 beyond, before anything is tokenized)",
                                ge=1)
    max_n: int = setting(8, "the largest `n` (also at most --max-batch-size)", ge=1)
    api_keys: Annotated[list[str], NoDecode] = setting(
        [], "require `Authorization: Bearer KEY` on every route but /health (/metrics, /docs, /openapi.json "
            "included); the UI asks for a key as its login password", shown_default="off", flag="api_key",
        repr=False)  # keys stay out of logs
    allow_no_auth: bool = setting(False, "allow a non-loopback --host without an API key (refused otherwise)")
    ui: bool = setting(True, "mount the Gradio UI at --ui-path when gradio is installed (the default)")
    ui_path: str = setting("/ui", "where the UI is mounted")
    retry_after_s: int = setting(1, "seconds a 429 or shutdown 503 tells the client to wait (Retry-After)", ge=1,
                                 env="STEER_RETRY_AFTER")
    # One process less and a faster start, at about two thirds of the throughput under load.
    engine_in_process: bool = setting(False, "decode in a thread of the server process instead of a separate "
                                             "engine process")
    engine_max_restarts: int = setting(3, "restarts of a crashed engine in a row before the server gives up "
                                          "(503 until restarted by hand)", ge=0)
    engine_restart_backoff_s: float = setting(1.0, "seconds before the first restart, doubled for each next one "
                                                   "(at most 30)", ge=0, env="STEER_ENGINE_RESTART_BACKOFF")
    stall_after_s: float = setting(60.0, "/health reports a stall after this many seconds without a decode step "
                                         "while requests wait", gt=0, env="STEER_STALL_AFTER")
    # New requests get 503 + Retry-After meanwhile; whatever still runs afterwards ends with an error.
    drain_timeout_s: float = setting(30.0, "on SIGTERM/SIGINT, seconds requests in flight get to finish", ge=0,
                                     env="STEER_DRAIN_TIMEOUT")

    LOOPBACK_HOSTS: ClassVar[tuple[str, ...]] = ("127.0.0.1", "localhost", "::1")

    def __init__(self, **values: Any):
        """Keyword values, then ``STEER_*`` variables, then the defaults."""
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _settings_error(e, given=values) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets files: what configures a server is its flags and its environment.
        return init_settings, env_settings

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from steer.runtime.engines import ENGINES

        if value not in ENGINES:
            raise ValueError(f"unknown engine; use one of {', '.join(ENGINES)}")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):  # STEER_API_KEYS=key1,key2
            value = value.split(",")
        if isinstance(value, (list, tuple)):  # non-strings are left for pydantic to refuse
            return [k.strip() if isinstance(k, str) else k for k in value if not isinstance(k, str) or k.strip()]
        return value

    @classmethod
    def from_env(cls, overrides: dict[str, Any] | None = None) -> ServerSettings:
        """``overrides`` (flags; None values and empty key lists are left out), then the environment."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None and not (k == "api_keys" and not v)}
        return cls(**given)

    def check_exposure(self) -> None:
        """Refuse to listen on a reachable interface with no key unless told to explicitly."""
        if self.host not in self.LOOPBACK_HOSTS and not self.api_keys and not self.allow_no_auth:
            raise SettingsError(
                f"listening on {self.host} without an API key would let anyone who can reach it use the model: "
                "pass --api-key KEY (STEER_API_KEYS), or --allow-no-auth (STEER_ALLOW_NO_AUTH=1) if that is meant",
                "api_keys")


# ----------------------------------------------------------- names derived from the declaration
def env_var(name: str) -> str:
    """The environment variable of settings field ``name``."""
    alias = ServerSettings.model_fields[name].validation_alias
    return alias if isinstance(alias, str) else ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    """The ``steer serve`` option (and ``ServeConfig`` field) of settings field ``name``."""
    return _extra(ServerSettings.model_fields[name]).get("flag", name)


def shown_default(name: str) -> str:
    """The default as docs and ``--help`` say it."""
    info = ServerSettings.model_fields[name]
    extra = _extra(info)
    if "shown_default" in extra:
        return extra["shown_default"]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def _settings_error(e: ValidationError, given: dict[str, Any]) -> SettingsError:
    aliases = {env_var(name): name for name in ServerSettings.model_fields}
    first = e.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    name = aliases.get(name.upper(), name)
    source = ""
    if name in ServerSettings.model_fields:
        origin = "--" + flag_name(name).replace("_", "-") if name in given else env_var(name)
        source = f" (from {origin})"
    got = f", got {first['input']!r}" if first.get("type") != "extra_forbidden" and "input" in first else ""
    message = f"{name}: {first['msg'][:1].lower()}{first['msg'][1:]}{got}{source}"
    if len(e.errors()) > 1:
        message += f" (and {len(e.errors()) - 1} more problem(s))"
    return SettingsError(message, name or None)


def settings_table() -> str:
    """The markdown table of every setting, as docs/serving.md holds it."""
    rows = ["| Flag | Environment | Default | Meaning |", "| --- | --- | --- | --- |"]
    for name, info in ServerSettings.model_fields.items():
        flag = "--" + flag_name(name).replace("_", "-")
        env = f"`{env_var(name)}`"
        annotation = info.annotation
        if annotation is bool:
            flags = f"`{flag}` / `--no-{flag[2:]}`" if info.default else f"`{flag}`"
            env += " (`1`/`0`)"
        elif annotation == list[str]:
            flags = f"`{flag} {flag.rsplit('-', 1)[-1].upper()}` (repeatable)"
            env += " (comma-separated)"
        else:
            flags = f"`{flag}`"
        default = shown_default(name)
        rows.append(f"| {flags} | {env} | {default} | {info.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_table(), end="")
