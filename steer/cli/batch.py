"""``steer generate --input requests.jsonl --output lines.jsonl``: many replies, offline.

For writers and game developers who ship pre-generated NPC lines instead of running a server: one
request per input line (a prompt or a conversation, attribute values, optionally a seed), decoded
together through :meth:`SteerGenerator.generate_prepared`, one result per output line.

- Every line is checked (JSON, fields, attribute names and ranges, prompt length) before anything
  is generated; an error names the line and the field.
- Each result records the seed it was drawn with (a random one when the request gave none), so
  any line can be regenerated exactly later.
- ``--batch-size`` replies decode together, continuously batched: a new request takes the place of
  the first reply to end.
- Results are appended and flushed in input order as they end. A rerun of the same command skips
  the ids already in the output, so a crash or a Ctrl-C loses at most the replies in flight; a line
  cut off mid-write is dropped and redone.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm

from steer.data.jsonl import ResumableJsonl
from steer.core.errors import SteerError, validation_error_text
from steer.runtime.generator import GenerationError, GenerationRequest, SteerGenerator

logger = logging.getLogger(__name__)

@dataclass
class BatchItem:
    id: str
    request: GenerationRequest
    where: str  # "requests.jsonl line 7", for errors


class RequestLine(BaseModel):
    """One line of a request file. Types are strict (``"seed": "7"`` is an error, not 7); values
    (attribute ranges, temperature, prompt length) are checked against the policy afterwards."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | int | None = None
    prompt: str | None = None
    system: str | None = None
    messages: list[dict[str, Any]] | None = None
    attributes: dict[str, Any] | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None


REQUEST_FIELDS = set(RequestLine.model_fields)


def read_requests(path: str | Path, defaults: Mapping[str, Any]) -> list[BatchItem]:
    """Parse the request file; ``defaults`` fill what a line leaves out (the command's flags)."""
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GenerationError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}", "input") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{where}: not JSON ({e.msg})", "input") from None
        if not isinstance(row, dict):
            raise GenerationError(f"{where}: expected a JSON object", "input")
        try:
            request = RequestLine.model_validate(row)
        except ValidationError as e:
            message, field = validation_error_text(e, where, depth=1)
            if field not in REQUEST_FIELDS:
                message += f" (known: {', '.join(sorted(REQUEST_FIELDS))})"
            raise GenerationError(message, field) from None
        item_id = str(request.id if request.id is not None else f"line-{number}")
        if item_id in seen:
            raise GenerationError(f"{where}: id {item_id!r} repeats line {seen[item_id]}", "id")
        seen[item_id] = number
        items.append(BatchItem(item_id, _request(request, defaults, where, number), where))
    if not items:
        raise GenerationError(f"{path} holds no requests", "input")
    return items


def _request(row: RequestLine, defaults: Mapping[str, Any], where: str, number: int) -> GenerationRequest:
    if row.messages is not None:
        if row.prompt is not None or row.system is not None:
            raise GenerationError(f"{where}: give messages, or prompt (and system), not both", "messages")
        if not row.messages:
            raise GenerationError(f"{where}: messages must be a non-empty list", "messages")
        messages = row.messages
    elif row.prompt is not None and row.prompt.strip():
        system = row.system if row.system is not None else defaults.get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": row.prompt}]
    else:
        raise GenerationError(f"{where}: needs a non-empty prompt or messages", "prompt")
    seed = row.seed
    if seed is None and defaults.get("seed") is not None:
        seed = defaults["seed"] + number - 1  # --seed: every line its own, the same on every run
    stop = row.stop if row.stop is not None else (defaults.get("stop") or [])
    return GenerationRequest(
        messages=messages,
        attributes={**defaults.get("attributes", {}), **(row.attributes or {})},
        max_new_tokens=row.max_new_tokens if row.max_new_tokens is not None else defaults["max_new_tokens"],
        temperature=row.temperature if row.temperature is not None else defaults["temperature"],
        top_p=row.top_p if row.top_p is not None else defaults["top_p"],
        # Recorded with the result, so every line can be made again exactly.
        seed=seed if seed is not None else secrets.randbits(31),
        stop=[stop] if isinstance(stop, str) else stop,
    )


def finished_ids(output: ResumableJsonl) -> set[str]:
    """Ids already in ``output``; a last line cut off mid-write is removed, to be generated again."""
    ids = set()
    for number, row in enumerate(output.resume(), start=1):
        if "id" not in row:
            raise GenerationError(f"{output.path} line {number} is not a result line (it has no id); "
                                  "use another --output", "output")
        ids.add(str(row["id"]))
    return ids


def generate_file(generator: SteerGenerator, items: list[BatchItem], output: str | Path, batch_size: int = 16) -> dict:
    """Generate every item not yet in ``output``, appending each result (in input order) as it ends."""
    if batch_size < 1:
        raise GenerationError("--batch-size must be at least 1", "batch_size")
    output = ResumableJsonl(output)
    done = finished_ids(output)
    todo = [item for item in items if item.id not in done]
    prepared = []  # every line is checked (and tokenized, once) before the first token is generated
    for item in todo:
        try:
            prepared.append(generator.prepare(item.request))
        except SteerError as e:
            raise type(e)(f"{item.where}: {e}", e.field) from None
    if done:
        logger.info("%s already holds %d of the %d requests; generating the other %d",
                    output.path, len(items) - len(todo), len(items), len(todo))
    start, tokens = time.perf_counter(), 0
    # Continuous batching: ``batch_size`` replies decode together and a waiting request takes the
    # place of the first to end, so a batch does not idle on its longest reply. Lines are written
    # in input order, each as soon as those before it are done, so a crash loses only the replies
    # in flight.
    finished: dict[int, Any] = {}
    written = 0

    def on_result(index: int, result) -> None:
        nonlocal written, tokens
        finished[index] = result
        ready = []
        while written in finished:
            ready.append((todo[written], finished.pop(written)))
            written += 1
        if ready:
            output.append({"id": item.id, **result.to_dict(), "seed": item.request.seed} for item, result in ready)
            tokens += sum(result.completion_tokens for _, result in ready)
            bar.update(len(ready))

    with tqdm(total=len(todo), desc="generate", unit="reply") as bar:
        generator.generate_prepared(prepared, max_batch_size=batch_size, on_result=on_result)
    seconds = time.perf_counter() - start
    logger.info("wrote %d replies to %s (%d tokens in %.1f s)", len(todo), output.path, tokens, seconds)
    return {"generated": len(todo), "skipped": len(items) - len(todo), "completion_tokens": tokens, "seconds": seconds}
