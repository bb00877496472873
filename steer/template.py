"""The prompt format: the one object that turns a conversation into text and tokens.

One template serves three callers, switched by ``mode``:

- ``"train"``: the whole conversation, each assistant turn conditioned on its own labels, with a
  loss mask that covers only assistant responses and the marker that ends them;
- ``"inference"``: the same text up to the point where the model starts answering, conditioned on
  the requested attributes;
- ``"apm"``: the conversation up to and including the reply being scored, with no labels (they are
  what the attribute prediction model predicts).

Text is built from segments that are tokenized one by one and concatenated, so the inference
prompt is a token-for-token prefix of the training sequence: BPE merges never cross a segment
boundary. User-supplied text is escaped so it can never produce a template marker.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from steer.attributes import AttributeSchema
from steer.conversation import Message, as_messages, validate_messages

Mode = Literal["train", "inference", "apm"]
MODES = ("train", "inference", "apm")

IGNORE_INDEX = -100

# A lookalike for '<' that no tokenizer normalises back (NFKC maps the fullwidth form, not this).
_ESCAPED_LT = "\u2039"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False


@dataclass
class TokenizedPrompt:
    input_ids: list[int]
    # IGNORE_INDEX where the loss is masked; equal to input_ids where it is trained.
    labels: list[int]

    @property
    def num_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class PromptTemplate:
    """SteerLM's format (NeMo-Aligner)::

        <extra_id_0>System
        {system}
        <extra_id_1>User
        {user}
        <extra_id_1>Assistant
        <extra_id_2>{label string}
        {response}
        <extra_id_1>
    """

    name = "steerlm"
    # The chat-template variant writes its own BOS inside the template text.
    adds_bos = True
    system_marker = "<extra_id_0>"
    turn_marker = "<extra_id_1>"
    label_marker = "<extra_id_2>"
    _marker_pattern = re.compile(r"<(?=extra_id_)")

    def __init__(self, schema: AttributeSchema, default_system: str = ""):
        self.schema = schema
        self.default_system = default_system

    # ---------------------------------------------------------------- settings
    @property
    def end_marker(self) -> str:
        """What ends every assistant response; trained on, and where generation stops."""
        return "\n" + self.turn_marker

    @property
    def stop_strings(self) -> list[str]:
        return [self.turn_marker]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "default_system": self.default_system}

    # ------------------------------------------------------------------ render
    def escape(self, text: str) -> str:
        """Neutralise anything in user-controlled text that looks like a template marker."""
        return self._marker_pattern.sub(_ESCAPED_LT, text)

    def label_line(self, values: Mapping[str, Any], fill_defaults: bool = True) -> str:
        return f"{self.label_marker}{self.schema.format_labels(values, fill_defaults=fill_defaults)}\n"

    def render(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        mode: Mode = "train",
        attributes: Mapping[str, Any] | None = None,
    ) -> list[Segment]:
        """Segments of the rendered conversation.

        ``attributes`` conditions the reply the model is about to write (inference) and any
        earlier assistant turn that carries no labels of its own.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        msgs = as_messages(messages)
        validate_messages(msgs, for_generation=(mode == "inference"))
        requested = self.schema.validate(attributes) if mode != "apm" else {}

        system = msgs[0].content if msgs[0].role == "system" else self.default_system
        segments = [Segment(f"{self.system_marker}System\n{self.escape(system)}\n")]
        for m in msgs[1:] if msgs[0].role == "system" else msgs:
            if m.role == "user":
                segments.append(Segment(f"{self.turn_marker}User\n{self.escape(m.content)}\n"))
                continue
            header = f"{self.turn_marker}Assistant\n"
            if mode == "apm":
                segments.append(Segment(header))
                segments.append(Segment(self.escape(m.content), trainable=True))
                continue
            # A turn's own labels condition it; partial human labels stay partial (never guessed).
            if m.labels:
                header += self.label_line(m.labels, fill_defaults=False)
            else:
                header += self.label_line(requested)
            segments.append(Segment(header))
            segments.append(Segment(self.escape(m.content) + self.end_marker, trainable=True))
        if mode == "inference":
            segments.append(Segment(f"{self.turn_marker}Assistant\n" + self.label_line(requested)))
        return segments

    def render_text(self, messages, mode: Mode = "train", attributes=None) -> str:
        return "".join(s.text for s in self.render(messages, mode=mode, attributes=attributes))

    # --------------------------------------------------------------- tokenize
    def tokenize(self, messages, tokenizer, mode: Mode = "train", attributes=None) -> TokenizedPrompt:
        """Token ids and loss labels. Each segment is tokenized on its own (no special tokens),
        and the tokenizer's BOS, if it has one, starts the sequence."""
        segments = self.render(messages, mode=mode, attributes=attributes)
        ids: list[int] = []
        labels: list[int] = []
        if self.adds_bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for seg in segments:
            seg_ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
            ids.extend(seg_ids)
            labels.extend(seg_ids if (seg.trainable and mode == "train") else [IGNORE_INDEX] * len(seg_ids))
        return TokenizedPrompt(input_ids=ids, labels=labels)


class ChatTemplatePrompt(PromptTemplate):
    """For models that ship a chat template: the tokenizer's own template renders the turns, and
    each assistant turn starts with the SteerLM label line, so conditioning works the same way.

    At inference the prompt is the template's generation prompt followed by the label line; the
    model then writes the reply and the template's own end-of-turn token.
    """

    name = "chat_template"
    adds_bos = False

    def __init__(self, schema: AttributeSchema, tokenizer, default_system: str = ""):
        super().__init__(schema, default_system=default_system)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use the default SteerLM template instead")
        self.tokenizer = tokenizer

    @property
    def end_marker(self) -> str:
        return self.tokenizer.eos_token or ""

    @property
    def stop_strings(self) -> list[str]:
        return [s for s in (self.tokenizer.eos_token,) if s]

    def _chat(self, msgs: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    def _turn_suffix(self) -> str | None:
        """What the template writes after an assistant reply's text (its end-of-turn), found once
        from a two-message probe; None when the probe does not render as growing prefixes."""
        if not hasattr(self, "_suffix"):
            probe_reply = "\u2063probe\u2063"
            user = [{"role": "user", "content": "x"}]
            try:
                prefix = self._chat(user, generation_prompt=True)
                full = self._chat(user + [{"role": "assistant", "content": probe_reply}], generation_prompt=False)
            except Exception:
                full = prefix = ""
            self._suffix = full[len(prefix) + len(probe_reply):] if full.startswith(prefix + probe_reply) else None
        return self._suffix

    def _render_inference_once(self, msgs, requested) -> list[Segment] | None:
        """The inference segments from ONE render of the conversation, where the general path
        renders it twice per assistant turn (a cost that grows with the square of its length).
        Each reply is found in the render by its label line, which user text cannot contain (it
        is escaped), and must be followed by the template's end-of-turn; None when the template
        renders otherwise, and the general path is used."""
        suffix = self._turn_suffix()
        if suffix is None or not any(m.role == "assistant" for m in msgs):
            return None
        chat: list[dict] = []
        if msgs[0].role != "system" and self.default_system:
            chat.append({"role": "system", "content": self.escape(self.default_system)})
        replies = []
        for m in msgs:
            if m.role != "assistant":
                chat.append({"role": m.role, "content": self.escape(m.content)})
                continue
            line = self.label_line(m.labels, fill_defaults=False) if m.labels else self.label_line(requested)
            replies.append((line, line + self.escape(m.content)))
            chat.append({"role": "assistant", "content": replies[-1][1]})
        whole = self._chat(chat, generation_prompt=True)
        segments: list[Segment] = []
        done = 0
        for line, body in replies:
            start = whole.find(body, done)
            end = start + len(body)
            if start < 0 or not whole.startswith(suffix, end):
                return None
            segments.append(Segment(whole[done:start] + line))
            segments.append(Segment(whole[start + len(line):end + len(suffix)], trainable=True))
            done = end + len(suffix)
        segments.append(Segment(whole[done:] + self.label_line(requested)))
        return segments

    def render(self, messages, mode: Mode = "train", attributes=None) -> list[Segment]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        msgs = as_messages(messages)
        validate_messages(msgs, for_generation=(mode == "inference"))
        requested = self.schema.validate(attributes) if mode != "apm" else {}
        if mode == "inference":
            fast = self._render_inference_once(msgs, requested)
            if fast is not None:
                return fast
        chat: list[dict] = []
        if msgs[0].role != "system" and self.default_system:
            chat.append({"role": "system", "content": self.escape(self.default_system)})
        segments: list[Segment] = []
        done = ""  # text already emitted as segments
        for m in msgs:
            if m.role != "assistant":
                chat.append({"role": m.role, "content": self.escape(m.content)})
                continue
            prefix = self._chat(chat, generation_prompt=True)
            line = "" if mode == "apm" else (
                self.label_line(m.labels, fill_defaults=False) if m.labels else self.label_line(requested)
            )
            chat.append({"role": "assistant", "content": line + self.escape(m.content)})
            full = self._chat(chat, generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix + line)):
                raise ValueError("this chat template does not render conversations as growing prefixes")
            segments.append(Segment(prefix[len(done):] + line))
            segments.append(Segment(full[len(prefix) + len(line):], trainable=True))
            done = full
        if mode == "inference":
            prefix = self._chat(chat, generation_prompt=True)
            segments.append(Segment(prefix[len(done):] + self.label_line(requested)))
        else:
            # Text after the last turn (if any) is template boilerplate, not something to learn.
            tail = self._chat(chat, generation_prompt=False)[len(done):]
            if tail:
                segments.append(Segment(tail))
        return segments


def build_template(settings: Mapping[str, Any] | None, schema: AttributeSchema, tokenizer=None) -> PromptTemplate:
    """Rebuild a template from the settings saved beside a model (``PromptTemplate.to_dict``)."""
    settings = dict(settings or {})
    kind = settings.pop("type", "steerlm")
    if kind == "steerlm":
        return PromptTemplate(schema, **settings)
    if kind == "chat_template":
        if tokenizer is None:
            raise ValueError("the chat_template prompt format needs the model's tokenizer")
        return ChatTemplatePrompt(schema, tokenizer, **settings)
    raise ValueError(f"unknown prompt template type {kind!r}; expected 'steerlm' or 'chat_template'")
