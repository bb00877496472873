"""``steer generate --input requests.jsonl --output lines.jsonl``: many replies, offline.

For writers and game developers who ship pre-generated NPC lines instead of running a server: one
request per input line (a prompt or a conversation, attribute values, optionally a seed), decoded
in batches through :meth:`SteerGenerator.generate_batch`, one result per output line.

- Every line is checked (JSON, fields, attribute names and ranges, prompt length) before anything
  is generated; an error names the line and the field.
- Each result records the seed it was drawn with (a random one when the request gave none), so
  any line can be regenerated exactly later.
- Results are appended and flushed batch by batch. A rerun of the same command skips the ids
  already in the output, so a crash or a Ctrl-C loses at most the batch in progress; a line cut
  off mid-write is dropped and redone.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steer.errors import SteerError
from steer.runtime.generator import GenerationError, GenerationRequest, SteerGenerator

logger = logging.getLogger(__name__)

REQUEST_FIELDS = {"id", "prompt", "system", "messages", "attributes", "seed", "max_new_tokens", "temperature",
                  "top_p", "stop"}


@dataclass
class BatchItem:
    id: str
    request: GenerationRequest
    where: str  # "requests.jsonl line 7", for errors


def read_requests(path: str | Path, defaults: Mapping[str, Any]) -> list[BatchItem]:
    """Parse the request file; ``defaults`` fill what a line leaves out (the command's flags)."""
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise GenerationError(f"cannot read {path}: {e.strerror or e}", "input") from None
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
        unknown = sorted(set(row) - REQUEST_FIELDS)
        if unknown:
            raise GenerationError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(REQUEST_FIELDS))})",
                                  unknown[0])
        item_id = str(row.get("id", f"line-{number}"))
        if item_id in seen:
            raise GenerationError(f"{where}: id {item_id!r} repeats line {seen[item_id]}", "id")
        seen[item_id] = number
        items.append(BatchItem(item_id, _request(row, defaults, where, number), where))
    if not items:
        raise GenerationError(f"{path} holds no requests", "input")
    return items


def _request(row: dict[str, Any], defaults: Mapping[str, Any], where: str, number: int) -> GenerationRequest:
    if "messages" in row:
        if "prompt" in row or "system" in row:
            raise GenerationError(f"{where}: give messages, or prompt (and system), not both", "messages")
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise GenerationError(f"{where}: messages must be a non-empty list", "messages")
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        system = row.get("system", defaults.get("system"))
        if system is not None and not isinstance(system, str):
            raise GenerationError(f"{where}: system must be text", "system")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": row["prompt"]}]
    else:
        raise GenerationError(f"{where}: needs a non-empty prompt or messages", "prompt")
    attributes = row.get("attributes", {})
    if not isinstance(attributes, dict):
        raise GenerationError(f"{where}: attributes must be an object, e.g. {{\"humor\": 4}}", "attributes")
    seed = row.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationError(f"{where}: seed must be an integer", "seed")
    if seed is None and defaults.get("seed") is not None:
        seed = defaults["seed"] + number - 1  # --seed: every line its own, the same on every run
    stop = row.get("stop", defaults.get("stop") or [])
    return GenerationRequest(
        messages=messages,
        attributes={**defaults.get("attributes", {}), **attributes},
        max_new_tokens=row.get("max_new_tokens", defaults["max_new_tokens"]),
        temperature=row.get("temperature", defaults["temperature"]),
        top_p=row.get("top_p", defaults["top_p"]),
        # Recorded with the result, so every line can be made again exactly.
        seed=seed if seed is not None else secrets.randbits(31),
        stop=[stop] if isinstance(stop, str) else stop,
    )


def finished_ids(output: Path) -> set[str]:
    """Ids already in ``output``. A last line cut off mid-write is removed, to be generated again."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if len(keep) < len(data):
        logger.warning("%s ends in a cut-off line; it will be generated again", output)
        with output.open("r+b") as f:
            f.truncate(len(keep))
    ids = set()
    for number, line in enumerate(keep.decode("utf-8").splitlines(), start=1):
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise GenerationError(f"{output} line {number} is not a result line; use another --output", "output") from None
    return ids


def generate_file(generator: SteerGenerator, items: list[BatchItem], output: str | Path, batch_size: int = 16) -> dict:
    """Generate every item not yet in ``output``, appending results batch by batch."""
    if batch_size < 1:
        raise GenerationError("--batch-size must be at least 1", "batch_size")
    output = Path(output)
    done = finished_ids(output)
    todo = [item for item in items if item.id not in done]
    prepared = []  # every line is checked (and tokenized, once) before the first token is generated
    for item in todo:
        try:
            prepared.append(generator.prepare(item.request))
        except SteerError as e:
            raise type(e)(f"{item.where}: {e}", e.field) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    if done:
        logger.info("%s already holds %d of the %d requests; generating the other %d",
                    output, len(items) - len(todo), len(items), len(todo))
    start, tokens = time.perf_counter(), 0
    with output.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="generate", unit="reply") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            results = generator.generate_prepared(prepared[i:i + batch_size])
            for item, result in zip(batch, results):
                out.write(json.dumps({"id": item.id, **result.to_dict(), "seed": item.request.seed},
                                     ensure_ascii=False) + "\n")
                tokens += result.completion_tokens
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    logger.info("wrote %d replies to %s (%d tokens in %.1f s)", len(todo), output, tokens, seconds)
    return {"generated": len(todo), "skipped": len(items) - len(todo), "completion_tokens": tokens, "seconds": seconds}
