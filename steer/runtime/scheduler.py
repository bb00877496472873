"""Continuous batching: the one decode loop of steer. It decodes every running request together,
admitting waiting requests into the running batch between decode steps. The server runs it on a
background thread (:meth:`Scheduler.start`, in ``steer.service.engine_process``); :class:`SteerGenerator`
(``steer.runtime.generator``), and through it ``steer generate --input``, best-of-n and the eval,
run a batch of requests to the end on the calling thread (:meth:`Scheduler.run`).

Each pass of the loop:

1. free the batch slots of rows whose client went away;
2. admit waiting rows up to ``max_batch_size``. Once a batch runs, a row whose prompt fits the
   batch's cache claims a slot (a batch row whose request ended, or an empty row added for it) and
   is prefilled inside the next decode step (``steer.runtime.mixed_step``), which then costs little more
   than a plain one. The first batch, prompts longer than the cache and models that cannot take
   that path are prefilled on their own (left-padded together); each one's KV cache is written into
   a free slot, right-aligned like every row, or appended (left-padding the shorter cache), and
   their first token is sampled;
3. one batched decode step over all rows; each row samples from its own logits with its own
   random stream (``steer.runtime.sampling``), so a seeded request gives the same text alone or batched;
4. detokenize and end replies (``steer.runtime.stopping``), emit text deltas through each row's
   ``sink`` callback and free the slots of finished rows. Slots nobody takes over for a few steps are compacted away, and
   leading cache columns that only padding still uses are trimmed now and then.

Every running row has exactly one sampled token that is not yet in the cache (its "pending" token);
the decode step feeds those (free slots are fed padding, and their outputs are ignored). A row
that claimed a slot has no token yet: the step feeds its prompt and samples its first token.

Writing into and merging caches is done by ``steer.runtime.kv_cache``, on caches that store plain
``[batch, heads, seq, dim]`` tensors per layer. Caches of other shapes (sliding-window layers)
fall back to re-prefilling the whole batch on admission and compacting at once, which is correct
and, for small models, cheap.

This module knows nothing about HTTP or processes: results leave through the ``sink`` callables
(the serving layer turns them into ``loop.call_soon_threadsafe`` calls, or
``steer.service.engine_process`` into messages to the server process); a row without a sink is read
when it is done (``row.reply``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from steer.core.errors import SteerError
from steer.runtime.detokenize import TokenDecoder
from steer.runtime.kv_cache import DecodeState, add_free_rows, is_preallocated, merge_states, place_row, \
    select_new_rows, select_rows, trim_columns
from steer.runtime.mixed_step import fits, mixed_step, supports_mixed_step
from steer.runtime.model_runner import context_limit, decode_step, left_pad, prefill
from steer.runtime.sampling import SamplingParams, sample_next_tokens
from steer.runtime.stopping import ReplyState

logger = logging.getLogger(__name__)


class QueueFullError(SteerError, RuntimeError):
    """The waiting queue is full; the client should retry later."""


class EngineStoppedError(SteerError, RuntimeError):
    pass


class EngineFailedError(EngineStoppedError):
    """The engine (its thread or its process) failed and is not running."""


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
    rng: random.Random | None = None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    # Text and end of the reply, token by token (set when the scheduler accepts the row).
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


class Scheduler:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        eos_token_ids: Sequence[int] = (),
        device: torch.device | str | None = None,
        on_token: Callable[[int], None] | None = None,
        on_step: Callable[[], None] | None = None,
        mixed_steps: bool = True,
        decoder: TokenDecoder | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.on_token = on_token
        # Called after every pass of the loop, outside the lock, once that pass's events are out.
        self.on_step = on_step
        self.max_context = context_limit(model)
        # How ids become text (incrementally, per row: steer.runtime.detokenize), worked out once.
        self._decoder = decoder or TokenDecoder.for_tokenizer(tokenizer)
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        # Batch row i of the KV cache belongs to _slots[i]; None marks a free slot, which decodes
        # padding until a new row takes it over or the batch is compacted.
        self._slots: list[Row | None] = []
        self._free_since: dict[int, int] = {}  # free slot -> the step it was freed at
        # The running batch's KV cache, attention mask (1 where a real token sits) and positions.
        self._state: DecodeState | None = None
        self._mergeable: bool | None = None
        # Whether admitted rows may be prefilled inside the decode step (steer.mixed_step), decided
        # when the first batch exists; and the (slot, row) pairs that claimed a slot for the next step.
        self._mixed: bool | None = None if mixed_steps else False
        self._joining: list[tuple[int, Row]] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cancelled_total = 0
        self._finished_total = 0
        self._tokens_total = 0
        self._steps_total = 0
        self._max_batch_seen = 0
        # Supervision: a loop that dies (a step's own errors are caught below; this is for the
        # rest) fails its rows and starts over, up to max_restarts times; then ``error`` says why.
        self.max_restarts = 3
        self.restart_backoff_s = 1.0
        self.restarts_total = 0
        self.error: str | None = None
        self._last_progress = time.monotonic()
        # Rows submitted and rows ended: the difference is in flight (waiting, being admitted or
        # running). Two counters, each written by one thread, so no count is lost to a race.
        self._submitted = 0
        self._ended = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="steer-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            for row in list(self._waiting) + self._live_rows():
                self._finish(row, "cancelled", error=STOPPED_MESSAGE)
            self._waiting.clear()
            self._reset_batch()

    # --------------------------------------------------------------- client
    def submit(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` together (a request's ``n`` choices), or none of them."""
        now = time.perf_counter()
        with self._cv:
            if self._stop:
                raise EngineStoppedError("the server is shutting down")
            if self.error is not None:
                raise EngineFailedError(f"the engine is not running ({self.error})")
            running = len(self._live_rows())
            if self._submitted == self._ended:
                self._last_progress = time.monotonic()  # the stall clock starts with the first row
            if len(self._waiting) + len(rows) > self.max_queue + max(0, self.max_batch_size - running):
                raise QueueFullError(
                    f"the server is busy ({running} running, {len(self._waiting)} waiting); retry later"
                )
            for row in rows:
                row.submitted_at = now
                if row.rng is None:
                    row.rng = row.params.make_rng()
                row.reply = ReplyState(self._decoder.detokenizer(), row.stops, row.params.max_new_tokens,
                                       frozenset() if row.params.ignore_eos else self.eos_token_ids)
                self._waiting.append(row)
                self._submitted += 1
            self._cv.notify_all()

    def cancel(self, rows: Sequence[Row]) -> None:
        """Free the rows' slots; the engine drops them before its next step."""
        with self._cv:
            for row in rows:
                if not row.done:
                    row.cancelled = True
            self._cv.notify_all()

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                waiting=len(self._waiting),
                active=len(self._live_rows()),
                cancelled_total=self._cancelled_total,
                finished_total=self._finished_total,
                tokens_total=self._tokens_total,
                steps_total=self._steps_total,
                max_batch_seen=self._max_batch_seen,
            )

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        # Inference mode for the whole thread: the batch's tensors are updated in place from every
        # path (a cancelled row's slot is released before the next step runs).
        with torch.inference_mode():
            while True:
                try:
                    while self._iterate():
                        self._last_progress = time.monotonic()
                        if self.on_step is not None:
                            self.on_step()
                    return
                except Exception as e:
                    if not self._recover(e):
                        return

    def _recover(self, e: Exception) -> bool:
        """The loop died: fail every row it held and say whether to run it again (bounded, with backoff)."""
        logger.exception("the engine loop failed")
        with self._cv:
            for row in list(self._waiting) + self._live_rows():
                self._finish(row, "error", error=f"generation failed: the engine failed ({type(e).__name__}); "
                                                 "retry the request")
            self._waiting.clear()
            self._reset_batch()
            if self.restarts_total >= self.max_restarts:
                self.error = f"the engine failed {self.restarts_total + 1} times (last: {type(e).__name__}: {e})"
                return False
            self.restarts_total += 1
            delay = self.restart_backoff_s * 2 ** (self.restarts_total - 1)
            self._cv.wait_for(lambda: self._stop, timeout=delay)
            return not self._stop

    def stalled_for(self) -> float:
        """Seconds since the last decode step while rows were waiting or running (0 when idle)."""
        return time.monotonic() - self._last_progress if self._submitted > self._ended else 0.0

    def _iterate(self) -> bool:
        """One pass of the background loop: wait for work, then :meth:`_step`. False once stopped."""
        with self._cv:
            while not self._stop and not self._waiting and not self._slots:
                self._cv.wait()
            if self._stop:
                return False
        admit: list[Row] = []
        try:
            self._step(admit)
        except Exception as e:  # a bug or an out-of-memory must not kill the server silently
            logger.exception("engine step failed; failing the batch")
            with self._cv:
                for row in admit + self._live_rows():
                    if not row.done:
                        self._finish(row, "error", error=f"generation failed: {type(e).__name__}")
                self._reset_batch()
        return True

    def _step(self, admit: list[Row]) -> None:
        """Drop cancelled rows, admit waiting ones (collected into ``admit``), one decode step."""
        with self._cv:
            self._drop_cancelled()
            room = self.max_batch_size - len(self._live_rows())
            while self._waiting and len(admit) < room:
                admit.append(self._waiting.popleft())
            idle_free_slots = not self._waiting and self._free_since and \
                self._steps_total - min(self._free_since.values()) >= self.HOLD_FREE_SLOT_STEPS
        if admit:
            self._admit(admit)
        elif idle_free_slots:
            self._compact()
        if self._slots:
            self._decode_step()

    def run(self, rows: Sequence[Row]) -> list[Row]:
        """Decode ``rows`` to their end on the calling thread, for a scheduler that is not
        :meth:`start`-ed; errors propagate. Each row's ``reply`` then holds its text."""
        if self._thread is not None:
            raise RuntimeError("run() drives a scheduler that is not running on its own thread")
        self.submit(rows)
        with torch.inference_mode():
            while self._waiting or self._slots:
                self._step([])
        return list(rows)

    def _live_rows(self) -> list[Row]:
        return [r for r in self._slots if r is not None]

    def _drop_cancelled(self) -> None:
        """Under the lock: remove cancelled rows from the queue and free their batch slots."""
        for row in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(row)
            self._finish(row, "cancelled")
        for row in self._live_rows():
            if row.cancelled:
                self._finish(row, "cancelled")
                self._release(row)

    # ---------------------------------------------------------- the batch
    # A row that ends leaves a free slot rather than a copy of the whole cache without it: under
    # load the next request takes the slot over a step or two later (its prompt written into that
    # batch row), and the batch is compacted only when slots stay free. Before, every finished
    # and every admitted row copied every layer's cache, a tenth of the server's time.
    HOLD_FREE_SLOT_STEPS = 4
    # Leading cache columns that only padding still uses are cut once there are this many.
    TRIM_COLUMNS = 32

    def _reset_batch(self) -> None:
        self._slots, self._free_since, self._state, self._joining = [], {}, None, []

    def _release(self, row: Row) -> None:
        slot = next(i for i, r in enumerate(self._slots) if r is row)
        self._slots[slot] = None
        if not self._live_rows():
            self._reset_batch()
            return
        self._free_since[slot] = self._steps_total
        # From now on the free row attends only to the padding it is fed, so it stays finite and
        # holds no column of the cache.
        self._state.attention_mask[slot] = 0
        if not self._mergeable:
            self._compact()  # other cache layouts cannot take a new row into a slot

    def _compact(self) -> None:
        """Drop free slots from the batch."""
        keep = [i for i, r in enumerate(self._slots) if r is not None]
        if len(keep) < len(self._slots):
            self._select_rows(keep)

    def _prefill(self, sequences: list[list[int]]) -> tuple[torch.Tensor, DecodeState]:
        return prefill(self.model, *left_pad(sequences, self.pad_token_id, self.device))

    def _admit(self, rows: list[Row]) -> None:
        # Rows that can be prefilled inside the next decode step claim their slots; the others
        # (the first batch, prompts longer than the batch's cache) are prefilled now, first, since
        # appending them may compact the batch.
        joining = [r for r in rows if self._mixed and self._state is not None and fits(self._state, len(r.prompt_ids))]
        apart = [r for r in rows if not any(r is j for j in joining)]
        if apart:
            self._prefill_and_place(apart)
        if joining and not self._claim_slots(joining):
            self._prefill_and_place(joining)

    def _prefill_and_place(self, rows: list[Row]) -> None:
        logits, new = self._prefill([r.prompt_ids for r in rows])
        if self._mergeable is None:
            self._mergeable = is_preallocated(new.past_key_values)
            if not self._mergeable:
                logger.info("this model's KV cache cannot be merged; admission re-prefills the batch")
        if self._state is None:
            self._state, self._slots = new, list(rows)
            if self._mixed is None:
                self._mixed = supports_mixed_step(self.model, new)  # implies a mergeable cache
        elif not self._mergeable:
            # Rebuild the whole batch: running rows re-prefill everything except their pending token.
            running = self._live_rows()
            _, self._state = self._prefill(
                [r.prompt_ids + r.generated[:-1] for r in running] + [r.prompt_ids for r in rows]
            )
            self._slots, self._free_since = running + list(rows), {}
        else:
            width = self._state.attention_mask.shape[1]
            free = [i for i, r in enumerate(self._slots) if r is None]
            unplaced = []
            for j, row in enumerate(rows):
                if free and len(row.prompt_ids) <= width:
                    self._place(new, j, free.pop(0), row)
                else:
                    unplaced.append(j)
            if unplaced:
                # A prompt longer than the batch's cache, or no free slot: append rows instead.
                self._compact()
                if len(unplaced) < len(rows):
                    select_new_rows(new, unplaced)
                merge_states(self._state, new)
                self._slots.extend(rows[j] for j in unplaced)
        tokens = sample_next_tokens(logits, [r.params for r in rows], [r.rng for r in rows],
                                    [r.generated for r in rows])
        self._max_batch_seen = max(self._max_batch_seen, len(self._live_rows()))
        self._accept(rows, tokens.tolist())

    def _claim_slots(self, rows: list[Row]) -> bool:
        """Give every row a free slot to be prefilled in by the next decode step, if all of them fit."""
        if self._state is None or not all(fits(self._state, len(r.prompt_ids)) for r in rows):
            return False
        free = [i for i, r in enumerate(self._slots) if r is None]
        if len(free) < len(rows):
            # Empty rows cost one copy of the cache; a prefill of their own would cost a forward pass.
            first = len(self._slots)
            self._add_free_slots(len(rows) - len(free))
            free += range(first, len(self._slots))
        for slot, row in zip(free, rows):
            self._slots[slot] = row
            self._free_since.pop(slot, None)
            self._joining.append((slot, row))
        self._max_batch_seen = max(self._max_batch_seen, len(self._live_rows()))
        return True

    def _add_free_slots(self, n: int) -> None:
        """Append ``n`` free rows to the batch."""
        add_free_rows(self._state, n)
        self._slots.extend([None] * n)

    def _place(self, new: DecodeState, j: int, slot: int, row: Row) -> None:
        """Write prefilled row ``j`` of ``new`` into free batch row ``slot``."""
        place_row(self._state, new, j, slot, len(row.prompt_ids))
        self._slots[slot] = row
        self._free_since.pop(slot, None)

    def _select_rows(self, keep: list[int]) -> None:
        """Keep only the batch rows ``keep`` and drop cache columns no remaining row uses."""
        self._slots = [self._slots[i] for i in keep]
        self._free_since = {}
        if not keep:
            self._state = None
            return
        select_rows(self._state, keep, preallocated=bool(self._mergeable))

    def _decode_step(self) -> None:
        slots = self._slots
        pending = torch.tensor([r.generated[-1] if r is not None and r.generated else self.pad_token_id
                                for r in slots], dtype=torch.long, device=self.device)
        if self._joining:
            joining, self._joining = self._joining, []
            logits = mixed_step(self.model, pending, self._state, [(slot, r.prompt_ids) for slot, r in joining])
        else:
            logits = decode_step(self.model, pending, self._state)
        self._steps_total += 1
        live = [i for i, r in enumerate(slots) if r is not None]
        if len(live) < len(slots):
            logits = logits.index_select(0, torch.tensor(live, dtype=torch.long, device=logits.device))
        rows = [slots[i] for i in live]
        tokens = sample_next_tokens(logits, [r.params for r in rows], [r.rng for r in rows],
                                    [r.generated for r in rows])
        self._accept(rows, tokens.tolist())
        if self._mergeable and self._state is not None and self._steps_total % self.TRIM_COLUMNS == 0:
            trim_columns(self._state, min_columns=self.TRIM_COLUMNS)

    # -------------------------------------------------------------- output
    def _accept(self, rows: list[Row], tokens: list[int]) -> None:
        """Hand each row its new token, emit text, and retire rows that are done."""
        now = time.perf_counter()
        finished = False
        accepted = 0
        for row, token in zip(rows, tokens):
            if row.cancelled:
                continue
            if row.first_token_at is None:
                row.first_token_at = now
            row.generated.append(token)
            accepted += 1
            reply = row.reply
            if reply.add(token):
                self._finish(row, reply.finish_reason)
                finished = True
            elif row.sink is not None:
                delta = reply.delta()
                if delta:
                    row.sink(RowEvent(index=row.index, delta=delta))
        self._tokens_total += accepted
        if accepted and self.on_token is not None:
            self.on_token(accepted)
        if finished or any(r.cancelled for r in rows):
            with self._cv:
                for r in rows:
                    if r.cancelled and not r.done:
                        self._finish(r, "cancelled")
                    if r.done:
                        self._release(r)

    def _finish(self, row: Row, reason: str, error: str | None = None) -> None:
        """End ``row``: the rest of its text (if it ended well), then its final event."""
        if row.done:
            return
        row.done = True
        row.finished_at = time.perf_counter()
        row.finish_reason, row.error = reason, error
        self._ended += 1
        if reason == "cancelled":
            self._cancelled_total += 1
        else:
            self._finished_total += 1
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
