"""KV slots and the prefixes they hold: the bookkeeping of a runner, without torch (the torch runner,
app/models/runner.py, and the torch-free one, app/lite/runner.py, share it)."""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol

from app.models.base import StepInput


class SlotPool:
    """Which of `num_slots` KV slots are free (a heap: the lowest free slot first)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("the KV cache needs at least one slot")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots))
        heapq.heapify(self._free)

    @staticmethod
    def slots_in_budget(budget_bytes: int | None, max_slots: int, per_slot: int, max_len: int) -> int:
        """Slots of `per_slot` bytes that fit in `budget_bytes` (all of `max_slots` when None), capped by
        `max_slots`."""
        if max_slots < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_slots}")
        if budget_bytes is None:
            return max_slots
        fit = int(budget_bytes) // per_slot
        if fit < 1:
            raise ValueError(
                f"KV cache budget of {budget_bytes} bytes is too small for one sequence of {max_len} tokens "
                f"({per_slot} bytes per sequence); raise the budget or lower max_model_len."
            )
        return min(fit, max_slots)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self._free)

    def can_allocate(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"no free KV cache slot (all {self.num_slots} in use)")
        return heapq.heappop(self._free)

    def free_slots(self) -> list[int]:
        return list(self._free)

    def take(self, slot: int) -> None:
        """Allocate this particular free slot (one whose cached prefix a new sequence reuses)."""
        if slot not in self._free:
            raise ValueError(f"KV slot {slot} is not free")
        self._free.remove(slot)
        heapq.heapify(self._free)

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"KV slot {slot} is not allocated")
        heapq.heappush(self._free, slot)


class SlotStore(Protocol):
    """A SlotPool whose slots hold keys and values that can be copied between slots."""

    num_slots: int

    @property
    def num_free_slots(self) -> int: ...
    @property
    def num_used_slots(self) -> int: ...
    def allocate(self) -> int: ...
    def free_slots(self) -> list[int]: ...
    def take(self, slot: int) -> None: ...
    def free(self, slot: int) -> None: ...
    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...


def _shared_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens `a` and `b[:limit]` have in common."""
    n = 0
    for x, y in zip(a, b[:limit]):
        if x != y:
            break
        n += 1
    return n


class PrefixSlots:
    """A runner's sequences -> KV slots, and the tokens each slot holds: slots are handed out on a sequence's
    first step and kept until `free`; a freed slot keeps its tokens' keys and values for `adopt` (prefix
    caching).  The runner calls `_slots_for` before its forward and `_record` after it succeeded."""

    COPY_MIN_TOKENS = 32  # a running sequence's prefix shorter than this is prefilled, not copied
    max_model_len: int  # set by the runner

    def __init__(self, kv: SlotStore) -> None:
        self.kv = kv
        num_slots = kv.num_slots
        self._slot_of: dict[int, int] = {}  # seq_id -> slot
        self._num_cached: dict[int, int] = {}  # seq_id -> tokens in its slot
        # slot -> the tokens whose keys and values it holds (positions 0..), kept after its sequence is
        # freed, so that a new sequence starting with the same tokens can continue from them (`adopt`)
        self._slot_tokens: list[list[int]] = [[] for _ in range(num_slots)]
        self._freed_at = [0] * num_slots  # slot -> when its last sequence was freed (a counter)
        self._frees = itertools.count(1)
        # False (EngineCore without prefix caching): new sequences take the lowest free slot, so resident KV
        # memory follows the busiest moment; True: a slot holding a cached prefix is overwritten last
        self.keep_prefixes = True

    # ------------------------------------------------------------ status

    @property
    def num_free_slots(self) -> int:
        return self.kv.num_free_slots

    @property
    def kv_usage(self) -> float:
        """Fraction of KV slots held by sequences (a slot reserves max_model_len tokens)."""
        return self.kv.num_used_slots / self.kv.num_slots

    @property
    def num_cached_tokens(self) -> int:
        return sum(self._num_cached.values())

    # ------------------------------------------------------------ protocol

    def free(self, seq_id: int) -> None:
        slot = self._slot_of.pop(seq_id, None)
        self._num_cached.pop(seq_id, None)
        if slot is not None:
            self.kv.free(slot)
            self._freed_at[slot] = next(self._frees)

    def _allocate(self) -> int:
        """A free slot for a sequence that reuses no prefix: with `keep_prefixes`, an empty one (lowest
        first), else the one freed longest ago (its cached prefix is the least likely to be asked for
        again); without, the lowest."""
        if not self.keep_prefixes:
            return self.kv.allocate()
        slot = min(self.kv.free_slots(), key=lambda s: (bool(self._slot_tokens[s]), self._freed_at[s], s),
                   default=None)
        if slot is None:
            return self.kv.allocate()  # raises: no free slot
        self.kv.take(slot)
        return slot

    def adopt(self, seq_id: int, prompt_ids: list[int]) -> int:
        """Start a new sequence from the longest prefix of its prompt that a KV slot already holds.

        Returns how many prompt tokens it starts with (0: none; the sequence then gets a slot on its first
        step, as usual). A free slot holding the prefix is taken as it is. A prefix held by a busy slot
        (another running sequence: a shared system prompt, say) is copied into the lowest free slot when it
        is at least COPY_MIN_TOKENS long and longer than any free slot's: copying keys and values costs far
        less than computing them. At most all but the last prompt token are reused: the last one must be
        fed to get the logits of the first sampled token. Keys and values depend only on the tokens before
        them, so the reused positions are what a fresh prefill would compute (up to float rounding: a
        prefill split at another point, as chunked prefill does too)."""
        if seq_id in self._slot_of:
            raise RuntimeError(f"sequence {seq_id} already has a KV slot")
        free = set(self.kv.free_slots())
        if not free:
            return 0
        limit = len(prompt_ids) - 1
        best = {True: (-1, 0), False: (-1, 0)}  # free?: (slot, shared tokens)
        for slot, cached in enumerate(self._slot_tokens):
            n = _shared_prefix(cached, prompt_ids, limit)
            if n > best[slot in free][1]:
                best[slot in free] = (slot, n)
        (slot, n), (busy, busy_n) = best[True], best[False]
        if busy_n >= self.COPY_MIN_TOKENS and busy_n > n:
            slot, n = self._allocate(), busy_n
            try:
                self.kv.copy_prefix(busy, slot, n)
            except BaseException:
                self._slot_tokens[slot].clear()  # its keys and values may be half-copied
                self.kv.free(slot)
                raise
            self._slot_tokens[slot] = self._slot_tokens[busy][:n]
        elif n > 0:
            self.kv.take(slot)
            del self._slot_tokens[slot][n:]
        else:
            return 0
        self._slot_of[seq_id] = slot
        self._num_cached[seq_id] = n
        return n

    def _slots_for(self, inputs: list[StepInput]) -> list[int]:
        """Check every input against the cache state; allocate slots of new sequences."""
        seen: set[int] = set()
        slots, new = [], []
        try:
            for inp in inputs:
                n, start = len(inp.token_ids), inp.start_pos
                if inp.seq_id in seen:
                    raise ValueError(f"sequence {inp.seq_id} appears twice in one step")
                seen.add(inp.seq_id)
                if n == 0:
                    raise ValueError(f"sequence {inp.seq_id} was fed no tokens")
                if start + n > self.max_model_len:
                    raise ValueError(f"sequence {inp.seq_id} would reach {start + n} tokens, "
                                     f"more than max_model_len={self.max_model_len}")
                slot = self._slot_of.get(inp.seq_id)
                if slot is None:
                    if start != 0:
                        raise RuntimeError(f"KV cache of sequence {inp.seq_id} is out of step "
                                           f"(new, start_pos={start})")
                    slot = self._allocate()
                    self._slot_tokens[slot].clear()  # its old prefix is overwritten from position 0
                    self._slot_of[inp.seq_id] = slot
                    self._num_cached[inp.seq_id] = 0
                    new.append(inp.seq_id)
                elif self._num_cached[inp.seq_id] != start:
                    raise RuntimeError(f"KV cache of sequence {inp.seq_id} is out of step "
                                       f"({self._num_cached[inp.seq_id]} cached, start_pos={start})")
                slots.append(slot)
        except BaseException:
            for seq_id in new:
                self.free(seq_id)
            raise
        return slots

    def _record(self, inputs: list[StepInput], slots: list[int]) -> None:
        # called only after the forward succeeded: a failed step's half-written positions are never claimed
        for inp, slot in zip(inputs, slots):
            self._num_cached[inp.seq_id] = inp.start_pos + len(inp.token_ids)
            self._slot_tokens[slot].extend(inp.token_ids)
