"""The README.md (model card) written into every policy and APM directory.

PEFT's ``save_pretrained`` leaves a blank template in a policy ("[More Information Needed]"
twenty times) and an APM got none. Either is only usable with its attribute schema, so each card
says it, how to run the model and how it was trained; a policy's card also shows a prompt rendered
by the same template code the server uses, an APM's its held-out accuracy. The front matter keeps
the fields the Hugging Face hub reads.
"""

from __future__ import annotations

import json
from typing import Any

from steer.core.attributes import AttributeSchema
from steer.core.conversation import Message
from steer.core.template import PromptTemplate

EXAMPLE_MESSAGES = [Message("user", "Can you fix my sword?")]


def policy_card(name: str, base_model: str, schema: AttributeSchema, template: PromptTemplate,
                training: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Markdown for ``OUTPUT/README.md``. ``training`` holds the run's settings (data, format,
    epochs, lr, LoRA rank ...) and ``metrics`` what ``sft_metrics.json`` holds."""
    defaults = schema.defaults
    example = dict(defaults)
    first = schema.attributes[0]
    example[first.name] = first.max
    prompt = template.render_text(EXAMPLE_MESSAGES, mode="inference", attributes=example)
    attr_flags = " ".join(f"--attr {k}={v}" for k, v in example.items())
    return f"""{_front_matter(base_model, "peft", "text-generation", ["attribute-conditioned", "lora"])}

# {name}

An attribute-conditioned (SteerLM-style) LoRA policy trained with steer on top of `{base_model}`.
Every prompt carries the values the reply should have; changing them steers the reply.

{_attribute_table(schema)}

Attributes a request leaves out take their default.

## Prompt format

Template `{template.to_dict().get("type", "steerlm")}`. The prompt for one user message with
`{first.name}` at {first.max} and the rest at their defaults; the reply follows it and ends with
`{template.end_marker.strip() or template.end_marker}`:

```
{prompt}
```

## Use

```bash
steer generate --policy {name} --prompt "Can you fix my sword?" {attr_flags}
steer serve --policy {name}     # OpenAI-compatible API with an "attributes" field
```

```python
from steer.runtime.generator import SteerGenerator

gen = SteerGenerator.load("{name}")
print(gen.generate([{{"role": "user", "content": "Can you fix my sword?"}}], attributes={example!r}).text)
```

## Training

{_table(("setting", "value"), training.items())}

{_table(("result", "value"), metrics.items())}
"""


def apm_card(name: str, schema: AttributeSchema, backbone: str, training: dict[str, Any],
             evaluation: dict[str, Any] | None, cv: dict[str, Any] | None = None) -> str:
    """Markdown for an APM's ``README.md``. ``evaluation`` is what ``eval_results.json`` holds
    (None when nothing was held out), ``cv`` what ``cv_results.json`` holds (None without ``--cv``).
    Cross-validated figures come first: one held-out split of a few trees says little."""
    if evaluation:
        per_attribute = [(f"`{n}`", m["pearson"], m["spearman"], m["mae"], m["n"])
                         for n, m in evaluation["attributes"].items()]
        results = (f"{evaluation.get('headline') or ''}\n\nOn {evaluation['n_items']} held-out replies: mean Pearson "
                   f"over all attributes {_cell(evaluation['mean_pearson'])}, mean Spearman "
                   f"{_cell(evaluation['mean_spearman'])}.\n\n"
                   + _table(("attribute", "Pearson", "Spearman", "MAE", "n"), per_attribute))
    else:
        results = "Nothing was held out, so there is no held-out accuracy; `steer apm eval` measures it on any rated data."
    cv_section = _cv_section(cv) if cv else (
        "Not run for this model. `steer apm cv` (or `steer apm train --cv 5`) cross-validates the recipe over "
        "whole conversations, with 95% intervals and two baselines on the same folds.")
    return f"""{_front_matter(backbone, "transformers", "text-classification", ["attribute-prediction"])}

# {name}

A SteerLM attribute prediction model (APM) trained with steer from `{backbone}`: given a
conversation, it predicts how much of each attribute the last assistant reply has, on the
schema's scale.

{_attribute_table(schema)}

## Cross-validated accuracy

{cv_section}

## Held-out accuracy

{results}

## Use

```bash
steer relabel --model {name} --data DATA --format FORMAT --output relabeled.jsonl   # label a dataset
steer apm eval --model {name} --data RATED_DATA --format FORMAT     # accuracy on rated data
steer serve --policy POLICY --apm {name}                            # "score": true in requests
```

```python
from steer.models.apm import AttributePredictor

apm = AttributePredictor.load("{name}")
print(apm.predict_dicts([[{{"role": "user", "content": "Can you fix my sword?"}},
                          {{"role": "assistant", "content": "Aye, leave it with me till dusk."}}]]))
```

## Training

{_table(("setting", "value"), training.items())}
"""


def _ci(entry: dict[str, Any], key: str) -> str:
    value, ci = entry.get(key), entry.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.3f}"


def _cv_section(cv: dict[str, Any]) -> str:
    """The CV figures with their intervals: the recipe beside the probe and the constant."""
    models = [cv[k] for k in ("model", "ridge_probe", "constant") if k in cv]
    head = models[0]
    names = ", ".join(head["headline_attributes"])
    summary = _table(
        ("model", f"mean Pearson ({names}) [95% CI]", "mean over folds +- sd"),
        [(m["model"], _ci(m, "headline_pearson"),
          f"{m['folds']['mean']:.3f} +- {m['folds']['std']:.3f}" if m["folds"].get("std") is not None else "-")
         for m in models],
    )
    per_attribute = _table(
        ("attribute", "Pearson [95% CI]", "Spearman [95% CI]", "MAE", "probe Pearson", "constant MAE", "n"),
        [(f"`{n}`", _ci(a, "pearson"), _ci(a, "spearman"), a["mae"],
          _ci(cv["ridge_probe"]["attributes"][n], "pearson") if "ridge_probe" in cv else "-",
          cv["constant"]["attributes"][n]["mae"] if "constant" in cv else "-", a["n"])
         for n, a in head["attributes"].items()],
    )
    return (f"{cv['folds']}-fold cross-validation grouped by conversation ({cv['n_groups']} groups, {cv['n_items']} "
            f"rated replies; every reply predicted once by a model that never saw its conversation). Pearson and "
            f"Spearman are pooled over all out-of-fold predictions against the integer labels; intervals come from "
            f"{cv['bootstrap']} resamples of whole conversations.\n\n{summary}\n\n{per_attribute}")


def _front_matter(base_model: str, library: str, pipeline: str, tags: list[str]) -> str:
    """The YAML header the Hugging Face hub reads. JSON strings are YAML strings, so a path or an
    id with ":" or "#" in it stays one value."""
    lines = ["---", f"base_model: {json.dumps(base_model)}", f"library_name: {library}", f"pipeline_tag: {pipeline}",
             "tags:", *(f"- {tag}" for tag in ["steer", "steerlm", *tags]), "---"]
    return "\n".join(lines)


def _attribute_table(schema: AttributeSchema) -> str:
    rows = [(f"`{a.name}`", f"{a.min}-{a.max}", a.default, a.description) for a in schema.attributes]
    return f"## Attributes (schema `{schema.name}`)\n\n" + _table(("attribute", "range", "default", "description"), rows)


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value).replace("|", "\\|")
