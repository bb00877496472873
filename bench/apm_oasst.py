"""APM accuracy on OpenAssistant, measured so that it does not move with the split.

1. Whole conversation trees are held out first (``--holdout-fraction``, ``--holdout-seed``) and never
   used for choosing anything.
2. On the remaining (development) trees: K-fold cross-validation grouped by tree of the recipe, the
   frozen-embedding ridge probe and the constant (training mean), all on the same folds.
3. The recipe and the probe are fitted on all development trees and scored on the held-out trees.
4. Cross-validation on all the data (the figure docs/apm.md and the model card quote).

Every figure is the pooled Pearson over out-of-fold (or held-out) predictions against the integer
labels, with a 95% interval from resampling whole trees. Prints JSON and a short table, with the
recipe's training time and the process's peak memory.

    python bench/apm_oasst.py --data ../shared/data/oasst1-en/messages.jsonl --folds 5
    python bench/apm_oasst.py --recipe finetune --folds 5      # the fine-tuning recipe (slow on CPU)
    # a decoder backbone read at its last token, asked a judging question, beside the default head
    python bench/apm_oasst.py --backbone ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --pooling last --layers 6 9 12 15 18 21 24 27 30 --max-length 512 \
        --judge-question "Rate your last reply: how good, helpful, funny and creative was it?" --compare-default
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(name: str, r: dict) -> str:
    if r["headline_pearson"] is None:  # the constant on one split: no correlation to speak of
        return f"{name:<34}    -  (constant predictions; MAE " + " ".join(
            f"{r['attributes'][a]['mae']:.3f}" for a in r["headline_attributes"]) + ")"
    ci = r.get("headline_pearson_ci") or [float("nan")] * 2
    folds = r.get("folds") or {}
    spread = (f"{folds['mean']:.3f} +- {folds['std']:.3f}" if folds.get("std") is not None else "-")
    per = " ".join(f"{r['attributes'][a]['pearson']:6.3f}" if r["attributes"][a]["pearson"] is not None else "   -  "
                   for a in r["headline_attributes"])
    return f"{name:<34} {r['headline_pearson']:6.3f} [{ci[0]:.3f}, {ci[1]:.3f}]  {per}  {spread}"


def compare_with_default(results: dict, config, frozen, dev, hold, every, schema, bootstrap: int) -> None:
    """Add ``default`` and ``model_minus_default`` to each block: steer apm train's default head
    on the same folds and held-out trees, and the paired difference on the same resamples."""
    from steer.models.apm import default_backbone
    from steer.models.modeling import load_tokenizer
    from steer.training import apm_cv
    from steer.training.apm import ApmTrainConfig, FrozenBackbone, apm_template, validate_config
    from steer.training.apm_data import headline_attributes, label_matrix

    base = ApmTrainConfig(data=config.data, output_dir=config.output_dir, format="oasst", cv=config.cv,
                          bootstrap=bootstrap, device="cpu")
    validate_config(base)
    tokenizer = load_tokenizer(default_backbone())
    default = FrozenBackbone(base, default_backbone(), tokenizer, apm_template(base, schema, tokenizer), schema)
    headline = headline_attributes(schema)

    def cv_predictions(backbone, cfg, items):
        groups = np.array([it.group for it in items])
        folds = apm_cv.grouped_folds(groups, cfg.cv, cfg.cv_seed)
        x, targets = backbone.features(items), np.stack([it.values for it in items])
        return folds, apm_cv.out_of_fold(folds, lambda tr, te: apm_cv.apply_head(
            apm_cv.fit_ridge_head(x[tr], targets[tr], groups[tr], cfg.inner_folds, cfg.seed), x[te]), len(schema))

    for key, items in (("dev_cv", dev), ("all_cv", every)):
        folds, ours = cv_predictions(frozen, config, items)
        _, theirs = cv_predictions(default, base, items)
        labels, groups = label_matrix(items, schema), [it.group for it in items]
        results[key]["default"] = apm_cv.report("default recipe", theirs, labels, groups, folds, schema, headline,
                                                bootstrap, config.cv_seed)
        results[key]["model_minus_default"] = apm_cv.paired_difference(ours, theirs, labels, groups, schema, headline,
                                                                       bootstrap, config.cv_seed)
    groups_dev, targets = [it.group for it in dev], np.stack([it.values for it in dev])
    ours = apm_cv.apply_head(apm_cv.fit_ridge_head(frozen.features(dev), targets, groups_dev, config.inner_folds,
                                                   config.seed), frozen.features(hold))
    theirs = apm_cv.apply_head(apm_cv.fit_ridge_head(default.features(dev), targets, groups_dev, base.inner_folds,
                                                     base.seed), default.features(hold))
    labels, groups = label_matrix(hold, schema), [it.group for it in hold]
    results["holdout"]["default"] = apm_cv.pooled_metrics(theirs, labels, groups, schema, headline, bootstrap, 0)
    results["holdout"]["model_minus_default"] = apm_cv.paired_difference(ours, theirs, labels, groups, schema,
                                                                         headline, bootstrap, 0)


def noise_ceilings(path: str, items, headline, bootstrap: int) -> dict:
    """Per headline attribute, :func:`steer.training.apm_cv.rater_noise_ceiling` of the replies in
    ``items``, from the rater means and counts in the OpenAssistant file."""
    from steer.training import apm_cv

    wanted = {it.id for it in items}
    rated: dict[str, dict[str, tuple[float, int]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("message_id") in wanted and row.get("labels"):
                labels = row["labels"]
                rated[row["message_id"]] = {n: (v, c) for n, v, c in zip(labels["name"], labels["value"], labels["count"])}
    out = {}
    for name in headline:
        rows = [(rated[it.id][name], it.group) for it in items if name in rated.get(it.id, {})]
        out[name] = apm_cv.rater_noise_ceiling(np.array([r[0][0] for r in rows]), np.array([r[0][1] for r in rows]),
                                               [r[1] for r in rows], n_boot=bootstrap)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/oasst1-en/messages.jsonl")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipe", default=None, help="default: steer apm train's default")
    parser.add_argument("--holdout-fraction", type=float, default=0.2)
    parser.add_argument("--holdout-seed", type=int, default=2026)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/apm-bench", help="scratch directory for the fine-tuning recipe")
    parser.add_argument("--backbone", default=None, help="as steer apm train --backbone (default: MiniLM)")
    parser.add_argument("--pooling", default=None, help="as steer apm train --pooling")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="as steer apm train --layers")
    parser.add_argument("--max-length", type=int, default=None, help="as steer apm train --max-length")
    parser.add_argument("--prompt-format", default=None, help="as steer apm train --prompt-format")
    parser.add_argument("--judge-question", default=None, help="as steer apm train --judge-question")
    parser.add_argument("--compare-default", action="store_true",
                        help="head recipe: also score steer apm train's default on the same folds and held-out "
                             "trees, with the paired difference (recipe minus default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from steer.models.apm import default_backbone
    from steer.core.attributes import get_schema
    from steer.data import grouped_split, load_conversations
    from steer.models.modeling import load_tokenizer
    from steer.training import apm_cv
    from steer.training.apm import (ApmTrainConfig, FrozenBackbone, apm_template, cross_validate, finetune, train_head,
                                    validate_config)
    from steer.training.apm_data import headline_attributes, label_matrix, rated_items

    chosen = {name: getattr(args, name) for name in ("recipe", "backbone", "pooling", "layers", "max_length",
                                                     "prompt_format", "judge_question")
              if getattr(args, name) is not None}
    config = ApmTrainConfig(data=args.data, output_dir=args.out, format="oasst", cv=args.folds, bootstrap=args.bootstrap,
                            device="cpu", **chosen)
    validate_config(config)
    schema = get_schema("oasst")
    backbone = config.backbone or default_backbone()
    tokenizer = load_tokenizer(backbone)
    template = apm_template(config, schema, tokenizer)
    convs, _ = load_conversations(args.data, "oasst", schema=schema)
    dev_convs, hold_convs = grouped_split(convs, args.holdout_fraction, args.holdout_seed)
    dev, hold, every = (rated_items(c, schema, True) for c in (dev_convs, hold_convs, convs))
    headline = headline_attributes(schema)

    start = time.perf_counter()
    frozen = FrozenBackbone(config, backbone, tokenizer, template, schema)
    frozen.features(every)
    frozen.features(every, pooling="mean", layers=[-1], length=False)
    embed_seconds = time.perf_counter() - start

    results: dict = {"recipe": config.recipe, "folds": args.folds, "embed_seconds": round(embed_seconds, 1),
                     "config": {"backbone": config.backbone or "all-MiniLM-L6-v2", "layers": config.layers,
                                "pooling": config.pooling, "prompt_format": type(template).__name__,
                                "judge_question": config.judge_question,
                                "length_features": config.length_features, "max_length": config.max_length}}
    results["dev_cv"] = cross_validate(config, dev, schema, backbone, tokenizer, template, frozen)

    # Held-out trees: fit on every development tree, score once.
    start = time.perf_counter()
    targets = np.stack([it.values for it in dev])
    if config.recipe == "head":
        head = train_head(config, frozen, dev)
        model_pred = apm_cv.apply_head(head, frozen.features(hold))
    else:
        from steer.models.apm import AttributePredictor

        model, norm, _ = finetune(config, backbone, schema, tokenizer, template, dev, args.out, quiet=True)
        predictor = AttributePredictor(model.eval(), tokenizer, schema, {"template": template.to_dict(),
                                       "max_length": config.max_length, "label_normalization": norm},
                                       next(model.parameters()).device)
        model_pred = predictor.predict([it.messages for it in hold])
    fit_seconds = time.perf_counter() - start
    probe = apm_cv.fit_ridge_head(frozen.features(dev, pooling="mean", layers=[-1], length=False), targets,
                                  [it.group for it in dev], config.inner_folds, config.seed)
    probe_pred = apm_cv.apply_head(probe, frozen.features(hold, pooling="mean", layers=[-1], length=False))
    const_pred = np.tile(np.nanmean(targets, axis=0), (len(hold), 1))
    labels, groups = label_matrix(hold, schema), [it.group for it in hold]
    results["holdout"] = {
        name: apm_cv.pooled_metrics(pred, labels, groups, schema, headline, args.bootstrap, 0)
        for name, pred in (("model", model_pred), ("ridge_probe", probe_pred), ("constant", const_pred))
    }
    results["holdout"]["model_minus_probe"] = apm_cv.paired_difference(model_pred, probe_pred, labels, groups,
                                                                     schema, headline, args.bootstrap, 0)
    results["holdout_fit_seconds"] = round(fit_seconds, 1)
    results["all_cv"] = cross_validate(config, every, schema, backbone, tokenizer, template, frozen)
    if args.compare_default and config.recipe == "head":
        compare_with_default(results, config, frozen, dev, hold, every, schema, args.bootstrap)
    # Rater counts are read from the OpenAssistant JSONL itself (a hub id has no file to read).
    if Path(args.data).is_file():
        results["noise_ceiling"] = noise_ceilings(args.data, every, headline, args.bootstrap)
    results["peak_rss_mb"] = round(_peak_rss_mb())
    print(json.dumps(results, indent=2))

    print(f"\nrecipe {config.recipe}; mean Pearson over {', '.join(headline)} [95% CI], "
          f"per attribute, mean +- sd over folds")
    for title, block in (
        (f"{args.folds}-fold CV, development trees ({results['dev_cv']['n_groups']} trees, "
         f"{results['dev_cv']['n_items']} replies)", results["dev_cv"]),
        (f"held-out trees never used for tuning ({results['holdout']['model']['n_groups']} trees, "
         f"{results['holdout']['model']['n_items']} replies)", results["holdout"]),
        (f"{args.folds}-fold CV, all trees ({results['all_cv']['n_groups']} trees, "
         f"{results['all_cv']['n_items']} replies)", results["all_cv"]),
    ):
        print(f"\n{title}")
        for key, name in (("model", f"APM ({config.recipe})"), ("ridge_probe", "ridge probe"), ("constant", "constant")):
            print("  " + _row(name, block[key]))
        if "default" in block:
            print("  " + _row("default recipe (MiniLM head)", block["default"]))
        for key, name in (("model_minus_probe", "APM minus probe (paired)"),
                          ("model_minus_default", "APM minus default (paired)")):
            if key in block:
                d = block[key]
                print(f"  {name:<34} {d['difference']:6.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]")
    print("\nceiling set by rater noise (a perfect model's Pearson with the rater means) [95% CI], "
          "true and one-rater variance, replies per number of raters")
    for name, c in results.get("noise_ceiling", {}).items():
        if c["ceiling"] is None:
            print(f"  {name:<12}   -  not identifiable (fewer than two numbers of raters with 20+ replies) {c['strata']}")
        else:
            print(f"  {name:<12} {c['ceiling']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]  vt {c['true_variance']:.4f} "
                  f"s2 {c['rater_variance']:.4f}  {c['strata']}")
    print(f"\nbackbone pass over {len(every)} replies {embed_seconds:.0f} s; fit on the development trees "
          f"{fit_seconds:.1f} s; peak RSS {results['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
