"""The base class of errors a user can fix: the CLI prints them as one line, the server as a 4xx."""

from __future__ import annotations


class SteerError(Exception):
    """A problem with the user's input, data or artifacts (not a bug in steer).

    ``field`` names the offending input (a CLI flag, a request field) when there is one.
    """

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


def validation_error_text(error, where: str, depth: int | None = None) -> tuple[str, str | None]:
    """The first problem of a pydantic ``ValidationError`` as one line prefixed with ``where``
    (a file, a file and line), and the field it names (``attributes[2].max``), for a SteerError.
    ``depth`` keeps that many levels of the field's path (1: the top-level field alone)."""
    first = error.errors()[0]
    field = ""
    for part in first["loc"][:depth]:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required field missing"
    else:
        message = f"{first['msg'][0].lower()}{first['msg'][1:]}, got {first['input']!r}"
    return (f"{where}: {field}: {message}" if field else f"{where}: {message}"), (field or None)
