"""Where a reply ends, and what of it is text: ONE rule for every client of the runtime.

A reply ends at the first of:

- an end-of-sequence token (the tokenizer's or the model's generation config's), unless the request
  says ``ignore_eos``: it counts as a completion token but is not text;
- a stop string: the template's end marker (``"\\n<extra_id_1>"``), its other stop strings, the
  request's own. The reply is cut where the earliest of them starts, so nothing of a stop string
  (and of the end marker not even the newline before it) is in the text;
- the token budget (``max_new_tokens`` capped by the model's context, :func:`token_budget`):
  finish_reason ``"length"``.

While a reply streams, text that might be the start of a stop string is held back until the next
tokens settle it. :class:`ReplyState` applies all of this to one reply, a token at a time; the
scheduler (:mod:`steer.runtime.scheduler`) keeps one per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def reply_stops(template, request_stops: Iterable[str] = ()) -> list[str]:
    """The stop strings of a reply under ``template``: the end marker first, so the newline that
    precedes its token is cut too (and held back while streaming), then the template's stop
    strings, then the request's; each once."""
    marker = getattr(template, "end_marker", "")
    return list(dict.fromkeys([s for s in [marker] if s] + list(template.stop_strings) + list(request_stops)))


def token_budget(requested: int, prompt_tokens: int, max_context: int | None) -> int:
    """The most tokens a reply may take: ``requested``, capped by what the model's context has left
    after the prompt (the reply then ends with finish_reason "length", like a model out of context).
    0 when the prompt leaves no room, which the caller refuses naming its field."""
    if not max_context:
        return requested
    return max(0, min(requested, max_context - prompt_tokens))


class ReplyState:
    """One reply's end-of-reply bookkeeping over an incremental detokenizer
    (:mod:`steer.runtime.detokenize`)."""

    __slots__ = ("detok", "stops", "max_tokens", "eos_ids", "completion_tokens", "finish_reason", "_final",
                 "emitted", "_held", "_stop_ends")

    def __init__(self, detok, stops: Sequence[str], max_tokens: int, eos_ids: frozenset[int] | set[int]):
        self.detok = detok
        self.stops = list(stops)
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids  # empty when the request ignores EOS
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # "stop" | "length" once the reply is over
        self._final: str | None = None
        self.emitted = 0  # characters handed out by delta()
        self._held = stop_prefixes(self.stops)
        # A stop string can only be completed by new text holding its last character; most new
        # text holds none, and the search is skipped.
        self._stop_ends = frozenset(s[-1] for s in self.stops)

    @property
    def text(self) -> str:
        """The reply: final once ``finish_reason`` is set, the settled text so far before."""
        return self._final if self._final is not None else self.detok.text

    def add(self, token: int) -> bool:
        """Take the next sampled token; True when it ends the reply."""
        self.completion_tokens += 1
        detok = self.detok
        if token in self.eos_ids:
            detok.finish()
            return self._end(detok.text, "stop")
        settled = len(detok.text)
        detok.add(token)
        spent = self.completion_tokens >= self.max_tokens
        if spent:
            detok.finish()
        text = detok.text
        if len(text) > settled and not self._stop_ends.isdisjoint(text[settled:]):
            cut = find_stop(text, self.stops, new_from=settled)
            if cut >= 0:
                return self._end(text[:cut], "stop")
        return self._end(text, "length") if spent else False

    def close(self, reason: str = "length") -> bool:
        """End the reply where its tokens stop, for an engine that stopped decoding on its own (an
        upstream out of context): settle the text, cut a stop string still held back, ``reason`` else."""
        if self.finish_reason is not None:
            return True
        self.detok.finish()
        text = self.detok.text
        cut = find_stop(text, self.stops)
        return self._end(text[:cut], "stop") if cut >= 0 else self._end(text, reason)

    def _end(self, text: str, reason: str) -> bool:
        self._final, self.finish_reason = text, reason
        return True

    def delta(self) -> str:
        """The text that may go to the client now and has not yet; after the end, all that is left."""
        text = self.text
        safe = len(text) if self._final is not None else streamable_length(text, self.stops, self._held)
        if safe <= self.emitted:
            return ""
        out, self.emitted = text[self.emitted:safe], safe
        return out


def find_stop(text: str, stops: Sequence[str], new_from: int = 0) -> int:
    """Index of the earliest stop string in ``text``, or -1. With ``new_from``, only stops that end
    at or after that index are looked for: the text before it was searched when it arrived."""
    hits = [i for i in (text.find(s, max(0, new_from - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_prefixes(stops: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The proper prefixes of the stop strings (the tails a reply may have to hold back), keyed by
    their last character and longest first."""
    by_last: dict[str, set[str]] = {}
    for s in stops:
        for k in range(1, len(s)):
            by_last.setdefault(s[k - 1], set()).add(s[:k])
    return {c: tuple(sorted(held, key=len, reverse=True)) for c, held in by_last.items()}


def streamable_length(text: str, stops: Sequence[str], prefixes: dict[str, tuple[str, ...]] | None = None) -> int:
    """How much of ``text`` can be sent now: everything except a tail that might be the start
    of a stop string still being generated. ``prefixes`` is ``stop_prefixes(stops)``, made once
    per reply: a held tail ends in the text's last character, so only the prefixes ending in it
    are tried (this runs for every token of every streamed reply)."""
    if not text:
        return 0
    for held in (stop_prefixes(stops) if prefixes is None else prefixes).get(text[-1], ()):
        if text.endswith(held):
            return len(text) - len(held)
    return len(text)
