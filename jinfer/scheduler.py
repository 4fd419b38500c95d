"""Decides what each engine step computes: a batch of prompt chunks (prefill) or one token for
every running sequence (decode). Touches host state only and returns plain data."""

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
    is_prefill: bool
    scheduled: list[ScheduledSequence]

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FIFO admission, chunked prefill under a token budget, preemption by recompute."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(is_prefill=True, scheduled=prefill)
        return self._schedule_decode()

    def _schedule_prefill(self) -> list[ScheduledSequence]:
        budget = self.config.max_num_batched_tokens
        scheduled = []
        for seq in [s for s in self.running if s.in_prefill]:  # unfinished chunked prompts first
            if budget == 0 or seq not in self.running:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + num_new):
                scheduled.append(ScheduledSequence(seq, num_new))
                budget -= num_new
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            item = self._try_chunk(self.waiting[0], budget)
            if item is None:
                break
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(item)
            budget -= item.num_new_tokens
        return scheduled

    def _try_chunk(self, seq: Sequence, budget: int):
        """Allocates blocks for the next prompt chunk of `seq`, or returns None if they lack."""
        num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
        end = seq.num_computed_tokens + num_new
        if not self.block_manager.can_allocate(seq, end):
            return None
        self.block_manager.allocate(seq, end)
        return ScheduledSequence(seq, num_new)

    def _schedule_decode(self) -> SchedulerOutput:
        scheduled = []
        for seq in list(self.running):
            if seq in self.running and not seq.in_prefill and self._reserve(seq, seq.num_tokens):
                scheduled.append(ScheduledSequence(seq, 1))
        return SchedulerOutput(is_prefill=False, scheduled=scheduled)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Allocates blocks for `seq` to hold `num_tokens`, preempting newer running sequences
        (last admitted first) when the pool is dry. False if `seq` itself had to give way."""
        while not self.block_manager.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: drop the blocks, go back to the front of the waiting queue."""
        logger.debug("preempting sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
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
