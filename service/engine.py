"""The server's engine is the runtime's scheduler (``steer.runtime.scheduler``), run on a thread of
the engine process (``service.engine_process``); these are the names the service layer uses."""

from steer.runtime.scheduler import (  # noqa: F401
    STOPPED_MESSAGE,
    EngineFailedError,
    EngineStats,
    EngineStoppedError,
    QueueFullError,
    Row,
    RowEvent,
)
from steer.runtime.scheduler import Scheduler as Engine  # noqa: F401
