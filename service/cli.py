"""``steer serve``: run the OpenAI-compatible API with uvicorn.

The options are not written here: each is a field of ``steer.service.settings.ServerSettings``, which
also names its ``STEER_*`` environment variable. A flag given on the command line wins.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import field, make_dataclass
from typing import Any

from steer.service.settings import ServerSettings, SettingsError, env_var, flag_name, shown_default

logger = logging.getLogger(__name__)


def _help(name: str) -> str:
    info = ServerSettings.model_fields[name]
    text = info.description[:1].upper() + info.description[1:]
    shown = shown_default(name)
    if shown.startswith("("):  # "(required)"
        text += f" {shown}"
    elif info.annotation is not bool:  # a switch's description says what it does when given
        text += f". Default: {shown}"
    return f"{text}. Env: {env_var(name)}."


def _serve_config_fields() -> list[tuple[str, Any, Any]]:
    """One option per settings field, unset (None) unless given so the environment can decide;
    a switch that is on by default also gets its ``--no-`` form."""
    out: list[tuple[str, Any, Any]] = []
    for name, info in ServerSettings.model_fields.items():
        flag, help_text = flag_name(name), _help(name)
        if info.annotation is bool:
            out.append((flag, bool, field(default=False, metadata={"help": help_text})))
            if info.default:
                out.append((f"no_{flag}", bool, field(default=False, metadata={"help": f"Turn --{flag} off."})))
        elif info.annotation == list[str]:
            out.append((flag, list[str], field(default_factory=list, metadata={"help": help_text + " Repeatable."})))
        else:
            kind = info.annotation if info.annotation in (int, float) else str
            out.append((flag, kind | None, field(default=None, metadata={"help": help_text})))
    out.append(("log_level", str, field(default="info", metadata={"help": "uvicorn's log level."})))
    return out


def _to_settings(self) -> ServerSettings:
    """The settings these options give: options given win over ``STEER_*`` variables."""
    values: dict[str, Any] = {}
    for name, info in ServerSettings.model_fields.items():
        flag = flag_name(name)
        value = getattr(self, flag)
        if info.annotation is bool:
            off = getattr(self, f"no_{flag}", False)
            if value and off:
                raise SettingsError(f"give --{flag} or --no-{flag}, not both", name)
            value = True if value else (False if off else None)
        values[name] = value
    return ServerSettings.from_env(values)


# The flags are derived from ServerSettings, so a new setting is a new flag with no edit here.
ServeConfig = make_dataclass("ServeConfig", _serve_config_fields(), namespace={"to_settings": _to_settings})
ServeConfig.__module__ = __name__
ServeConfig.__doc__ = "``steer serve`` options: one per ``ServerSettings`` field, plus uvicorn's log level."


def main(config: ServeConfig) -> int:
    from steer.core.artifacts import load_steer_config
    from steer.models.policy import policy_config
    from steer.runtime.engines import check_engine
    from steer.service.app import create_app

    settings = config.to_settings()
    if not settings.policy:
        raise SettingsError("no policy: pass --policy DIR or set STEER_POLICY", "policy")
    # Fail now, with one clear line, rather than after the server is up.
    check_engine(settings.engine, settings.policy, settings.upstream)
    _, schema = policy_config(settings.policy, settings.attribute_schema)
    if settings.npcs:
        from steer.npc import load_profiles

        load_profiles(settings.npcs, schema)  # a bad profile fails here, naming its file and field
    if settings.npcs or settings.database_url:
        from steer.service.npc.db import DEFAULT_DATABASE_URL, open_database

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
    from steer.service.shutdown import build_server

    app = create_app(settings)
    build_server(app, settings.host, settings.port, config.log_level, settings.drain_timeout_s).run()
    return 0
