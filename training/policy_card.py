"""The README.md (model card) written into every policy directory.

PEFT's ``save_pretrained`` leaves a blank template there ("[More Information Needed]" twenty
times). A policy is only usable with its attribute schema and prompt format, so the card says
those, shows a rendered prompt (from the same template code the server uses), how to run it, and
how it was trained; the front matter keeps the fields the Hugging Face hub reads.
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
    rows = "\n".join(f"| `{a.name}` | {a.min}-{a.max} | {a.default} | {a.description or ''} |" for a in schema.attributes)
    prompt = template.render_text(EXAMPLE_MESSAGES, mode="inference", attributes=example)
    attr_flags = " ".join(f"--attr {k}={v}" for k, v in example.items())
    settings = "\n".join(f"| {k} | {_cell(v)} |" for k, v in training.items())
    results = "\n".join(f"| {k} | {_cell(v)} |" for k, v in metrics.items())
    # JSON strings are YAML strings: a path or id with ":" or "#" stays one value.
    return f"""---
base_model: {json.dumps(base_model)}
library_name: peft
pipeline_tag: text-generation
tags:
- steer
- steerlm
- attribute-conditioned
- lora
---

# {name}

An attribute-conditioned (SteerLM-style) LoRA policy trained with steer on top of `{base_model}`.
Every prompt carries the values the reply should have; changing them steers the reply.

## Attributes (schema `{schema.name}`)

| attribute | range | default | description |
| --- | --- | --- | --- |
{rows}

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

| setting | value |
| --- | --- |
{settings}

| result | value |
| --- | --- |
{results}
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value).replace("|", "\\|")
