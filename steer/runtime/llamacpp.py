"""The running batch in llama.cpp: :class:`LlamaCppBatch`, the scheduler's llama.cpp runner.

The scheduler (:mod:`steer.runtime.scheduler`) stays the one decode loop: queue, admission, steer's
own sampling (so seeds, temperature, top-p, logit bias and penalties mean what they mean on the
torch engine), where replies end, events. This runner only runs the model, through
llama-cpp-python's low-level API (no ``llama_cpp.Llama``, whose sampling and stopping are not ours).

Each batch slot is one llama.cpp sequence (``seq_id`` = slot, ``n_seq_max`` = the batch size), with
its own KV cells. A step is ONE ``llama_decode`` carrying every running row's pending token at its
next position plus the whole prompt of each row joining the batch (continuous batching, as
``llama-server -np N`` does); only each row's last token asks for logits, which come back as one
[rows, vocab] tensor for the scheduler's sampler.

A row that ends frees its slot but leaves its tokens in that sequence's cache, as ``llama-server``
does: the next request takes the free slot whose cached tokens share the longest prefix with its
prompt, the rest of that sequence is removed (``llama_memory_seq_rm``), and only the prompt's new
tokens are fed. steer prompts of one policy start alike (the system turn and the attribute
line), so a joining request often skips most of its prompt. A request does not overwrite another
conversation's cache to get there: unless a free slot's whole cache starts its prompt (its own
previous turn), it takes the least recently used free slot and copies the shared prefix into it
from whichever sequence has the most of it (``llama_state_seq_get_data`` / ``set_data``, what
llama-server's prompt cache does), so recent conversations stay cached for their next turn.

The KV cache is not unified: each sequence gets ``n_ctx`` cells of its own (the total is ``n_ctx *
n_seq_max``), which llama.cpp recommends when sequences share no prefix, and which makes a row's
room independent of its neighbours'.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from steer.core.errors import SteerError
from steer.runtime.rows import MIN_COPIED_TOKENS, common_prefix_length

logger = logging.getLogger(__name__)

INSTALL_HINT = ('pip install "steer[llamacpp]" (llama-cpp-python; it builds llama.cpp from source, which needs '
                'cmake and a C++ compiler and takes several minutes)')
# Per-sequence context when the model's own is longer: every slot's cells are allocated up front.
DEFAULT_CONTEXT = 4096


class LlamaCppError(SteerError, RuntimeError):
    """llama.cpp is missing or could not load or run the model."""


def import_llama_cpp():
    """The ``llama_cpp`` module, or an error that says what to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(f"the llama.cpp engine needs llama-cpp-python, which is not installed ({e}): "
                            f"{INSTALL_HINT}", "engine") from None
    return llama_cpp


def default_threads() -> int:
    """llama.cpp threads when none are asked for: every core this process may use. Unlike the torch
    engine, no core is left to the HTTP side: llama.cpp releases the interpreter lock for the whole
    step and the HTTP side has little to do per token."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class LlamaCppBatch:
    """Decode up to ``n_seq_max`` rows together in llama.cpp; see the module docstring."""

    def __init__(self, path: str | Path, n_seq_max: int = 16, threads: int = 0, n_ctx: int | None = None,
                 n_batch: int = 2048):
        llama_cpp = import_llama_cpp()
        from llama_cpp import _internals

        path = Path(path)
        if not path.is_file():
            raise LlamaCppError(f"{path} is not a file: the llama.cpp engine takes a .gguf model file", "policy")
        self._llama = llama_cpp
        llama_cpp.llama_backend_init()
        verbose = logger.isEnabledFor(logging.DEBUG)
        if not verbose:  # llama.cpp's own log goes to stderr; keep only its errors
            from llama_cpp._logger import set_verbose

            set_verbose(False)
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=llama_cpp.llama_model_default_params(),
                                                verbose=verbose)
        except ValueError as e:
            raise LlamaCppError(f"llama.cpp could not load {path}: {e}", "policy") from None
        self.n_vocab = self._model.n_vocab()
        trained = self._model.n_ctx_train()
        self.n_seq_max = n_seq_max
        self.max_context = n_ctx or (min(trained, DEFAULT_CONTEXT) if trained > 0 else DEFAULT_CONTEXT)
        self.threads = threads if threads > 0 else default_threads()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.max_context * n_seq_max
        params.n_seq_max = n_seq_max
        params.kv_unified = False
        params.n_batch = max(n_batch, n_seq_max)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=verbose)
        except ValueError as e:
            raise LlamaCppError(f"llama.cpp could not create a context for {path} ({n_seq_max} sequences of "
                                f"{self.max_context} tokens): {e}", "policy") from None
        self.n_batch = params.n_batch
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        vocab = self._model.vocab
        self.eos_token_ids = {t for t in (llama_cpp.llama_vocab_eos(vocab), llama_cpp.llama_vocab_eot(vocab)) if t >= 0}
        self.slots: list = []
        self._positions: list[int] = []  # slot -> tokens its sequence holds
        # slot -> where its row's prompt starts to be fed (what precedes is already cached).
        self._joining: dict[int, int] = {}
        # sequence -> the tokens its cache holds, in order, kept after its row ends for the next.
        self._cached: dict[int, list[int]] = {}
        # sequence -> when a row last took it (admissions counted); for least-recently-used ties.
        self._taken_at: dict[int, int] = {}
        self._admissions = 0
        self.tokens_fed = 0
        self.sequences_copied = 0
        self.steps = 0
        self.decode_calls = 0

    def close(self) -> None:
        if self._batch is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._model.close()

    # ------------------------------------------------------------ interface
    def reset(self) -> None:
        self._llama.llama_memory_clear(self._ctx.memory, True)
        self.slots, self._positions, self._joining, self._cached, self._taken_at = [], [], {}, {}, {}

    def admit(self, rows: list, first_logits: Callable[[list, torch.Tensor], None]) -> None:
        """Every row takes a free slot (or a new one) and is prefilled by the next :meth:`step`."""
        for row in rows:
            if len(row.prompt_ids) > self.max_context:
                raise LlamaCppError(f"a {len(row.prompt_ids)}-token prompt does not fit this engine's "
                                    f"{self.max_context}-token context", "messages")
            free = [i for i in range(self.n_seq_max) if i >= len(self.slots) or self.slots[i] is None]
            if not free:
                raise LlamaCppError(f"more rows than the engine's {self.n_seq_max} sequences")
            slot, source, shared = self._choose(row.prompt_ids, free)
            self._admissions += 1
            self._taken_at[slot] = self._admissions
            while len(self.slots) <= slot:
                self.slots.append(None)
                self._positions.append(0)
            keep = shared[slot]
            if source != slot:
                self._copy_sequence(source, slot)
                keep = shared[source]
            if keep < len(self._cached.get(slot, ())):
                self._llama.llama_memory_seq_rm(self._ctx.memory, slot, keep, -1)
            self._cached[slot] = list(row.prompt_ids[:keep])
            self.slots[slot], self._positions[slot] = row, keep
            self._joining[slot] = keep

    def _choose(self, prompt: list[int], free: list[int]) -> tuple[int, int, dict[int, int]]:
        """(the free sequence the prompt takes, the sequence to copy its cached prefix from, each
        sequence's shared prefix with the prompt). The prompt's last token is always fed, for its
        logits, so at most all but it is shared.

        A free sequence whose whole cache starts the prompt (the previous turn of this conversation)
        loses nothing: it is taken, the longest such first. Otherwise the least recently used free
        sequence is (never used ones first), and when another sequence, free or running, shares at
        least :data:`MIN_COPIED_TOKENS` more of the prompt, its cache is copied over first: a copy
        costs far less than feeding those tokens again."""
        limit = len(prompt) - 1
        shared = {i: common_prefix_length(cached, prompt, limit) for i, cached in self._cached.items()}
        for i in free:
            shared.setdefault(i, 0)
        intact = [i for i in free if 0 < shared[i] == len(self._cached.get(i, ()))]
        if intact:
            slot = max(intact, key=lambda i: (shared[i], -i))
        else:
            slot = min(free, key=lambda i: (self._taken_at.get(i, -1), i))
        source = max(shared, key=lambda i: (shared[i], i == slot))
        if shared[source] < shared[slot] + MIN_COPIED_TOKENS:
            source = slot
        return slot, source, shared

    def _copy_sequence(self, source: int, target: int) -> None:
        """Replace sequence ``target``'s cache with a copy of ``source``'s (its cells' keys and values:
        llama.cpp's per-sequence state, as llama-server's prompt cache saves and restores it)."""
        llama, ctx = self._llama, self._ctx.ctx
        size = llama.llama_state_seq_get_size(ctx, source)
        buffer = (ctypes.c_uint8 * size)()
        written = llama.llama_state_seq_get_data(ctx, buffer, size, source)
        llama.llama_memory_seq_rm(self._ctx.memory, target, -1, -1)
        if written != size or llama.llama_state_seq_set_data(ctx, buffer, written, target) != written:
            raise LlamaCppError(f"copying sequence {source}'s cache to sequence {target} failed")
        self._cached[target] = list(self._cached[source])
        self.sequences_copied += 1

    def step(self) -> tuple[list, torch.Tensor]:
        """One ``llama_decode``: each running row's pending token and each joining row's prompt."""
        prefix: list[tuple[int, int, int]] = []  # (token, position, seq) without logits
        last: list[tuple[int, int, int]] = []  # one per live row, with logits, in slot order
        rows = []
        for slot, row in enumerate(self.slots):
            if row is None:
                continue
            if slot in self._joining:
                prompt, start = row.prompt_ids, self._joining[slot]
                prefix.extend((prompt[p], p, slot) for p in range(start, len(prompt) - 1))
                last.append((prompt[-1], len(prompt) - 1, slot))
                self._cached[slot].extend(prompt[start:])
                self._positions[slot] = len(prompt)
            else:
                last.append((row.generated[-1], self._positions[slot], slot))
                self._cached[slot].append(row.generated[-1])
                self._positions[slot] += 1
            rows.append(row)
        self._joining.clear()
        self.tokens_fed += len(prefix) + len(last)
        entries = prefix + last
        # A step longer than one call may take (n_batch: long prompts joining) goes in several;
        # the rows that want logits come last, so they all land in the final call (there are at
        # most n_seq_max <= n_batch of them), and a sequence's positions still arrive in order.
        final = max(0, len(entries) - self.n_batch)
        for start in range(0, final, self.n_batch):
            self._decode(entries[start:min(start + self.n_batch, final)], 0)
        self._decode(entries[final:], len(last))
        self.steps += 1
        out = np.ctypeslib.as_array(self._llama.llama_get_logits(self._ctx.ctx), shape=(len(last), self.n_vocab))
        return rows, torch.from_numpy(out.copy())

    def release(self, row) -> None:
        """Free ``row``'s slot; its sequence's cached tokens stay for the next request to share."""
        slot = next(i for i, r in enumerate(self.slots) if r is row)
        if slot in self._joining:  # cancelled before its prompt was fed: the cache holds the shared part
            self._joining.pop(slot)
        self.slots[slot] = None
        self._positions[slot] = 0
        while self.slots and self.slots[-1] is None:  # no row: no batch
            self.slots.pop()
            self._positions.pop()

    def idle(self) -> None:
        """Nothing to compact: a free slot costs no compute (its cached tokens wait for a prompt
        that shares them)."""

    def sequence_length(self, slot: int) -> int:
        """Tokens sequence ``slot`` holds in llama.cpp's cache (0 when empty)."""
        return self._llama.llama_memory_seq_pos_max(self._ctx.memory, slot) + 1

    # ------------------------------------------------------------ internals
    def _decode(self, entries: list[tuple[int, int, int]], with_logits: int) -> None:
        """Decode ``entries``; the last ``with_logits`` of them ask for logits."""
        batch = self._batch
        first_logit = len(entries) - with_logits
        for i, (token, position, seq) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i >= first_logit
        batch.n_tokens = len(entries)
        code = self._llama.llama_decode(self._ctx.ctx, batch)
        self.decode_calls += 1
        if code != 0:
            raise LlamaCppError(f"llama_decode failed with code {code} ({len(entries)} tokens)")


def llamacpp_engine(path: str | Path, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64, threads: int = 0,
                    eos_token_ids=(), n_batch: int = 2048, **scheduler_kwargs):
    """A :class:`~steer.runtime.scheduler.Scheduler` whose batch runs in llama.cpp on the GGUF file
    ``path``. Ends of replies: ``eos_token_ids``, the tokenizer's EOS and the file's EOS/EOT."""
    from steer.runtime.scheduler import Scheduler

    batch = LlamaCppBatch(path, n_seq_max=max_batch_size, threads=threads, n_batch=n_batch)
    eos = set(eos_token_ids) | batch.eos_token_ids
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    logger.info("llama.cpp engine: %s, %d sequences of %d tokens, %d threads", path, max_batch_size,
                batch.max_context, batch.threads)
    return Scheduler(None, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue, eos_token_ids=eos,
                     batch=batch, **scheduler_kwargs)
