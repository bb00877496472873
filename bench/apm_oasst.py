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
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/oasst1-en/messages.jsonl")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--recipe", default=None, help="default: steer apm train's default")
    parser.add_argument("--holdout-fraction", type=float, default=0.2)
    parser.add_argument("--holdout-seed", type=int, default=2026)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/apm-bench", help="scratch directory for the fine-tuning recipe")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from steer.models.apm import default_backbone
    from steer.core.attributes import get_schema
    from steer.data import grouped_split, load_conversations
    from steer.models.modeling import load_tokenizer
    from steer.core.template import PromptTemplate
    from steer.training import apm_cv
    from steer.training.apm import ApmTrainConfig, FrozenBackbone, cross_validate, finetune, train_head, validate_config
    from steer.training.apm_data import headline_attributes, label_matrix, rated_items

    config = ApmTrainConfig(data=args.data, output_dir=args.out, format="oasst", cv=args.folds, bootstrap=args.bootstrap,
                            device="cpu", **({"recipe": args.recipe} if args.recipe else {}))
    validate_config(config)
    schema = get_schema("oasst")
    backbone = default_backbone()
    tokenizer = load_tokenizer(backbone)
    template = PromptTemplate(schema)
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
                     "config": {"layers": config.layers, "pooling": config.pooling,
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
        d = block["model_minus_probe"]
        print(f"  {'APM minus probe (paired)':<34} {d['difference']:6.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]")
    print(f"\nbackbone pass over {len(every)} replies {embed_seconds:.0f} s; fit on the development trees "
          f"{fit_seconds:.1f} s; peak RSS {results['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
