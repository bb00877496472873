"""``steer relabel``: annotate every assistant turn of a dataset with an APM's attribute values.

Output is steer's native conversation JSONL (or Parquet), one row per input conversation, in
input order. Each assistant message gains ``labels`` (rounded and clipped to the schema),
``predictions`` (the raw floats) and ``label_string``; each row carries ``provenance``.

Resuming: rows are written in chunks, each flushed and fsynced before the next starts, and
the output itself is the record of progress: on restart, complete rows are counted (a torn
last line is cut off) and that many input rows are skipped. A run killed at any moment and
restarted with the same command therefore ends with every input row exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steer.core.artifacts import load_steer_config
from steer.core.conversation import Conversation
from steer.data import format_histogram, label_histogram, load_conversations
from steer.data.jsonl import ResumableJsonl
from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".relabel.json"


class RelabelError(SteerError, ValueError):
    pass


@dataclass
class RelabelConfig:
    model: str = field(metadata={"help": "APM directory (written by `steer apm train`)."})
    data: str = field(metadata={"help": "Dataset to relabel: a JSONL/CSV/Parquet file or a hub dataset id."})
    output: str = field(metadata={"help": "Output file: .jsonl or .parquet (loadable with `datasets`)."})
    format: str = field(
        default="jsonl", metadata={"help": "Input format: oasst, helpsteer, hh, steer, jsonl, csv, parquet, hub."}
    )
    columns: list[str] = field(
        default_factory=list,
        metadata={"help": "Column mapping for table formats, repeated: --columns prompt=instruction."},
    )
    split: str = field(default="train", metadata={"help": "Split to read when --data is a hub dataset."})
    keep_human_labels: bool = field(
        default=False,
        metadata={"help": "Where the source has a human label for an attribute, keep it instead of the APM's."},
    )
    batch_size: int = field(default=64, metadata={"help": "APM batch size (batches are sorted by length)."})
    chunk_size: int = field(
        default=512, metadata={"help": "Conversations per durable write; a crash loses at most one chunk of work."}
    )
    limit: int | None = field(default=None, metadata={"help": "Relabel only the first N conversations."})
    strict: bool = field(default=False, metadata={"help": "Stop at the first malformed input row."})
    overwrite: bool = field(default=False, metadata={"help": "Start over even if a partial output exists."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)."})


# ---------------------------------------------------------------------- output
class _JsonlSink:
    """Append-only JSONL whose complete lines are the durable progress record (steer.data.jsonl)."""

    def __init__(self, path: Path):
        self.path = path
        self.file = ResumableJsonl(path)

    def count_and_repair(self) -> int:
        return self.file.repair()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self.file.append(rows)

    def finish(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def exists(self) -> bool:
        return self.file.exists()

    def reset(self) -> None:
        self.file.reset()


class _ParquetSink:
    """Parquet cannot be appended to safely, so chunks go to numbered part files (each written
    to a temporary name and renamed, hence all-or-nothing) and are joined at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.parts = path.with_name(path.name + ".parts")

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def count_and_repair(self) -> int:
        import pyarrow.parquet as pq

        for tmp in self.parts.glob("*.tmp") if self.parts.is_dir() else []:
            tmp.unlink()
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self._part_files())

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts.mkdir(parents=True, exist_ok=True)
        final = self.parts / f"part-{len(self._part_files()):06d}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(pa.Table.from_pylist([_parquet_row(r) for r in rows]), tmp)
        tmp.replace(final)

    def finish(self) -> None:
        """Join the parts into the final file (written aside, then renamed). The parts stay until
        the progress record says the run is complete (``cleanup``): a kill before that resumes
        from the parts, which still hold every row."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in self._part_files()]
        if tables:
            tmp = self.path.with_name(self.path.name + ".tmp")
            # Parts may differ in which struct fields they saw (a human label, a meta key) and in
            # columns that were all empty (null type); permissive promotion unifies them.
            pq.write_table(pa.concat_tables(tables, promote_options="permissive"), tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            tmp.replace(self.path)

    def cleanup(self) -> None:
        for p in self._part_files():
            p.unlink()
        if self.parts.is_dir():
            for tmp in self.parts.glob("*.tmp"):
                tmp.unlink()
            self.parts.rmdir()

    def exists(self) -> bool:
        return self.path.exists() or self.parts.exists()

    def reset(self) -> None:
        self.cleanup()
        self.path.unlink(missing_ok=True)


def _parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """Messages, meta, predictions and provenance as nested columns (lists and structs), which
    `datasets` and pandas read as lists and dicts. Parquet cannot store a struct with no fields,
    so an empty mapping is written as null (it reads back as empty)."""
    def nested(value):
        if isinstance(value, dict):
            return {k: nested(v) for k, v in value.items()} or None
        if isinstance(value, list):
            return [nested(v) for v in value]
        return value

    return {k: nested(v) for k, v in row.items()}


def _sink(path: Path):
    if path.suffix == ".jsonl":
        return _JsonlSink(path)
    if path.suffix == ".parquet":
        return _ParquetSink(path)
    raise RelabelError(f"--output must end in .jsonl or .parquet, got {path.name!r}", field="output")


# ----------------------------------------------------------------------- logic
def content_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (names and bytes, in name order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file is not path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file, fsync it and rename it over ``path``: a reader (or a
    resumed run) sees the old record or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read_progress(sidecar: Path) -> dict[str, Any] | None:
    if not sidecar.exists():
        return None
    try:
        state = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (ValueError, UnicodeDecodeError) as e:
        raise RelabelError(
            f"the progress record {sidecar} is damaged ({e}), so steer cannot tell what the output beside it "
            "holds; move both away (or pass --overwrite to start over) and run again", field="output",
        ) from None


def _fingerprint(config: RelabelConfig) -> dict[str, Any]:
    """What must match for a partial output to be continued rather than started over: the
    settings, and the contents of the data file and of the APM (a file edited or an APM retrained
    in place under the same name would otherwise be resumed as if unchanged)."""
    data_path, model_path = Path(config.data), Path(config.model)
    return {
        "model": str(model_path.resolve()),
        "model_sha256": content_digest(model_path) if model_path.exists() else None,
        "data_sha256": content_digest(data_path) if data_path.exists() else None,
        "data": str(data_path.resolve()) if data_path.exists() else config.data,
        "format": config.format,
        "columns": list(config.columns),
        "split": config.split,
        "keep_human_labels": config.keep_human_labels,
        "limit": config.limit,
    }


def _chunks(items: Sequence[Conversation], size: int) -> Iterator[Sequence[Conversation]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def annotate(
    conversations: Sequence[Conversation],
    predictor,
    keep_human_labels: bool = False,
    batch_size: int = 64,
    cache: dict[str, list[float]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Score every assistant turn of ``conversations`` in one length-sorted pass and return the
    output rows. ``cache`` (message id -> predictions) avoids re-scoring a reply that several
    conversations share, as OpenAssistant's tree paths do."""
    schema = predictor.schema
    cache = {} if cache is None else cache
    wanted: list[tuple[int, int]] = []
    items, item_keys, queued = [], [], set()
    for ci, conv in enumerate(conversations):
        for mi in conv.assistant_indices():
            wanted.append((ci, mi))
            mid = conv.messages[mi].id
            if mid is not None and (mid in cache or mid in queued):
                continue
            queued.add(mid)
            items.append(conv.messages[: mi + 1])
            item_keys.append(mid if mid is not None else f"#{ci}:{mi}")
    if items:
        preds = predictor.predict(items, batch_size=batch_size)
        for key, row in zip(item_keys, preds):
            cache[key] = [float(x) for x in row]

    rows = [conv.to_dict() for conv in conversations]
    for ci, mi in wanted:
        msg = conversations[ci].messages[mi]
        key = msg.id if msg.id is not None else f"#{ci}:{mi}"
        # Stored to 4 decimals, and the labels are rounded from what is stored, so a row always
        # reads labels == round(predictions) (a value such as 0.50004 would otherwise label 1 and
        # be stored as 0.5, which rounds to 0).
        predictions = {k: round(v, 4) for k, v in zip(schema.names, cache[key])}
        labels = schema.round_and_clip(predictions)
        out = rows[ci]["messages"][mi]
        if keep_human_labels and msg.labels:
            human = {schema.canonical_name(k): v for k, v in msg.labels.items() if k in schema}
            labels.update(human)
            out["human_labels"] = human
        else:
            out.pop("scores", None)  # the source's scores are not the labels being written
        out["labels"] = labels
        out["predictions"] = predictions
        out["label_string"] = schema.format_labels(labels)
        if msg.id is None:
            cache.pop(key, None)
    for row in rows:
        last = next((m for m in reversed(row["messages"]) if m["role"] == "assistant"), None)
        row["label_string"] = last["label_string"] if last else ""
        row["predictions"] = last["predictions"] if last else {}
        row["provenance"] = provenance or {}
    return rows


def main(config: RelabelConfig) -> int:
    from steer.models.apm import AttributePredictor

    if config.chunk_size < 1 or config.batch_size < 1:
        raise RelabelError("--chunk-size and --batch-size must be positive", field="chunk_size")
    output = Path(config.output)
    sink = _sink(output)
    sidecar = output.with_name(output.name + SIDECAR_SUFFIX)
    data = Path(config.data)
    if data.exists() and (data.resolve() == output.resolve() or (output.exists() and output.samefile(data))):
        raise RelabelError(f"--output {output} is the input file itself; write the relabeled data to another file",
                           field="output")
    # Only files a relabel run wrote (recorded by the progress file beside them) are ever replaced.
    state = read_progress(sidecar) if not (config.overwrite and sidecar.exists()) else {"overwrite": True}
    if state is None and sink.exists():
        raise RelabelError(
            f"{output} already exists and was not written by steer relabel (there is no {sidecar.name} beside it); "
            "steer will not overwrite it: choose another --output or move the file away", field="output")
    fingerprint = _fingerprint(config)
    if output.parent and not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)

    if state is not None and not config.overwrite:
        if state.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if state.get("fingerprint", {}).get(k) != fingerprint[k])
            raise RelabelError(
                f"{output} holds output of a different relabel run ({sidecar.name} differs in: "
                f"{', '.join(changed)}); use another --output or pass --overwrite",
                field="output",
            )
        if state.get("complete"):
            sink.cleanup()  # a run killed between recording completion and cleaning up
            logger.info("%s is already complete (%d rows); nothing to do", output, state.get("rows", 0))
            return 0
    if config.overwrite or state is None:
        sink.reset()

    # Read the data before loading the model, so bad input fails in a second, not after a load.
    _, schema = load_steer_config(config.model, kind="apm")
    conversations, report = load_conversations(
        config.data, config.format, schema=schema, columns=config.columns or None,
        strict=config.strict, split=config.split, limit=config.limit,
    )
    if not conversations:
        cause = f": {report.summary()}" if report.bad else ""
        raise RelabelError(f"no conversations could be read from {config.data}{cause}", field="data")
    predictor = AttributePredictor.load(config.model, device=config.device)

    provenance = {
        "apm": fingerprint["model"],
        "schema": predictor.schema.name,
        "attributes": predictor.schema.names,
        "source": fingerprint["data"],
    }
    state = {"fingerprint": fingerprint, "schema": predictor.schema.to_dict(), "provenance": provenance,
             "complete": False, "rows": 0}
    write_json_atomic(sidecar, state)

    done = sink.count_and_repair()
    if done > len(conversations):
        raise RelabelError(f"{output} has more rows ({done}) than the input ({len(conversations)})", field="output")
    if done:
        logger.info("resuming: %d of %d conversations already relabeled", done, len(conversations))
        state["rows"] = done
        write_json_atomic(sidecar, state)
    remaining = conversations[done:]
    cache: dict[str, list[float]] = {}
    # The bar moves every batch_size conversations, not every (durable) chunk, so a slow APM still
    # shows progress every few seconds; the sidecar's row count follows each durable write.
    with tqdm(total=len(conversations), initial=done, desc="relabel", unit="conv", mininterval=1.0) as bar:
        for chunk in _chunks(remaining, config.chunk_size):
            rows = []
            for piece in _chunks(chunk, config.batch_size):
                rows += annotate(piece, predictor, config.keep_human_labels, config.batch_size, cache, provenance)
                bar.update(len(piece))
            sink.write(rows)
            done += len(rows)
            state["rows"] = done
            write_json_atomic(sidecar, state)
    # Crash-safe order: the finished file is in place, then the record says so, then the
    # intermediate files go. A kill at any point resumes (or finishes) with every row.
    sink.finish()
    # Read back from the output, so a resumed run counts the rows of its earlier attempts too.
    labelled, _ = load_conversations(output, "steer", schema=predictor.schema)
    histogram = label_histogram(labelled, predictor.schema)
    state.update(complete=True, rows=len(conversations), skipped_input_rows=len(report.bad),
                 label_histogram=histogram)
    write_json_atomic(sidecar, state)
    sink.cleanup()
    logger.info("wrote %d relabeled conversations to %s", len(conversations), output)
    logger.info("labels written (value:count per attribute, '-' never):\n%s",
                format_histogram(histogram, predictor.schema))
    return 0
