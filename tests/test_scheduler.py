"""Scheduler policy with no model and no device: budgets, chunking, decode progress, fairness,
admission with one prefix lookup, planning past tokens in flight, multi-step calls with their
slots reserved, and blocks released outside a sliding window at read back."""

from __future__ import annotations

from jinfer.api.sampling_params import SamplingParams
from jinfer.config import EngineConfig
from jinfer.engine.block_manager import BlockManager
from jinfer.engine.scheduler import Schedule, ScheduledSequence, Scheduler
from jinfer.engine.sequence import Sequence
from jinfer.engine.stopping import StopChecker
from jinfer.model.kv_cache import PAD_BLOCK


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 16,
             outputs: tuple[int, ...] = (), first_token: int = 0) -> Sequence:
    """A prompt of `prompt_len` consecutive ids from `first_token` (default: 1000 * seq_id + 1,
    so that sequences share no prefix unless a test asks them to)."""
    first = first_token or 1000 * seq_id + 1
    seq = Sequence(seq_id, str(seq_id), 0, list(range(first, first + prompt_len)),
                   SamplingParams(max_tokens=max_tokens), seed=0, detokenizer=None)
    seq.output_token_ids = list(outputs)
    return seq


def make_scheduler(num_blocks: int, sliding_window=None, any_step_count=False,
                   **config) -> Scheduler:
    """A scheduler over a pool of `num_blocks` blocks of 4 tokens (block 0 is padding), for a
    runner whose multi-step calls take num_scheduler_steps or 1 steps (or `any_step_count`)."""
    config = EngineConfig(**{"block_size": 4, "max_model_len": 64, **config})
    return Scheduler(config, BlockManager(num_blocks, 4, sliding_window=sliding_window),
                     StopChecker(eos_token_ids=(), max_model_len=config.max_model_len),
                     lambda num_rows: any_step_count)


def rows(schedule: Schedule) -> list[ScheduledSequence]:
    return schedule.decode + schedule.prefill


def read_back(scheduler: Scheduler, schedule: Schedule) -> None:
    """Folds a dispatched schedule into its sequences, as the engine's read-back does: the
    positions are computed, and every sample is token 7."""
    for item in rows(schedule):
        seq = item.seq
        if schedule.num_decode_steps > 1:
            for _ in range(schedule.num_decode_steps):
                scheduler.mark_computed(seq, 1)
                seq.num_samples_in_flight -= 1
                seq.output_token_ids.append(7)
            continue
        scheduler.mark_computed(seq, item.num_new_tokens)
        if item.samples:
            seq.num_samples_in_flight -= 1
            seq.output_token_ids.append(7)


def run_step(scheduler: Scheduler) -> dict[int, int]:
    """Schedules and reads back one step. Returns {seq_id: new tokens computed}."""
    schedule = scheduler.schedule()
    read_back(scheduler, schedule)
    return {item.seq.seq_id: item.num_new_tokens for item in rows(schedule)}


# -- budgets, chunks, fairness (one step per call) ------------------------------------------------
def test_long_prompt_does_not_stall_decodes():
    scheduler = make_scheduler(200, max_num_batched_tokens=16, max_model_len=256)
    short = make_seq(0, 5)
    scheduler.add(short)
    run_step(scheduler)  # short prompt prefilled, first token sampled
    long = make_seq(1, 100)
    scheduler.add(long)
    for _ in range(6):
        computed = run_step(scheduler)
        assert computed[0] == 1, "the running sequence must decode every step"
        assert sum(computed.values()) <= 16
        assert computed[1] == 15  # the rest of the budget goes to the long prompt's chunk
    assert long.num_computed_tokens == 90


def test_max_num_seqs_and_budget():
    scheduler = make_scheduler(200, max_num_batched_tokens=32, max_num_seqs=3)
    for i in range(5):
        scheduler.add(make_seq(i, 8))
    computed = run_step(scheduler)
    assert sorted(computed) == [0, 1, 2] and len(scheduler.running) == 3


def test_preempted_sequence_resumes_first_and_is_not_thrashed():
    scheduler = make_scheduler(1 + 12, max_num_batched_tokens=64, preemption_grace_steps=4,
                               num_scheduler_steps=1)  # 12 usable blocks: 48 tokens
    seqs = [make_seq(i, 14) for i in range(3)]  # 4 blocks each once they pass 16 tokens
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)
    newcomer = make_seq(3, 4)
    scheduler.add(newcomer)
    preempted_at = None
    for step in range(40):
        run_step(scheduler)
        if scheduler.num_preemptions and preempted_at is None:
            preempted_at = step
            victim = scheduler.waiting[0]
            assert victim in seqs, "the preempted sequence goes to the front of the queue"
        if preempted_at is not None and victim in scheduler.running:
            break
    assert victim.num_preemptions == 1
    assert newcomer not in scheduler.running or victim in scheduler.running
    resumed_step = scheduler.num_steps
    for _ in range(scheduler.config.preemption_grace_steps):
        run_step(scheduler)
        others = [s for s in scheduler.running if s is not victim]
        if others:  # while others could give way, the resumed sequence keeps running
            assert victim in scheduler.running or victim.is_finished
    assert scheduler.num_steps - resumed_step == scheduler.config.preemption_grace_steps


def test_victim_skips_a_just_resumed_sequence():
    scheduler = make_scheduler(100, preemption_grace_steps=3)
    older, resumed = make_seq(0, 4), make_seq(1, 4)
    scheduler.running = [older, resumed]
    scheduler.num_steps = 10
    scheduler._scheduled = set()
    resumed.resumed_at_step = 9  # resumed last step: the older one gives way instead
    assert scheduler._pick_victim() is older
    resumed.resumed_at_step = 5  # grace over: the newest gives way again
    assert scheduler._pick_victim() is resumed
    older.resumed_at_step = resumed.resumed_at_step = 9  # nobody else could: newest still
    assert scheduler._pick_victim() is resumed


# -- admission ------------------------------------------------------------------------------------
def test_admission_looks_the_prefix_up_once(monkeypatch):
    """Each admission attempt, taken or refused, hashes the prompt's prefix once; the shared
    blocks cost neither budget nor fresh blocks."""
    scheduler = make_scheduler(1 + 6, max_num_batched_tokens=64)  # 6 usable blocks
    bm = scheduler.block_manager
    first = make_seq(0, 9)
    scheduler.add(first)
    read_back(scheduler, scheduler.schedule())  # 3 blocks; the 2 full ones are cached
    lookups = []
    match_prefix = bm.match_prefix
    monkeypatch.setattr(bm, "match_prefix", lambda seq: lookups.append(seq) or match_prefix(seq))
    hit = make_seq(1, 10, first_token=1)  # shares [1..8]: 2 cached blocks, 2 tokens to compute
    too_long = make_seq(2, 30)  # needs 8 blocks: refused, and stays first in the queue
    scheduler.add(hit)
    scheduler.add(too_long)
    schedule = scheduler.schedule()
    assert lookups == [hit, too_long]
    assert [(i.seq, i.start, i.num_new_tokens) for i in schedule.prefill] == [(hit, 8, 2)]
    assert hit.block_table[:2] == first.block_table[:2]
    assert list(scheduler.waiting) == [too_long]


# -- planning past tokens in flight (lookahead) ---------------------------------------------------
def test_schedule_counts_its_tokens_in_flight():
    scheduler = make_scheduler(100, max_num_batched_tokens=8, num_scheduler_steps=1)
    seq = make_seq(0, 12, max_tokens=3)
    scheduler.add(seq)
    first = scheduler.schedule()  # prompt chunk [0, 8)
    second = scheduler.schedule()  # planned before the first is read back: [8, 12), samples
    assert [(i.start, i.num_new_tokens, i.samples) for i in rows(first) + rows(second)] == [
        (0, 8, False), (8, 4, True)]
    third = scheduler.schedule()  # the decode of the token the second call samples
    assert [(i.start, i.num_new_tokens, i.samples, i.sample_step) for i in rows(third)] == [
        (12, 1, True, 1)]
    read_back(scheduler, first)
    assert (seq.num_computed_tokens, seq.num_in_flight, seq.num_samples_in_flight) == (8, 5, 2)
    fourth = scheduler.schedule()  # the third token is the last max_tokens allows
    assert [(i.start, i.num_new_tokens, i.sample_step) for i in rows(fourth)] == [(13, 1, 2)]
    assert rows(scheduler.schedule()) == []  # three samples in flight reach max_tokens
    for schedule in (second, third, fourth):
        read_back(scheduler, schedule)
    assert (seq.num_computed_tokens, seq.num_in_flight, seq.num_samples_in_flight) == (14, 0, 0)
    assert seq.output_token_ids == [7, 7, 7]


def test_never_preempts_sequences_with_tokens_in_flight():
    """A dry pool: the sequence that needs a block sits the step out rather than preempt one
    whose call is still writing its blocks, and nothing new is admitted meanwhile; once the
    calls are read back, preemption works as usual."""
    scheduler = make_scheduler(1 + 4, max_num_batched_tokens=64)  # 4 usable blocks
    a, b = make_seq(0, 7), make_seq(1, 7)
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()  # both prompts: 2 blocks each, the pool is full
    assert [i.seq for i in rows(first)] == [a, b]
    scheduler.add(make_seq(2, 3))
    second = scheduler.schedule()  # decodes at position 7 fit in the second blocks
    assert [i.seq for i in rows(second)] == [a, b] and second.num_decode_steps == 1
    third = scheduler.schedule()  # position 8 needs a third block: nobody may give way
    assert rows(third) == [] and scheduler.num_preemptions == 0 and len(scheduler.waiting) == 1
    read_back(scheduler, first)
    read_back(scheduler, second)
    fourth = scheduler.schedule()  # nothing in flight: b gives way to a, as usual
    assert [i.seq for i in rows(fourth)] == [a] and scheduler.num_preemptions == 1
    assert b in scheduler.waiting


# -- multi-step calls -----------------------------------------------------------------------------
def decoding(scheduler: Scheduler, *seqs: Sequence) -> None:
    """Admits `seqs` and reads their prompts back: each has one output token, and decodes."""
    for seq in seqs:
        scheduler.add(seq)
    schedule = scheduler.schedule()
    assert not schedule.decode and len(schedule.prefill) == len(seqs)
    read_back(scheduler, schedule)


def test_decode_only_calls_run_several_steps_with_their_slots_reserved():
    scheduler = make_scheduler(100, num_scheduler_steps=8)
    a, b = make_seq(0, 5, max_tokens=30), make_seq(1, 3, max_tokens=6)
    decoding(scheduler, a, b)
    schedule = scheduler.schedule()
    assert schedule.num_decode_steps == 8 and not schedule.prefill  # a wants 29 more
    assert [(i.start, i.sample_step) for i in schedule.decode] == [(5, 1), (3, 1)]
    assert len(a.block_table) == 4 and len(b.block_table) == 3  # slots up to 13 and 11
    assert (a.num_in_flight, a.num_samples_in_flight) == (8, 8)
    read_back(scheduler, schedule)
    assert len(b.output_token_ids) == 9  # computed past max_tokens: the engine discards those


def test_steps_follow_the_longest_row_and_max_model_len():
    """num_scheduler_steps where every row can take them, else one step (a tail of 3 tokens
    runs as 3 one-step calls: decode_steps_bucket)."""
    scheduler = make_scheduler(100, num_scheduler_steps=8, max_model_len=40)
    decoding(scheduler, make_seq(0, 5, max_tokens=4))  # 3 more tokens wanted: one step
    assert scheduler.schedule().num_decode_steps == 1
    scheduler = make_scheduler(100, num_scheduler_steps=8, max_model_len=40)
    decoding(scheduler, make_seq(0, 5, max_tokens=4), make_seq(1, 5, max_tokens=20))
    assert scheduler.schedule().num_decode_steps == 8  # the longest row wants 19
    scheduler = make_scheduler(100, num_scheduler_steps=8, max_model_len=12)
    b = make_seq(0, 7, max_tokens=30)  # 8 steps from position 7 pass max_model_len 12
    decoding(scheduler, b)
    assert scheduler.schedule().num_decode_steps == 1


def test_a_runner_of_any_step_count_gets_the_steps_wanted():
    """Where one program runs any count (the CPU's "while" loop), a tail of 3 tokens runs as
    one call of 3 steps, and max_model_len cuts the count to what fits rather than to 1."""
    scheduler = make_scheduler(100, any_step_count=True, num_scheduler_steps=8)
    decoding(scheduler, make_seq(0, 5, max_tokens=4))
    assert scheduler.schedule().num_decode_steps == 3
    scheduler = make_scheduler(100, any_step_count=True, num_scheduler_steps=8,
                               max_model_len=12)
    decoding(scheduler, make_seq(0, 7, max_tokens=30))
    schedule = scheduler.schedule()
    assert schedule.decode[0].start + schedule.num_decode_steps == 12


def test_one_step_until_the_pool_has_the_slots_of_all():
    scheduler = make_scheduler(1 + 4, num_scheduler_steps=8)  # 4 usable blocks
    a = make_seq(0, 7, max_tokens=30)
    decoding(scheduler, a)  # 2 blocks; 8 steps from 7 need 4, one step 2
    scheduler.block_manager.allocate(make_seq(9, 1), 1)  # one block left
    schedule = scheduler.schedule()
    assert schedule.num_decode_steps == 1 and len(a.block_table) == 2


def test_one_step_while_a_waiting_sequence_could_join():
    scheduler = make_scheduler(1 + 4, num_scheduler_steps=8, max_num_seqs=2)
    a = make_seq(0, 7, max_tokens=30)
    decoding(scheduler, a)
    scheduler.add(make_seq(1, 30))  # does not fit the pool, but a seat is free: one step
    assert scheduler.schedule().num_decode_steps == 1
    full = make_scheduler(100, num_scheduler_steps=8, max_num_seqs=2)
    decoding(full, make_seq(0, 5, max_tokens=30), make_seq(1, 5, max_tokens=30))
    full.add(make_seq(2, 5))  # every seat taken: it waits for a finish either way
    assert full.schedule().num_decode_steps == 8


def test_one_step_for_rows_that_have_not_sampled_or_do_not_sample():
    # A one-token prompt's first row is a decode, but n > 1 siblings fork after its sample.
    scheduler = make_scheduler(100, num_scheduler_steps=8)
    scheduler.add(make_seq(0, 1, max_tokens=30))
    schedule = scheduler.schedule()
    assert len(schedule.decode) == 1 and schedule.num_decode_steps == 1
    # A one-token chunk of a preempted sequence (the budget's last token) samples nothing.
    scheduler = make_scheduler(100, num_scheduler_steps=8, max_num_batched_tokens=2)
    a = make_seq(0, 2, max_tokens=30)
    resumed = make_seq(1, 5, max_tokens=30, outputs=(7,))
    decoding(scheduler, a)
    scheduler.add(resumed)
    schedule = scheduler.schedule()  # a's decode and a 1-token chunk of `resumed`
    assert [(i.seq, i.samples) for i in schedule.decode] == [(a, True), (resumed, False)]
    assert schedule.num_decode_steps == 1


def test_no_shared_block_in_the_write_range():
    """A sequence holding a block shared with another past its next block (copy-on-write
    pending) runs only as many steps as stay clear of it; the block it writes next is copied
    first (block_copies)."""
    scheduler = make_scheduler(100, num_scheduler_steps=4)
    bm = scheduler.block_manager
    parent = make_seq(0, 5, max_tokens=30, outputs=(7,))
    bm.allocate(parent, 12)  # blocks for positions 0..11
    parent.num_computed_tokens = 5
    child = make_seq(1, 5, max_tokens=30, outputs=(7,), first_token=1)
    scheduler.fork(parent, [child])  # shares all 3 blocks
    child.num_computed_tokens = 5  # as if it had recomputed position 4 already
    shared = list(parent.block_table)
    schedule = scheduler.schedule()
    assert [i.seq for i in schedule.decode] == [child]
    assert schedule.block_copies == [(shared[1], child.block_table[1])]  # position 5's block
    assert child.block_table[2] == shared[2]  # positions 8..11: still shared
    assert schedule.num_decode_steps == 1  # 4 steps would write position 8


# -- sliding window -------------------------------------------------------------------------------
def test_window_blocks_are_released_at_read_back_not_while_a_call_reads_them():
    """W = 8, blocks of 4. A call planned past one in flight (lookahead) still reads from its
    first position - 7 on; blocks go only when their positions are read back, and a decoding
    sequence then holds at most W / 4 + 2 blocks."""
    scheduler = make_scheduler(100, sliding_window=8, num_scheduler_steps=4)
    seq = make_seq(0, 14, max_tokens=40)
    scheduler.add(seq)
    first = scheduler.schedule()  # the prompt [0, 14): its first query reads from 0
    second = scheduler.schedule()  # decodes 14..17, past the first call: reads from 7
    assert [(i.start, second.num_decode_steps) for i in rows(second)] == [(14, 4)]
    assert PAD_BLOCK not in seq.block_table
    read_back(scheduler, first)  # 14 computed: block 0 (0..3) goes, block 1 (4..7) is read
    assert seq.block_table[0] == PAD_BLOCK and seq.block_table[1] != PAD_BLOCK
    read_back(scheduler, second)  # 18 computed: the next call reads from 11; block 2 stays
    assert seq.block_table[:3].count(PAD_BLOCK) == 2
    most = 0
    while seq.num_output_tokens < 40:
        run_step(scheduler)
        assert PAD_BLOCK not in seq.block_table[(seq.num_computed_tokens - 8) // 4:]
        most = max(most, len(seq.block_table) - seq.block_table.count(PAD_BLOCK))
    assert most <= 8 // 4 + 2 and len(seq.block_table) == 14
