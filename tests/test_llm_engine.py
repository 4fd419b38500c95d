"""LLMEngine against a fake runner (tests/fake_runner.py): no model, tokens by arithmetic, so every
output is known by hand. Greedy rows continue a prompt [1, 2] as 3, 6, 12, 24, 48, ... (each
token is the sum of all before it, mod 1000); sampled rows add seed + step. The fake's pool of
token ids checks every row reads its own context through its block table, so the outputs also
vouch for the block tables, copies, prefix hits and the gathers of lookahead.

Covered: continuous batching, chunked prefill, multi-step calls and their reserved slots,
lookahead (calls dispatched ahead, rows discarded after a finish), preemption under a tiny pool,
abort, n > 1 forks, every finish reason, logprobs, prompt logprobs (read back chunk by chunk,
whole in a request's first output), a sliding-window model (blocks released as sequences grow,
never while a call in flight reads them); the pool is whole after every workload.
"""

from __future__ import annotations

import numpy as np
import pytest

try:
    from tests.fake_runner import (LOGPROB, FakeRunner, FakeTokenizer, expected_tokens,
                                   prompt_logprob)
except ImportError:  # tests/ is on sys.path instead of the repo root
    from fake_runner import LOGPROB, FakeRunner, FakeTokenizer, expected_tokens, prompt_logprob

from jinfer.api.outputs import Logprob
from jinfer.api.sampling_params import SamplingParams
from jinfer.config import EngineConfig
from jinfer.engine.llm_engine import LLMEngine
from jinfer.model.kv_cache import PAD_BLOCK

VOCAB = 1000
EOS = 999
# One synchronous step per call; lookahead with multi-step calls (of 4 or 1 steps, as the GPU's
# programs take them, or of any count up to 4, as the CPU's "while" loop does); the same with
# prompt chunks and decodes in separate calls; and without prefix caching, at the default 8
# steps per call.
ENGINES = {"sync": dict(num_scheduler_steps=1),
           "lookahead": dict(num_scheduler_steps=4),
           "any_step_count": dict(num_scheduler_steps=4, any_step_count=True),
           "split_calls": dict(num_scheduler_steps=4, mixed_batching=False),
           "no_prefix_cache": dict(num_scheduler_steps=8, enable_prefix_caching=False)}


def make_engine(num_blocks: int = 64, sliding_window=None, any_step_count=False,
                **config) -> LLMEngine:
    config = EngineConfig(**{"block_size": 4, "max_model_len": 64, "max_num_batched_tokens": 16,
                             "max_num_seqs": 8, **config})
    runner = FakeRunner(num_blocks, config.block_size, VOCAB, sliding_window, any_step_count)
    return LLMEngine(runner, FakeTokenizer(special_ids=[EOS]), config, [EOS], num_blocks,
                     sliding_window=sliding_window)


def run(engine: LLMEngine, arrivals, after_step=None) -> dict:
    """Adds each (step, request_id, prompt ids, params) before that engine step and steps until
    every request is done (calling `after_step(engine)` after each), then reads back a dangling
    call (its rows are discarded) and checks the pool is whole. Returns {request_id:
    RequestOutput}."""
    pending, outputs, step = sorted(arrivals, key=lambda a: a[0]), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params = pending.pop(0)
            engine.add_request(request_id, None, prompt, params)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if after_step is not None:
            after_step(engine)
        step += 1
    while engine._in_flight is not None:
        assert engine.step() == []
    assert_pool_whole(engine)
    return outputs


def assert_pool_whole(engine: LLMEngine) -> None:
    assert engine.block_manager.is_whole()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def prompt(first: int, length: int) -> list[int]:
    return list(range(first, first + length))


def tokens(outputs: dict, request_id: str, index: int = 0) -> list[int]:
    return outputs[request_id].outputs[index].token_ids


# -- continuous batching, chunks, calls ---------------------------------------------------------
@pytest.mark.parametrize("engine_config", ENGINES.values(), ids=ENGINES.keys())
def test_staggered_requests_give_the_arithmetic_tokens(engine_config):
    """Requests arrive while others decode, long prompts are chunked under the 16-token budget,
    two share a prompt prefix; greedy and seeded rows: every output is the fake model's."""
    engine = make_engine(**engine_config)
    shared = prompt(100, 12)
    arrivals = [(0, "short", [1, 2], greedy(20)),
                (0, "long", prompt(10, 40), greedy(5)),
                (1, "seeded", prompt(50, 7), SamplingParams(temperature=1.0, seed=3,
                                                            max_tokens=9, ignore_eos=True)),
                (2, "shared_a", shared + [1], greedy(6)),
                (4, "shared_b", shared + [2, 3], greedy(7)),
                (5, "one", [7], greedy(1))]
    outputs = run(engine, arrivals)
    assert tokens(outputs, "short")[:10] == [3, 6, 12, 24, 48, 96, 192, 384, 768, 536]
    seeded_seed = engine_seed(3)
    for request_id, ids, params in ((r, p, s) for _, r, p, s in arrivals):
        want = expected_tokens(ids, params.max_tokens, VOCAB, greedy=params.greedy,
                               seed=seeded_seed)
        assert tokens(outputs, request_id) == want, request_id
        assert outputs[request_id].outputs[0].finish_reason == "length"
    if engine.config.enable_prefix_caching:
        assert engine.stats()["prefix_cache_hit_blocks"] > 0
    lookahead = engine.config.num_scheduler_steps > 1
    assert (engine.stats()["num_calls_ahead"] > 0) == lookahead
    assert any(c.num_steps > 1 for c in engine.runner.calls) == lookahead


def engine_seed(seed: int, index: int = 0) -> int:
    """The seed the engine gives completion `index` of a request with `seed`."""
    return (seed + index * 1_000_003) % (2**31 - 1)


def test_long_prompt_is_chunked_beside_decodes():
    """A 40-token prompt under a 16-token budget takes three calls, each of which also decodes
    the running sequence (one mixed call per step)."""
    engine = make_engine(num_scheduler_steps=1)
    engine.add_request("short", None, [1, 2], greedy(8))
    engine.step()
    engine.add_request("long", None, prompt(10, 40), greedy(2))
    calls = engine.runner.calls
    start = len(calls)
    while engine.has_unfinished_requests():
        engine.step()
    chunked = calls[start:start + 3]
    assert [(c.seq_ids, c.num_decode) for c in chunked] == [((0, 1), 1)] * 3
    assert engine.stats()["num_computed_prompt_tokens"] == 2 + 40


@pytest.mark.parametrize("any_step_count,calls",
                         [(False, [1, 4, 4, 1, 1]), (True, [1, 4, 4, 2])])
def test_multi_step_calls_reserve_their_slots(any_step_count, calls):
    """A lone decode runs 4 steps per call, then its tail (10 tokens after the first): one step
    a call where the runner's programs take 4 or 1 steps (4 + 4 + 1 + 1), in one call where
    they take any count (4 + 4 + 2); the scheduler reserved every step's slots beforehand."""
    engine = make_engine(num_scheduler_steps=4, any_step_count=any_step_count)
    schedules, schedule = [], engine.scheduler.schedule

    def spy():
        result = schedule()
        for item in result.decode:
            reserved = len(item.seq.block_table) * engine.config.block_size
            assert reserved >= item.start + result.num_decode_steps
        schedules.append(result.num_decode_steps)
        return result

    engine.scheduler.schedule = spy
    outputs = run(engine, [(0, "r", [1, 2], greedy(11))])
    assert tokens(outputs, "r") == expected_tokens([1, 2], 11, VOCAB)
    assert [c.num_steps for c in engine.runner.calls] == calls
    assert schedules[:len(calls)] == calls


def test_full_batch_runs_several_steps_while_a_request_waits():
    """With every seat (max_num_seqs) taken, a waiting request cannot join before a finish, so
    decodes still run several steps per call; it joins once a seat frees."""
    engine = make_engine(num_scheduler_steps=4, max_num_seqs=2)
    waiting_at_launch, launch = [], engine.runner.launch_decode_steps

    def spy(step, flags, num_steps, token_ids=None):
        waiting_at_launch.append(len(engine.scheduler.waiting))
        return launch(step, flags, num_steps, token_ids)

    engine.runner.launch_decode_steps = spy
    arrivals = [(0, "a", prompt(1, 5), greedy(12)), (0, "b", prompt(20, 5), greedy(9)),
                (1, "c", prompt(40, 3), greedy(3))]
    outputs = run(engine, arrivals)
    assert any(waiting_at_launch)
    for _, request_id, ids, params in arrivals:
        assert tokens(outputs, request_id) == expected_tokens(ids, params.max_tokens, VOCAB)


# -- lookahead -----------------------------------------------------------------------------------
def test_calls_run_ahead_and_rows_past_a_finish_are_discarded():
    """With lookahead each call is dispatched before the previous one is read back, its decode
    inputs gathered on the device. A stop id in the second call's third step finishes the
    sequence: that call's later tokens and the whole third call (already dispatched) are
    discarded, and the pool is whole once it is read back."""
    engine = make_engine(num_scheduler_steps=4)
    outputs = run(engine, [(0, "r", [1, 2], greedy(20, stop_token_ids=[24]))])
    completion = outputs["r"].outputs[0]
    assert completion.token_ids == [3, 6, 12, 24]
    assert (completion.finish_reason, completion.stop_reason, completion.text) == (
        "stop", 24, " 3 6 12")
    calls = engine.runner.calls
    assert [(c.num_steps, c.device_tokens) for c in calls] == [(1, False), (4, True), (4, True)]
    assert engine.num_calls_ahead == 2


def test_no_lookahead_with_one_scheduler_step():
    engine = make_engine(num_scheduler_steps=1)
    engine.add_request("r", None, [1, 2], greedy(5))
    while engine.has_unfinished_requests():
        engine.step()
        assert engine._in_flight is None
    assert engine.num_calls_ahead == 0
    assert not any(c.device_tokens or c.num_steps > 1 for c in engine.runner.calls)
    assert_pool_whole(engine)


def test_penalties_wait_for_the_read_back():
    """A penalised row's next call is planned only after its samples are on the host (the
    sampler reads every output token), so its decode inputs never come from the device."""
    engine = make_engine(num_scheduler_steps=4)
    outputs = run(engine, [(0, "p", [1, 2], greedy(9, repetition_penalty=1.5))])
    assert tokens(outputs, "p") == expected_tokens([1, 2], 9, VOCAB)  # the fake ignores them
    assert not any(c.device_tokens for c in engine.runner.calls)
    assert engine.num_calls_ahead == 0


# -- preemption, abort, forks ---------------------------------------------------------------------
@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_preemption_under_a_tiny_pool_keeps_the_tokens(num_scheduler_steps):
    engine = make_engine(num_blocks=1 + 10, num_scheduler_steps=num_scheduler_steps)
    arrivals = [(i // 2, f"r{i}", prompt(100 * i + 1, 5 + i), greedy(18)) for i in range(6)]
    outputs = run(engine, arrivals)
    assert engine.stats()["num_preemptions"] > 0
    for _, request_id, ids, params in arrivals:
        assert tokens(outputs, request_id) == expected_tokens(ids, 18, VOCAB), request_id


def test_abort_while_calls_are_in_flight():
    """Aborting a decoding request and one mid-prefill frees their blocks at once; the other
    request's tokens are unchanged, and the pool is whole once the dangling call is read
    back."""
    engine = make_engine(num_scheduler_steps=4)
    engine.add_request("keep", None, [1, 2], greedy(12))
    engine.add_request("decoding", None, prompt(10, 3), greedy(30))
    engine.add_request("prefilling", None, prompt(30, 40), greedy(4))
    outputs = {}
    for _ in range(3):
        for out in engine.step():
            outputs[out.request_id] = out
    decoding, prefilling = (engine.requests[r].seqs[0] for r in ("decoding", "prefilling"))
    assert decoding.num_samples_in_flight and prefilling.num_in_flight
    assert 0 < prefilling.num_computed_tokens < 40
    engine.abort("decoding")
    engine.abort("prefilling")
    assert decoding.finish_reason == prefilling.finish_reason == "abort"
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs["keep"].finished and tokens(outputs, "keep") == expected_tokens([1, 2], 12,
                                                                                    VOCAB)
    while engine._in_flight is not None:
        assert engine.step() == []
    assert_pool_whole(engine)


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_parallel_sampling_forks_after_the_prompt(num_scheduler_steps):
    """n > 1: the siblings fork from sequence 0 once its prompt is in (sharing its blocks, the
    partial last one copied on write) and sample with their own seeds; greedy siblings agree."""
    engine = make_engine(num_scheduler_steps=num_scheduler_steps)
    ids = prompt(5, 6)  # the last block holds 2 tokens: each sibling writes a private copy
    outputs = run(engine, [
        (0, "sampled", ids, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=7)),
        (0, "greedy", [1, 2], greedy(6, n=2))])
    for index in range(3):
        want = expected_tokens(ids, 7, VOCAB, greedy=False, seed=engine_seed(5, index))
        assert tokens(outputs, "sampled", index) == want
    assert tokens(outputs, "greedy", 0) == tokens(outputs, "greedy", 1) == [3, 6, 12, 24, 48,
                                                                           96]
    assert engine.runner.num_copies > 0


# -- finish reasons ------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_config", ENGINES.values(), ids=ENGINES.keys())
def test_every_finish_reason(engine_config):
    """[1, 2] continues 3, 6, 12, 24, 48, 96, 192, ...; [997, 2] continues with EOS (999)
    right away, and under min_tokens=2 with 0 (999 banned: the next id), 0, then EOS."""
    engine = make_engine(max_model_len=10, **engine_config)
    outputs = run(engine, [
        (0, "max_tokens", [1, 2], greedy(3)),
        (0, "max_model_len", [1, 2], greedy(50)),
        (0, "stop_id", [1, 2], greedy(50, stop_token_ids=[48, 12])),
        (0, "stop_string", [1, 2], greedy(50, stop=["2 2"])),
        (0, "eos", [997, 2], greedy(50)),
        (0, "ignore_eos", [997, 2], greedy(4, ignore_eos=True)),
        (0, "min_tokens", [997, 2], greedy(4, min_tokens=2))])
    finishes = {r: (o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
                for r, o in outputs.items()}
    assert finishes["max_tokens"] == ([3, 6, 12], "length", None)
    assert finishes["max_model_len"] == ([3, 6, 12, 24, 48, 96, 192, 384], "length", None)
    assert finishes["stop_id"] == ([3, 6, 12], "stop", 12)
    assert finishes["stop_string"] == ([3, 6, 12, 24], "stop", "2 2")
    assert outputs["stop_string"].outputs[0].text == " 3 6 1"
    assert finishes["eos"] == ([EOS], "stop", None)
    assert outputs["eos"].outputs[0].text == ""
    assert finishes["ignore_eos"] == ([EOS, 998, 996, 992], "length", None)
    assert expected_tokens([997, 2], 3, VOCAB, min_tokens=2, banned=[EOS]) == [0, 0, EOS]
    assert finishes["min_tokens"] == ([0, 0, EOS], "stop", None)


def test_abort_is_a_finish_reason():
    engine = make_engine(num_scheduler_steps=4)
    engine.add_request("r", None, [1, 2], greedy(30))
    request = engine.requests["r"]
    engine.step()
    engine.abort("r")
    assert request.output().outputs[0].finish_reason == "abort" and request.finished
    while engine._in_flight is not None:
        assert engine.step() == []
    assert_pool_whole(engine)


def test_logprobs_of_the_fake_sampler():
    engine = make_engine(num_scheduler_steps=4)
    outputs = run(engine, [(0, "r", [1, 2], greedy(3, logprobs=2))])
    completion = outputs["r"].outputs[0]
    assert completion.cumulative_logprob == pytest.approx(3 * LOGPROB)
    first = completion.logprobs[0]
    assert sorted(first) == [3, 4]
    assert (first[3].logprob, first[3].rank, first[3].decoded_token) == (LOGPROB, 1, " 3")
    assert (first[4].logprob, first[4].rank) == (LOGPROB - 1, 2)


# -- prompt logprobs -------------------------------------------------------------------------------
def want_prompt_logprobs(ids: list[int], top_n: int) -> list:
    """The fake model's prompt logprobs of `ids` for prompt_logprobs=top_n: token p at
    prompt_logprob(p, token) (rank 1), then the next ids 1, 2, ... lower (top_n of them)."""
    want = [None]
    for position, token in enumerate(ids[1:], 1):
        logprob = np.float32(prompt_logprob(position, token))
        want.append({(token + j) % VOCAB: Logprob(float(logprob - j), j + 1, f" {token + j}")
                     for j in range(max(top_n, 1))})
    return want


@pytest.mark.parametrize("engine_config", ENGINES.values(), ids=ENGINES.keys())
def test_prompt_logprobs_cover_every_prompt_token_once(engine_config):
    """A 40-token prompt prefilled in three chunks beside other requests gets each prompt
    token's logprob once; a repeat of it computes every position again (no prefix-cache hit:
    40 more prompt tokens computed) and gets them all too, while a request without prompt
    logprobs shares its blocks. The others' tokens are the fake model's."""
    engine = make_engine(**engine_config)
    ids = prompt(10, 40)
    arrivals = [(0, "short", [1, 2], greedy(10)),
                (0, "scored", ids, greedy(3, prompt_logprobs=2)),
                (6, "again", ids, greedy(3, prompt_logprobs=0)),
                (12, "shared", ids + [7], greedy(3))]
    outputs = run(engine, arrivals)
    assert outputs["scored"].prompt_logprobs == want_prompt_logprobs(ids, 2)
    assert outputs["again"].prompt_logprobs == want_prompt_logprobs(ids, 0)
    assert outputs["short"].prompt_logprobs is outputs["shared"].prompt_logprobs is None
    for _, request_id, prompt_ids, params in arrivals:
        assert tokens(outputs, request_id) == expected_tokens(prompt_ids, params.max_tokens,
                                                              VOCAB)
    shared_computed = 1 if engine.config.enable_prefix_caching else 41
    assert engine.stats()["num_computed_prompt_tokens"] == 2 + 40 + 40 + shared_computed


def test_the_first_output_has_the_whole_prompts_logprobs():
    """Chunks that sample nothing return no output: the first one comes with the first token
    and every prompt token's logprob."""
    engine = make_engine(num_scheduler_steps=1)
    ids = prompt(10, 40)
    engine.add_request("r", None, ids, greedy(3, prompt_logprobs=1))
    first = []
    while not first:
        first = engine.step()
    assert first[0].outputs[0].token_ids == expected_tokens(ids, 1, VOCAB)
    assert first[0].prompt_logprobs == want_prompt_logprobs(ids, 1)
    engine.abort("r")
    assert_pool_whole(engine)


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_preemption_mid_prompt_neither_repeats_nor_loses_prompt_logprobs(num_scheduler_steps):
    """Under a tiny pool the scored prompt is preempted mid-prefill and recomputed from its
    start: the positions read back before are skipped, the rest read back once."""
    engine = make_engine(num_blocks=1 + 10, num_scheduler_steps=num_scheduler_steps)
    preempted, preempt = [], engine.scheduler._preempt
    engine.scheduler._preempt = lambda seq: preempted.append(seq.needs_prompt_logprobs) or \
        preempt(seq)
    ids = prompt(100, 30)
    arrivals = [(0, "a", prompt(1, 5), greedy(30)), (0, "b", prompt(200, 6), greedy(20)),
                (1, "scored", ids, greedy(5, prompt_logprobs=1))]
    outputs = run(engine, arrivals)
    assert any(preempted), "the scored prompt was meant to be preempted mid-prefill"
    assert outputs["scored"].prompt_logprobs == want_prompt_logprobs(ids, 1)
    for _, request_id, prompt_ids, params in arrivals:
        assert tokens(outputs, request_id) == expected_tokens(prompt_ids, params.max_tokens,
                                                              VOCAB)


def test_parallel_samples_share_one_set_of_prompt_logprobs():
    engine = make_engine(num_scheduler_steps=4)
    ids = prompt(5, 22)
    outputs = run(engine, [(0, "r", ids, SamplingParams(n=3, temperature=1.0, seed=5,
                                                        max_tokens=4, prompt_logprobs=2))])
    assert outputs["r"].prompt_logprobs == want_prompt_logprobs(ids, 2)
    for index in range(3):
        want = expected_tokens(ids, 4, VOCAB, greedy=False, seed=engine_seed(5, index))
        assert tokens(outputs, "r", index) == want


def test_bad_requests_are_value_errors():
    engine = make_engine()
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", None, [], greedy(2))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("a", None, [1] * 64, greedy(2))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("a", None, [VOCAB], greedy(2))
    engine.add_request("a", None, [1], greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", None, [1], greedy(2))
    engine.abort("a")
    assert_pool_whole(engine)


# -- sliding window ------------------------------------------------------------------------------
def held_blocks(seq) -> int:
    return len(seq.block_table) - seq.block_table.count(PAD_BLOCK)


def assert_calls_in_flight_hold_their_windows(engine: LLMEngine) -> None:
    """Every position that a dispatched, unread call's queries attend to is still in a block its
    sequence holds (a finished sequence's rows are discarded)."""
    if engine._in_flight is None:
        return
    bm, bs = engine.block_manager, engine.config.block_size
    for call in engine._in_flight.calls:
        for item in call.items:
            seq = item.seq
            if seq.is_finished:
                continue
            end = item.start + (item.num_new_tokens if call.num_steps == 1 else call.num_steps)
            for position in range(max(0, item.start - bm.sliding_window + 1), end):
                block = seq.block_table[position // bs]
                assert block != PAD_BLOCK and bm.ref_counts[block] > 0, (seq.seq_id, position)


@pytest.mark.parametrize("num_scheduler_steps", [1, 8])
def test_a_windowed_sequence_holds_a_windows_worth_of_blocks(num_scheduler_steps):
    """W = 64, blocks of 16: a sequence growing to 32 x W tokens holds at most W / 16 + 2 = 6
    blocks at every point, counted after each schedule (slots reserved, nothing read back yet)
    and each step; without a window it ends holding all 128. Both give their model's tokens,
    and stats() counts only the blocks held."""
    window, num_tokens, most = 64, 32 * 64, {}
    for sliding_window in (None, window):
        engine = make_engine(1 + 130, sliding_window, block_size=16, max_model_len=num_tokens,
                             num_scheduler_steps=num_scheduler_steps)
        held, schedule = [], engine.scheduler.schedule

        def count(engine=engine):
            held.extend(held_blocks(seq) for seq in engine.scheduler.running)
            if engine.scheduler.running:
                assert engine.stats()["num_used_blocks"] == held[-1]
            if sliding_window:
                assert_calls_in_flight_hold_their_windows(engine)

        def spy(schedule=schedule, count=count):
            result = schedule()
            count()
            return result

        engine.scheduler.schedule = spy
        outputs = run(engine, [(0, "r", [1, 2], greedy(num_tokens - 2, ignore_eos=True))], count)
        assert tokens(outputs, "r") == expected_tokens([1, 2], num_tokens - 2, VOCAB,
                                                       window=sliding_window)
        most[sliding_window] = max(held)
    assert most[window] <= window // 16 + 2
    assert most[None] == num_tokens // 16


@pytest.mark.parametrize("engine_config", ENGINES.values(), ids=ENGINES.keys())
def test_windowed_workloads_give_the_windowed_tokens(engine_config):
    """W = 6 over blocks of 4: prompts in chunks, two sharing a prefix whose head the first has
    released (still cached: the second hits it), n > 1 forks of a 13-token prompt (a sibling
    recomputes position 12, which reads from 7: the parent keeps block 1), seeded rows. Every
    call in flight still holds what it reads, and every token is the windowed model's."""
    window = 6
    engine = make_engine(sliding_window=window, **engine_config)
    shared = prompt(100, 24)
    arrivals = [(0, "short", [1, 2], greedy(40, ignore_eos=True)),
                (0, "long", prompt(10, 40), greedy(12, ignore_eos=True)),
                (1, "seeded", prompt(50, 7), SamplingParams(temperature=1.0, seed=3,
                                                            max_tokens=20, ignore_eos=True)),
                (2, "shared_a", shared + [1], greedy(6, ignore_eos=True)),
                (8, "shared_b", shared + [2, 3], greedy(7, ignore_eos=True)),
                (3, "forked", prompt(5, 13), SamplingParams(n=3, temperature=1.0, seed=5,
                                                           max_tokens=9, ignore_eos=True))]
    outputs = run(engine, arrivals, assert_calls_in_flight_hold_their_windows)
    for _, request_id, ids, params in arrivals:
        for index in range(params.n):
            want = expected_tokens(ids, params.max_tokens, VOCAB, greedy=params.greedy,
                                   seed=engine_seed(params.seed or 0, index), window=window)
            assert tokens(outputs, request_id, index) == want, (request_id, index)
    if engine.config.enable_prefix_caching:
        assert engine.stats()["num_tokens_from_cache"] >= 24


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_windowed_preemption_and_abort(num_scheduler_steps):
    """A tiny pool preempts windowed sequences (recomputed from their start); one is aborted
    while its calls are in flight; the others' tokens are the windowed model's."""
    engine = make_engine(num_blocks=1 + 10, sliding_window=6,
                         num_scheduler_steps=num_scheduler_steps)
    arrivals = [(i // 2, f"r{i}", prompt(100 * i + 1, 5 + i), greedy(40, ignore_eos=True))
                for i in range(8)]

    def abort_r1(engine):
        assert_calls_in_flight_hold_their_windows(engine)
        if "r1" in engine.requests and engine.requests["r1"].seqs[0].num_output_tokens > 20:
            engine.abort("r1")

    outputs = run(engine, arrivals, abort_r1)
    assert engine.stats()["num_preemptions"] > 0 and "r1" not in outputs
    for _, request_id, ids, _ in arrivals[2:] + arrivals[:1]:
        assert tokens(outputs, request_id) == expected_tokens(ids, 40, VOCAB, window=6)


def test_windowed_prefix_hits_across_requests():
    """Beam search's pattern: each request's prompt is the previous prompt and its output. The
    blocks the previous one released before its window stay cached, so the whole chain hits and
    only the last partial block and the new tokens are prefilled."""
    engine = make_engine(sliding_window=6, num_scheduler_steps=4)
    ids = prompt(10, 30)
    for step in range(4):
        outputs = run(engine, [(0, f"r{step}", ids, greedy(3, ignore_eos=True))],
                      assert_calls_in_flight_hold_their_windows)
        assert tokens(outputs, f"r{step}") == expected_tokens(ids, 3, VOCAB, window=6)
        ids = ids + tokens(outputs, f"r{step}")
    # Each hits every full block the previous one computed (up to its last sample's input).
    assert engine.stats()["num_tokens_from_cache"] == 32 + 32 + 36
