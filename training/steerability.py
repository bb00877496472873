"""``steer eval steerability``: how well a policy follows requested attribute values, measured by one
or more APMs, with APM-guided best-of-n and an optional prompt-steering baseline.

The grid: for each attribute under test, its requested value runs over ``--values`` while the others
stay at their defaults, over every prompt, ``--samples`` draws each. Draw ``k`` of prompt ``p`` has
seed ``seed + 64 * (p * samples + k)`` at every level (common random numbers: levels differ only
in the request), and best-of candidate ``i`` adds ``i`` to it (:func:`steer.runtime.best_of.candidate_seed`).
So the largest ``--best-of`` is drawn once, and smaller ones are its first candidates, exactly what
``best_of=N`` in the Python API or the REST API would draw and pick. The first ``--apm`` picks the
winner and is the primary judge; the others only judge, so a policy (or a best-of selection) that
games the primary judge shows up there.

Generations go through :func:`steer.cli.batch.generate_file` into ``OUT/cache`` keyed by model
and request, and judge scores into per-judge cache files, so a rerun (or a run cut short) reuses
everything already done. Results: ``OUT/report.json``, ``OUT/report.md`` and PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steer.core.errors import SteerError

logger = logging.getLogger(__name__)

SEED_STRIDE = 64  # == steer.runtime.best_of.MAX_BEST_OF: a cell's candidates never reuse another cell's seeds


class SteerabilityError(SteerError, ValueError):
    """Bad evaluation settings; ``field`` names the option."""


@dataclass
class SteerabilityConfig:
    policy: str = field(default=None, metadata={"help": "Policy directory (written by `steer sft` or `steer demo`)."})
    apm: list[str] = field(default_factory=list, metadata={
        "help": "APM directory, repeatable. The first picks best-of winners and is the primary judge; the others "
                "are independent judges."})
    output: str = field(default=None, metadata={"help": "Directory for report.json, report.md, plots and the cache."})
    prompts: str | None = field(default=None, metadata={
        "help": "JSONL in `steer generate --input` format (prompt and optional system, or messages; id optional). "
                "Default: the bundled held-out NPC player lines."})
    attributes: str | None = field(default=None, metadata={
        "help": "Comma-separated attributes to vary (default: every attribute of the policy's schema)."})
    values: str | None = field(default=None, metadata={
        "help": "Comma-separated requested values (default: each attribute's full range)."})
    samples: int = field(default=2, metadata={"help": "Draws per prompt and requested value (distinct seeds)."})
    best_of: str = field(default="1", metadata={
        "help": "Comma-separated best-of sizes, e.g. 1,4,8; the top-level figures are for the largest."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most tokens per reply."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass."})
    seed: int = field(default=0, metadata={"help": "Base seed; the whole run is reproducible from it."})
    baseline: str | None = field(default=None, metadata={
        "help": "`prompt`: also evaluate the unmodified --base-model asked for the values in its system message."})
    base_model: str | None = field(default=None, metadata={"help": "Hub id or directory of the baseline's base model."})
    batch_size: int = field(default=32, metadata={"help": "Replies decoded together."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap samples for the 95%% intervals."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)."})
    engine: str = field(default="torch", metadata={
        "help": "What decodes the policy: torch, or llama.cpp for a .gguf --policy (the [llamacpp] extra). Sampling "
                "is steer's own on both; seeds reproduce within an engine, not across engines."})
    threads: int = field(default=0, metadata={"help": "llama.cpp engine: CPU threads (0: every core)."})
    upstream: str | None = field(default=None, metadata={
        "help": "URL of a vLLM server (--engine vllm) or llama-server (--engine llama.cpp) that decodes the policy; "
                "its API key from STEER_UPSTREAM_API_KEY."})
    upstream_model: str | None = field(default=None, metadata={
        "help": "The model or LoRA adapter name on the vLLM upstream (default: the one it serves)."})
    json: bool = field(default=False, metadata={"help": "Print report.json to stdout instead of the summary table."})


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    messages: tuple

    @property
    def user(self) -> str:
        return [m["content"] for m in self.messages if m["role"] == "user"][-1]


@dataclass(frozen=True)
class Cell:
    attribute: str
    value: int
    prompt: int
    sample: int
    seed: int


# ------------------------------------------------------------------ inputs
def parse_ints(text: str | None, option: str) -> list[int] | None:
    if text is None or not str(text).strip():
        return None
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SteerabilityError(f"--{option} must be comma-separated integers, got {text!r}", option) from None
    if not values:
        raise SteerabilityError(f"--{option} is empty", option)
    return sorted(dict.fromkeys(values))


def load_prompts(path: str | None) -> list[EvalPrompt]:
    """The request file of ``steer generate --input``, or the bundled held-out player lines."""
    if path is None:
        from steer.demo_data import prompts_path

        rows = [json.loads(line) for line in prompts_path().read_text(encoding="utf-8").splitlines() if line.strip()]
        return [EvalPrompt(r["id"], tuple(([{"role": "system", "content": r["system"]}] if r.get("system") else [])
                                          + [{"role": "user", "content": r["user"]}])) for r in rows]
    from steer.cli.batch import read_requests

    defaults = {"system": None, "attributes": {}, "max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0,
                "stop": [], "seed": 0}
    try:
        items = read_requests(path, defaults)
    except SteerError as e:
        raise SteerabilityError(f"--prompts: {e}", "prompts") from None
    return [EvalPrompt(item.id, tuple({"role": m["role"], "content": m["content"]} for m in item.request.messages))
            for item in items]


def build_grid(schema, attributes: Sequence[str], values: Sequence[int] | None, n_prompts: int, samples: int,
               seed: int) -> list[Cell]:
    cells = []
    for name in attributes:
        attr = schema[name]
        levels = [v for v in values if attr.min <= v <= attr.max] if values else list(range(attr.min, attr.max + 1))
        if len(levels) < 2:
            raise SteerabilityError(f"--values leave fewer than two levels of {name} ({attr.min}-{attr.max})", "values")
        for v in levels:
            for p in range(n_prompts):
                for k in range(samples):
                    cells.append(Cell(name, v, p, k, seed + SEED_STRIDE * (p * samples + k)))
    return cells


def fingerprint(path: str | Path) -> str:
    """Names a model directory (or a single-file model such as a GGUF) by its contents for the cache:
    every top-level file's name, size and first and last MiB, so a copied or moved model keeps its
    cache and a retrained one does not."""
    p = Path(path)
    if not p.exists():  # a hub id
        return hashlib.sha1(str(path).encode()).hexdigest()[:12]
    h = hashlib.sha1()
    for f in [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file()):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()[:12]


def request_key(model_key: str, messages, attributes: dict, seed: int, config: SteerabilityConfig) -> str:
    blob = json.dumps([model_key, list(messages), attributes, seed, config.max_new_tokens, config.temperature,
                       config.top_p], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


# -------------------------------------------------------------- generation
def generate_cached(generator, keyed: list[tuple[str, Any]], cache: Path, batch_size: int) -> dict[str, dict]:
    """Generate every (key, GenerationRequest) not yet in ``cache``; returns key -> result line."""
    from steer.cli.batch import BatchItem, generate_file

    unique = list(dict((k, r) for k, r in keyed).items())
    items = [BatchItem(k, r, where=f"grid request {i}") for i, (k, r) in enumerate(unique)]
    generate_file(generator, items, cache, batch_size=batch_size)
    lines = {}
    for line in cache.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        lines[row["id"]] = row
    return lines


def score_cached(apm, keyed: dict[str, tuple[Sequence, str]], cache: Path, chunk: int = 256) -> dict[str, dict]:
    """APM scores of every key -> (messages, reply), cached per judge; returns key -> {attr: value}."""
    from tqdm.auto import tqdm

    done: dict[str, dict] = {}
    if cache.exists():
        data = cache.read_text(encoding="utf-8")
        for line in data.splitlines():
            try:
                row = json.loads(line)
                done[row["id"]] = row["scores"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut off by a crash is scored again
    todo = [k for k in keyed if k not in done]
    if todo:
        with cache.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc=f"judge {cache.stem}",
                                                            unit="reply") as bar:
            for i in range(0, len(todo), chunk):
                keys = todo[i:i + chunk]
                preds = apm.predict([list(keyed[k][0]) + [{"role": "assistant", "content": keyed[k][1]}]
                                     for k in keys])
                for k, row in zip(keys, preds):
                    done[k] = {n: round(float(v), 4) for n, v in zip(apm.schema.names, row)}
                    out.write(json.dumps({"id": k, "scores": done[k]}) + "\n")
                out.flush()
                bar.update(len(keys))
    return done


# ---------------------------------------------------------------- analysis
def figures(cells: list[Cell], winners: dict[Cell, str], scores: dict[str, dict], attributes: Sequence[str],
            n_boot: int, seed: int) -> dict[str, Any]:
    """Steerability per attribute and the cross-talk matrix, for the replies ``winners`` names."""
    from steer.training.steerability_metrics import attribute_metrics, crosstalk

    measured_names = [a for a in attributes if a in next(iter(scores.values()), {})]
    steer, varied = {}, {}
    for a in attributes:
        rows = [c for c in cells if c.attribute == a]
        requested = np.array([c.value for c in rows], dtype=float)
        groups = np.array([c.prompt for c in rows])
        if a in measured_names:
            measured = np.array([scores[winners[c]][a] for c in rows])
            steer[a] = attribute_metrics(requested, measured, groups, sorted({c.value for c in rows}),
                                         n_boot=n_boot, seed=seed)
        varied[a] = (requested, {b: np.array([scores[winners[c]][b] for c in rows]) for b in measured_names})
    return {"steerability": steer, "crosstalk": crosstalk(varied)}


def baseline_gap(cells: list[Cell], winners: dict[Cell, str], baseline_ids: dict[Cell, str], scores: dict[str, dict],
                 attributes: Sequence[str], n_boot: int, seed: int) -> dict[str, dict]:
    """Per attribute: the policy's Spearman minus the prompt baseline's on the same cells, with a
    paired 95% interval over prompts (:func:`steer.training.steerability_metrics.spearman_difference`)."""
    from steer.training.steerability_metrics import spearman_difference

    out = {}
    for a in attributes:
        rows = [c for c in cells if c.attribute == a]
        if not rows or a not in scores[winners[rows[0]]]:
            continue
        out[a] = spearman_difference([c.value for c in rows], [scores[winners[c]][a] for c in rows],
                                     [scores[baseline_ids[c]][a] for c in rows], [c.prompt for c in rows],
                                     n_boot=n_boot, seed=seed)
    return out


def relevance_figures(cells: list[Cell], winners: dict[Cell, str], replies: dict[str, str], prompts, encoder,
                      attributes: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    from steer.training.steerability_metrics import level_means

    cos = encoder.cosine([prompts[c.prompt].user for c in cells], [replies[winners[c]] for c in cells])
    out = {}
    for a in attributes:
        idx = [i for i, c in enumerate(cells) if c.attribute == a]
        out[a] = {"levels": level_means(sorted({cells[i].value for i in idx}), [cells[i].value for i in idx],
                                        cos[idx], [cells[i].prompt for i in idx], n_boot=n_boot, seed=seed),
                  "mean": round(float(cos[idx].mean()), 4)}
    return out


# -------------------------------------------------------------------- main
def _check(config: SteerabilityConfig) -> list[int]:
    if not config.policy:
        raise SteerabilityError("--policy is required", "policy")
    if not config.apm:
        raise SteerabilityError("at least one --apm is required (the first is the primary judge)", "apm")
    if not config.output:
        raise SteerabilityError("--output is required", "output")
    if config.samples < 1:
        raise SteerabilityError("--samples must be at least 1", "samples")
    if config.baseline not in (None, "", "prompt"):
        raise SteerabilityError(f"--baseline must be 'prompt', got {config.baseline!r}", "baseline")
    if config.baseline and not config.base_model:
        raise SteerabilityError("--baseline prompt needs --base-model (hub id or directory)", "base_model")
    from steer.runtime.best_of import MAX_BEST_OF

    best_of = parse_ints(config.best_of, "best_of") or [1]
    if best_of[0] < 1 or best_of[-1] > MAX_BEST_OF:
        raise SteerabilityError(f"--best-of sizes must be 1-{MAX_BEST_OF}", "best_of")
    return best_of


def run(config: SteerabilityConfig) -> dict[str, Any]:
    from steer.models.apm import AttributePredictor
    from steer.core.artifacts import load_steer_config
    from steer.runtime.best_of import best_of_target, candidate_seed, select_best
    from steer.runtime.generator import GenerationRequest, SteerGenerator
    from steer.training.relevance import SentenceEncoder

    start = time.perf_counter()
    best_of = _check(config)
    from steer.runtime.engines import check_engine

    check_engine(config.engine, config.policy, config.upstream)
    _, schema = load_steer_config(config.policy, kind="policy")
    attributes = ([schema.canonical_name(a) for a in config.attributes.split(",") if a.strip()]
                  if config.attributes else schema.names)
    values = parse_ints(config.values, "values")
    prompts = load_prompts(config.prompts)
    cells = build_grid(schema, attributes, values, len(prompts), config.samples, config.seed)
    out = Path(config.output)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # Policy: the largest best-of's candidates for every cell, in one resumable pass.
    n_max = best_of[-1]
    # The engine is part of the key: the same seed draws different text on another engine.
    policy_key = "policy-" + fingerprint(config.policy) + ("" if config.engine == "torch" else "-" + config.engine)
    if config.upstream:
        policy_key += "-upstream-" + fingerprint(f"{config.upstream} {config.upstream_model}")
    keyed, candidates = [], {}
    for c in cells:
        ids = []
        for i in range(n_max):
            seed = candidate_seed(c.seed, i)
            msgs = prompts[c.prompt].messages
            k = request_key(policy_key, msgs, {c.attribute: c.value}, seed, config)
            keyed.append((k, GenerationRequest(list(msgs), {c.attribute: c.value}, config.max_new_tokens,
                                               config.temperature, config.top_p, seed)))
            ids.append(k)
        candidates[c] = ids
    t = time.perf_counter()
    generator = SteerGenerator.load(config.policy, device=config.device, engine=config.engine, threads=config.threads,
                                    max_batch_size=config.batch_size, upstream=config.upstream,
                                    upstream_model=config.upstream_model)
    lines = generate_cached(generator, keyed, out / "cache" / f"{policy_key}.generations.jsonl", config.batch_size)
    # The baseline asks for the values in the words the policy was trained on.
    wording = getattr(generator.template, "label_wording", "numbers")
    del generator
    timings["generate_policy"] = round(time.perf_counter() - t, 1)

    baseline_ids: dict[Cell, str] = {}
    baseline_desc = None
    if config.baseline:
        from steer.training.prompt_baseline import load_baseline_generator

        t = time.perf_counter()
        base_key = "baseline-prompt-" + fingerprint(config.base_model)
        if wording != "numbers":
            base_key += "-" + wording
        bkeyed = []
        for c in cells:
            msgs = prompts[c.prompt].messages
            k = request_key(base_key, msgs, {c.attribute: c.value}, c.seed, config)
            bkeyed.append((k, GenerationRequest(list(msgs), {c.attribute: c.value}, config.max_new_tokens,
                                                config.temperature, config.top_p, c.seed)))
            baseline_ids[c] = k
        base_gen = load_baseline_generator(config.base_model, schema, device=config.device, wording=wording)
        baseline_desc = base_gen.template.description
        lines.update(generate_cached(base_gen, bkeyed, out / "cache" / f"{base_key}.generations.jsonl",
                                     config.batch_size))
        del base_gen
        timings["generate_baseline"] = round(time.perf_counter() - t, 1)

    replies = {k: row["text"] for k, row in lines.items()}
    to_score = {k: (prompts[c.prompt].messages, replies[k]) for c in cells for k in candidates[c]}
    to_score.update({k: (prompts[c.prompt].messages, replies[k]) for c, k in baseline_ids.items()})

    t = time.perf_counter()
    judges = []
    for path in config.apm:
        apm = AttributePredictor.load(path, device=config.device)
        judge_scores = score_cached(apm, to_score, out / "cache" / f"judge-{fingerprint(path)}.scores.jsonl")
        judges.append({"apm": str(path), "names": list(apm.schema.names), "scores": judge_scores})
        del apm
    timings["score"] = round(time.perf_counter() - t, 1)

    # Best-of-N winners, picked by the primary judge exactly as steer.runtime.best_of does for best_of=N.
    primary = judges[0]
    winners: dict[int, dict[Cell, str]] = {}
    for n in best_of:
        winners[n] = {}
        for c in cells:
            target = best_of_target({c.attribute: c.value}, [c.attribute], primary["names"])
            choice = select_best([primary["scores"][k] for k in candidates[c][:n]], target)
            winners[n][c] = candidates[c][choice.index]

    t = time.perf_counter()
    encoder = SentenceEncoder(device="cpu")
    relevance = {n: relevance_figures(cells, winners[n], replies, prompts, encoder, attributes, config.bootstrap,
                                      config.seed) for n in best_of}
    base_relevance = (relevance_figures(cells, baseline_ids, replies, prompts, encoder, attributes, config.bootstrap,
                                        config.seed) if baseline_ids else None)
    timings["relevance"] = round(time.perf_counter() - t, 1)

    judge_reports = []
    for j in judges:
        blocks = {str(n): {**figures(cells, winners[n], j["scores"], attributes, config.bootstrap, config.seed),
                           "relevance": relevance[n]} for n in best_of}
        top = blocks[str(n_max)]
        report_j = {"apm": j["apm"], "steerability": top["steerability"], "crosstalk": top["crosstalk"],
                    "best_of": {n: {"steerability": b["steerability"], "crosstalk": b["crosstalk"]}
                                for n, b in blocks.items()}}
        if baseline_ids:
            report_j["baseline"] = figures(cells, baseline_ids, j["scores"], attributes, config.bootstrap, config.seed)
            for n in best_of:
                report_j["best_of"][str(n)]["vs_baseline"] = baseline_gap(
                    cells, winners[n], baseline_ids, j["scores"], attributes, config.bootstrap, config.seed)
        judge_reports.append(report_j)

    main_judge = judge_reports[0]
    report: dict[str, Any] = {
        "steerability": main_judge["steerability"],
        "crosstalk": main_judge["crosstalk"],
        "relevance": relevance[n_max],
        "best_of": {str(n): {**main_judge["best_of"][str(n)], "relevance": relevance[n]} for n in best_of},
        "judges": judge_reports,
    }
    if baseline_ids:
        report["baseline"] = {**main_judge["baseline"], "relevance": base_relevance}
    report["examples"] = examples(cells, winners[n_max], baseline_ids, replies, prompts, primary["scores"])
    settings = {k: v for k, v in asdict(config).items() if k not in ("json",)}
    settings.update({"attributes": attributes, "best_of": best_of, "prompts": config.prompts or "bundled held-out NPC player lines",
                     "n_prompts": len(prompts), "defaults": schema.defaults, "cells": len(cells),
                     "replies_generated": len(cells) * n_max + len(baseline_ids),
                     "seed_rule": f"draw k of prompt p: seed + {SEED_STRIDE} * (p * samples + k); best-of candidate i adds i",
                     "selection": "closest to the requested value of the varied attribute under the first --apm "
                                  "(steer.runtime.best_of)",
                     "baseline_prompt": baseline_desc})
    report["settings"] = settings
    timings["total"] = round(time.perf_counter() - start, 1)
    report["timings"] = timings
    return report


def examples(cells, winners, baseline_ids, replies, prompts, scores, per_attribute: int = 1) -> list[dict]:
    """A reply at the lowest and highest level of each attribute, for the first prompt(s)."""
    out = []
    for a in dict.fromkeys(c.attribute for c in cells):
        rows = [c for c in cells if c.attribute == a and c.sample == 0 and c.prompt < per_attribute]
        lo, hi = min(c.value for c in rows), max(c.value for c in rows)
        for c in rows:
            if c.value in (lo, hi):
                item = {"attribute": a, "requested": c.value, "player": prompts[c.prompt].user,
                        "reply": replies[winners[c]], "measured": scores[winners[c]].get(a)}
                if baseline_ids:
                    item["baseline_reply"] = replies[baseline_ids[c]]
                out.append(item)
    return out


def main(config: SteerabilityConfig) -> int:
    from steer.training.eval_plots import write_plots
    from steer.training.eval_report import format_summary, write_markdown

    report = run(config)
    out = Path(config.output)
    report["plots"] = write_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_markdown(report, out / "report.md")
    if config.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_summary(report))
        print(f"\nReport: {out / 'report.json'}, {out / 'report.md'}; plots: {', '.join(report['plots'])}")
    return 0
