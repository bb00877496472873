"""Raw records from files or the Hugging Face hub, each with a line number for error messages."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

FILE_KINDS = ("jsonl", "json", "csv", "parquet")


class DataError(SteerError, ValueError):
    """Input data that cannot be used. Names the source and, where known, the line."""

    def __init__(self, message: str, source: str = "", line: int | None = None, field: str | None = None):
        where = source + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.line = line
        self.field = field


@dataclass
class BadRow:
    line: int
    reason: str
    # "malformed" (the row itself is broken), "schema" (labels the schema does not have) or
    # "format" (the row is fine but in another format than the one asked for).
    kind: str = "malformed"


@dataclass
class LoadReport:
    """What a loader skipped, so a caller can say so instead of silently dropping data."""

    source: str
    rows: int = 0
    bad: list[BadRow] = field(default_factory=list)
    # What fixes the "schema" and "format" kinds, named by the loader (e.g. "--format hh").
    hints: dict[str, str] = field(default_factory=dict)

    def add(self, line: int, reason: str, strict: bool, kind: str = "malformed", hint: str = "") -> None:
        if strict:
            raise DataError(reason + (f"; {hint}" if hint else ""), self.source, line)
        self.bad.append(BadRow(line, reason, kind))
        if hint:
            self.hints.setdefault(kind, hint)

    def summary(self) -> str:
        """One sentence per kind of problem: how many conversations, from how many input lines,
        the first few reasons, and the flag that fixes it where there is one."""
        parts = []
        for kind, before, after in (("format", "", " in another format than the one asked for"),
                                    ("schema", "", " with labels the attribute schema does not have"),
                                    ("malformed", "malformed ", "")):
            bad = [b for b in self.bad if b.kind == kind]
            if not bad:
                continue
            lines = len({b.line for b in bad})
            # hh gives two conversations per row: say which is counted.
            count = (f"{len(bad)} {before}row(s)" if lines == len(bad)
                     else f"{len(bad)} {before}conversation(s) from {lines} input row(s)")
            shown = "; ".join(f"line {b.line}: {b.reason}" for b in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            hint = f" -- {self.hints[kind]}" if kind in self.hints else ""
            parts.append(f"skipped {count}{after}: {shown}{more}{hint}")
        return "; ".join(parts)

    def log_summary(self) -> None:
        if self.bad:
            logger.warning("%s: %s", self.source, self.summary())


def file_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".bz2", ".xz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for kind in FILE_KINDS:
        if name.endswith("." + kind):
            return kind
    raise DataError(f"cannot tell the file type from its name; expected one of {', '.join('.' + k for k in FILE_KINDS)}", str(path))


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def iter_records(
    source: str | Path, report: LoadReport, strict: bool = False, split: str = "train"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` from a JSONL/JSON/CSV/Parquet file or a hub dataset id.

    Line numbers are 1-based file lines for JSONL and CSV (the header is line 1), and row
    numbers for Parquet, JSON arrays and hub datasets.
    """
    path = Path(source)
    if not path.exists():
        if isinstance(source, str) and "/" in source and not source.startswith((".", "/")) and path.suffix == "":
            yield from _iter_hub(source, report, split)
            return
        raise DataError("no such file", str(source))
    kind = file_kind(path)
    if kind == "jsonl":
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                report.rows += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    report.add(line_no, f"invalid JSON ({e.msg} at column {e.colno})", strict)
                    continue
                if not isinstance(record, dict):
                    report.add(line_no, f"expected a JSON object, got {type(record).__name__}", strict)
                    continue
                yield line_no, record
    elif kind == "json":
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at line {e.lineno})", str(path), e.lineno) from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows", [data]))
        for i, record in enumerate(data, start=1):
            report.rows += 1
            if not isinstance(record, dict):
                report.add(i, f"expected a JSON object, got {type(record).__name__}", strict)
                continue
            yield i, record
    elif kind == "csv":
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            for record in reader:
                report.rows += 1
                if None in record:  # more cells than header columns
                    report.add(reader.line_num, "row has more cells than the header", strict)
                    continue
                yield reader.line_num, dict(record)
    elif kind == "parquet":
        import pyarrow.parquet as pq

        # Batch by batch, so a caller that stops early (--limit) does not read the whole file.
        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                i += 1
                report.rows += 1
                yield i, record


def _iter_hub(name: str, report: LoadReport, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub raises many types; the user needs the reason, not a traceback
        raise DataError(f"could not load hub dataset (split {split!r}): {e}", name) from None
    for i, record in enumerate(ds, start=1):
        report.rows += 1
        yield i, dict(record)
