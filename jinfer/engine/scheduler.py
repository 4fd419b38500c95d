"""Decides what each engine step computes: one token for every running sequence (decode) and
prompt chunks (prefill) under a token budget. Touches host state only and returns plain data."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Optional

from jinfer.engine.block_manager import BlockManager
from jinfer.config import EngineConfig
from jinfer.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledSequence:
    """One row of a step: the K/V of `num_new_tokens` tokens of `seq` from position `start`.

    Attributes:
      start: None (the default) means the first position that no call computes yet:
        num_computed_tokens, plus the tokens a call in flight computes (`Sequence.num_in_flight`).
      samples: the row reaches the end of the sequence (counting tokens still being sampled on
        the device), so its last logits are sampled. Both are fixed when the row is made.
    """

    seq: Sequence
    num_new_tokens: int
    start: Optional[int] = None
    samples: bool = dataclasses.field(init=False)

    def __post_init__(self):
        seq = self.seq
        if self.start is None:
            self.start = seq.num_computed_tokens + seq.num_in_flight
        self.samples = (self.start + self.num_new_tokens
                        == seq.num_tokens + seq.num_samples_in_flight)


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

    Lookahead (the engine plans a step while the previous device call is in flight): each
    sequence is planned past its tokens in flight (`Sequence.num_in_flight`, and the samples
    `num_samples_in_flight` whose K/V the next step computes); a sequence whose samples in
    flight reach max_tokens or max_model_len gets nothing (it finishes on read-back). A
    sequence with tokens in flight is never preempted (its call still writes its blocks): when
    the pool is dry and only such sequences could give way, the sequence that needs blocks sits
    the step out, and nothing new is admitted that step.
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
        self._starved = False  # a sequence with tokens in flight found no blocks: admit nobody
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older sequence
                continue
            if self._finishes_in_flight(seq):
                continue
            start = seq.num_computed_tokens + seq.num_in_flight
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, start + num_new):
                (decode if num_new == 1 else prefill).append(ScheduledSequence(seq, num_new))
                self._scheduled.add(seq.seq_id)
                budget -= num_new
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and not self._starved):
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            (decode if item.num_new_tokens == 1 else prefill).append(item)
            self._scheduled.add(item.seq.seq_id)
            budget -= item.num_new_tokens
        return Schedule(SchedulerOutput(True, prefill), SchedulerOutput(False, decode),
                        self._block_copies)

    def _finishes_in_flight(self, seq: Sequence) -> bool:
        """Its samples in flight reach max_tokens or max_model_len: it finishes when they are
        read back, and has nothing more to compute."""
        ahead = seq.num_samples_in_flight
        return ahead > 0 and (seq.num_output_tokens + ahead >= seq.params.max_tokens
                              or seq.num_tokens + ahead >= self.config.max_model_len)

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
        is dry. False if `seq` itself had to give way, or has tokens in flight and nobody could
        give way (it sits this step out)."""
        while not self.block_manager.can_append_slots(seq, num_tokens):
            victim = self._pick_victim()
            if victim is None:
                self._starved = True
                return False
            self._preempt(victim)
            if victim is seq:
                return False
        self._block_copies += self.block_manager.append_slots(seq, num_tokens)
        return True

    def _pick_victim(self) -> Optional[Sequence]:
        """The most recently admitted sequence not yet in this step's batches and with no
        tokens in flight, passing over ones that just resumed while another could give way;
        None when there is none."""
        grace = self.config.preemption_grace_steps
        candidates = [s for s in self.running
                      if s.seq_id not in self._scheduled and not s.num_in_flight]
        if not candidates:
            return None
        for seq in reversed(candidates):
            if self.num_steps - seq.resumed_at_step > grace:
                return seq
        return candidates[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the blocks, go back to the front of the waiting queue."""
        logger.debug("preempting sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)
        assert not seq.num_in_flight, "a call in flight still writes this sequence's blocks"
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes a finished (or aborted) sequence and frees its blocks, also while a call in
        flight still computes some of its tokens: the engine discards that call's rows of it,
        and the device runs calls in dispatch order, so a later owner of a freed block
        rewrites it only after."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.num_in_flight = seq.num_samples_in_flight = 0
        self.block_manager.free(seq)
