"""The base class of errors a user can fix: the CLI prints them as one line, the server as a 4xx."""

from __future__ import annotations


class SteerError(Exception):
    """A problem with the user's input, data or artifacts (not a bug in steer).

    ``field`` names the offending input (a CLI flag, a request field) when there is one.
    """

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field
