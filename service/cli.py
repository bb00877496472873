"""``steer serve``: run the OpenAI-compatible API with uvicorn.

Every option can also come from a ``STEER_*`` environment variable (see ``service.settings``);
a flag given on the command line wins.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from service.settings import ServerSettings, SettingsError

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    policy: str | None = field(default=None, metadata={"help": "Policy directory (steer sft / steer demo). Env: STEER_POLICY."})
    apm: str | None = field(
        default=None, metadata={"help": "Attribute prediction model directory; enables \"score\": true. Env: STEER_APM."}
    )
    npcs: str | None = field(
        default=None, metadata={"help": "Directory of NPC profile files (*.yaml) served under /v1/npcs, with "
                                     "dialogue sessions (docs/npc.md). Env: STEER_NPCS."}
    )
    database_url: str | None = field(
        default=None, metadata={"help": "Where NPC sessions are kept: sqlite:///path (default "
                                     "sqlite:///steer-sessions.db) or postgresql://user:pass@host/db. "
                                     "Env: STEER_DATABASE_URL."}
    )
    host: str | None = field(default=None, metadata={"help": "Interface to bind (default 127.0.0.1). Env: STEER_HOST."})
    port: int | None = field(default=None, metadata={"help": "TCP port (default 8000). Env: STEER_PORT."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available). Env: STEER_DEVICE."})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: bf16 on GPU). Env: STEER_DTYPE."})
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (default: the engine process takes all cores but one, "
                                     "left to the HTTP side). Env: STEER_THREADS."}
    )
    model_name: str | None = field(
        default=None, metadata={"help": "Model name shown by /v1/models (default: the policy's name). Env: STEER_MODEL_NAME."}
    )
    max_batch_size: int | None = field(
        default=None, metadata={"help": "Rows decoded together (default 16). Env: STEER_MAX_BATCH_SIZE."}
    )
    max_queue: int | None = field(
        default=None, metadata={"help": "Rows allowed to wait for a slot before 429 (default 64). Env: STEER_MAX_QUEUE."}
    )
    max_tokens_limit: int | None = field(
        default=None, metadata={"help": "Largest max_tokens a request may ask for (default 1024). Env: STEER_MAX_TOKENS_LIMIT."}
    )
    default_max_tokens: int | None = field(
        default=None, metadata={"help": "max_tokens when a request gives none (default 256). Env: STEER_DEFAULT_MAX_TOKENS."}
    )
    max_prompt_tokens: int | None = field(
        default=None, metadata={"help": "Longest prompt accepted, in tokens (default 2048). Env: STEER_MAX_PROMPT_TOKENS."}
    )
    max_body_bytes: int | None = field(
        default=None, metadata={"help": "Largest request body before 413 (default 1000000). Env: STEER_MAX_BODY_BYTES."}
    )
    max_messages: int | None = field(
        default=None, metadata={"help": "Most messages in one request (default 512). Env: STEER_MAX_MESSAGES."}
    )
    max_n: int | None = field(default=None, metadata={"help": "Largest n (choices per request) (default 8). Env: STEER_MAX_N."})
    api_key: list[str] = field(
        default_factory=list,
        metadata={"help": "Require 'Authorization: Bearer KEY'; repeat for several keys. Off by default. "
                          "Env: STEER_API_KEYS (comma-separated)."},
    )
    ui: bool = field(
        default=False, metadata={"help": "Mount the Gradio UI at /ui when gradio is installed (the default). Env: STEER_UI=1/0."}
    )
    no_ui: bool = field(default=False, metadata={"help": "Do not mount the UI."})
    engine_in_process: bool = field(
        default=False,
        metadata={"help": "Decode in a thread of the server process instead of a separate engine process: "
                          "faster start, lower throughput under concurrent load. Env: STEER_ENGINE_IN_PROCESS=1."},
    )
    engine_max_restarts: int | None = field(
        default=None, metadata={"help": "Restarts of a crashed engine in a row before giving up (default 3). "
                                     "Env: STEER_ENGINE_MAX_RESTARTS."}
    )
    engine_restart_backoff_s: float | None = field(
        default=None, metadata={"help": "Seconds before the first restart, doubled for each next one (default 1). "
                                     "Env: STEER_ENGINE_RESTART_BACKOFF."}
    )
    stall_after_s: float | None = field(
        default=None, metadata={"help": "/health reports a stall after this many seconds without a decode step "
                                     "while requests wait (default 60). Env: STEER_STALL_AFTER."}
    )
    drain_timeout_s: float | None = field(
        default=None, metadata={"help": "On SIGTERM/SIGINT, seconds requests in flight get to finish (default 30). "
                                     "Env: STEER_DRAIN_TIMEOUT."}
    )
    allow_no_auth: bool = field(
        default=False, metadata={"help": "Allow listening on a non-loopback --host without --api-key. "
                                         "Env: STEER_ALLOW_NO_AUTH=1."}
    )
    log_level: str = field(default="info", metadata={"help": "uvicorn's log level."})

    def to_settings(self) -> ServerSettings:
        overrides = {k: v for k, v in vars(self).items() if k not in ("api_key", "log_level", "ui", "no_ui")}
        overrides["api_keys"] = list(self.api_key)
        if self.ui and self.no_ui:
            raise SettingsError("give --ui or --no-ui, not both", "ui")
        overrides["ui"] = True if self.ui else (False if self.no_ui else None)
        overrides["engine_in_process"] = True if self.engine_in_process else None  # else the environment decides
        overrides["allow_no_auth"] = True if self.allow_no_auth else None
        return ServerSettings.from_env(overrides)


def main(config: ServeConfig) -> int:
    from service.app import create_app
    from steer.artifacts import load_steer_config

    settings = config.to_settings()
    if not settings.policy:
        raise SettingsError("no policy: pass --policy DIR or set STEER_POLICY", "policy")
    # Fail now, with one clear line, rather than after the server is up.
    _, schema = load_steer_config(settings.policy, kind="policy")
    if settings.npcs:
        from steer.npc import load_profiles

        load_profiles(settings.npcs, schema)  # a bad profile fails here, naming its file and field
    if settings.npcs or settings.database_url:
        from service.npc.db import DEFAULT_DATABASE_URL, open_database

        # Reachable, and migrated to the current schema, before the server starts.
        open_database(settings.database_url or DEFAULT_DATABASE_URL).dispose()
    if settings.apm:
        load_steer_config(settings.apm, kind="apm")
    settings.check_exposure()
    if settings.host not in settings.LOOPBACK_HOSTS and not settings.api_keys:
        logger.warning("listening on %s without API keys (--allow-no-auth): anyone who can reach it can use it",
                       settings.host)
    # A thread that decodes (--engine-in-process) or relays the engine process's events holds the GIL
    # between calls; a shorter switch interval lets the event loop parse new requests and flush
    # tokens promptly instead of waiting up to 5 ms each time (with the in-process engine, p50 time
    # to first token with 16 concurrent clients went 0.49 s -> 0.33 s in bench/serve_throughput.py).
    sys.setswitchinterval(0.001)
    from service.shutdown import build_server

    app = create_app(settings)
    build_server(app, settings.host, settings.port, config.log_level, settings.drain_timeout_s).run()
    return 0
