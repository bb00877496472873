"""``steer apm eval``: how well an APM's predictions track human ratings.

Per attribute: Pearson and Spearman correlation, mean absolute error and the number of rated
replies, against the integer labels on the schema's scale (the scale conditioning uses). By
default it scores the same grouped held-out split the APM was trained without (fraction and seed
are read from its ``steer_config.json``), so no conversation tree it learned from is scored.

    steer apm eval --model runs/apm --data ../shared/data/oasst1-en/messages.jsonl --json

For a figure that does not depend on one split, cross-validate the recipe instead (``steer apm cv``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from steer.models.apm import AttributePredictor
from steer.core.attributes import AttributeSchema
from steer.data import DataError, grouped_split, load_conversations
from steer.training.apm_data import MIN_MEANINGFUL_HELD_OUT, headline_attributes, label_matrix, rated_items

logger = logging.getLogger(__name__)

# Fewer rated replies than this and a correlation means little; report null instead.
MIN_ITEMS_FOR_CORRELATION = 3


@dataclass
class ApmEvalConfig:
    model: str = field(metadata={"help": "Directory of a trained APM (holds steer_config.json)."})
    data: str = field(metadata={"help": "Rated conversations: a file path or hub dataset id."})
    format: str | None = field(
        default=None,
        metadata={"help": "Data format: oasst, helpsteer, hh, steer, table, jsonl, csv, parquet or hub. "
                          "Default: the format the APM was trained on (its steer_config.json records it)."},
    )
    columns: list[str] = field(
        default_factory=list, metadata={"help": "Column mapping for table formats (field=column)."}
    )
    eval_fraction: float | None = field(
        default=None, metadata={"help": "Held-out fraction of groups. Default: the one the APM was trained with."}
    )
    split_seed: int | None = field(
        default=None, metadata={"help": "Seed of the grouped split. Default: the one the APM was trained with."}
    )
    all: bool = field(default=False, metadata={"help": "Score every rated reply, not just the held-out split."})
    batch_size: int = field(default=32, metadata={"help": "Replies per forward pass."})
    limit: int | None = field(default=None, metadata={"help": "Load at most this many conversations."})
    device: str | None = field(default=None, metadata={"help": "Device (cpu, cuda, cuda:1); default: GPU if present."})
    json: bool = field(default=False, metadata={"help": "Print the metrics as JSON."})
    progress: bool = field(default=False, metadata={"help": "Show a progress bar while scoring."})


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def attribute_metrics(predictions: np.ndarray, labels: np.ndarray, schema: AttributeSchema) -> dict:
    """Pearson, Spearman, MAE and n per attribute (NaN labels skipped). Correlations are null when
    an attribute has too few labels or constant labels/predictions."""
    from scipy import stats

    per = {}
    for j, name in enumerate(schema.names):
        mask = ~np.isnan(labels[:, j])
        y, p = labels[mask, j], predictions[mask, j]
        n = int(mask.sum())
        entry = {"pearson": None, "spearman": None, "mae": _finite(float(np.abs(p - y).mean())) if n else None, "n": n}
        if n >= MIN_ITEMS_FOR_CORRELATION and np.ptp(y) > 0 and np.ptp(p) > 0:
            entry["pearson"] = _finite(stats.pearsonr(p, y).statistic)
            entry["spearman"] = _finite(stats.spearmanr(p, y).statistic)
        per[name] = entry
    pearsons = [m["pearson"] for m in per.values() if m["pearson"] is not None]
    spearmans = [m["spearman"] for m in per.values() if m["spearman"] is not None]
    headline = headline_attributes(schema)
    head_values = [per[a]["pearson"] for a in headline]
    return {
        "attributes": per,
        "mean_pearson": float(np.mean(pearsons)) if pearsons else None,
        "mean_spearman": float(np.mean(spearmans)) if spearmans else None,
        "headline_attributes": headline,
        "headline_pearson": None if any(v is None for v in head_values) else float(np.mean(head_values)),
    }


def format_table(metrics: dict) -> str:
    def cell(x):
        return "   -  " if x is None else f"{x:6.3f}"

    lines = [f"{'attribute':<16} {'pearson':>7} {'spearman':>8} {'mae':>6} {'n':>6}"]
    for name, m in metrics["attributes"].items():
        lines.append(f"{name:<16} {cell(m['pearson']):>7} {cell(m['spearman']):>8} {cell(m['mae']):>6} {m['n']:>6}")
    lines.append(f"{'mean (all)':<16} {cell(metrics['mean_pearson']):>7} {cell(metrics['mean_spearman']):>8}")
    if metrics.get("headline_attributes"):
        lines.append(f"mean Pearson over {', '.join(metrics['headline_attributes'])} (the figure docs/apm.md quotes): "
                     f"{cell(metrics.get('headline_pearson')).strip()} (n = {metrics.get('n_items', '?')})")
        if metrics.get("n_items", 0) < MIN_MEANINGFUL_HELD_OUT:
            lines.append(f"fewer than {MIN_MEANINGFUL_HELD_OUT} rated replies: this figure is not meaningful (it moves "
                         "by +-0.2 between splits); `steer apm cv` gives a cross-validated figure with an interval")
    return "\n".join(lines)


def evaluate(predictor: AttributePredictor, items: Sequence, batch_size: int = 32, progress: bool = False) -> dict:
    preds = predictor.predict([it.messages for it in items], batch_size=batch_size, progress=progress)
    metrics = attribute_metrics(preds, label_matrix(items, predictor.schema), predictor.schema)
    metrics["n_items"] = len(items)
    return metrics


def main(config: ApmEvalConfig) -> dict:
    predictor = AttributePredictor.load(config.model, device=config.device)
    schema = predictor.schema
    trained_on = predictor.config.get("data") or {}
    data_format = config.format or trained_on.get("format") or "oasst"
    columns = config.columns or (trained_on.get("columns") or [] if config.format is None else [])
    if config.format is None:
        logger.info("--format %s (the format %s was trained on)", data_format, config.model)
    split = predictor.config.get("split") or {}
    fraction = config.eval_fraction if config.eval_fraction is not None else float(split.get("eval_fraction", 0.1))
    seed = config.split_seed if config.split_seed is not None else int(split.get("seed", 0))
    if not config.all and not 0.0 < fraction < 1.0:
        raise DataError(f"--eval-fraction must be in (0, 1) (or pass --all), got {fraction}", field="eval_fraction")
    convs, _ = load_conversations(config.data, data_format, schema=schema, columns=columns, limit=config.limit)
    if not config.all:
        _, convs = grouped_split(convs, fraction, seed)
    # Labels (integers) are what the metrics compare against, so items need at least one.
    items = rated_items(convs, schema, use_scores=False)
    if not items:
        where = "in the data" if config.all else f"in the held-out split (fraction {fraction}, seed {seed})"
        raise DataError(
            f"no assistant reply {where} has a label for schema {schema.name!r} ({', '.join(schema.names)})",
            source=config.data,
        )
    logger.info("scoring %d rated replies %s", len(items), "(all)" if config.all else f"(held-out split, seed {seed})")
    metrics = evaluate(predictor, items, batch_size=config.batch_size, progress=config.progress)
    metrics["split"] = None if config.all else {"eval_fraction": fraction, "seed": seed}
    metrics["format"] = data_format
    print(json.dumps(metrics, indent=2) if config.json else format_table(metrics))
    return metrics
