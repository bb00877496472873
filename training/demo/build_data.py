"""Deterministic generator for the bundled demo dataset (``python -m steer.training.demo.build_data``).

Every example is a player talking to a fantasy-game NPC. The NPC's reply is assembled from
three independent slots of a hand-written fragment library, and each slot alone decides one
attribute, so the labels follow from the fragments chosen:

    reply = [creativity sentence] + [helpfulness core] + [humor line]

* helpfulness (0-4): the core. 0 = dismissive or irrelevant (per NPC and generic lines),
  1 = vague non-answer (per NPC), 2 = on topic but partial, 3 = useful, 4 = concrete and
  specific (prices, times, places, steps). Cores 2-4 are written per request ("intent": one
  player question in 3-5 wordings), so a level-4 core really answers the question asked.
  Cores are written plainly and without jokes, so they carry no humor or creativity.
* creativity (0-4): an optional leading sentence about the NPC's surroundings. 0 = none,
  1 = plain short description, 2 = a simile, 3 = a vivid metaphor, 4 = a striking metaphor
  plus a strange, specific detail. Written straight, never as a joke.
* humor (0-4): an optional closing line. 0 = none, 1 = a dry, barely-there aside,
  2 = a light quip, 3 = a pun or clear joke with one exclamation, 4 = over-the-top comic
  exaggeration opening with a laugh ("Ha!") and several exclamations. Humor lines add no
  information.

The three levels of each row are drawn from independently shuffled, balanced lists, so the
marginals are (almost exactly) uniform and the attributes are close to uncorrelated.
The fragment library is data (``fragments.json`` beside this module). Only the standard
library is used, and all randomness comes from seeded ``random.Random``
instances, so the output is byte-identical on every run.

Usage::

    python -m steer.training.demo.build_data            # (re)write the files next to this module
    python -m steer.training.demo.build_data --out DIR  # write them elsewhere
    python -m steer.training.demo.build_data --stats    # also print histograms and correlations
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ATTRIBUTES = ("helpfulness", "humor", "creativity")
SOURCE = "steer-demo"
RATED_SEED = 20240501
UNRATED_SEED = 20240502
# Row counts are capped by file size: each JSONL file must stay well under 1 MB.
N_RATED = 1700
N_UNRATED = 1900
PERSONA_PROB = 0.8  # share of rows that carry the NPC persona as a system line
GREETING_PROB = 0.3  # share of player lines that open with a greeting


# --------------------------------------------------------------------------- fragment library
# fragments.json holds, per NPC: personas, vague cores (helpfulness 1), dismissive cores
# (helpfulness 0), humor lines (levels 1-4) and creativity sentences (levels 1-4); per NPC and
# topic: the player requests and the cores that answer them (helpfulness 2-4); generic dismissive
# lines, greetings, and the held-out player lines of the steerability grid, each on a topic the
# data covers but worded as nowhere in the rated or unrated files (checked at build time).
FRAGMENTS_PATH = Path(__file__).with_name("fragments.json")
# The built files ship inside the installed package; this builder and its fragments do not.
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "steer" / "demo_data"


def _int_keys(obj: dict) -> dict:
    # JSON object keys are strings; the levels (1-4) are looked up as ints.
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


def load_fragments(path: Path = FRAGMENTS_PATH) -> dict:
    return json.loads(path.read_text(encoding="utf-8"), object_hook=_int_keys)


_FRAGMENTS = load_fragments()
NPCS: dict[str, dict] = _FRAGMENTS["npcs"]
TOPICS: dict[str, dict[str, dict]] = _FRAGMENTS["topics"]
GENERIC_DISMISS: list[str] = _FRAGMENTS["generic_dismiss"]
GREETINGS: list[str] = _FRAGMENTS["greetings"]
# (npc, persona index, topic, intent index, player line)
PROMPTS: list[tuple] = [tuple(p) for p in _FRAGMENTS["prompts"]]


# --------------------------------------------------------------------------------- assembly
def _balanced_levels(rng: random.Random, n: int) -> list[int]:
    """``n`` values spread as evenly as possible over 0..4, in random order."""
    values = [i % 5 for i in range(n)]
    rng.shuffle(values)
    return values


def _help_core(rng: random.Random, npc: dict, topic: dict, intent: dict, level: int) -> str:
    if level == 0:
        # Two thirds NPC-specific dismissals, one third generic/irrelevant ones.
        pool = npc["dismiss"] if rng.random() < 2 / 3 else GENERIC_DISMISS
        return rng.choice(pool)
    if level == 1:
        return rng.choice(npc["vague"])
    # The intent's own partial answer when it has one, else the topic's shared one.
    return rng.choice(intent.get(level) or topic[level])


def compose_reply(rng: random.Random, npc: dict, topic: dict, intent: dict, levels: dict[str, int]) -> str:
    parts = []
    if levels["creativity"]:
        parts.append(rng.choice(npc["creative"][levels["creativity"]]))
    parts.append(_help_core(rng, npc, topic, intent, levels["helpfulness"]))
    if levels["humor"]:
        parts.append(rng.choice(npc["humor"][levels["humor"]]))
    return " ".join(parts)


def generate(
    seed: int, n: int, prefix: str, with_labels: bool, exclude: set[tuple] | None = None
) -> tuple[list[dict], dict[str, list[int]]]:
    """``n`` conversations and the attribute levels they were built with (written out as
    ``labels`` only when ``with_labels``). Rows whose (system, user, reply) is in ``exclude``
    or already drawn are redrawn, so every row is unique."""
    rng = random.Random(seed)
    columns = {name: _balanced_levels(rng, n) for name in ATTRIBUTES}
    npc_names = list(NPCS)
    npc_column = [npc_names[i % len(npc_names)] for i in range(n)]  # NPCs balanced too
    rng.shuffle(npc_column)
    seen = set(exclude or ())
    rows = []
    for i in range(n):
        levels = {name: columns[name][i] for name in ATTRIBUTES}
        npc_name = npc_column[i]
        npc = NPCS[npc_name]
        for _attempt in range(1000):
            topic_name = rng.choice(list(TOPICS[npc_name]))
            topic = TOPICS[npc_name][topic_name]
            k = rng.randrange(len(topic["intents"]))
            intent = topic["intents"][k]
            user = rng.choice(intent["users"])
            if rng.random() < GREETING_PROB:
                user = rng.choice(GREETINGS) + user
            system = rng.choice(npc["personas"]) if rng.random() < PERSONA_PROB else None
            reply = compose_reply(rng, npc, topic, intent, levels)
            key = (system, user, reply)
            if key not in seen:
                break
        else:  # pragma: no cover - the library is far larger than the row counts
            raise RuntimeError("could not draw a fresh row; enlarge the fragment library")
        seen.add(key)
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        assistant = {"role": "assistant", "content": reply}
        if with_labels:
            assistant["labels"] = {name: levels[name] for name in ATTRIBUTES}
        messages.append(assistant)
        rows.append(
            {
                "id": f"{prefix}-{i + 1:05d}",
                # One group per request (all its wordings share the same answer cores).
                "group": f"{npc_name}-{topic_name}-{k + 1}",
                "source": SOURCE,
                "messages": messages,
                "meta": {"npc": npc_name},
            }
        )
    return rows, columns


def _row_key(row: dict) -> tuple:
    msgs = row["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    return (system, msgs[-2]["content"], msgs[-1]["content"])


def build_prompts() -> list[dict]:
    out = []
    for i, (npc_name, persona_idx, topic_name, intent_idx, user) in enumerate(PROMPTS):
        assert intent_idx < len(TOPICS[npc_name][topic_name]["intents"]), (npc_name, topic_name)
        out.append(
            {
                "id": f"prompt-{i + 1:02d}",
                "npc": npc_name,
                "system": NPCS[npc_name]["personas"][persona_idx],
                "user": user,
                "group": f"{npc_name}-{topic_name}-{intent_idx + 1}",
            }
        )
    return out


def fragment_count() -> dict[str, int]:
    counts = {"personas": 0, "player_lines": 0, "help_cores": 0, "humor": 0, "creativity": 0}
    for npc_name, npc in NPCS.items():
        counts["personas"] += len(npc["personas"])
        counts["help_cores"] += len(npc["vague"]) + len(npc["dismiss"])
        for topic in TOPICS[npc_name].values():
            counts["help_cores"] += len(topic.get(2, []))
            for intent in topic["intents"]:
                counts["player_lines"] += len(intent["users"])
                counts["help_cores"] += sum(len(intent.get(level, [])) for level in (2, 3, 4))
        counts["humor"] += sum(len(v) for v in npc["humor"].values())
        counts["creativity"] += sum(len(v) for v in npc["creative"].values())
    counts["help_cores"] += len(GENERIC_DISMISS)
    counts["greetings"] = len(GREETINGS)
    counts["total"] = sum(counts.values())
    return counts


def _dump(rows: list[dict], path: Path) -> None:
    # Compact separators keep the files small; any JSON reader parses them the same way.
    text = "".join(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n" for row in rows)
    path.write_bytes(text.encode("ascii"))


# ------------------------------------------------------------------------------------ stats
def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(_ranks(xs), _ranks(ys))


def stats(rows: list[dict], levels: dict[str, list[int]] | None = None) -> str:
    lines = [f"rows: {len(rows)}"]
    words = [len(r["messages"][-1]["content"].split()) for r in rows]
    lines.append(f"reply words: min {min(words)}, mean {sum(words) / len(words):.1f}, max {max(words)}")
    lines.append(f"distinct replies: {len({r['messages'][-1]['content'] for r in rows})}")
    lines.append(f"groups: {len({r['group'] for r in rows})}")
    npcs: dict[str, int] = {}
    for r in rows:
        npcs[r["meta"]["npc"]] = npcs.get(r["meta"]["npc"], 0) + 1
    lines.append("npcs: " + ", ".join(f"{k} {v}" for k, v in npcs.items()))
    if levels is None:
        if "labels" not in rows[0]["messages"][-1]:
            return "\n".join(lines)
        levels = {a: [r["messages"][-1]["labels"][a] for r in rows] for a in ATTRIBUTES}
    for a in ATTRIBUTES:
        hist = [levels[a].count(v) for v in range(5)]
        lines.append(f"{a:12s} 0..4: {hist}")
    for i, a in enumerate(ATTRIBUTES):
        for b in ATTRIBUTES[i + 1 :]:
            lines.append(
                f"corr {a}/{b}: pearson {pearson(levels[a], levels[b]):+.3f}, "
                f"spearman {spearman(levels[a], levels[b]):+.3f}"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def build(out_dir: Path) -> dict[str, list[dict]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rated, rated_levels = generate(RATED_SEED, N_RATED, "rated", with_labels=True)
    unrated, unrated_levels = generate(
        UNRATED_SEED, N_UNRATED, "unrated", with_labels=False, exclude={_row_key(r) for r in rated}
    )
    prompts = build_prompts()
    # Held-out prompts must not appear verbatim (with or without a greeting) in the training data.
    held_out = {p["user"] for p in prompts}
    for row in rated + unrated:
        user = row["messages"][-2]["content"]
        assert not any(user.endswith(h) for h in held_out), user
    _dump(rated, out_dir / "rated.jsonl")
    _dump(unrated, out_dir / "unrated.jsonl")
    _dump(prompts, out_dir / "prompts.jsonl")
    return {
        "rated": rated,
        "unrated": unrated,
        "prompts": prompts,
        "rated_levels": rated_levels,
        "unrated_levels": unrated_levels,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package's steer/demo_data)")
    parser.add_argument("--stats", action="store_true", help="print histograms and correlations")
    args = parser.parse_args(argv)
    data = build(args.out)
    for name in ("rated", "unrated", "prompts"):
        path = args.out / f"{name}.jsonl"
        print(f"wrote {path} ({len(data[name])} rows, {path.stat().st_size} bytes)")
    if args.stats:
        print("fragments: " + ", ".join(f"{k} {v}" for k, v in fragment_count().items()))
        print("== rated ==")
        print(stats(data["rated"]))
        print("== unrated (levels it was built with; not written to the file) ==")
        print(stats(data["unrated"], data["unrated_levels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
