"""Loaders that turn each source format into :class:`~steer.core.conversation.Conversation` objects.

Formats:

- ``oasst``: OpenAssistant's flat message format (one message per record, linked by
  ``parent_id``). Every root-to-leaf path becomes a conversation; deleted messages and their
  subtrees are dropped; label values in 0-1 are mapped onto the schema's range
  (``round(v * 4)`` for 0-4); labels the raters did not give stay missing.
- ``helpsteer``: HelpSteer / HelpSteer2 rows (``prompt``, ``response`` and five 0-4 integers).
  HelpSteer2's multi-turn prompts (turns joined by ``<extra_id_1>``) are split into turns.
- ``hh``: Anthropic hh-rlhf ``chosen``/``rejected`` dialogue text; each row gives two
  unlabelled conversations in the same group.
- ``steer``: steer's own JSONL (what ``steer relabel`` writes).
- ``table`` (also ``jsonl``, ``csv``, ``parquet``, ``hub``): any table, with a column mapping for
  ``prompt``, ``response``, ``system``, ``messages``, ``id``, ``group`` and each attribute.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from steer.core.attributes import AttributeSchema, AttributeValueError, get_schema
from steer.core.conversation import Conversation, ConversationError, Message, as_messages, validate_messages
from steer.data.records import DataError, LoadReport, iter_records

logger = logging.getLogger(__name__)

FORMATS = ("oasst", "helpsteer", "hh", "steer", "table", "jsonl", "csv", "parquet", "hub")
# The schema a format's labels naturally belong to, used when the caller names none.
DEFAULT_SCHEMA = {"oasst": "oasst", "helpsteer": "helpsteer"}

_DEFAULT_COLUMNS = {
    "prompt": ("prompt", "instruction", "question", "input", "query"),
    "response": ("response", "output", "answer", "completion"),
    "system": ("system", "system_prompt"),
    "messages": ("messages", "conversations", "conversation"),
    "id": ("id", "uid"),
    "group": ("group", "prompt_id"),
}


def parse_column_map(items: list[str] | Mapping[str, str] | None) -> dict[str, str]:
    """``["prompt=instruction", "humor=funny"]`` -> ``{"prompt": "instruction", "humor": "funny"}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise DataError(f"column mapping {item!r} must look like field=column, e.g. prompt=instruction")
        out[key.strip()] = value.strip()
    return out


def load_conversations(
    source: str | Path,
    format: str,
    schema: AttributeSchema | str | None = None,
    columns: Mapping[str, str] | list[str] | None = None,
    strict: bool = False,
    split: str = "train",
    limit: int | None = None,
) -> tuple[list[Conversation], LoadReport]:
    """Load every conversation in ``source``. Malformed rows are skipped and reported (or, with
    ``strict``, raise :class:`DataError` naming the line)."""
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", field="format")
    schema = get_schema(schema or DEFAULT_SCHEMA.get(format, "steerlm"))
    report = LoadReport(source=str(source))
    records = iter_records(source, report, strict=strict, split=split)
    if format == "oasst":
        convs = _oasst(records, schema, report, strict)
    elif format == "helpsteer":
        convs = _helpsteer(records, schema, report, strict)
    elif format == "hh":
        convs = _hh(records, report, strict)
    elif format == "steer":
        convs = _native(records, schema, report, strict)
    else:
        convs = _table(records, schema, parse_column_map(columns), report, strict)
    out = []
    for conv in convs:
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    report.log_summary()
    return out, report


# --------------------------------------------------------------------- helpers
def _scale(schema: AttributeSchema, name: str, unit_value: float) -> tuple[int, float]:
    """A 0-1 rating onto the attribute's integer range: (rounded label, unrounded score)."""
    attr = schema[name]
    score = attr.min + float(unit_value) * (attr.max - attr.min)
    return int(round(score)), score


def _int_labels(schema: AttributeSchema, raw: Mapping[str, Any], report: LoadReport, line: int, strict: bool):
    """Labels given as integers on the schema's scale; empty/None cells are missing labels."""
    labels = {}
    for name, value in raw.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if isinstance(value, float) and value != value:  # NaN from pandas/parquet
            continue
        try:
            labels[schema.canonical_name(name)] = schema.validate_value(name, value)
        except AttributeValueError as e:
            report.add(line, str(e), strict)
            return None
    return labels


def _group_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------- oasst
def _oasst(records, schema, report, strict) -> Iterator[Conversation]:
    nodes: dict[str, dict] = {}
    lines: dict[str, int] = {}
    children: dict[str | None, list[str]] = defaultdict(list)
    for line, rec in records:
        missing = [k for k in ("message_id", "role", "text") if k not in rec]
        if missing:
            report.add(line, f"missing field(s) {', '.join(missing)}", strict)
            continue
        if rec["role"] not in ("prompter", "assistant"):
            report.add(line, f"role {rec['role']!r} is neither 'prompter' nor 'assistant'", strict)
            continue
        if rec.get("deleted"):
            continue
        nodes[rec["message_id"]] = rec
        lines[rec["message_id"]] = line
    for mid, rec in nodes.items():
        parent = rec.get("parent_id")
        # A child of a deleted (or absent) message goes with it: the path is broken.
        if parent is None or parent in nodes:
            children[parent].append(mid)

    def to_message(rec) -> Message:
        role = "user" if rec["role"] == "prompter" else "assistant"
        labels, scores = {}, {}
        raw = rec.get("labels") or {}
        if role == "assistant" and raw:
            for name, value in zip(raw.get("name", []), raw.get("value", [])):
                canonical = schema.canonical_name(name, strict=False)
                if canonical is None or value is None:
                    continue
                labels[canonical], scores[canonical] = _scale(schema, canonical, value)
        return Message(role=role, content=rec["text"], labels=labels, scores=scores, id=rec["message_id"])

    emitted: set[str | None] = set()
    for root in children[None]:
        if nodes[root]["role"] != "prompter":
            report.add(lines[root], "conversation tree does not start with a prompter message", strict)
            continue
        stack = [(root, [to_message(nodes[root])])]
        while stack:
            mid, path = stack.pop()
            kids = children.get(mid, [])
            good_kids = [k for k in kids if nodes[k]["role"] != nodes[mid]["role"]]
            if not good_kids:
                # A path may end in an unanswered prompt; its last reply still deserves a
                # conversation of its own (once, however many unanswered prompts follow it).
                while path and path[-1].role != "assistant":
                    path = path[:-1]
                if path and path[-1].id not in emitted:
                    emitted.add(path[-1].id)
                    yield Conversation(
                        messages=path,
                        id=path[-1].id or mid,
                        group=nodes[root].get("message_tree_id") or root,
                        source="oasst",
                    )
                continue
            for kid in reversed(good_kids):
                stack.append((kid, path + [to_message(nodes[kid])]))


# ------------------------------------------------------------------- helpsteer
HELPSTEER_TURN_MARKER = "<extra_id_1>"


def _split_helpsteer_prompt(prompt: str) -> list[Message]:
    """HelpSteer2 joins earlier turns into ``prompt`` with ``<extra_id_1>Assistant\\n`` etc."""
    parts = prompt.split(HELPSTEER_TURN_MARKER)
    msgs = [Message("user", parts[0].strip())]
    for part in parts[1:]:
        role, _, text = part.partition("\n")
        role = role.strip().lower()
        if role not in ("user", "assistant"):
            raise ValueError(f"unexpected turn header {role!r} in a multi-turn prompt")
        msgs.append(Message(role, text.strip()))
    return msgs


def _helpsteer(records, schema, report, strict) -> Iterator[Conversation]:
    for line, rec in records:
        prompt, response = rec.get("prompt"), rec.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            report.add(line, "needs string fields 'prompt' and 'response'", strict)
            continue
        raw = {k: v for k, v in rec.items() if k not in ("prompt", "response") and k in schema}
        labels = _int_labels(schema, raw, report, line, strict)
        if labels is None:
            continue
        try:
            msgs = _split_helpsteer_prompt(prompt)
            msgs.append(Message("assistant", response, labels=labels, scores={k: float(v) for k, v in labels.items()}))
            validate_messages(msgs, for_generation=False)
        except ValueError as e:
            report.add(line, str(e), strict)
            continue
        yield Conversation(messages=msgs, id=f"helpsteer-{line}", group=_group_id(prompt), source="helpsteer")


# -------------------------------------------------------------------------- hh
def parse_hh_dialogue(text: str) -> list[Message]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> user/assistant messages."""
    msgs: list[Message] = []
    for chunk in ("\n\n" + text.lstrip("\n")).split("\n\nHuman: ")[1:]:
        user, *assistant_parts = chunk.split("\n\nAssistant:")
        msgs.append(Message("user", user.strip()))
        for part in assistant_parts:
            msgs.append(Message("assistant", part.strip()))
    return msgs


def _hh(records, report, strict) -> Iterator[Conversation]:
    for line, rec in records:
        for side in ("chosen", "rejected"):
            text = rec.get(side)
            if text is None:
                continue
            if not isinstance(text, str):
                report.add(line, f"field {side!r} must be text", strict)
                continue
            msgs = parse_hh_dialogue(text)
            try:
                validate_messages(msgs, for_generation=False)
            except ConversationError as e:
                report.add(line, f"{side}: {e}", strict)
                continue
            yield Conversation(
                messages=msgs, id=f"hh-{line}-{side}", group=f"hh-{line}", source="hh", meta={"preference": side}
            )


# ---------------------------------------------------------------------- native
def _native(records, schema, report, strict) -> Iterator[Conversation]:
    for line, rec in records:
        try:
            conv = Conversation.from_dict(rec)
            validate_messages(conv.messages, for_generation=False)
            for m in conv.messages:
                if m.labels:
                    m.labels = schema.validate(m.labels, fill_defaults=False)
        except KeyError as e:
            report.add(line, f"not a steer conversation record (no {e} field)", strict)
            continue
        except TypeError as e:
            report.add(line, f"not a steer conversation record ({e})", strict)
            continue
        except AttributeValueError as e:
            report.add(line, str(e), strict, kind="schema", hint=SCHEMA_HINT)
            continue
        except ValueError as e:
            report.add(line, str(e), strict)
            continue
        yield conv


SCHEMA_HINT = ("the data was labelled with another attribute schema: pass the matching --schema (a built-in name, "
               "a schema file or the APM directory that labelled it)")
# Columns that give away a known source format read as a plain table.
_FORMAT_SIGNS = (({"chosen", "rejected"}, "hh"), ({"message_id", "parent_id"}, "oasst"))


def _format_hint(rec: Mapping[str, Any]) -> str:
    for columns, name in _FORMAT_SIGNS:
        if columns & set(rec):
            return f"these rows look like the {name!r} format: pass --format {name}"
    return ""


# ----------------------------------------------------------------------- table
def _pick(rec: Mapping[str, Any], mapping: Mapping[str, str], key: str):
    if key in mapping:
        return mapping[key] if mapping[key] in rec else None
    return next((c for c in _DEFAULT_COLUMNS[key] if c in rec), None)


def _table(records, schema, mapping, report, strict) -> Iterator[Conversation]:
    unknown = set(mapping) - set(_DEFAULT_COLUMNS) - {a for a in mapping if a in schema}
    if unknown:
        raise DataError(
            f"column mapping names unknown field(s) {sorted(unknown)}; use prompt, response, system, messages, "
            f"id, group or an attribute of the schema ({', '.join(schema.names)})",
            field="columns",
        )
    for line, rec in records:
        for key, column in mapping.items():
            if column not in rec:
                report.add(line, f"column {column!r} (mapped to {key!r}) is missing", strict)
                break
        else:
            conv = _table_row(rec, line, schema, mapping, report, strict)
            if conv is not None:
                yield conv


def _table_row(rec, line, schema, mapping, report, strict) -> Conversation | None:
    label_cols = {a: c for a, c in mapping.items() if a in schema}
    if not label_cols:  # unmapped: columns named like attributes are labels
        label_cols = {c: c for c in rec if c in schema and c not in _DEFAULT_COLUMNS}
    labels = _int_labels(schema, {a: rec.get(c) for a, c in label_cols.items()}, report, line, strict)
    if labels is None:
        return None
    messages_col = _pick(rec, mapping, "messages")
    try:
        if messages_col is not None:
            raw = rec[messages_col]
            if isinstance(raw, str):
                raw = json.loads(raw)
            msgs = as_messages(raw)
        else:
            prompt_col, response_col = _pick(rec, mapping, "prompt"), _pick(rec, mapping, "response")
            if prompt_col is None or response_col is None:
                hint = _format_hint(rec)
                if hint:
                    report.add(line, f"no prompt/response columns (columns: {', '.join(sorted(rec))})", strict,
                               kind="format", hint=hint)
                else:
                    report.add(line, "no prompt/response columns found (map them with --columns, e.g. "
                               "--columns prompt=instruction)", strict)
                return None
            msgs = [Message("user", str(rec[prompt_col])), Message("assistant", str(rec[response_col]))]
            system_col = _pick(rec, mapping, "system")
            if system_col is not None and rec[system_col]:
                msgs.insert(0, Message("system", str(rec[system_col])))
        if labels and msgs and msgs[-1].role == "assistant":
            msgs[-1].labels = labels
            msgs[-1].scores = {k: float(v) for k, v in labels.items()}
        for m in msgs:
            if m.labels:
                m.labels = schema.validate(m.labels, fill_defaults=False)
        validate_messages(msgs, for_generation=False)
    except AttributeValueError as e:
        report.add(line, str(e), strict, kind="schema", hint=SCHEMA_HINT)
        return None
    except (ValueError, TypeError) as e:
        report.add(line, str(e), strict)
        return None
    id_col, group_col = _pick(rec, mapping, "id"), _pick(rec, mapping, "group")
    conv_id = str(rec[id_col]) if id_col else f"row-{line}"
    group = str(rec[group_col]) if group_col else _group_id(msgs[0].content if msgs[0].role != "system" else msgs[1].content)
    # A table that already carries steer's own columns (a relabeled file read as plain JSONL or
    # Parquet) keeps its origin and metadata; otherwise the source is the file or dataset it came from.
    source = rec.get("source") if isinstance(rec.get("source"), str) and rec.get("source") else _source_name(report.source)
    meta = Conversation.from_dict({"messages": [], "meta": rec.get("meta")}).meta
    return Conversation(messages=msgs, id=conv_id, group=group, source=source, meta=meta)


def _source_name(source: str) -> str:
    """``runs/data.jsonl`` -> ``data.jsonl``; a hub id stays as it is."""
    path = Path(source)
    return path.name if path.exists() else source
