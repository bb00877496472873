"""The prompt-steering baseline: an unmodified base model asked for the attribute values in plain
words in its system message ("Humor: 4 of 4, be very funny."), with no adapter and no label line.

This is what a user would try instead of SteerLM. :class:`InstructionPrompt` plugs into
:class:`steer.runtime.generator.SteerGenerator` like any prompt template, so the baseline runs through the
same batched decode loop, sampler and stop handling as the policy:

- a base model with a chat template gets its own template (system message + user turn +
  generation prompt), and stops at its EOS;
- a base model without one (the demo's tiny base, any plain LM) gets steer's SteerLM turn layout
  (System / User / Assistant markers) without the label line: the layout the demo base was
  pretrained on. The fallback is logged and recorded in the report's settings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from steer.core.attributes import AttributeSchema
from steer.core.conversation import as_messages
from steer.core.template import PromptTemplate, Segment

logger = logging.getLogger(__name__)

# How an attribute reads in an instruction: "be {adverb} {adjective}". Unknown attributes use
# their name ("be very menace" reads badly, so they get "{name} level" instead).
ADJECTIVES = {
    "humor": "funny", "creativity": "creative", "helpfulness": "helpful", "quality": "good",
    "toxicity": "toxic", "violence": "violent", "not_appropriate": "inappropriate", "correctness": "correct",
    "coherence": "coherent", "complexity": "complex", "verbosity": "verbose",
}
# Degree words by position on the attribute's scale (0 = none .. 1 = the maximum).
DEGREES = ((0.0, "do not be {adj} at all"), (0.25, "be slightly {adj}"), (0.5, "be moderately {adj}"),
           (0.75, "be quite {adj}"), (1.0, "be very {adj}"))


def instruction(schema: AttributeSchema, name: str, value: int) -> str:
    """``"Humor: 4 of 4, be very funny."``"""
    attr = schema[name]
    share = (value - attr.min) / (attr.max - attr.min)
    phrase = min(DEGREES, key=lambda d: abs(d[0] - share))[1]
    adj = ADJECTIVES.get(attr.name, f"high in {attr.name.replace('_', ' ')}")
    return f"{attr.name.replace('_', ' ').capitalize()}: {value} of {attr.max}, {phrase.format(adj=adj)}."


def instructions(schema: AttributeSchema, values: Mapping[str, int], wording: str = "numbers") -> str:
    """The values as an instruction. ``wording="words"`` (a policy trained with ``--label-wording
    words``) uses the schema's level words, the policy's own label text: "Reply in a way that is
    as helpful and specific as possible, completely serious, vivid and imaginative." """
    if wording == "words":
        return "Reply in a way that is " + ", ".join(schema.describe_labels(values, fill_defaults=False)) + "."
    return "Write your reply with these qualities. " + " ".join(
        instruction(schema, n, v) for n, v in values.items())


class InstructionPrompt:
    """A prompt "template" for :class:`SteerGenerator` that writes the requested values into the
    system message and renders the turns with the base model's own chat template."""

    def __init__(self, schema: AttributeSchema, tokenizer, wording: str = "numbers"):
        self.schema = schema
        self.tokenizer = tokenizer
        self.wording = wording
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # No chat template: the SteerLM turn layout without labels (see the module docstring).
        self._layout = PromptTemplate(schema)
        if not self.uses_chat_template:
            logger.warning("the base model's tokenizer has no chat template; the baseline writes the turns in "
                           "steer's System/User/Assistant layout instead (no label line)")

    @property
    def description(self) -> str:
        layout = "chat template" if self.uses_chat_template else "steerlm layout without labels (no chat template)"
        return layout if self.wording == "numbers" else f"{layout}, values in {self.wording}"

    @property
    def end_marker(self) -> str:
        return (self.tokenizer.eos_token or "") if self.uses_chat_template else self._layout.end_marker

    @property
    def stop_strings(self) -> list[str]:
        if self.uses_chat_template:
            return [s for s in (self.tokenizer.eos_token,) if s]
        return self._layout.stop_strings

    def messages_with_instructions(self, messages, attributes: Mapping[str, int]) -> list[dict[str, str]]:
        msgs = [{"role": m.role, "content": m.content} for m in as_messages(messages)]
        text = instructions(self.schema, attributes, self.wording)
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n{text}"}
        else:
            msgs.insert(0, {"role": "system", "content": text})
        return msgs

    def render(self, messages, mode: str = "inference", attributes=None) -> list[Segment]:
        if mode != "inference":
            raise ValueError("the prompt baseline only renders inference prompts")
        applied = self.schema.validate(attributes)
        msgs = self.messages_with_instructions(messages, applied)
        if self.uses_chat_template:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            return [Segment(text)]
        segments = self._layout.render(msgs, mode="inference", attributes=applied)
        # Drop the label line: the last segment is "<extra_id_1>Assistant\n<extra_id_2>labels\n".
        last = segments[-1].text
        return segments[:-1] + [Segment(last[: last.index(self._layout.label_marker)])]

    def tokenize(self, messages, tokenizer, mode: str = "inference", attributes=None, segment_ids=None):
        """As ``PromptTemplate.tokenize``, except that each segment is encoded whole, special-token
        text included, as a plain tokenizer call would (``segment_ids``: the same cache)."""
        from steer.core.template import TokenizedPrompt, segment_encoder

        encode = segment_encoder(tokenizer, segment_ids)
        segments = self.render(messages, mode=mode, attributes=attributes)
        ids: list[int] = []
        if not self.uses_chat_template and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        for seg in segments:
            # Without its content spans a segment is encoded as one plain call (encode_segment).
            ids.extend(encode(Segment(seg.text)))
        return TokenizedPrompt(input_ids=ids, labels=list(ids))


def load_baseline_generator(base_model: str, schema: AttributeSchema, device: str | None = None,
                            trust_remote_code: bool = False, wording: str = "numbers"):
    """A :class:`SteerGenerator` over the bare base model with :class:`InstructionPrompt`."""
    from steer.runtime.generator import SteerGenerator
    from steer.models.modeling import load_causal_lm, load_tokenizer, resolve_device

    dev = resolve_device(device)
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    model = load_causal_lm(base_model, device=dev, trust_remote_code=trust_remote_code).eval()
    return SteerGenerator(model, tokenizer, schema, InstructionPrompt(schema, tokenizer, wording), dev,
                          name=str(base_model))


def describe(generator: Any) -> str:
    return getattr(generator.template, "description", "")
