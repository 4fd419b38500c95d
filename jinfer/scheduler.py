"""Decides what each engine step computes: one token for every running sequence (decode) and
prompt chunks (prefill) under a token budget. Touches host state only and returns plain data."""

from __future__ import annotations

import collections
import dataclasses
import logging

from jinfer.block_manager import BlockManager
from jinfer.config import EngineConfig
from jinfer.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes, starting at num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    """One device batch: prompt chunks (prefill) or rows of exactly one new token (decode)."""

    is_prefill: bool
    scheduled: list[ScheduledSequence]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclasses.dataclass
class Schedule:
    """What one engine step computes: every running decode advances one token while prompt
    chunks use the rest of the token budget, so a long prompt never stalls the decodes."""

    prefill: SchedulerOutput
    decode: SchedulerOutput
    block_copies: list[tuple[int, int]]  # (src, dst): copy-on-write, done on device first

    @property
    def is_empty(self) -> bool:
        return self.prefill.is_empty and self.decode.is_empty


class Scheduler:
    """Continuous batching: running sequences first (decodes, unfinished prompt chunks), then
    FIFO admission under a token budget per step; preemption by recompute when the pool is dry.

    Fairness: a preempted sequence goes back to the front of the queue, so it resumes before
    newer requests; and a sequence that just resumed is not chosen as a victim again while a
    sequence that has not just resumed could give way instead.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Schedule:
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        prefill, decode = [], []
        self._block_copies: list[tuple[int, int]] = []
        self._scheduled: set[int] = set()  # seq ids in this step's batches: never victims
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older sequence
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + num_new):
                (decode if num_new == 1 else prefill).append(ScheduledSequence(seq, num_new))
                self._scheduled.add(seq.seq_id)
                budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            (decode if item.num_new_tokens == 1 else prefill).append(item)
            self._scheduled.add(item.seq.seq_id)
            budget -= item.num_new_tokens
        return Schedule(SchedulerOutput(True, prefill), SchedulerOutput(False, decode),
                        self._block_copies)

    def _admit(self, seq: Sequence, budget: int):
        """Moves the head of the queue to running with blocks for its first chunk, or None.

        Leading full blocks found in the prefix cache are shared, not recomputed: they cost
        neither budget nor fresh blocks.
        """
        _, num_cached = self.block_manager.get_computed_blocks(seq)
        num_new = min(seq.num_tokens - num_cached, budget)
        if not self.block_manager.can_allocate_prompt(seq, num_cached + num_new):
            return None
        self.block_manager.allocate_prompt(seq, num_cached + num_new)
        self.waiting.popleft()
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.num_preemptions:
            seq.resumed_at_step = self.num_steps
        return ScheduledSequence(seq, num_new)

    def add_running(self, seq: Sequence) -> None:
        """Joins a sequence that already holds its blocks (a fork) straight to the batch."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes `seq`'s blocks cover `num_tokens` and gives it private copies of shared blocks
        it is about to write (copy-on-write), preempting other running sequences when the pool
        is dry. False if `seq` itself had to give way."""
        while not self.block_manager.can_append_slots(seq, num_tokens):
            victim = self._pick_victim()
            self._preempt(victim)
            if victim is seq:
                return False
        self._block_copies += self.block_manager.append_slots(seq, num_tokens)
        return True

    def _pick_victim(self) -> Sequence:
        """The most recently admitted sequence not yet in this step's batches, passing over
        ones that just resumed while another could give way."""
        grace = self.config.preemption_grace_steps
        candidates = [s for s in self.running if s.seq_id not in self._scheduled]
        for seq in reversed(candidates):
            if self.num_steps - seq.resumed_at_step > grace:
                return seq
        return candidates[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the blocks, go back to the front of the waiting queue."""
        logger.debug("preempting sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes a finished (or aborted) sequence and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)
