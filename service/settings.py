"""Server settings: one dataclass, filled from ``steer serve`` flags or ``STEER_*`` environment variables.

Flags win over the environment, the environment over the defaults. Plain ``os.environ`` reading
keeps the server free of a settings framework.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from steer.errors import SteerError


class SettingsError(SteerError, ValueError):
    """Invalid server settings (flag or environment variable)."""


# settings field -> environment variable
ENV_VARS: dict[str, str] = {
    "policy": "STEER_POLICY",
    "apm": "STEER_APM",
    "npcs": "STEER_NPCS",
    "database_url": "STEER_DATABASE_URL",
    "host": "STEER_HOST",
    "port": "STEER_PORT",
    "device": "STEER_DEVICE",
    "dtype": "STEER_DTYPE",
    "threads": "STEER_THREADS",
    "model_name": "STEER_MODEL_NAME",
    "max_batch_size": "STEER_MAX_BATCH_SIZE",
    "max_queue": "STEER_MAX_QUEUE",
    "max_tokens_limit": "STEER_MAX_TOKENS_LIMIT",
    "default_max_tokens": "STEER_DEFAULT_MAX_TOKENS",
    "max_prompt_tokens": "STEER_MAX_PROMPT_TOKENS",
    "max_body_bytes": "STEER_MAX_BODY_BYTES",
    "max_messages": "STEER_MAX_MESSAGES",
    "max_n": "STEER_MAX_N",
    "api_keys": "STEER_API_KEYS",
    "ui": "STEER_UI",
    "ui_path": "STEER_UI_PATH",
    "retry_after_s": "STEER_RETRY_AFTER",
    "engine_in_process": "STEER_ENGINE_IN_PROCESS",
    "engine_max_restarts": "STEER_ENGINE_MAX_RESTARTS",
    "engine_restart_backoff_s": "STEER_ENGINE_RESTART_BACKOFF",
    "stall_after_s": "STEER_STALL_AFTER",
    "drain_timeout_s": "STEER_DRAIN_TIMEOUT",
    "allow_no_auth": "STEER_ALLOW_NO_AUTH",
}


@dataclass
class ServerSettings:
    policy: str = ""
    apm: str | None = None
    # NPC profiles (a directory of YAML files) and the session database (service.npc); either turns them on.
    npcs: str | None = None
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str | None = None
    dtype: str | None = None
    # torch CPU threads; 0: the engine process takes every core but one (left to the HTTP side),
    # an in-process engine keeps torch's default. Threads that outnumber free cores spin against
    # each other.
    threads: int = 0
    # Name reported by /v1/models and checked against a request's "model"; defaults to the policy's name.
    model_name: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    max_prompt_tokens: int = 2048
    max_body_bytes: int = 1_000_000
    # Messages per request; counted before anything is tokenized.
    max_messages: int = 512
    max_n: int = 8
    api_keys: list[str] = field(default_factory=list)
    ui: bool = True
    ui_path: str = "/ui"
    retry_after_s: int = 1
    # Decode in a thread of the server process instead of a child process (service.engine_process):
    # one process less and a faster start, at about two thirds of the throughput under load.
    engine_in_process: bool = False
    # A crashed engine is restarted this many times in a row (waiting engine_restart_backoff_s,
    # then twice that, ...) before the server gives up and answers 503 until restarted by hand.
    engine_max_restarts: int = 3
    engine_restart_backoff_s: float = 1.0
    # /health reports the engine as stalled (503) after this long without a decode step while
    # requests are waiting or running.
    stall_after_s: float = 60.0
    # On SIGTERM/SIGINT: new requests get 503 + Retry-After, requests in flight get this long to
    # finish, then whatever still runs ends with an error and the engine stops.
    drain_timeout_s: float = 30.0
    # Serve on a non-loopback interface without API keys (refused unless this is set).
    allow_no_auth: bool = False

    LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

    def check_exposure(self) -> None:
        """Refuse to listen on a reachable interface with no key unless told to explicitly."""
        if self.host not in self.LOOPBACK_HOSTS and not self.api_keys and not self.allow_no_auth:
            raise SettingsError(
                f"listening on {self.host} without an API key would let anyone who can reach it use the model: "
                "pass --api-key KEY (STEER_API_KEYS), or --allow-no-auth (STEER_ALLOW_NO_AUTH=1) if that is meant",
                "api_keys")

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_limit", "default_max_tokens", "max_prompt_tokens",
                     "max_body_bytes", "max_n", "retry_after_s", "max_messages"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"{name} must be at least 1", name)
        if self.max_queue < 0:
            raise SettingsError("max_queue must be 0 or more", "max_queue")
        for name in ("engine_max_restarts", "engine_restart_backoff_s", "drain_timeout_s"):
            if float(getattr(self, name)) < 0:
                raise SettingsError(f"{name} must be 0 or more", name)
        if float(self.stall_after_s) <= 0:
            raise SettingsError("stall_after_s must be more than 0", "stall_after_s")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is not a valid TCP port", "port")
        self.api_keys = [k for k in self.api_keys if k]

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None):
        """Defaults, then ``STEER_*`` variables, then ``overrides`` (values that are None are skipped)."""
        environ = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            if environ.get(var, "") != "":
                values[name] = _parse(name, types[name], environ[var], var)
        for name, value in (overrides or {}).items():
            if value is None or (name == "api_keys" and not value):
                continue
            values[name] = value
        return cls(**values)


def _parse(name: str, type_name: str, raw: str, var: str) -> Any:
    raw = raw.strip()
    if name == "api_keys":
        return [k.strip() for k in raw.split(",") if k.strip()]
    if type_name == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{var}={raw!r} is not a boolean (use 1/0, true/false)", name)
    if type_name == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not an integer", name) from None
    if type_name == "float":
        try:
            return float(raw)
        except ValueError:
            raise SettingsError(f"{var}={raw!r} is not a number", name) from None
    return raw
