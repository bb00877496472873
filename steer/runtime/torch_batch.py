"""The running batch on a transformers model: :class:`TorchBatch`, the scheduler's torch runner.

The scheduler (:mod:`steer.runtime.scheduler`) owns the loop: the queue, admission, sampling, where
replies end, events. A runner owns the batch's slots and its model state, and does the forward
passes; :class:`TorchBatch` does them with :mod:`steer.runtime.model_runner` and
:mod:`steer.runtime.mixed_step` on a KV cache kept by :mod:`steer.runtime.kv_cache`
(:mod:`steer.runtime.llamacpp` is the other runner).

Admission: once a batch runs, a row whose prompt fits the batch's cache claims a slot (a batch
row whose request ended, or an empty row added for it) and is prefilled inside the next decode
step (``steer.runtime.mixed_step``), which then costs little more than a plain one. The first
batch, prompts longer than the cache and models that cannot take that path are prefilled on their
own (left-padded together); each one's KV cache is written into a free slot, right-aligned like
every row, or appended (left-padding the shorter cache), and their first logits go back to the
scheduler at once.

A joining prompt that shares at least :data:`~steer.runtime.rows.MIN_COPIED_TOKENS` leading tokens
with a running row's prompt copies those from that row's cache instead of feeding them
(:class:`~steer.runtime.mixed_step.JoiningPrompt`), as llama.cpp's runner copies a sequence. So
that a first batch of alike prompts gets there too, its first row is prefilled alone and the others
join it in the next step.

The prompt cache: a request that ends leaves its prompt and reply in its slot's cache, and when
the last running row ends the whole batch is kept (parked) until the next request that copies
from it. A joining prompt copies its start from whichever row holds most of it, running or ended
(taking the ended request's slot when that is where it copies from), so a conversation's next
turn, a system prompt used again or the same question asked again feeds only what is new. A slot's
tokens stay until the slot is taken or compacted away (free slots are, once no request has waited
for a few steps); trimming keeps the columns they hold (``prompt_cache=False`` keeps nothing).

Caches of other shapes than plain ``[batch, heads, seq, dim]`` tensors per layer (sliding-window
layers) fall back to re-prefilling the whole batch on admission and compacting at once, which is
correct and, for small models, cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from steer.runtime.kv_cache import DecodeState, add_columns, add_free_rows, is_preallocated, merge_states, \
    place_row, select_new_rows, select_rows, trim_columns
from steer.runtime.mixed_step import JoiningPrompt, fits, mixed_step, supports_mixed_step
from steer.runtime.model_runner import context_limit, decode_step, left_pad, prefill
from steer.runtime.rows import MIN_COPIED_TOKENS, common_prefix_length

logger = logging.getLogger(__name__)


class TorchBatch:
    """Batch row ``i`` of the KV cache belongs to ``slots[i]``; None marks a free slot, which decodes
    padding until a new row takes it over or the batch is compacted."""

    # A row that ends leaves a free slot rather than a copy of the whole cache without it: under
    # load the next request takes the slot over a step or two later (its prompt written into that
    # batch row), and the batch is compacted only when slots stay free. Before, every finished
    # and every admitted row copied every layer's cache, a tenth of the server's time.
    HOLD_FREE_SLOT_STEPS = 4
    # Leading cache columns that only padding still uses are cut once there are this many.
    TRIM_COLUMNS = 32

    def __init__(self, model, pad_token_id: int, device: torch.device, mixed_steps: bool = True,
                 prompt_cache: bool = True):
        self.model = model
        self.pad_token_id = pad_token_id
        self.device = device
        self.max_context = context_limit(model)
        self.slots: list = []
        self._free_since: dict[int, int] = {}  # free slot -> the step it was freed at
        # The running batch's KV cache, attention mask (1 where a real token sits) and positions.
        self._state: DecodeState | None = None
        self._mergeable: bool | None = None
        # Whether admitted rows may be prefilled inside the decode step (steer.mixed_step), decided
        # when the first batch exists; and the (slot, row) pairs that claimed a slot for the next step.
        self._mixed: bool | None = None if mixed_steps else False
        self._joining: list[tuple[int, object]] = []
        # Free slot -> the tokens its cache still holds (an ended request's prompt and reply), which
        # a joining prompt that starts the same way copies instead of feeding (prefix reuse across
        # requests: a conversation's next turn, a repeated system prompt). And the batch as it was
        # when its last row ended, kept for that until the next request comes.
        self._donors: dict[int, list[int]] = {}
        self._parked: DecodeState | None = None
        self.prompt_cache = prompt_cache
        self._steps = 0
        # Tokens prefilled (prompts, and running rows' text where a batch is rebuilt), and prompt
        # tokens copied from another row's cache instead.
        self.tokens_prefilled = 0
        self.tokens_copied = 0

    # ------------------------------------------------------------ interface
    def reset(self) -> None:
        self.slots, self._free_since, self._state, self._joining = [], {}, None, []
        self._donors, self._parked = {}, None

    def live_rows(self) -> list:
        return [r for r in self.slots if r is not None]

    def admit(self, rows: list, first_logits: Callable[[list, torch.Tensor], None]) -> None:
        """Take ``rows`` into the batch. Rows prefilled now hand their logits to ``first_logits``;
        the others are prefilled by the next :meth:`step`."""
        # Rows that can be prefilled inside the next decode step claim their slots; the others
        # (the first batch, prompts longer than the batch's cache) are prefilled now, first, since
        # appending them may compact the batch. A first batch whose prompts start alike is
        # prefilled one row only, so that the others copy its cache for what they share.
        if self._state is None and self._parked is not None:
            self._unpark(rows)
        if self._state is not None and self._mixed:
            self._widen_for(rows)
        if self._state is None and self._mixed is not False and len(rows) > 1 and any(
                common_prefix_length(rows[0].prompt_ids, r.prompt_ids, len(r.prompt_ids) - 1) >= MIN_COPIED_TOKENS
                for r in rows[1:]):
            first_logits(rows[:1], self._prefill_and_place(rows[:1]))
            rows = rows[1:]
        joining = [r for r in rows if self._mixed and self._state is not None and fits(self._state, len(r.prompt_ids))]
        apart = [r for r in rows if not any(r is j for j in joining)]
        if apart:
            first_logits(apart, self._prefill_and_place(apart))
        if joining and not self._claim_slots(joining):
            first_logits(joining, self._prefill_and_place(joining))

    def step(self) -> tuple[list, torch.Tensor]:
        """One decode step over every slot: the live rows, and their next logits."""
        slots = self.slots
        pending = torch.tensor([r.generated[-1] if r is not None and r.generated else self.pad_token_id
                                for r in slots], dtype=torch.long, device=self.device)
        joined = bool(self._joining)
        if joined:
            joining, self._joining = self._joining, []
            logits = mixed_step(self.model, pending, self._state, self._joining_prompts(joining))
        else:
            logits = decode_step(self.model, pending, self._state)
        self._steps += 1
        live = [i for i, r in enumerate(slots) if r is not None]
        if len(live) < len(slots):
            logits = logits.index_select(0, torch.tensor(live, dtype=torch.long, device=logits.device))
        # Attention reads every column of the batch, so columns no row attends to are cut: every
        # TRIM_COLUMNS steps, and right after rows joined (their prompts were written right-aligned,
        # often past the columns that ended requests held).
        if self._mergeable and self._state is not None and (joined or self._steps % self.TRIM_COLUMNS == 0):
            trim_columns(self._state, min_columns=self.TRIM_COLUMNS, keep_from=self._first_lent_column())
        return [slots[i] for i in live], logits

    def release(self, row) -> None:
        slot = next(i for i, r in enumerate(self.slots) if r is row)
        self.slots[slot] = None
        if self._mixed and self.prompt_cache:
            # The slot's cache holds the prompt and the reply but its last token (sampled, never fed).
            self._donors[slot] = list(row.prompt_ids) + row.generated[:-1]
        if not self.live_rows():
            if self._donors:
                self._park()
            else:
                self.reset()
            return
        self._free_since[slot] = self._steps
        # From now on the free row attends only to the padding it is fed, so it stays finite and
        # holds no column of the cache.
        self._state.attention_mask[slot] = 0
        if not self._mergeable:
            self._compact()  # other cache layouts cannot take a new row into a slot

    def idle(self) -> None:
        """Nothing waits: drop slots that stayed free for a few steps."""
        if self._free_since and self._steps - min(self._free_since.values()) >= self.HOLD_FREE_SLOT_STEPS:
            self._compact()

    # ------------------------------------------------------------ internals
    def _park(self) -> None:
        """The last row ended: keep the batch's cache for the next requests to copy from."""
        parked, donors = self._state, self._donors
        self.reset()
        self._parked, self._donors = parked, donors

    def _unpark(self, rows: list) -> None:
        """Make the parked batch the running one, its rows free, when one of ``rows`` copies at
        least MIN_COPIED_TOKENS from it; else drop it. Every ended request is kept, not only the
        ones ``rows`` copy from: replies that end in the same step are followed by their clients'
        next requests one by one over the next steps, and each finds its own cache still there.
        Free rows are decoded as padding, so those no request takes are compacted away once no
        request has waited for HOLD_FREE_SLOT_STEPS steps, as any free slot is."""
        parked, donors = self._parked, self._donors
        self._parked, self._donors = None, {}
        if not any(self._best_donor(row.prompt_ids, donors, parked)[1] >= MIN_COPIED_TOKENS for row in rows):
            return
        self._state, self.slots = parked, [None] * parked.attention_mask.shape[0]
        self._donors = donors
        self._free_since = dict.fromkeys(range(len(self.slots)), self._steps)

    def _widen_for(self, rows: list) -> None:
        """A prompt longer than the batch's columns (a conversation's next turn, which holds the
        last turn's prompt and reply) still joins the next step when a row's cache lends it its
        start: the cache grows on the left by what it lacks. That copies the cache once, as
        prefilling the prompt apart and appending it would, without feeding what it copies."""
        lacking = 0
        for row in rows:
            length = len(row.prompt_ids)
            if not fits(self._state, length) and self._best_source(row.prompt_ids)[1] >= MIN_COPIED_TOKENS:
                lacking = max(lacking, length - 1 - self._state.columns)
        if lacking:
            add_columns(self._state, lacking)

    def _best_source(self, prompt, exclude: set[int] = frozenset()) -> tuple[int, int]:
        """The row whose cache holds most of ``prompt``'s start (all but its last token): a free
        slot's ended request, or a running row's prompt (not those in ``exclude``); and how many
        tokens. (-1, 0) when none."""
        source, copied = self._best_donor(prompt, self._donors, self._state)
        for i, r in enumerate(self.slots):
            if copied == len(prompt) - 1:
                break
            if r is not None and i not in exclude:  # a running row's cache holds at least its whole prompt
                shared = common_prefix_length(r.prompt_ids, prompt, len(prompt) - 1)
                if shared > copied:
                    source, copied = i, shared
        return source, copied

    @staticmethod
    def _best_donor(prompt, donors: dict[int, list[int]], state: DecodeState) -> tuple[int, int]:
        """The free slot whose cache holds most of ``prompt``'s start (all but its last token, which
        is fed), and how many tokens; (-1, 0) when none. A slot whose first tokens were trimmed away
        lends nothing."""
        if not donors:
            return -1, 0
        positions, width = state.next_positions.tolist(), state.columns
        best = (-1, 0)
        for slot, cached in donors.items():
            if positions[slot] <= width:
                shared = common_prefix_length(cached, prompt, len(prompt) - 1)
                if shared > best[1]:
                    best = (slot, shared)
        return best

    def _first_lent_column(self) -> int | None:
        """The first cache column an ended request in a free slot still holds (a row's tokens end
        at the last column and start ``next_positions`` before it), so trimming keeps what it can
        lend until the slot is taken or compacted; None when no free slot lends anything."""
        if not self._donors:
            return None
        width, positions = self._state.columns, self._state.next_positions.tolist()
        starts = [width - positions[slot] for slot in self._donors if positions[slot] <= width]
        return min(starts, default=None)

    def _compact(self) -> None:
        """Drop free slots from the batch."""
        keep = [i for i, r in enumerate(self.slots) if r is not None]
        if len(keep) < len(self.slots):
            self._select_rows(keep)

    def _prefill(self, sequences: list[list[int]]) -> tuple[torch.Tensor, DecodeState]:
        self.tokens_prefilled += sum(len(s) for s in sequences)
        return prefill(self.model, *left_pad(sequences, self.pad_token_id, self.device))

    def _prefill_and_place(self, rows: list) -> torch.Tensor:
        logits, new = self._prefill([r.prompt_ids for r in rows])
        if self._mergeable is None:
            self._mergeable = is_preallocated(new.past_key_values)
            if not self._mergeable:
                logger.info("this model's KV cache cannot be merged; admission re-prefills the batch")
        if self._state is None:
            self._state, self.slots = new, list(rows)
            if self._mixed is None:
                self._mixed = supports_mixed_step(self.model, new)  # implies a mergeable cache
        elif not self._mergeable:
            # Rebuild the whole batch: running rows re-prefill everything except their pending token.
            running = self.live_rows()
            _, self._state = self._prefill(
                [r.prompt_ids + r.generated[:-1] for r in running] + [r.prompt_ids for r in rows]
            )
            self.slots, self._free_since = running + list(rows), {}
        else:
            width = self._state.attention_mask.shape[1]
            free = [i for i, r in enumerate(self.slots) if r is None]
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
                self.slots.extend(rows[j] for j in unplaced)
        return logits

    def _claim_slots(self, rows: list) -> bool:
        """Give every row a free slot to be prefilled in by the next decode step, if all of them fit."""
        if self._state is None or not all(fits(self._state, len(r.prompt_ids)) for r in rows):
            return False
        # A row whose best lender is an ended request takes that request's slot (the step reads
        # every source before it writes); the others take slots whose cache lends nothing first,
        # so that what the rest hold is kept for the requests still to come.
        free = {i for i, r in enumerate(self.slots) if r is None}
        slots: list[int | None] = []
        for row in rows:
            lenders = {i: cached for i, cached in self._donors.items() if i in free}
            slot, copied = self._best_donor(row.prompt_ids, lenders, self._state)
            claims = copied >= MIN_COPIED_TOKENS
            slots.append(slot if claims else None)
            if claims:
                free.discard(slot)
        others = sorted(free, key=lambda i: (i in self._donors, i))
        missing = slots.count(None) - len(others)
        if missing > 0:
            # Empty rows cost one copy of the cache; a prefill of their own would cost a forward pass.
            first = len(self.slots)
            self._add_free_slots(missing)
            others += range(first, len(self.slots))
        others.reverse()
        slots = [others.pop() if slot is None else slot for slot in slots]
        for slot, row in zip(slots, rows):
            self.slots[slot] = row
            self._free_since.pop(slot, None)
            self._joining.append((slot, row))
        return True

    def _joining_prompts(self, joining: list[tuple[int, object]]) -> list[JoiningPrompt]:
        """Each joining row's prompt, with the row whose cache holds most of its start: a running
        row, or a free one that still holds an ended request (the joining rows' own slots included:
        the mixed step reads every source before it writes)."""
        taken = {slot for slot, _ in joining}
        prompts = []
        for slot, row in joining:
            prompt = row.prompt_ids
            source, copied = self._best_source(prompt, exclude=taken)
            if copied < MIN_COPIED_TOKENS:
                source, copied = -1, 0
            self.tokens_copied += copied
            self.tokens_prefilled += len(prompt) - copied
            prompts.append(JoiningPrompt(slot, prompt, source, copied))
        for slot in taken:
            self._donors.pop(slot, None)
        return prompts

    def _add_free_slots(self, n: int) -> None:
        """Append ``n`` free rows to the batch."""
        add_free_rows(self._state, n)
        self.slots.extend([None] * n)

    def _place(self, new: DecodeState, j: int, slot: int, row) -> None:
        """Write prefilled row ``j`` of ``new`` into free batch row ``slot``."""
        place_row(self._state, new, j, slot, len(row.prompt_ids))
        self.slots[slot] = row
        self._free_since.pop(slot, None)
        self._donors.pop(slot, None)

    def _select_rows(self, keep: Sequence[int]) -> None:
        """Keep only the batch rows ``keep`` and drop cache columns no remaining row uses."""
        self.slots = [self.slots[i] for i in keep]
        self._free_since, self._donors = {}, {}
        if not keep:
            self._state = None
            return
        select_rows(self._state, list(keep), preallocated=bool(self._mergeable))
