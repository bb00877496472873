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
boundary. User-supplied text (every message's content) is escaped so it can never produce a
template marker, and each segment records where that text lies, so the tokenizer's special
tokens written as text there (``</s>``, ``<|im_start|>``) are tokenized as plain text: they can
never end a turn or open a new one.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from steer.core.attributes import AttributeSchema, AttributeValueError
from steer.core.conversation import ConversationError, Message, as_messages, validate_messages

Mode = Literal["train", "inference", "apm"]
MODES = ("train", "inference", "apm")

IGNORE_INDEX = -100

# A lookalike for '<' that no tokenizer normalises back (NFKC maps the fullwidth form, not this).
_ESCAPED_LT = "\u2039"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool = False
    # (start, end) of user-controlled text (message contents) in ``text``: never special tokens.
    content: tuple[tuple[int, int], ...] = ()


def _segment(*parts: tuple[str, bool], trainable: bool = False) -> Segment:
    """A segment from (text, is_user_content) parts."""
    text, spans = "", []
    for part, is_content in parts:
        if is_content and part:
            spans.append((len(text), len(text) + len(part)))
        text += part
    return Segment(text, trainable, tuple(spans))


def special_token_strings(tokenizer) -> list[str]:
    """The text of every special token the tokenizer would otherwise find in a string, longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


def backend_encoder(tokenizer):
    """The ``tokenizers`` object behind a fast transformers tokenizer, when calling the tokenizer
    (no special tokens added, special tokens not split) would only run it: no truncation or
    padding left set on it, and no subclass that changes how text is encoded. None otherwise.

    A transformers call costs about three times the encoding itself (argument handling and the
    ``BatchEncoding`` built around the ids); the server tokenizes every request's prompt while it
    streams other replies. ``tests/test_template.py`` checks both ways give the same ids, and
    ``steer.runtime.compat.check_transformers`` that the method recognised here still exists."""
    encode_plus = getattr(type(tokenizer), "_encode_plus", None)
    if getattr(encode_plus, "__qualname__", "") != "TokenizersBackend._encode_plus":
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return None
    if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens:
        return None
    return backend


def encode_plain(tokenizer, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``, straight from the fast
    tokenizer's backend where that gives the same ids (:func:`backend_encoder`)."""
    backend = backend_encoder(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_segment(segment: Segment, tokenizer) -> list[int]:
    """Token ids of one segment. Special-token text inside user content stays text; the template's
    own text keeps its special tokens (a chat template's ``<|im_start|>``)."""
    normal = lambda text: encode_plain(tokenizer, text)  # noqa: E731
    text = segment.text
    specials = [t for t in special_token_strings(tokenizer) if t in text] if segment.content else []
    if not specials:
        return normal(text)
    matches = list(re.finditer("|".join(map(re.escape, specials)), text))

    def in_content(m) -> bool:
        return any(m.start() < end and start < m.end() for start, end in segment.content)

    if not any(in_content(m) for m in matches):
        return normal(text)  # the common case: tokenized exactly as a plain call would
    plain = lambda t: tokenizer(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] if t else []  # noqa: E731
    ids: list[int] = []
    pos = 0
    for m in matches:
        if in_content(m):
            continue
        ids += plain(text[pos:m.start()])
        ids.append(tokenizer.convert_tokens_to_ids(m.group()))
        pos = m.end()
    return ids + plain(text[pos:])


class SegmentIds:
    """Token ids of recently tokenized segments, for one tokenizer (a bounded LRU, thread-safe).

    A server tokenizes the same segments in request after request: the system message with its
    label line, and every earlier turn, which a chat client sends again with each new message.
    Encoding was 13% of the server's CPU per request; a hit costs a dictionary lookup. Segments
    over ``max_chars`` characters are encoded each time, so the cache stays small (at most
    ``max_entries`` x ``max_chars`` characters and their ids).
    """

    def __init__(self, tokenizer, max_entries: int = 1024, max_chars: int = 4096):
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.hits = 0
        self.misses = 0
        self._ids: OrderedDict[tuple[str, tuple[tuple[int, int], ...]], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, segment: Segment) -> list[int]:
        if len(segment.text) > self.max_chars:
            return encode_segment(segment, self.tokenizer)
        key = (segment.text, segment.content)  # where user content lies changes the ids (special tokens)
        with self._lock:
            ids = self._ids.get(key)
            if ids is not None:
                self._ids.move_to_end(key)
                self.hits += 1
                return list(ids)
            self.misses += 1
        ids = encode_segment(segment, self.tokenizer)
        with self._lock:
            self._ids[key] = tuple(ids)
            if len(self._ids) > self.max_entries:
                self._ids.popitem(last=False)
        return ids


def segment_encoder(tokenizer, segment_ids: SegmentIds | None = None) -> Callable[[Segment], list[int]]:
    """How a template's ``tokenize`` encodes a segment: through ``segment_ids``, which must cache
    ``tokenizer``'s ids, or afresh with :func:`encode_segment`."""
    if segment_ids is None:
        return lambda segment: encode_segment(segment, tokenizer)
    if segment_ids.tokenizer is not tokenizer:
        raise ValueError("segment_ids caches another tokenizer's ids")
    return segment_ids


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

    # How the label line writes the values: "numbers" (SteerLM's ``humor:0,creativity:3``) or
    # "words", each value as its attribute's level word (``(completely serious; vivid and
    # imaginative)``), which an instruction-tuned base reads before any training.
    LABEL_WORDINGS = ("numbers", "words")

    def __init__(self, schema: AttributeSchema, default_system: str = "", label_wording: str = "numbers"):
        if label_wording not in self.LABEL_WORDINGS:
            raise ValueError(f"label_wording must be one of {self.LABEL_WORDINGS}, got {label_wording!r}")
        if label_wording == "words" and (missing := schema.without_level_words()):
            raise AttributeValueError(f"label wording 'words' needs level words for every attribute; "
                                      f"{', '.join(missing)} has none (give \"levels\" in the schema file)",
                                      "label_wording")
        self.schema = schema
        self.default_system = default_system
        self.label_wording = label_wording

    # ---------------------------------------------------------------- settings
    @property
    def end_marker(self) -> str:
        """What ends every assistant response; trained on, and where generation stops."""
        return "\n" + self.turn_marker

    @property
    def stop_strings(self) -> list[str]:
        return [self.turn_marker]

    def to_dict(self) -> dict[str, Any]:
        # The wording is written only when it is not the default, so settings saved before it existed
        # compare the same.
        out = {"type": self.name, "default_system": self.default_system}
        return out if self.label_wording == "numbers" else {**out, "label_wording": self.label_wording}

    # ------------------------------------------------------------------ render
    def escape(self, text: str) -> str:
        """Neutralise anything in user-controlled text that looks like a template marker."""
        return self._marker_pattern.sub(_ESCAPED_LT, text)

    def label_line(self, values: Mapping[str, Any], fill_defaults: bool = True) -> str:
        if self.label_wording == "words":
            words = "; ".join(self.schema.describe_labels(values, fill_defaults=fill_defaults))
            return f"{self.label_marker}({words})\n"
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
        segments = [_segment((f"{self.system_marker}System\n", False), (self.escape(system), True), ("\n", False))]
        for m in msgs[1:] if msgs[0].role == "system" else msgs:
            if m.role == "user":
                segments.append(_segment((f"{self.turn_marker}User\n", False), (self.escape(m.content), True),
                                         ("\n", False)))
                continue
            header = f"{self.turn_marker}Assistant\n"
            if mode == "apm":
                segments.append(Segment(header))
                segments.append(_segment((self.escape(m.content), True), trainable=True))
                continue
            # A turn's own labels condition it; partial human labels stay partial (never guessed).
            if m.labels:
                header += self.label_line(m.labels, fill_defaults=False)
            else:
                header += self.label_line(requested)
            segments.append(Segment(header))
            segments.append(_segment((self.escape(m.content), True), (self.end_marker, False), trainable=True))
        if mode == "inference":
            segments.append(Segment(f"{self.turn_marker}Assistant\n" + self.label_line(requested)))
        return segments

    def render_text(self, messages, mode: Mode = "train", attributes=None) -> str:
        return "".join(s.text for s in self.render(messages, mode=mode, attributes=attributes))

    # --------------------------------------------------------------- tokenize
    def tokenize(self, messages, tokenizer, mode: Mode = "train", attributes=None,
                 segment_ids: SegmentIds | None = None) -> TokenizedPrompt:
        """Token ids and loss labels. Each segment is tokenized on its own (no special tokens),
        and the tokenizer's BOS, if it has one, starts the sequence. ``segment_ids``: a cache of
        ``tokenizer``'s segment ids to read and fill (servers pass one; the ids are the same)."""
        encode = segment_encoder(tokenizer, segment_ids)
        segments = self.render(messages, mode=mode, attributes=attributes)
        ids: list[int] = []
        labels: list[int] = []
        if self.adds_bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for seg in segments:
            seg_ids = encode(seg)
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
    LABEL_PLACEMENTS = ("reply", "system")

    def __init__(self, schema: AttributeSchema, tokenizer, default_system: str = "", label_placement: str = "reply",
                 label_wording: str = "numbers"):
        super().__init__(schema, default_system=default_system, label_wording=label_wording)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use the default SteerLM template instead")
        if label_placement not in self.LABEL_PLACEMENTS:
            raise ValueError(f"label_placement must be one of {self.LABEL_PLACEMENTS}, got {label_placement!r}")
        self.tokenizer = tokenizer
        # "reply": SteerLM's place, the label line opens each assistant turn. "system": the label line
        # closes the system message and every assistant turn is the bare reply, the base model's own
        # format; an instruction-tuned base already reads its system message as instructions, so it
        # learns the conditioning from less data. One system message conditions one reply: the last
        # assistant turn is the one trained on, earlier turns are context.
        self.label_placement = label_placement

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "label_placement": self.label_placement}

    @property
    def _labels_in_system(self) -> bool:
        return self.label_placement == "system"

    def _system_labels(self, msgs: list[Message], mode: Mode, requested: dict[str, int]) -> str:
        """The label text that closes the system message ("" unless labels go there)."""
        if not self._labels_in_system or mode == "apm":
            return ""
        last = next((m for m in reversed(msgs) if m.role == "assistant"), None) if mode == "train" else None
        if last is not None and last.labels:
            return self.label_line(last.labels, fill_defaults=False).rstrip("\n")
        return self.label_line(requested).rstrip("\n")

    def _system_turn(self, text: str | None, labels: str) -> dict:
        """The system message: its (escaped or placeholder) text, then the label text if any."""
        return {"role": "system", "content": "\n".join(t for t in (text, labels) if t)}

    def _opening(self, msgs: list[Message], content, sys_labels: str) -> list[dict]:
        """The system turn to add before ``msgs`` when they have none: the default system prompt,
        the label text, or both; none when there is neither."""
        if msgs[0].role == "system" or not (self.default_system or sys_labels):
            return []
        return [self._system_turn(content(self.escape(self.default_system)) if self.default_system else None,
                                  sys_labels)]

    def _context_turn(self, m: Message, content, sys_labels: str) -> dict:
        """A system or user message as the chat template takes it."""
        if m.role == "system":
            return self._system_turn(content(self.escape(m.content)), sys_labels)
        return {"role": m.role, "content": content(self.escape(m.content))}

    def _reply_line(self, m: Message, mode: Mode, requested: dict[str, int]) -> str:
        """The label line that opens an assistant turn ("" when the labels go elsewhere)."""
        if mode == "apm" or self._labels_in_system:
            return ""
        return self.label_line(m.labels, fill_defaults=False) if m.labels else self.label_line(requested)

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

    def _render_inference_once(self, msgs, requested, content=lambda text: text, segment=Segment) -> list[Segment] | None:
        """The inference segments from ONE render of the conversation, where the general path
        renders it twice per assistant turn (a cost that grows with the square of its length).
        Each reply is found in the render by its label line, which user text cannot contain (it
        is escaped), and must be followed by the template's end-of-turn; None when the template
        renders otherwise, and the general path is used. ``content`` and ``segment`` are the
        placeholder hooks of :meth:`_render` (special-token text kept as text)."""
        suffix = self._turn_suffix()
        if suffix is None or not any(m.role == "assistant" for m in msgs):
            return None
        sys_labels = self._system_labels(msgs, "inference", requested)
        chat = self._opening(msgs, content, sys_labels)
        replies = []
        for m in msgs:
            if m.role != "assistant":
                chat.append(self._context_turn(m, content, sys_labels))
                continue
            line = self._reply_line(m, "inference", requested)
            replies.append((line, line + content(self.escape(m.content))))
            chat.append({"role": "assistant", "content": replies[-1][1]})
        whole = self._chat(chat, generation_prompt=True)
        segments: list[Segment] = []
        done = 0
        for line, body in replies:
            start = whole.find(body, done)
            end = start + len(body)
            if start < 0 or not whole.startswith(suffix, end):
                return None
            segments.append(segment(whole[done:start] + line))
            segments.append(segment(whole[start + len(line):end + len(suffix)], trainable=True))
            done = end + len(suffix)
        segments.append(segment(whole[done:] + ("" if self._labels_in_system else self.label_line(requested))))
        return segments

    def render(self, messages, mode: Mode = "train", attributes=None) -> list[Segment]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        msgs = as_messages(messages)
        validate_messages(msgs, for_generation=(mode == "inference"))
        requested = self.schema.validate(attributes) if mode != "apm" else {}
        contents = ([self.escape(self.default_system)] if msgs[0].role != "system" and self.default_system else [])
        contents += [self.escape(m.content) for m in msgs]
        specials = special_token_strings(self.tokenizer)
        if not any(t in c for c in contents for t in specials):
            return self._render(msgs, mode, requested)  # nothing to keep from acting as a special token
        # Render with a placeholder for each content, then put the contents back, so their exact
        # place is known (a search could find the same text in the template's own).
        located = self._render(msgs, mode, requested, contents)
        if [seg.text for seg in located] != [seg.text for seg in self._render(msgs, mode, requested)]:
            where = next((f"messages[{i}].content" for i, m in enumerate(msgs) if any(t in m.content for t in specials)),
                         "default_system")
            raise ConversationError(
                f"{where} contains the text of a special token of this model, and its chat template rewrites "
                "message contents, so it cannot be kept as plain text; remove it", where)
        return located

    def question_turn(self, question: str) -> str:
        """The text this chat template writes after a finished assistant reply for a user turn
        asking ``question``, up to where the assistant would answer it. An APM reads a decoder's
        state there: the model has just been asked to judge the reply above (see docs/apm.md)."""
        user = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        done = self._chat(user, generation_prompt=False)
        asked = self._chat(user + [{"role": "user", "content": self.escape(question)}], generation_prompt=True)
        if not asked.startswith(done):
            raise ValueError("this chat template does not render conversations as growing prefixes")
        return asked[len(done):]

    def _render(self, msgs: list[Message], mode: Mode, requested: dict[str, int],
                contents: list[str] | None = None) -> list[Segment]:
        """Segments of the conversation; with ``contents``, each message content (and the default
        system prompt) is rendered as a placeholder and put back with its span recorded."""
        def fresh_content():
            # Placeholders are numbered in the order contents are rendered: each pass starts at 0.
            placeholders = iter(range(len(contents))) if contents is not None else None

            def content(text: str) -> str:
                return text if placeholders is None else f"{_PLACEHOLDER[0]}{next(placeholders)}{_PLACEHOLDER[1]}"
            return content

        def segment(text: str, trainable: bool = False) -> Segment:
            if contents is None:
                return Segment(text, trainable)
            return _fill_placeholders(text, contents, trainable)

        if mode == "inference":
            fast = self._render_inference_once(msgs, requested, fresh_content(), segment)
            if fast is not None:
                return fast
        content = fresh_content()
        sys_labels = self._system_labels(msgs, mode, requested)
        last_reply = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=-1)
        chat = self._opening(msgs, content, sys_labels)
        segments: list[Segment] = []
        done = ""  # text already emitted as segments
        for i, m in enumerate(msgs):
            if m.role != "assistant":
                chat.append(self._context_turn(m, content, sys_labels))
                continue
            prefix = self._chat(chat, generation_prompt=True)
            line = self._reply_line(m, mode, requested)
            chat.append({"role": "assistant", "content": line + content(self.escape(m.content))})
            full = self._chat(chat, generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix + line)):
                raise ValueError("this chat template does not render conversations as growing prefixes")
            segments.append(segment(prefix[len(done):] + line))
            # With the labels in the system message they describe the last reply only.
            trainable = not (self._labels_in_system and mode == "train" and i != last_reply)
            segments.append(segment(full[len(prefix) + len(line):], trainable=trainable))
            done = full
        if mode == "inference":
            prefix = self._chat(chat, generation_prompt=True)
            segments.append(segment(prefix[len(done):] + ("" if self._labels_in_system else self.label_line(requested))))
        else:
            # Text after the last turn (if any) is template boilerplate, not something to learn.
            tail = self._chat(chat, generation_prompt=False)[len(done):]
            if tail:
                segments.append(segment(tail))
        return segments


# Private-use characters around a number: what no message and no template writes.
_PLACEHOLDER = ("\ue000", "\ue001")
_PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")


def _fill_placeholders(text: str, contents: list[str], trainable: bool) -> Segment:
    out, spans, pos = "", [], 0
    for m in _PLACEHOLDER_RE.finditer(text):
        out += text[pos:m.start()]
        value = contents[int(m.group(1))]
        spans.append((len(out), len(out) + len(value)))
        out += value
        pos = m.end()
    return Segment(out + text[pos:], trainable, tuple(s for s in spans if s[0] < s[1]))


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
