"""Resumable JSONL output: the file's complete lines are the durable record of the work done.

Used by ``steer relabel`` and ``steer generate --input``. Rows are appended a batch at a time and
each batch is flushed and fsynced before the next is computed, so a crash, a Ctrl-C or a SIGKILL
loses at most the batch in progress. A line without its newline can only be the tail of a write
the crash cut off: :meth:`ResumableJsonl.resume` cuts it off, and what remains tells the rerun what
is already done.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)


class JsonlOutputError(SteerError, ValueError):
    """The output file holds something that is not a complete output row of this command."""


class ResumableJsonl:
    """An append-only JSONL output file that a rerun of the same command resumes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def reset(self) -> None:
        """Starts over: removes the file."""
        self.path.unlink(missing_ok=True)

    def repair(self) -> int:
        """Cuts off a torn last line (one without its newline) and returns the number of complete lines."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as f:
            data = f.read()
            cut = data.rfind(b"\n") + 1
            if cut != len(data):
                logger.warning("%s ends in a line cut off mid-write; it is removed and will be made again", self.path)
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
        return data[:cut].count(b"\n")

    def resume(self) -> list[dict[str, Any]]:
        """Repairs the file and returns its rows. A line that is not a JSON object is an error
        naming the file and the line: the file is not this command's output."""
        self.repair()
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JsonlOutputError(f"{self.path} line {number} is not JSON ({e.msg}); it is not output "
                                           "of this command: choose another output file", "output") from None
                if not isinstance(row, dict):
                    raise JsonlOutputError(f"{self.path} line {number} is not a JSON object; it is not output "
                                           "of this command: choose another output file", "output")
                rows.append(row)
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Appends ``rows`` (one line each) and makes them durable before returning their number."""
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        return len(lines)
