"""The engine in its own process.

The decode loop and the HTTP side (parsing requests, rendering chunks, writing sockets) are both
Python. In one process they take turns on one interpreter lock, so with 16 streaming clients the
server used about one core of two and delivered two thirds of what the engine alone could. As in
vLLM (an engine core process behind the API server), :class:`EngineProcess` runs the
:class:`~steer.runtime.scheduler.Scheduler` (the engine) in a child process: the server tokenizes prompts and sends rows
down one pipe; after every decode step the child sends that step's events back up another, in
one message.

``EngineProcess`` has the engine's client interface (``start``, ``stop``, ``submit``, ``cancel``,
``stats``, ``max_context``), so :class:`~service.serving.ChatServing` drives either. The queue
limit is enforced here, on the server's side, so a full server answers 429 without a round trip.

If the child dies (killed, out of memory), every request in flight ends with an error, ``error``
says why, ``/health`` turns 503 and new requests are refused.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from steer.runtime.scheduler import (  # noqa: F401  (EngineFailedError is imported from here too)
    STOPPED_MESSAGE,
    EngineFailedError,
    EngineStats,
    EngineStoppedError,
    QueueFullError,
    Row,
    RowEvent,
    Scheduler,
)

logger = logging.getLogger(__name__)


STATS_FIELDS = tuple(f.name for f in fields(EngineStats))


@dataclass(frozen=True)
class EngineProcessConfig:
    """What the child needs to load the policy and build its engine (it is pickled across)."""

    policy: str
    # "torch", or "llama.cpp": the policy is a .gguf file decoded in llama.cpp, and ``schema`` gives
    # the attribute schema of a file that carries none.
    engine: str = "torch"
    schema: str | None = None
    device: str | None = None
    dtype: str | None = None
    threads: int = 0
    max_batch_size: int = 16
    log_level: int = logging.INFO
    # After a SIGTERM, how long the child waits for the server's "stop" before leaving on its own.
    sigterm_grace_s: float = 60.0


class EngineProcess:
    # A child that ran this long before dying starts a fresh series of restarts.
    HEALTHY_AFTER_S = 60.0
    MAX_BACKOFF_S = 30.0

    def __init__(self, config: EngineProcessConfig, *, max_queue: int = 64,
                 on_token: Callable[[int], None] | None = None, start_timeout: float = 600.0,
                 max_restarts: int = 3, restart_backoff_s: float = 1.0):
        self.config = config
        self.max_batch_size = config.max_batch_size
        self.max_queue = max_queue
        self.on_token = on_token
        self.start_timeout = start_timeout
        self.max_context: int | None = None
        self.error: str | None = None  # why the engine process is gone, once it is
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._rows: dict[int, Row] = {}
        self._row_ids: dict[int, int] = {}  # id(row) -> the id the child knows it by
        self._next_id = itertools.count()
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0)
        self._tokens_seen = 0
        self._stopping = False
        self._process = None
        self._commands = None
        self._events = None
        self._reader: threading.Thread | None = None
        # Supervision: a child that dies is restarted up to max_restarts times in a row, waiting
        # restart_backoff_s, then twice that, ... before each attempt.
        self.max_restarts = max_restarts
        self.restart_backoff_s = restart_backoff_s
        self.restarts_total = 0
        self._failures = 0
        self._started_at = 0.0
        self._stopped = threading.Event()
        self._last_progress = time.monotonic()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the child and wait until its model is loaded; raises ``EngineFailedError``."""
        self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and CUDA state
        command_reader, self._commands = ctx.Pipe(duplex=False)
        self._events, event_writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=run_engine_process, args=(self.config, command_reader, event_writer),
                                    name="steer-engine", daemon=True)
        self._process.start()
        command_reader.close()
        event_writer.close()
        deadline = time.monotonic() + self.start_timeout
        while not self._events.poll(0.5):
            if not self._process.is_alive():
                raise EngineFailedError(f"the engine process exited while loading (exit code {self._process.exitcode})")
            if time.monotonic() > deadline:
                self._process.kill()
                raise EngineFailedError(f"the engine process did not load the model within {self.start_timeout:.0f} s")
        try:
            kind, payload = self._events.recv()
        except EOFError:
            self._process.join(5)
            raise EngineFailedError(f"the engine process exited while loading (exit code {self._process.exitcode})")
        if kind == "failed":
            self._process.join(5)
            raise EngineFailedError(payload)
        self.max_context = payload["max_context"]
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0)
        self._tokens_seen = 0
        self._started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read_events, name="steer-engine-events", daemon=True)
        self._reader.start()
        logger.info("engine process %d ready", self._process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
        self._stopped.set()
        if self._process is None:
            return
        self._send("stop", None)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._fail_all("cancelled", STOPPED_MESSAGE)

    # --------------------------------------------------------------- client
    def submit(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` together (a request's ``n`` choices), or none of them."""
        now = time.perf_counter()
        with self._lock:
            if self.error is not None:
                raise EngineFailedError(f"the engine is not running ({self.error})")
            if self._stopping:
                raise EngineStoppedError("the server is shutting down")
            # The engine's own rule (waiting rows beyond free batch slots), counted on this side:
            # rows in flight here are never fewer than the child's running + waiting.
            if len(self._rows) + len(rows) > self.max_queue + self.max_batch_size:
                raise QueueFullError(f"the server is busy ({len(self._rows)} requests in progress); retry later")
            if not self._rows:
                self._last_progress = time.monotonic()  # the stall clock starts with the first row
            items = []
            for row in rows:
                row.submitted_at = now
                key = next(self._next_id)
                self._rows[key] = row
                self._row_ids[id(row)] = key
                items.append((key, row.prompt_ids, row.params, row.stops, row.index))
            self._send("submit", items)

    def cancel(self, rows: Sequence[Row]) -> None:
        keys = []
        with self._lock:
            for row in rows:
                key = self._row_ids.get(id(row))
                if key is not None and not row.done:
                    row.cancelled = True
                    keys.append(key)
            if keys:
                self._send("cancel", keys)

    def stats(self) -> EngineStats:
        return self._stats

    def stalled_for(self) -> float:
        """Seconds since the engine last reported progress while rows were in flight (0 when idle)."""
        return time.monotonic() - self._last_progress if self._rows else 0.0

    # ------------------------------------------------------------ internals
    def _send(self, kind: str, payload) -> None:
        try:
            message = pickle.dumps((kind, payload), pickle.HIGHEST_PROTOCOL)  # as flush() does, for the same reason
            with self._send_lock:  # stop() may send while the event loop sends
                self._commands.send_bytes(message)
        except (OSError, ValueError):  # the child is gone; the reader reports it
            pass

    def _read_events(self) -> None:
        try:
            while True:
                kind, payload = self._events.recv()
                if kind == "stopped":
                    return
                events, stats = payload
                self._last_progress = time.monotonic()
                # Counts before events: a client that has seen its text finds them in the stats.
                self._stats = stats = EngineStats(*stats)
                new_tokens = stats.tokens_total - self._tokens_seen
                self._tokens_seen = stats.tokens_total
                if new_tokens and self.on_token is not None:
                    self.on_token(new_tokens)
                self._deliver(events)
        except (EOFError, OSError):
            pass
        finally:
            if not self._stopping:
                self._process.join(1)
                self._after_exit(exit_reason(self._process.exitcode))

    def _after_exit(self, reason: str, ran_well: bool | None = None) -> None:
        """The child is gone: fail what it held, then restart it (bounded, with backoff) or give up."""
        if ran_well is None:
            ran_well = time.monotonic() - self._started_at > self.HEALTHY_AFTER_S
        if ran_well:
            self._failures = 0
        with self._lock:
            if self._failures < self.max_restarts:
                self._failures += 1
                delay = min(self.restart_backoff_s * 2 ** (self._failures - 1), self.MAX_BACKOFF_S)
                self.error = f"{reason}; restarting it (attempt {self._failures} of {self.max_restarts})"
            else:
                delay = None
                self.error = (f"{reason}" + (f" after {self.max_restarts} restarts" if self.max_restarts else "")
                              + "; the server needs a restart")
        logger.error("%s; failing %d requests in flight", self.error, len(self._rows))
        self._fail_all("error", f"generation failed: {reason}; retry the request")
        if delay is not None:
            threading.Thread(target=self._restart, args=(delay, reason), name="steer-engine-restart",
                             daemon=True).start()

    def _restart(self, delay: float, reason: str) -> None:
        if self._stopped.wait(delay):
            return
        try:
            self._spawn()
        except Exception as e:  # counts as another failure, with a longer wait
            logger.error("restarting the engine process failed: %s", e)
            self._after_exit(f"{reason}; restarting it failed ({e})", ran_well=False)
            return
        with self._lock:
            self.restarts_total += 1
            self.error = None
            if self._stopping:  # stop() came while the child was loading
                self._send("stop", None)
        logger.warning("the engine process was restarted (%d restart(s) since the server started)",
                       self.restarts_total)

    def _deliver(self, events: list[tuple[int, RowEvent | str]]) -> None:
        for key, event in events:
            row = self._rows.get(key)
            if row is None:
                continue
            if isinstance(event, str):  # a text delta (see run_engine_process's sink)
                event = RowEvent(index=row.index, delta=event)
            if event.finished:
                with self._lock:
                    self._rows.pop(key, None)
                    self._row_ids.pop(id(row), None)
                row.done = True
                row.finished_at = time.perf_counter()
            elif row.first_token_at is None:
                row.first_token_at = time.perf_counter()
            row.sink(event)

    def _fail_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            rows, self._rows, self._row_ids = list(self._rows.values()), {}, {}
        for row in rows:
            if not row.done:
                row.done = True
                row.sink(RowEvent(index=row.index, finished=True, finish_reason=reason, error=error))


def exit_reason(code: int | None) -> str:
    """Why the engine process is gone, as the server reports it."""
    reason = f"the engine process exited (exit code {code})"
    if code == -signal.SIGILL:
        # Seen with llama.cpp built for the build machine's CPU (GGML_NATIVE) on a VM that does
        # not expose all of it (AMX tiles): quantized models crash on their first step.
        reason += (": an illegal CPU instruction; the native library (llama.cpp, torch) was built for a CPU feature "
                   "this machine lacks: rebuild it for this CPU (llama-cpp-python: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\")")
    return reason


def engine_threads(requested: int, device) -> int:
    """torch threads for the engine process: ``requested``, or by default on a CPU every core this
    process may use but one, which the HTTP side needs (with both on two cores, serving the demo
    policy fell from 1,770 to 1,320 tokens/s)."""
    if requested > 0:
        return requested
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def handle_command(engine: Scheduler, rows: dict[int, Row], sink_for: Callable[[int], Callable[[RowEvent], None]],
                   kind: str, payload) -> None:
    """Apply one command from the server to the engine. ``rows`` is shared with the engine
    thread, which removes a row the moment it finishes, so every lookup tolerates a key that
    vanished in between (``key in rows`` then ``rows[key]`` once raced into a KeyError that ended
    the command loop for good)."""
    if kind == "submit":
        batch = [Row(prompt_ids=list(ids), params=params, stops=list(stops), sink=sink_for(key), index=index)
                 for key, ids, params, stops, index in payload]
        rows.update((key, row) for (key, *_), row in zip(payload, batch))
        engine.submit(batch)
    elif kind == "cancel":
        found = [rows.get(key) for key in payload]
        engine.cancel([row for row in found if row is not None])
    else:
        logger.warning("engine process: unknown command %r", kind)


def build_engine(config: EngineProcessConfig, on_step: Callable[[], None]) -> Scheduler:
    """The child's engine: the policy loaded, and a scheduler over the configured engine's batch.

    The llama.cpp engine runs here too, in the child, rather than on a thread of the server. Its
    steps release the interpreter lock, so a thread costs little: on the 2-core VM (SmolLM2 q8_0,
    bench/engines.py, 2 threads) a thread and the child served 1 client at 50 and 49 tokens/s and
    16 clients at 110 and 95-107 tokens/s, within that machine's run-to-run noise. The child wins
    on isolation: a crash inside llama.cpp (an illegal instruction from a build for another CPU, a
    bad file) kills the child, which the server reports and restarts, not the server."""
    import torch

    from steer.models.policy import load_policy
    from steer.runtime.model_runner import eos_token_ids

    max_queue = 1 << 30  # the server side enforces the queue limit
    if config.engine == "llama.cpp":
        from steer.runtime.llamacpp import llamacpp_engine

        # Only the tokenizer and the schema: llama.cpp reads the weights. torch only samples, one
        # small op at a time, so one thread, leaving the cores to llama.cpp.
        torch.set_num_threads(1)
        policy = load_policy(config.policy, load_model=False, schema=config.schema)
        return llamacpp_engine(config.policy, policy.tokenizer, max_batch_size=config.max_batch_size,
                               max_queue=max_queue, threads=config.threads, on_step=on_step)
    policy = load_policy(config.policy, device=config.device, dtype=config.dtype, schema=config.schema)
    torch.set_num_threads(engine_threads(config.threads, policy.device))
    return Scheduler(
        policy.model,
        policy.tokenizer,
        max_batch_size=config.max_batch_size,
        max_queue=max_queue,
        eos_token_ids=eos_token_ids(policy.model, policy.tokenizer),
        device=policy.device,
        on_step=on_step,
    )


def run_engine_process(config: EngineProcessConfig, commands, events) -> None:
    """The child's main: load the policy, run an engine, relay rows in and events out."""
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group, and systemd's SIGTERM the whole cgroup; the server
    # decides when the engine stops (after draining its requests), so the child waits for its
    # "stop" command. A SIGTERM that no "stop" follows (the server died) still ends it, later.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum, frame):
        timer = threading.Timer(config.sigterm_grace_s, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        engine = build_engine(config, on_step=lambda: flush())
    except Exception as e:  # reported to the server, which fails its start with this message
        events.send(("failed", f"{type(e).__name__}: {e}"))
        return

    # A step's events for the server: a text delta travels as its string, other events whole;
    # pickling 16 dataclasses a step cost ten times what their strings do.
    outbox: list[tuple[int, RowEvent | str]] = []
    outbox_lock = threading.Lock()
    rows: dict[int, Row] = {}

    def flush() -> None:
        with outbox_lock:
            if not outbox:
                return
            batch = outbox[:]
            outbox.clear()
        stats = engine.stats()
        message = ("events", (batch, tuple(getattr(stats, name) for name in STATS_FIELDS)))
        try:
            # What Connection.send does, less its per-message pickler set-up and dataclasses'
            # deep-copying astuple: this runs after every decode step (the server's recv reads it).
            events.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError):  # the server is gone; the command loop ends too
            pass

    def sink_for(key: int) -> Callable[[RowEvent], None]:
        def sink(event: RowEvent) -> None:
            item = event.delta if not event.finished else event
            with outbox_lock:
                outbox.append((key, item))
            if event.finished:
                rows.pop(key, None)

        return sink

    engine.start()
    events.send(("ready", {"max_context": engine.max_context}))
    try:
        while True:
            kind, payload = commands.recv()
            if kind == "stop":
                break
            try:
                handle_command(engine, rows, sink_for, kind, payload)
            except Exception:  # one bad command must not end the loop (and the engine with it)
                logger.exception("engine process: the %r command failed", kind)
    except (EOFError, OSError):
        pass  # the server went away: stop decoding for nobody
    finally:
        engine.stop()
        flush()
        try:
            events.send(("stopped", None))
        except (OSError, ValueError):
            pass
