"""Scheduler policy with a fake model (no device): budgets, chunking, decode progress, fairness."""

from __future__ import annotations

from jinfer.engine.block_manager import BlockManager
from jinfer.config import EngineConfig
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.scheduler import Scheduler
from jinfer.engine.sequence import Sequence


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, str(seq_id), 0, list(range(1, prompt_len + 1)), SamplingParams(),
                    seed=0, detokenizer=None)


def run_step(scheduler: Scheduler) -> dict[int, int]:
    """Fake model: computes what was scheduled, appends token 7 where a row samples.
    Returns {seq_id: new tokens computed}."""
    schedule = scheduler.schedule()
    computed = {}
    for item in schedule.prefill.scheduled + schedule.decode.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.output_token_ids.append(7)
        computed[item.seq.seq_id] = item.num_new_tokens
    return computed


def test_long_prompt_does_not_stall_decodes():
    config = EngineConfig(block_size=4, max_num_batched_tokens=16, max_model_len=256)
    scheduler = Scheduler(config, BlockManager(200, 4))
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
    config = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=3,
                          max_model_len=64)
    scheduler = Scheduler(config, BlockManager(200, 4))
    for i in range(5):
        scheduler.add(make_seq(i, 8))
    computed = run_step(scheduler)
    assert sorted(computed) == [0, 1, 2] and len(scheduler.running) == 3


def test_preempted_sequence_resumes_first_and_is_not_thrashed():
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, max_model_len=64,
                          preemption_grace_steps=4)
    bm = BlockManager(1 + 12, 4)  # 12 usable blocks: 48 tokens
    scheduler = Scheduler(config, bm)
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
    for _ in range(config.preemption_grace_steps):
        run_step(scheduler)
        others = [s for s in scheduler.running if s is not victim]
        if others:  # while others could give way, the resumed sequence keeps running
            assert victim in scheduler.running or victim.is_finished
    assert scheduler.num_steps - resumed_step == config.preemption_grace_steps


def test_victim_skips_a_just_resumed_sequence():
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, max_model_len=64,
                          preemption_grace_steps=3)
    scheduler = Scheduler(config, BlockManager(100, 4))
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
