"""What every engine does with a row, apart from decoding it: ONE place for it.

An engine (the in-process :class:`~steer.runtime.scheduler.Scheduler`, the HTTP upstream of
:mod:`steer.runtime.upstream`) produces token ids; :class:`RowBook` turns them into what the
serving layer sees, the same way for each: it stamps a row when it is submitted and when its first
token arrives, gives it its :class:`~steer.runtime.stopping.ReplyState` (EOS, end marker, stop
strings, budget and streaming hold-back), hands each accepted token to it and emits the text
deltas, and ends the row with exactly one final event. It also keeps the counters behind
``EngineStats`` and ``stalled_for``.

The book takes no lock: the engine calls :meth:`RowBook.admit` under its own lock (it decides
whether there is room), and :meth:`RowBook.accept` / :meth:`RowBook.finish` from the thread
that decodes. ``submitted`` and ``ended`` are each written by one of those, so their difference,
the rows in flight, is never lost to a race.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from random import Random

from steer.core.errors import SteerError
from steer.runtime.detokenize import TokenDecoder
from steer.runtime.sampling import SamplingParams
from steer.runtime.stopping import ReplyState

class QueueFullError(SteerError, RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineStoppedError(SteerError, RuntimeError):
    pass


class EngineFailedError(EngineStoppedError):
    """The engine (its thread or its process) failed and is not running."""


def check_admission(*, stopping: bool, error: str | None, adding: int, waiting: int, running: int,
                    max_queue: float, max_batch_size: int) -> None:
    """The one admission rule of an engine: nothing while it stops or after it failed; and no more
    than ``max_queue`` rows waiting beyond the batch's free slots (``QueueFullError``, a 429)."""
    if stopping:
        raise EngineStoppedError("the server is shutting down")
    if error is not None:
        raise EngineFailedError(f"the engine is not running ({error})")
    if waiting + adding > max_queue + max(0, max_batch_size - running):
        raise QueueFullError(f"the server is busy ({running} running, {waiting} waiting); retry later")


# A joining prompt reuses another row's cached keys and values for the prefix they share (the
# system turn, the template, a best-of-n sibling) when that saves feeding at least this many tokens.
MIN_COPIED_TOKENS = 8


def common_prefix_length(a, b, limit: int | None = None) -> int:
    """How many leading tokens the sequences ``a`` and ``b`` share, at most ``limit``.

    Slices compare in C, so this halves the range with slice comparisons rather than stepping token
    by token: it runs for every pair of joining and running rows of a step."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    if n <= 0 or a[:n] == b[:n]:
        return max(n, 0)
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


# What a request still running when the engine stops is told.
STOPPED_MESSAGE = "the server stopped before this reply was finished; retry the request"


@dataclass
class RowEvent:
    """What a row reports: new text, and once, the end."""

    index: int
    delta: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    text: str = ""  # the full reply, on the final event
    error: str | None = None


@dataclass(eq=False)
class Row:
    """One reply to decode: its prompt, sampling settings and stop strings (``reply_stops``)."""

    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    # Gets the row's events; None: nobody streams it, the caller reads ``reply`` once ``done``.
    sink: Callable[[RowEvent], None] | None = None
    index: int = 0
    rng: Random | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # Text and end of the reply, token by token (set when the engine accepts the row).
    reply: ReplyState | None = field(default=None, repr=False)
    # How the row ended: "stop" | "length" | "cancelled" | "error", and the error's message.
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class EngineStats:
    waiting: int
    active: int
    cancelled_total: int
    finished_total: int
    tokens_total: int
    steps_total: int
    max_batch_seen: int
    # Prompt tokens fed to the model, and those copied from a cache that already held them (another
    # row's, or an ended request's left in its slot) instead; engines that do not count them say 0.
    prompt_tokens_fed: int = 0
    prompt_tokens_copied: int = 0


class RowBook:
    """Per-row bookkeeping and the counters of one engine (see the module docstring)."""

    def __init__(self, decoder: TokenDecoder, eos_token_ids: Iterable[int] = ()):
        self.decoder = decoder
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.submitted = 0
        self.ended = 0
        self.cancelled_total = 0
        self.finished_total = 0
        self.tokens_total = 0

    @property
    def in_flight(self) -> int:
        """Rows submitted and not yet ended (waiting, being admitted or decoding)."""
        return self.submitted - self.ended

    def stats(self, *, waiting: int, active: int, steps_total: int, max_batch_seen: int, prompt_tokens_fed: int = 0,
              prompt_tokens_copied: int = 0) -> EngineStats:
        """The engine's ``EngineStats``: its queue and batch, and this book's counters."""
        return EngineStats(waiting=waiting, active=active, cancelled_total=self.cancelled_total,
                           finished_total=self.finished_total, tokens_total=self.tokens_total,
                           steps_total=steps_total, max_batch_seen=max_batch_seen,
                           prompt_tokens_fed=prompt_tokens_fed, prompt_tokens_copied=prompt_tokens_copied)

    def admit(self, row: Row, now: float | None = None) -> None:
        """A row enters the engine: stamp it, give it its random stream and its ``ReplyState``."""
        row.submitted_at = time.perf_counter() if now is None else now
        if row.rng is None:
            row.rng = row.params.make_rng()
        row.reply = ReplyState(self.decoder.detokenizer(), row.stops, row.params.max_new_tokens,
                               frozenset() if row.params.ignore_eos else self.eos_token_ids)
        self.submitted += 1

    def enqueue(self, rows: Iterable[Row], waiting, now: float | None = None) -> bool:
        """:meth:`admit` each of ``rows`` and append it to the engine's ``waiting`` queue. True when
        nothing was in flight before: the engine's stall clock starts now."""
        was_idle = self.in_flight == 0
        for row in rows:
            self.admit(row, now)
            waiting.append(row)
        return was_idle

    def accept(self, row: Row, token: int, now: float | None = None) -> bool:
        """Hand ``row`` its next token: a text delta to its sink, or its end. True when the row is
        done (ended here or before); a cancelled or ended row takes no more tokens."""
        if row.cancelled or row.done:
            return row.done
        if row.first_token_at is None:
            row.first_token_at = time.perf_counter() if now is None else now
        row.generated.append(token)
        self.tokens_total += 1
        reply = row.reply
        if reply.add(token):
            self.finish(row, reply.finish_reason)
            return True
        if row.sink is not None:
            delta = reply.delta()
            if delta:
                row.sink(RowEvent(index=row.index, delta=delta))
        return False

    def finish(self, row: Row, reason: str, error: str | None = None) -> None:
        """End ``row``: the rest of its text (if it ended well), then its final event. Once."""
        if row.done:
            return
        row.done = True
        row.finished_at = time.perf_counter()
        row.finish_reason, row.error = reason, error
        self.ended += 1
        if reason == "cancelled":
            self.cancelled_total += 1
        else:
            self.finished_total += 1
        if row.sink is None:
            return
        ended_well = reason in ("stop", "length")
        text = row.reply.text if ended_well else ""
        if ended_well:
            delta = row.reply.delta()
            if delta:
                row.sink(RowEvent(index=row.index, delta=delta))
        row.sink(RowEvent(index=row.index, finished=True, finish_reason=reason,
                          completion_tokens=len(row.generated), text=text, error=error))
