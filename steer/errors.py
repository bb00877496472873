"""The base class of errors a user can fix: the CLI prints them as one line, the server as a 4xx."""


class SteerError(Exception):
    """A problem with the user's input, data or artifacts (not a bug in steer)."""

    field: str | None = None
