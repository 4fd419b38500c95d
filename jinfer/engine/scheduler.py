"""Decides what each device call computes, and every block that takes: one token for every
running sequence (decode) and prompt chunks (prefill) under a token budget, admission (with one
prefix-cache lookup), copy-on-write copies, preemption, and how many decode steps a call runs
with their slots reserved. Touches host state only and returns a plain `Schedule`."""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Optional

from jinfer.config import EngineConfig
from jinfer.engine.block_manager import BlockManager, PrefixMatch
from jinfer.engine.sequence import Sequence, SequenceStatus
from jinfer.engine.stopping import StopChecker
from jinfer.runner.buckets import decode_steps_bucket

logger = logging.getLogger(__name__)

NO_MATCH = PrefixMatch((), (), 0)  # no prefix-cache hit


@dataclasses.dataclass
class ScheduledSequence:
    """One row of a call: the K/V of `num_new_tokens` tokens of `seq` from position `start`.

    Attributes:
      start: None (the default) means the first position that no call computes yet:
        num_computed_tokens, plus the tokens a call in flight computes (`Sequence.num_in_flight`).
      samples: the row reaches the end of the sequence (counting tokens still being sampled on
        the device), so its last logits are sampled.
      sample_step: output tokens before the one it samples (on the host or in flight): the
        sampler's step, which keys the row's draw and lifts min_tokens bans.
    All three are fixed when the row is made.
    """

    seq: Sequence
    num_new_tokens: int
    start: Optional[int] = None
    samples: bool = dataclasses.field(init=False)
    sample_step: int = dataclasses.field(init=False)

    def __post_init__(self):
        seq = self.seq
        if self.start is None:
            self.start = seq.num_computed_tokens + seq.num_in_flight
        self.samples = (self.start + self.num_new_tokens
                        == seq.num_tokens + seq.num_samples_in_flight)
        self.sample_step = seq.num_output_tokens + seq.num_samples_in_flight


@dataclasses.dataclass
class Schedule:
    """What one engine step computes: every running decode advances while prompt chunks use the
    rest of the token budget, so a long prompt never stalls the decodes.

    Attributes:
      prefill: prompt chunks (the rest of a prompt, or of a preempted sequence, in pieces).
      decode: rows of exactly one new token, in the order they were scheduled.
      num_decode_steps: decode steps the device call runs back to back (multi-step); above 1
        only when `prefill` is empty, with every step's slots reserved.
      block_copies: (src, dst) copy-on-write copies the device makes before the call.
    """

    prefill: list[ScheduledSequence]
    decode: list[ScheduledSequence]
    num_decode_steps: int
    block_copies: list[tuple[int, int]]


class Scheduler:
    """Continuous batching: running sequences first (decodes, unfinished prompt chunks), then
    FIFO admission under a token budget per step; preemption by recompute when the pool is dry.

    Fairness: a preempted sequence goes back to the front of the queue, so it resumes before
    newer requests; and a sequence that just resumed is not chosen as a victim again while a
    sequence that has not just resumed could give way instead.

    Lookahead (the engine plans a call while the previous one is in flight): the tokens of a
    schedule count as in flight from the moment it is made (the engine dispatches every
    schedule), and each sequence is planned past them (`Sequence.num_in_flight`, and the
    samples `num_samples_in_flight` whose K/V the next call computes); a sequence whose samples
    in flight finish it (StopChecker, by length) gets nothing. A sequence with tokens in flight
    is never preempted (its call still writes its blocks): when the pool is dry and only such
    sequences could give way, the sequence that needs blocks sits the step out, and nothing new
    is admitted that step.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 stop_checker: StopChecker,
                 any_step_count: Callable[[int], bool] = lambda num_rows: False):
        self.config = config
        # Whether a multi-step call of n decode rows may run any number of steps up to
        # num_scheduler_steps (the runner's "while" loop), or only that number and 1.
        self.any_step_count = any_step_count
        self.block_manager = block_manager
        self.stop_checker = stop_checker
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- planning a call ---------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """The next call's rows, blocks and copies; its tokens count as in flight from now on."""
        self.num_steps += 1
        self._block_copies: list[tuple[int, int]] = []
        self._scheduled: set[int] = set()  # seq ids in this step's batches: never victims
        self._starved = False  # a sequence with tokens in flight found no blocks: admit nobody
        budget = self.config.max_num_batched_tokens
        items = self._schedule_running(budget)
        items += self._schedule_waiting(budget - sum(item.num_new_tokens for item in items))
        decode = [item for item in items if item.num_new_tokens == 1]
        prefill = [item for item in items if item.num_new_tokens != 1]
        num_steps = self._num_decode_steps(decode, prefill)
        if num_steps > 1:
            self._reserve_decode_steps(decode, num_steps)
        schedule = Schedule(prefill, decode, num_steps, self._block_copies)
        self._mark_in_flight(schedule)
        return schedule

    def _schedule_running(self, budget: int) -> list[ScheduledSequence]:
        """One row per running sequence, oldest first, while the budget lasts: its next token
        (decode) or its next prompt chunk, with blocks for it."""
        items = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted to make room for an older sequence
                continue
            ahead = seq.num_samples_in_flight
            if ahead and self.stop_checker.check(seq, ahead) is not None:
                continue  # finishes when its samples are read back: nothing more to compute
            start = seq.num_computed_tokens + seq.num_in_flight
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, start + num_new):
                items.append(ScheduledSequence(seq, num_new))
                self._scheduled.add(seq.seq_id)
                budget -= num_new
        return items

    def _schedule_waiting(self, budget: int) -> list[ScheduledSequence]:
        """Admits waiting sequences in order while the budget, the seats (max_num_seqs) and the
        pool allow."""
        items = []
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and not self._starved):
            item = self._admit(self.waiting[0], budget)
            if item is None:
                break
            items.append(item)
            self._scheduled.add(item.seq.seq_id)
            budget -= item.num_new_tokens
        return items

    def _admit(self, seq: Sequence, budget: int) -> Optional[ScheduledSequence]:
        """Moves the head of the queue to running with blocks for its first chunk, or None.

        Leading full blocks found in the prefix cache are shared, not recomputed: they cost
        neither budget nor fresh blocks. The prefix is looked up (hashed) once, for the check
        and the commit both. A sequence that still needs its prompt logprobs computes every
        position (its blocks still join the cache for others).
        """
        match = (NO_MATCH if seq.needs_prompt_logprobs
                 else self.block_manager.match_prefix(seq))
        num_tokens = match.num_tokens + min(seq.num_tokens - match.num_tokens, budget)
        if not self.block_manager.can_allocate_prompt(match, num_tokens):
            return None
        self.block_manager.allocate_prompt(seq, match, num_tokens)
        self.waiting.popleft()
        self.running.append(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.num_preemptions:
            seq.resumed_at_step = self.num_steps
        return ScheduledSequence(seq, num_tokens - match.num_tokens)

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

    # -- multi-step calls --------------------------------------------------------------------
    def _num_decode_steps(self, decode: list[ScheduledSequence],
                          prefill: list[ScheduledSequence]) -> int:
        """How many decode steps the call may run back to back (multi-step scheduling): only
        decodes run, no waiting sequence could be admitted (`_admission_possible`), and every
        row samples a token of a sequence that has sampled before (a prompt's last token is not
        one: n > 1 siblings fork after it); penalties and min_tokens bans need no host between
        tokens (the call appends each step's samples to the rows' output tokens and lifts the
        bans at min_tokens, on the device). Then the steps the longest row still wants past its
        samples in flight, as `decode_steps_bucket` rounds them (num_scheduler_steps or 1; any
        count up to it where `any_step_count` says the runner's program takes one), fewer
        until every row fits in max_model_len and the pool has the slots, with no shared block
        in the write range (`_decode_steps_fit`). Else 1."""
        limit = self.config.num_scheduler_steps
        if limit == 1 or prefill or not decode or self._admission_possible():
            return 1
        wanted, any_count = 1, self.any_step_count(len(decode))
        for item in decode:
            seq = item.seq
            generated = seq.num_output_tokens + seq.num_samples_in_flight
            if not generated or not item.samples:
                return 1
            wanted = max(wanted, seq.params.max_tokens - generated)
        num_steps = decode_steps_bucket(wanted, limit, any_count)
        while num_steps > 1 and not self._decode_steps_fit(decode, num_steps):
            num_steps = decode_steps_bucket(num_steps - 1, limit, any_count)
        return num_steps

    def _admission_possible(self) -> bool:
        """A waiting sequence could join the batch now (a free seat under max_num_seqs): then
        the next call should come back to schedule rather than run decodes ahead. With every
        seat taken, waiting sequences wait for a finish either way (at most one more call)."""
        return bool(self.waiting) and len(self.running) < self.config.max_num_seqs

    def _decode_steps_fit(self, decode: list[ScheduledSequence], num_steps: int) -> bool:
        """Every row can take num_steps more tokens: within max_model_len, with free blocks for
        them and no shared block to copy on write."""
        ends = [item.start + num_steps for item in decode]
        if max(ends) > self.config.max_model_len:
            return False
        manager = self.block_manager
        if any(manager.shares_write_range(item.seq, end) for item, end in zip(decode, ends)):
            return False
        new_blocks = sum(manager.num_new_blocks(item.seq, end) for item, end in zip(decode, ends))
        return new_blocks <= manager.num_free_blocks

    def _reserve_decode_steps(self, decode: list[ScheduledSequence], num_steps: int) -> None:
        """The slots of `num_steps` tokens per row (`_decode_steps_fit` made sure they fit)."""
        for item in decode:
            copies = self.block_manager.append_slots(item.seq, item.start + num_steps)
            assert not copies, "shared blocks in the write range are excluded beforehand"

    # -- tokens in flight --------------------------------------------------------------------
    def _mark_in_flight(self, schedule: Schedule) -> None:
        """Counts the schedule's positions and samples as in flight, and registers the full
        blocks it computes whose tokens are on the host in the prefix cache (a later call that
        shares them runs after this one)."""
        for item in schedule.decode + schedule.prefill:
            seq = item.seq
            if schedule.num_decode_steps == 1:
                seq.num_in_flight += item.num_new_tokens
                seq.num_samples_in_flight += int(item.samples)
            else:
                seq.num_in_flight += schedule.num_decode_steps
                seq.num_samples_in_flight += schedule.num_decode_steps
            known = min(seq.num_computed_tokens + seq.num_in_flight, seq.num_tokens)
            self.block_manager.mark_computed(seq, known)

    def mark_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """A call's row of `seq` was read back: its `num_new_tokens` positions are computed (no
        longer in flight), their full blocks join the prefix cache, and blocks that fell out of
        a sliding window are released (no call in flight reads before the window of its
        first position, num_computed_tokens). (Its sample, if any, is the caller's to append.)"""
        seq.num_computed_tokens += num_new_tokens
        seq.num_in_flight -= num_new_tokens
        self.block_manager.mark_computed(seq)
        self.block_manager.release_outside_window(seq)

    # -- preemption, forks, finishes ---------------------------------------------------------
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

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """Parallel sampling (n > 1): once `parent` has prefilled the prompt, each child shares
        every prompt block and joins the running batch. It recomputes only the last prompt
        token (for logits of its own), which copy-on-write lands in a private copy of the last
        block."""
        for child in children:
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = child.num_prompt_tokens - 1
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

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
