"""``SteerGenerator`` lives in :mod:`steer.runtime.generator`; this keeps the older import path
(``from steer.generation import SteerGenerator``) working."""

from steer.runtime.generator import (  # noqa: F401
    GenerationError,
    GenerationRequest,
    GenerationResult,
    PreparedRequest,
    SteerGenerator,
)
