"""APM accuracy and training time on OpenAssistant (the project's bar), with a like-for-like baseline.

For each split seed: train an APM with default settings (``steer apm train``), time it, score the
held-out conversation trees (``steer apm eval``'s metrics), and fit a ridge probe on frozen
MiniLM mean-pooled embeddings of the same inputs on the same split. Prints JSON and a short table.

    python bench/apm_oasst.py --data ../shared/data/oasst1-en/messages.jsonl --seeds 0 1 --out /tmp/apm-bench
    python bench/apm_oasst.py --baseline-only --seeds 0 1 2      # the ridge probe alone (about a minute a seed)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

BAR_ATTRIBUTES = ["quality", "helpfulness", "humor", "creativity"]


def _split_items(data: str, seed: int, fraction: float):
    from steer.attributes import get_schema
    from steer.data import grouped_split, load_conversations
    from training.apm import rated_items

    schema = get_schema("oasst")
    convs, _ = load_conversations(data, "oasst", schema=schema)
    train, held = grouped_split(convs, fraction, seed)
    return schema, rated_items(train, schema, True), rated_items(held, schema, False), len({c.group for c in held})


ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    w = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ (y - y.mean()))
    return w, float(y.mean())


def _pick_alpha(x: np.ndarray, y: np.ndarray, folds: int = 5) -> float:
    """The ridge strength with the best 5-fold Pearson on the training items only."""
    fold = np.arange(len(y)) % folds
    best, best_r = ALPHAS[0], -np.inf
    for alpha in ALPHAS:
        pred = np.zeros(len(y))
        for f in range(folds):
            w, b = _ridge_fit(x[fold != f], y[fold != f], alpha)
            pred[fold == f] = x[fold == f] @ w + b
        r = np.corrcoef(pred, y)[0, 1]
        if r > best_r:
            best, best_r = alpha, r
    return best


def ridge_baseline(data: str, seed: int, fraction: float, max_length: int) -> dict:
    """Ridge regression on frozen mean-pooled MiniLM embeddings (no fine-tuning); the ridge strength
    is chosen per attribute by cross-validation on the training items."""
    from transformers import AutoModel

    from steer.apm import default_backbone, encode_for_apm, pad_batch
    from steer.modeling import load_tokenizer
    from steer.template import PromptTemplate
    from training.apm_eval import attribute_metrics, label_matrix

    schema, train, held, _ = _split_items(data, seed, fraction)
    tok = load_tokenizer(default_backbone())
    model = AutoModel.from_pretrained(default_backbone()).eval()
    template = PromptTemplate(schema)

    def embed(items):
        feats = [encode_for_apm(it.messages, tok, template, max_length) for it in items]
        out = []
        with torch.inference_mode():
            for i in range(0, len(feats), 32):
                batch = pad_batch(feats[i : i + 32], tok.pad_token_id)
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
        return np.concatenate(out)

    x_train, x_held = embed(train), embed(held)
    mu = x_train.mean(0)
    x_train, x_held = x_train - mu, x_held - mu
    y_train = np.stack([it.values for it in train])
    preds = np.zeros((len(held), len(schema)))
    for j in range(len(schema)):
        ok = ~np.isnan(y_train[:, j])
        x, y = x_train[ok], y_train[ok, j]
        w, b = _ridge_fit(x, y, _pick_alpha(x, y))
        preds[:, j] = x_held @ w + b
    return attribute_metrics(preds, label_matrix(held, schema), schema)


def bar_mean(metrics: dict) -> float | None:
    values = [metrics["attributes"][a]["pearson"] for a in BAR_ATTRIBUTES]
    return None if any(v is None for v in values) else float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/oasst1-en/messages.jsonl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=None, help="default: the APM's default")
    parser.add_argument("--out", default="/tmp/apm-bench")
    parser.add_argument("--baseline-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from steer.apm import AttributePredictor
    from training.apm import ApmTrainConfig
    from training.apm import main as train_main
    from training.apm_eval import evaluate

    max_length = args.max_length or ApmTrainConfig.__dataclass_fields__["max_length"].default
    rows = []
    for seed in args.seeds:
        _, train, held, n_groups = _split_items(args.data, seed, args.eval_fraction)
        row = {"split_seed": seed, "train_items": len(train), "held_out_items": len(held), "held_out_trees": n_groups}
        ridge = ridge_baseline(args.data, seed, args.eval_fraction, max_length)
        row["ridge"] = {"bar_mean_pearson": bar_mean(ridge), "attributes": ridge["attributes"]}
        if not args.baseline_only:
            out = Path(args.out) / f"seed{seed}"
            config = ApmTrainConfig(data=args.data, output=str(out), format="oasst", split_seed=seed,
                                    eval_fraction=args.eval_fraction, overwrite=True,
                                    **({"max_length": args.max_length} if args.max_length else {}))
            start = time.perf_counter()
            train_main(config)
            wall = time.perf_counter() - start
            metrics = evaluate(AttributePredictor.load(out), held)
            row["apm"] = {"bar_mean_pearson": bar_mean(metrics), "train_wall_seconds": round(wall, 1),
                          "mean_pearson_all": metrics["mean_pearson"], "attributes": metrics["attributes"]}
        rows.append(row)
    print(json.dumps(rows, indent=2))
    print(f"\n{'seed':>4} {'trees':>5} {'items':>5} {'ridge':>7} {'apm':>7} {'train s':>8}")
    for r in rows:
        apm = r.get("apm", {})
        fmt = lambda v: "   -   " if v is None else f"{v:7.3f}"  # noqa: E731
        print(f"{r['split_seed']:>4} {r['held_out_trees']:>5} {r['held_out_items']:>5} "
              f"{fmt(r['ridge']['bar_mean_pearson'])} {fmt(apm.get('bar_mean_pearson'))} "
              f"{apm.get('train_wall_seconds', '-'):>8}")


if __name__ == "__main__":
    main()
