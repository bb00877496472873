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

from steer.attributes import AttributeSchema
from steer.conversation import Message
from steer.template import PromptTemplate

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
from steer.generation import SteerGenerator

gen = SteerGenerator.load("{name}")
print(gen.generate([{{"role": "user", "content": "Can you fix my sword?"}}], attributes={example!r}).text)
```

## Training

{_table(("setting", "value"), training.items())}

{_table(("result", "value"), metrics.items())}
"""


def apm_card(name: str, schema: AttributeSchema, backbone: str, training: dict[str, Any],
             evaluation: dict[str, Any] | None) -> str:
    """Markdown for an APM's ``README.md``. ``evaluation`` is what ``eval_results.json`` holds
    (None when nothing was held out)."""
    if evaluation:
        per_attribute = [(f"`{n}`", m["pearson"], m["spearman"], m["mae"], m["n"])
                         for n, m in evaluation["attributes"].items()]
        results = (f"On {evaluation['n_items']} held-out replies: mean Pearson "
                   f"{_cell(evaluation['mean_pearson'])}, mean Spearman {_cell(evaluation['mean_spearman'])}.\n\n"
                   + _table(("attribute", "Pearson", "Spearman", "MAE", "n"), per_attribute))
    else:
        results = "Nothing was held out, so there is no held-out accuracy; `steer apm eval` measures it on any rated data."
    return f"""{_front_matter(backbone, "transformers", "text-classification", ["attribute-prediction"])}

# {name}

A SteerLM attribute prediction model (APM) trained with steer from `{backbone}`: given a
conversation, it predicts how much of each attribute the last assistant reply has, on the
schema's scale.

{_attribute_table(schema)}

## Held-out accuracy

{results}

## Use

```bash
steer relabel --model {name} --data DATA --format FORMAT --output relabeled.jsonl   # label a dataset
steer apm eval --model {name} --data RATED_DATA --format FORMAT     # accuracy on rated data
steer serve --policy POLICY --apm {name}                            # "score": true in requests
```

```python
from steer.apm import AttributePredictor

apm = AttributePredictor.load("{name}")
print(apm.predict_dicts([[{{"role": "user", "content": "Can you fix my sword?"}},
                          {{"role": "assistant", "content": "Aye, leave it with me till dusk."}}]]))
```

## Training

{_table(("setting", "value"), training.items())}
"""


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
