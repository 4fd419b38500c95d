"""Lookahead (jinfer.engine.lookahead): every step, mixed prefill + decode steps included, is
planned and dispatched while the previous device call is still in flight, and gives exactly the
tokens and logprobs of synchronous steps (num_scheduler_steps=1), with the pool whole afterwards.

First the module's parts on their own (no model): where each sequence's sample lies among the
calls in flight, the on-device gather of decode inputs, and which rows make the next step wait.

Then, on the tiny random model, every workload runs on two engines over one ModelRunner
(compiling shapes is the cost on the CPU, and they share the compiled steps and the pool):
`lookahead_llm`, with lookahead and multi-step decoding on, and `sync_llm`, one synchronous step
per call. Both batch decodes and prompt chunks into one call (mixed_batching) under a small
token budget (chunked prefill), in a small pool of small blocks.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

try:
    from tests.fake_runner import FakeRunner
except ImportError:  # tests/ is on sys.path instead of the repo root
    from fake_runner import FakeRunner

from jinfer import LLM, SamplingParams
from jinfer.engine import lookahead
from jinfer.engine.llm_engine import LLMEngine
from jinfer.engine.lookahead import DeviceCall, InFlight, device_tokens
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence, SequenceStatus
from jinfer.model.sampler import SamplingRow


# -- the module's parts, no model ---------------------------------------------------------------
def make_seq(seq_id: int, num_prompt: int, num_output: int = 0, **params) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, list(range(10, 10 + num_prompt)),
                   SamplingParams(**params), seed=0, detokenizer=None)
    seq.output_token_ids = [5] * num_output
    return seq


def in_flight_row(seq: Sequence, num_new: int = 1) -> ScheduledSequence:
    """A row of `seq` dispatched and not read back: its positions and sample are in flight."""
    item = ScheduledSequence(seq, num_new)
    seq.num_in_flight += num_new
    seq.num_samples_in_flight += int(item.samples)
    return item


def call(items: list[ScheduledSequence], last_tokens: list[int]) -> DeviceCall:
    return DeviceCall(items, len(items), 1, results=None, last_tokens=np.array(last_tokens))


def test_sample_index_spans_the_calls_of_a_step():
    """A step of two calls (prompt chunks, then decodes): each sampling row's sample lies at
    its row in its call's last tokens, offset by the padded calls before it."""
    chunk, middle = make_seq(0, 6), make_seq(1, 9)
    a, b = make_seq(2, 3, 1), make_seq(3, 4, 2)
    for seq in (a, b):
        seq.num_computed_tokens = seq.num_tokens - 1
    prompts = call([in_flight_row(chunk, 6), in_flight_row(middle, 4)], [40, 41])
    decodes = call([in_flight_row(a), in_flight_row(b)], [50, 51, 0, 0])  # 2 padding rows
    step = InFlight([prompts, decodes])
    assert step.sample_index == {0: 0, 2: 2, 3: 3}  # the middle chunk samples nothing
    assert np.asarray(step.tokens).tolist() == [40, 41, 50, 51, 0, 0]


def test_decode_inputs_still_on_the_device_are_gathered_there():
    """A decode row planned past its sequence's sample in flight takes that sample from the
    call's device output; rows whose input is on the host keep it."""
    runner = FakeRunner(num_blocks=16, block_size=4)
    on_host, ahead = make_seq(0, 3, 1), make_seq(1, 5, 1)
    for seq, table in ((on_host, [1]), (ahead, [2, 3])):
        seq.block_table, seq.num_computed_tokens = table, seq.num_tokens - 1
    prev = InFlight([call([in_flight_row(ahead)], [77, 0])])  # computes 5, samples token 6
    decode = [ScheduledSequence(on_host, 1), ScheduledSequence(ahead, 1)]
    assert [item.start for item in decode] == [3, 6]
    rows = [SamplingRow(item.seq.params, seed=0, step=item.sample_step) for item in decode]
    step_input, _ = runner.prepare(decode, [], rows, 0)
    assert step_input.token_ids.tolist() == [5, 0]  # ahead's input is not on the host
    assert np.asarray(device_tokens(decode, step_input, prev)).tolist() == [5, 77]
    assert device_tokens(decode[:1], step_input, prev) is None  # all on the host


def test_rows_that_need_the_host_before_the_next_step():
    """Penalties (the sampler reads every output token) and the first sample of a request with
    n > 1 (its siblings fork from it) stop lookahead; finished rows and rows that sample
    nothing do not."""
    def needs_host(seq: Sequence, num_new: int = 1, samples: bool = True) -> bool:
        seq.num_computed_tokens = seq.num_tokens - num_new if samples else 0
        return InFlight([call([in_flight_row(seq, num_new)], [0])]).must_read_back_first()

    assert not needs_host(make_seq(0, 3, 1))
    assert needs_host(make_seq(0, 3, 1, repetition_penalty=1.2))
    assert needs_host(make_seq(0, 3, n=2), num_new=3)  # sequence 0's first token
    assert not needs_host(make_seq(0, 3, 1, n=2))  # its siblings have forked already
    assert not needs_host(make_seq(0, 8, presence_penalty=1.0), num_new=4, samples=False)
    finished = make_seq(0, 3, 1, frequency_penalty=0.5)
    finished.status = SequenceStatus.FINISHED
    assert not needs_host(finished)


# -- on the tiny model: lookahead against synchronous steps -------------------------------------
PROMPTS = ["The quick brown fox", "Why is the sky blue? Because of Rayleigh scattering.",
           "日本語 🙂 café", "numbers 12345 and 3.14159", "Tabs\tand\nnewlines, über naïve"]
# max_model_len=32 keeps one block-table width bucket (MIN_CONTEXT_BUCKET), max_num_seqs=4 three
# decode batch buckets and num_scheduler_steps=2 one multi-step bucket: few shapes to compile.
ENGINE = dict(block_size=4, num_kv_blocks=24, max_model_len=32, max_num_batched_tokens=16,
              max_num_seqs=4, mixed_batching=True, seed=1, enable_compilation_cache=False)


@pytest.fixture(scope="module")
def lookahead_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_scheduler_steps=2, **ENGINE)


@pytest.fixture(scope="module")
def sync_llm(lookahead_llm):
    return same_runner(lookahead_llm, num_scheduler_steps=1)


def same_runner(llm: LLM, **config) -> LLM:
    """`llm`'s model, runner (compiled steps) and pool under another engine, configured with
    `config`. The engines take turns, and `run_workload` forgets the prefix cache each time
    (another engine rewrote the pool)."""
    other, engine = copy.copy(llm), llm.engine
    other.config = dataclasses.replace(engine.config, **config)
    other.engine = LLMEngine(engine.runner, engine.tokenizer, other.config,
                             engine.eos_token_ids, engine.block_manager.num_blocks)
    return other


def run_workload(llm: LLM, arrivals: list[tuple[int, str, str, SamplingParams]]) -> dict:
    """Adds each (step, request_id, prompt, params) before that engine step and steps until
    every request is done; then reads back a dangling call and checks the pool is whole.
    Returns {request_id: RequestOutput}."""
    engine, tok = llm.engine, llm.get_tokenizer()
    engine.block_manager.reset_prefix_cache()
    pending, outputs, step = sorted(arrivals, key=lambda a: a[0]), {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, request_id, prompt, params = pending.pop(0)
            engine.add_request(request_id, prompt, tok.encode(prompt), params)
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        step += 1
    while engine._in_flight is not None:  # rows of finished sequences only: discarded
        assert engine.step() == []
    assert_pool_whole(llm)
    return outputs


def assert_pool_whole(llm: LLM):
    engine = llm.engine
    assert engine.block_manager.is_whole()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests


def assert_same_outputs(expected: dict, got: dict):
    assert sorted(got) == sorted(expected)
    for request_id, want in expected.items():
        for w, o in zip(want.outputs, got[request_id].outputs, strict=True):
            assert (o.token_ids, o.text, o.finish_reason, o.stop_reason) == (
                w.token_ids, w.text, w.finish_reason, w.stop_reason), request_id
            assert o.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)
            if w.logprobs is not None:
                assert [list(d) for d in o.logprobs] == [list(d) for d in w.logprobs]
                for wd, od in zip(w.logprobs, o.logprobs):
                    assert [v.logprob for v in od.values()] == pytest.approx(
                        [v.logprob for v in wd.values()], abs=1e-4)


def compare(sync_llm, lookahead_llm, arrivals) -> dict:
    expected = run_workload(sync_llm, arrivals)
    got = run_workload(lookahead_llm, arrivals)
    assert_same_outputs(expected, got)
    return got


# Every request asks for logprobs, and every workload keeps a sampled (not greedy) row in each
# batch: the sampler's static flags stay the same, and so do the programs to compile.
def sampled(max_tokens: int, seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=seed, max_tokens=max_tokens, ignore_eos=True,
                          logprobs=1, **kwargs)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1,
                          **kwargs)


def test_staggered_mixed_steps_overlap_and_match(sync_llm, lookahead_llm):
    """Prompts arrive while others decode (and wait for a seat), chunked under a 16-token
    budget; greedy and seeded rows, stop strings and stop ids, max_tokens of 1 and 2 and
    max_model_len (finishing inside the call dispatched ahead). The lookahead engine
    dispatches mixed calls (decode rows and a prompt chunk) while the previous call is in
    flight, their decode inputs gathered on the device, and gives the synchronous tokens and
    logprobs."""
    probe = run_workload(sync_llm, [(0, "p", PROMPTS[1], sampled(12, 7))])["p"].outputs[0]
    stop_text, stop_id = probe.text[4:7], probe.token_ids[5]
    assert stop_text
    arrivals = [
        (0, "seeded", PROMPTS[1], sampled(16, 3)),
        (0, "greedy", PROMPTS[0], greedy(12)),
        (1, "long", " ".join(PROMPTS[:3]), sampled(6, 1)),
        (1, "to_the_end", PROMPTS[3], sampled(30, 2)),
        (2, "stop_str", PROMPTS[1], sampled(12, 7, stop=[stop_text])),
        (2, "stop_id", PROMPTS[1], sampled(12, 7, stop_token_ids=[stop_id])),
        (4, "one", PROMPTS[2], greedy(1)),
        (4, "two", PROMPTS[3], sampled(2, 9)),
        (6, "late", PROMPTS[4], sampled(9, 4)),
    ]
    runner = lookahead_llm.engine.runner
    launches = []
    launch = runner.launch_step

    def spy(step_input, flags, token_ids=None):
        att = step_input.attention
        launches.append((lookahead_llm.engine._in_flight is not None, att.decode is not None,
                         att.prefill is not None, token_ids is not None))
        return launch(step_input, flags, token_ids)

    runner.launch_step = spy
    before = lookahead_llm.stats()["num_calls_ahead"]
    try:
        got = compare(sync_llm, lookahead_llm, arrivals)
    finally:
        runner.launch_step = launch
    assert got["stop_str"].outputs[0].stop_reason == stop_text
    assert got["stop_id"].outputs[0].stop_reason == stop_id
    assert [len(got[r].outputs[0].token_ids) for r in ("one", "two")] == [1, 2]
    assert got["to_the_end"].outputs[0].finish_reason == "length"
    assert len(got["to_the_end"].outputs[0].token_ids) < 30  # max_model_len cut it
    assert any(all(launch) for launch in launches), "no mixed call dispatched ahead"
    assert lookahead_llm.stats()["num_calls_ahead"] > before


def test_two_calls_per_step_without_mixed_batching(sync_llm, lookahead_llm):
    """Without mixed batching a step is two calls (prompt chunks, then decodes), both
    dispatched ahead; the next step's decode inputs are gathered from both calls' samples."""
    split_llm = same_runner(lookahead_llm, mixed_batching=False)
    arrivals = [(0, "a", PROMPTS[1], sampled(10, 1)), (1, "b", PROMPTS[0], sampled(8, 4)),
                (2, "c", " ".join(PROMPTS[:3]), sampled(5, 2)),
                (3, "d", PROMPTS[4], sampled(7, 3))]
    expected = run_workload(sync_llm, arrivals)
    gathered = []  # per gather: whether it took samples of both calls of the step in flight
    take_tokens = lookahead.take_tokens

    def spy(host_tokens, tokens, sources):
        calls = split_llm.engine._in_flight.calls  # the step in flight, not yet read back
        split = calls[0].last_tokens.shape[0]
        used = sources[sources >= 0]
        gathered.append(len(calls) == 2 and (used < split).any() and (used >= split).any())
        return take_tokens(host_tokens, tokens, sources)

    lookahead.take_tokens = spy
    try:
        assert_same_outputs(expected, run_workload(split_llm, arrivals))
    finally:
        lookahead.take_tokens = take_tokens
    assert split_llm.engine.num_calls_ahead > 0 and any(gathered)


def test_prefix_cache_hits_while_the_prefix_is_in_flight(sync_llm, lookahead_llm):
    """A request sharing a prompt prefix with one whose chunks are still being computed hits
    the prefix cache (full blocks of host-known tokens are registered at dispatch), and both
    give the synchronous tokens."""
    prefix = " ".join(PROMPTS[:2])
    arrivals = [(0, "first", prefix + " one", sampled(6, 1)),
                (1, "second", prefix + " two", sampled(5, 2)),
                (3, "third", prefix + " three", sampled(5, 3))]
    hits = lookahead_llm.stats()["prefix_cache_hit_blocks"]
    compare(sync_llm, lookahead_llm, arrivals)
    assert lookahead_llm.stats()["prefix_cache_hit_blocks"] > hits


def test_preemption_with_calls_in_flight(sync_llm, lookahead_llm):
    """More sequences than the 23-block pool holds: both engines preempt (recompute), the
    lookahead engine never a sequence with tokens in flight, and the tokens match."""
    arrivals = [(i // 2, f"r{i}", PROMPTS[i % len(PROMPTS)], sampled(20, i)) for i in range(6)]
    preemptions = [llm.stats()["num_preemptions"] for llm in (sync_llm, lookahead_llm)]
    compare(sync_llm, lookahead_llm, arrivals)
    assert lookahead_llm.stats()["num_preemptions"] > preemptions[1]
    assert sync_llm.stats()["num_preemptions"] > preemptions[0]


def test_parallel_sampling_and_penalties_fall_back(sync_llm, lookahead_llm):
    """n > 1 (siblings fork after the prompt's last chunk is read back) and penalties (the
    sampler needs every output token on the host) make the next step wait for the read-back;
    the tokens still match, with other requests running ahead around them."""
    arrivals = [(0, "n3", PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=5,
                                                     max_tokens=7, ignore_eos=True,
                                                     logprobs=1)),
                (0, "plain", PROMPTS[3], sampled(9, 6)),
                (2, "penalised", PROMPTS[1], sampled(8, 8, repetition_penalty=1.6,
                                                     frequency_penalty=0.5)),
                (3, "n2", PROMPTS[2], SamplingParams(n=2, temperature=0.8, seed=1,
                                                     max_tokens=5, logprobs=1))]
    got = compare(sync_llm, lookahead_llm, arrivals)
    assert [len(c.token_ids) for c in got["n3"].outputs] == [7, 7, 7]


def test_abort_with_calls_in_flight(sync_llm, lookahead_llm):
    """Aborting a decoding request and a request mid-prefill while calls computing their
    tokens are in flight frees their blocks at once; the other request gives the synchronous
    tokens and the pool is whole once the dangling call is read back."""
    engine, tok = lookahead_llm.engine, lookahead_llm.get_tokenizer()
    expected = run_workload(sync_llm, [(0, "keep", PROMPTS[1], sampled(12, 1))])
    engine.block_manager.reset_prefix_cache()  # the other engine rewrote the pool
    engine.add_request("keep", None, tok.encode(PROMPTS[1]), sampled(12, 1))
    engine.add_request("decoding", None, tok.encode(PROMPTS[0]), sampled(20, 2))
    engine.add_request("prefilling", None, tok.encode(" ".join(PROMPTS[:3])), sampled(4, 3))
    outputs = {}
    while True:
        for out in engine.step():
            outputs[out.request_id] = out
        seqs = {r: engine.requests[r].seqs[0] for r in ("decoding", "prefilling")}
        if (seqs["decoding"].num_samples_in_flight and seqs["prefilling"].num_in_flight
                and seqs["prefilling"].num_computed_tokens):
            break
    engine.abort("decoding")
    engine.abort("prefilling")
    assert engine._in_flight is not None
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs["keep"].finished
    assert_same_outputs(expected, {"keep": outputs["keep"]})
    while engine._in_flight is not None:
        assert engine.step() == []
    assert_pool_whole(lookahead_llm)


def test_off_with_one_scheduler_step(sync_llm):
    """num_scheduler_steps=1 switches lookahead off: nothing is ever left in flight."""
    engine, tok = sync_llm.engine, sync_llm.get_tokenizer()
    engine.block_manager.reset_prefix_cache()  # the other engine rewrote the pool
    engine.add_request("a", None, tok.encode(PROMPTS[0]), sampled(4, 1))
    calls = engine.num_calls_ahead
    while engine.has_unfinished_requests():
        engine.step()
        assert engine._in_flight is None
    assert engine.num_calls_ahead == calls
    assert_pool_whole(sync_llm)
