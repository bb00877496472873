"""Continuous batching: the one decode loop of steer. It decodes every running request together,
admitting waiting requests into the running batch between decode steps. The server runs it on a
background thread (:meth:`Scheduler.start`, in ``steer.service.engine_process``); :class:`SteerGenerator`
(``steer.runtime.generator``), and through it ``steer generate --input``, best-of-n and the eval,
run a batch of requests to the end on the calling thread (:meth:`Scheduler.run`).

Each pass of the loop:

1. free the batch slots of rows whose client went away;
2. admit waiting rows up to ``max_batch_size`` into the batch's runner (:class:`BatchRunner`):
   :class:`steer.runtime.torch_batch.TorchBatch` on a transformers model (prefilled on their own or
   inside the next decode step), :class:`steer.runtime.llamacpp.LlamaCppBatch` in llama.cpp (one
   sequence per slot); rows prefilled at once sample their first token;
3. one batched decode step over all rows; each row samples from its own logits with its own
   random stream (``steer.runtime.sampling``), so a seeded request gives the same text alone or batched;
4. detokenize and end replies (``steer.runtime.stopping``), emit text deltas through each row's
   ``sink`` callback and free the slots of finished rows.

Every running row has exactly one sampled token that is not yet in the cache (its "pending" token);
the decode step feeds those (free slots are fed padding, and their outputs are ignored). A row
that claimed a slot has no token yet: the step feeds its prompt and samples its first token.

The runner only runs the model: sampling, stopping, events, cancellation and statistics are this
module's, the same whichever engine decodes.

This module knows nothing about HTTP or processes: results leave through the ``sink`` callables
(the serving layer turns them into ``loop.call_soon_threadsafe`` calls, or
``steer.service.engine_process`` into messages to the server process); a row without a sink is read
when it is done (``row.reply``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from steer.runtime.detokenize import TokenDecoder

# Row, RowEvent, EngineStats, STOPPED_MESSAGE and the engine errors are imported from here too.
from steer.runtime.rows import (  # noqa: F401
    STOPPED_MESSAGE,
    EngineFailedError,
    EngineStats,
    EngineStoppedError,
    QueueFullError,
    Row,
    RowBook,
    RowEvent,
    check_admission,
)
from steer.runtime.sampling import sample_next_tokens

logger = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """The batch the scheduler decodes: its slots, its model state and its forward passes
    (:class:`steer.runtime.torch_batch.TorchBatch`, :class:`steer.runtime.llamacpp.LlamaCppBatch`).
    Only the scheduler's thread calls it. Logits come back as a [rows, vocab] tensor, so every
    runner samples, stops and detokenizes through the same code here."""

    max_context: int | None
    slots: list  # batch slot -> its Row, None when free; empty when no batch runs

    def admit(self, rows: list[Row], first_logits: Callable[[list[Row], torch.Tensor], None]) -> None:
        """Give ``rows`` slots; rows prefilled right away hand their logits to ``first_logits``,
        the others are prefilled by the next :meth:`step` (and sampled from its logits)."""

    def step(self) -> tuple[list[Row], torch.Tensor]:
        """One forward pass over every running row: those rows, and their next logits."""

    def release(self, row: Row) -> None:
        """Free ``row``'s slot (and its state); the scheduler no longer decodes it."""

    def idle(self) -> None:
        """Called between steps when nothing waits: a chance to compact."""

    def reset(self) -> None:
        """Drop the whole batch (after an error, or on stop)."""


class Scheduler:
    """The decode loop. ``model``: a transformers model, decoded by a
    :class:`~steer.runtime.torch_batch.TorchBatch`; or None when ``batch`` gives the runner
    (:class:`~steer.runtime.llamacpp.LlamaCppBatch`, ...). ``mixed_steps`` and ``prompt_cache``
    (keep ended requests' keys and values for later prompts to copy) configure the TorchBatch."""

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
        prompt_cache: bool = True,
        decoder: TokenDecoder | None = None,
        batch: BatchRunner | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if batch is None:
            from steer.runtime.torch_batch import TorchBatch

            device = torch.device(device) if device is not None else next(model.parameters()).device
            batch = TorchBatch(model, self.pad_token_id, device, mixed_steps=mixed_steps, prompt_cache=prompt_cache)
        # The running batch: its slots, its model state and its forward passes.
        self.batch: BatchRunner = batch
        self.on_token = on_token
        # Called after every pass of the loop, outside the lock, once that pass's events are out.
        self.on_step = on_step
        self.max_context = batch.max_context
        # How ids become text (incrementally, per row: steer.runtime.detokenize), worked out once.
        self._decoder = decoder or TokenDecoder.for_tokenizer(tokenizer)
        # Per-row bookkeeping (ReplyState, events, counters), shared with every engine: steer.runtime.rows.
        self._book = RowBook(self._decoder, eos_token_ids)
        self.eos_token_ids = self._book.eos_token_ids
        self._cv = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._steps_total = 0
        self._max_batch_seen = 0
        # Supervision: a loop that dies (a step's own errors are caught below; this is for the
        # rest) fails its rows and starts over, up to max_restarts times; then ``error`` says why.
        self.max_restarts = 3
        self.restart_backoff_s = 1.0
        self.restarts_total = 0
        self.error: str | None = None
        self._last_progress = time.monotonic()

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
            check_admission(stopping=self._stop, error=self.error, adding=len(rows), waiting=len(self._waiting),
                            running=len(self._live_rows()), max_queue=self.max_queue,
                            max_batch_size=self.max_batch_size)
            if self._book.enqueue(rows, self._waiting, now):
                self._last_progress = time.monotonic()  # the stall clock starts with the first row
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
            return self._book.stats(waiting=len(self._waiting), active=len(self._live_rows()),
                                    steps_total=self._steps_total, max_batch_seen=self._max_batch_seen,
                                    prompt_tokens_fed=getattr(self.batch, "tokens_prefilled", 0),
                                    prompt_tokens_copied=getattr(self.batch, "tokens_copied", 0))

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
        return time.monotonic() - self._last_progress if self._book.in_flight > 0 else 0.0

    def _iterate(self) -> bool:
        """One pass of the background loop: wait for work, then :meth:`_step`. False once stopped."""
        with self._cv:
            while not self._stop and not self._waiting and not self.batch.slots:
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
            idle = not self._waiting
        if admit:
            self._admit(admit)
        elif idle:
            self.batch.idle()
        if self.batch.slots:
            self._decode_step()

    def run(self, rows: Sequence[Row], on_done: Callable[[Row], None] | None = None) -> list[Row]:
        """Decode ``rows`` to their end on the calling thread, for a scheduler that is not
        :meth:`start`-ed; errors propagate. Each row's ``reply`` then holds its text.

        Rows beyond ``max_batch_size`` wait and take the slot of the first row to finish (continuous
        batching), so a long reply holds up no one; ``on_done(row)`` is called as each row ends,
        which lets a caller save it at once."""
        if self._thread is not None:
            raise RuntimeError("run() drives a scheduler that is not running on its own thread")
        self.submit(rows)
        running: list[Row] = []
        with torch.inference_mode():
            while self._waiting or self.batch.slots:
                admitted: list[Row] = []
                self._step(admitted)
                if on_done is not None:
                    running += admitted
                    for row in [r for r in running if r.done]:
                        running.remove(row)
                        on_done(row)
        return list(rows)

    def _live_rows(self) -> list[Row]:
        return [r for r in self.batch.slots if r is not None]

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
    def _reset_batch(self) -> None:
        self.batch.reset()

    def _release(self, row: Row) -> None:
        self.batch.release(row)

    def _admit(self, rows: list[Row]) -> None:
        self.batch.admit(rows, self._sample_first)
        self._max_batch_seen = max(self._max_batch_seen, len(self._live_rows()))

    def _sample_first(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Rows prefilled on admission: their first token."""
        self._max_batch_seen = max(self._max_batch_seen, len(self._live_rows()))
        self._sample_and_accept(rows, logits)

    def _decode_step(self) -> None:
        rows, logits = self.batch.step()
        self._steps_total += 1
        self._sample_and_accept(rows, logits)

    def _sample_and_accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        tokens = sample_next_tokens(logits, [r.params for r in rows], [r.rng for r in rows],
                                    [r.generated for r in rows])
        self._accept(rows, tokens.tolist())

    # -------------------------------------------------------------- output
    def _accept(self, rows: list[Row], tokens: list[int]) -> None:
        """Hand each row its new token, emit text, and retire rows that are done."""
        now = time.perf_counter()
        finished = False
        accepted = 0
        for row, token in zip(rows, tokens):
            if row.cancelled:
                continue
            accepted += 1
            finished |= self._book.accept(row, token, now)
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
        self._book.finish(row, reason, error)
