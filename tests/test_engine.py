"""End-to-end engine behaviour on a tiny random model (no torch): decode matches a recompute
oracle, batching and paging are invisible, stops and limits hold, blocks never leak."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from jinfer import LLM, SamplingParams
from jinfer.config import KernelConfig

PROMPTS = ["The quick brown fox", "Why is the sky blue?", "日本語 🙂 café", "numbers 12345 and"]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=256, seed=1,
               enable_compilation_cache=False)


@pytest.fixture(scope="module")
def single_step_llm(tiny_model_dir):
    """One decode step per device call: the baseline multi-step decoding must reproduce."""
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=256, seed=1,
               num_scheduler_steps=1, enable_compilation_cache=False)


def greedy_by_recompute(llm: LLM, prompt_ids: list[int], steps: int) -> list[int]:
    """Oracle: re-prefill the whole sequence each step and take the argmax."""
    ids = list(prompt_ids)
    for _ in range(steps):
        ids.append(int(np.argmax(llm.prompt_logits(ids)[-1])))
    return ids[len(prompt_ids):]


def assert_pool_whole(llm: LLM):
    assert llm.engine.block_manager.is_whole()
    assert not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_greedy_decode_matches_recompute(llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        expected = greedy_by_recompute(llm, out.prompt_token_ids, 12)
        assert out.outputs[0].token_ids == expected, prompt
        assert out.outputs[0].finish_reason == "length"
    assert_pool_whole(llm)


def test_batch_and_seed_invariance(llm):
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s, max_tokens=10, ignore_eos=True)
              for s in range(len(PROMPTS))]
    together = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, p, out in zip(PROMPTS, params, together):
        alone = llm.generate(prompt, p, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids
    again = llm.generate(PROMPTS[::-1], params[::-1], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again[::-1]] == [
        o.outputs[0].token_ids for o in together]
    assert_pool_whole(llm)


@pytest.mark.parametrize("block_size", [1, 32])
def test_paging_is_invisible(tiny_model_dir, llm, block_size):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    other = LLM(str(tiny_model_dir), block_size=block_size, num_kv_blocks=4096 // block_size,
                max_model_len=256, shuffle_blocks_seed=7, max_num_batched_tokens=8,
                enable_compilation_cache=False)
    got = [o.outputs[0].token_ids for o in other.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    assert_pool_whole(other)


def test_preemption_keeps_outputs(tiny_model_dir, llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = PROMPTS * 3
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(str(tiny_model_dir), block_size=4, num_kv_blocks=70, max_model_len=64,
                enable_compilation_cache=False)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
    assert small.stats()["num_preemptions"] > 0
    assert got == expected
    assert_pool_whole(small)


def test_stop_strings_and_ids(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_text = base.text[5:9]
    assert stop_text
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop=[stop_text]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_text
    assert out.text == base.text[:base.text.index(stop_text)]
    stop_id = base.token_ids[3]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[stop_id]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                  stop_token_ids=[stop_id], min_tokens=10),
                       use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[:10]
    assert_pool_whole(llm)


def test_logprobs_match_prompt_logits(llm):
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    ids = out.prompt_token_ids + completion.token_ids
    logits = llm.prompt_logits(ids)
    total = 0.0
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logits[len(out.prompt_token_ids) - 1 + step].astype(np.float64)
        log_softmax = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        assert entry[token].logprob == pytest.approx(log_softmax[token], abs=1e-4)
        assert entry[token].rank == 1
        top3 = np.argsort(-log_softmax)[:3]
        assert set(top3) <= set(entry)
        total += log_softmax[token]
    assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_logprob_rank_of_sampled_tokens(llm):
    params = SamplingParams(temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, logprobs=0)
    out = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    logits = llm.prompt_logits(out.prompt_token_ids + completion.token_ids)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logits[len(out.prompt_token_ids) - 1 + step]
        assert list(entry) == [token]
        assert entry[token].rank == 1 + int(np.sum(row > row[token]))


def test_stream_deltas_concatenate(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0].text
    assert "".join(llm.stream(PROMPTS[2], params)) == full
    assert_pool_whole(llm)


def test_abort_mid_generation_frees_blocks(llm):
    # stream_outputs yields after every step; the text stream (llm.stream) yields only once
    # there is text, which a random model's first tokens may never give.
    stream = llm.stream_outputs(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50,
                                                           ignore_eos=True))
    assert not next(stream).finished
    stream.close()
    assert_pool_whole(llm)
    assert not llm.engine.has_unfinished_requests()
    # The text stream closed after its first delta (or, where the model gave no text at all,
    # after the request finished): the same, through LLM.stream's inner stream.
    text = llm.stream(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(text, None)
    text.close()
    assert_pool_whole(llm)
    assert not llm.engine.has_unfinished_requests()


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "Hello"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
                          add_special_tokens=False)
    assert out.prompt_token_ids == expected


def test_kv_pool_is_donated(llm):
    runner = llm.engine.runner
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=2), use_tqdm=False)
    before = runner.kv_cache.k.unsafe_buffer_pointer()
    with warnings.catch_warnings():
        # "Some donated buffers were not usable" would raise (other warnings, such as JAX's
        # deprecation of the Pallas Triton lowering on GPU, are not about donation).
        warnings.filterwarnings("error", message=".*donat.*")
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=3), use_tqdm=False)
    assert runner.kv_cache.k.unsafe_buffer_pointer() == before


def test_compiles_are_bounded(llm):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    runner = llm.engine.runner
    llm.generate(["a b c d e f g"], params, use_tqdm=False)
    num_compiles = runner.num_compiles
    llm.generate(["x y z w v u"], params, use_tqdm=False)  # same buckets
    assert runner.num_compiles == num_compiles


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"), (dict(min_p=1.5), "min_p")])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_engine_working(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[5] * 300], use_tqdm=False)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate(prompt_token_ids=[[10**6]], use_tqdm=False)
    assert_pool_whole(llm)
    assert llm.generate("ok", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_pool_too_small_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="cannot hold even one sequence"):
        LLM(str(tiny_model_dir), num_kv_blocks=4, max_model_len=256,
            enable_compilation_cache=False)


def test_missing_model_path():
    with pytest.raises((FileNotFoundError, ValueError), match="does-not-exist"):
        LLM("/nonexistent/does-not-exist", enable_compilation_cache=False)


def test_abort_mid_prefill_frees_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=128,
              max_num_batched_tokens=8, enable_compilation_cache=False)
    engine = llm.engine
    prompt = llm.get_tokenizer().encode(" ".join(["fox"] * 40))
    engine.add_request("long", None, prompt, SamplingParams(max_tokens=4))
    engine.step()
    (seq,) = engine.requests["long"].seqs
    assert 0 < seq.num_computed_tokens < len(prompt) and seq.block_table
    engine.abort("long")
    assert_pool_whole(llm)
    assert not engine.has_unfinished_requests()


def test_pallas_backend_matches_reference(tiny_model_dir, llm):
    """The engine on the Pallas decode kernel (interpret mode on CPU) gives the same tokens."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
    pallas = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256,
                 attention_backend="pallas", enable_compilation_cache=False)
    got = [o.outputs[0].token_ids for o in pallas.generate(PROMPTS[:2], params, use_tqdm=False)]
    assert got == expected
    assert_pool_whole(pallas)


def test_unknown_attention_backend(tiny_model_dir):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(str(tiny_model_dir), attention_backend="flash", enable_compilation_cache=False)


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", 2e-2), ("float16", 4e-3)])
def test_half_precision_logits_track_float32(tiny_model_dir, dtype, tolerance):
    """Weights, activations and the KV pool in 16 bits: logits within the dtype's rounding of
    the float32 ones (bf16 keeps 8 mantissa bits, f16 11). float32 asked for explicitly: the
    default dtype "auto" is bfloat16 on a GPU."""
    full, half = (LLM(str(tiny_model_dir), dtype=d, num_kv_blocks=64, max_model_len=256,
                      enable_compilation_cache=False) for d in ("float32", dtype))
    assert half.engine.runner.kv_cache.k.dtype == dtype
    ids = full.get_tokenizer().encode(PROMPTS[1])
    expected, got = full.prompt_logits(ids), half.prompt_logits(ids)
    assert np.abs(got - expected).max() / np.abs(expected).max() < tolerance
    out = half.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 or out.finish_reason == "stop"


def test_decodes_and_prompt_chunks_share_one_device_call(tiny_model_dir, llm):
    """A prompt arriving while another sequence decodes is computed in the same jitted call as
    that decode (mixed_batching), and both give the tokens they give alone."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = [o.outputs[0].token_ids
             for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]  # batched, same step
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256, mixed_batching=True,
              num_scheduler_steps=1, enable_compilation_cache=False)
    tok = llm.get_tokenizer()
    engine, runner = llm.engine, llm.engine.runner
    calls = []
    execute = runner.execute

    def spy(step_input, flags):
        calls.append(step_input.attention)
        return execute(step_input, flags)

    runner.execute = spy
    try:
        engine.add_request("first", None, tok.encode(PROMPTS[0]), params)
        engine.step()
        engine.step()  # "first" decodes now
        engine.add_request("second", None, tok.encode(PROMPTS[1]), params)
        calls.clear()
        engine.step()
        assert len(calls) == 1
        assert calls[0].decode is not None and calls[0].prefill is not None
        outputs = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids
    finally:
        runner.execute = execute
    assert [outputs["first"], outputs["second"]] == alone
    assert_pool_whole(llm)


@pytest.mark.parametrize("num_steps,unroll", [(4, False), (8, False), (4, True)])
def test_multi_step_decode_gives_the_same_tokens(tiny_model_dir, single_step_llm, num_steps,
                                                 unroll):
    """Several decode steps per device call, as a loop or unrolled (as on GPU): the same tokens
    and logprobs as one step per call for greedy, seeded sampling and stop conditions (stop
    ids, stop strings, max_tokens cut inside a call), with the pool whole afterwards."""
    params = [SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, stop=[" the"]),
              SamplingParams(temperature=1.0, seed=5, max_tokens=9, stop_token_ids=[5, 6, 7])]
    expected = single_step_llm.generate(PROMPTS, params, use_tqdm=False)
    multi = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256, seed=1,
                num_scheduler_steps=num_steps, enable_compilation_cache=False,
                kernel_config=KernelConfig(unroll_max_rows=4 if unroll else 0))
    calls = []
    runner = multi.engine.runner
    launch = runner.launch_decode_steps
    runner.launch_decode_steps = lambda *a: calls.append(a[2]) or launch(*a)
    got = multi.generate(PROMPTS, params, use_tqdm=False)
    assert calls and max(calls) == num_steps
    for want, out in zip(expected, got):
        w, o = want.outputs[0], out.outputs[0]
        assert (o.token_ids, o.text, o.finish_reason) == (w.token_ids, w.text, w.finish_reason)
        assert o.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)
    assert [list(d) for d in got[0].outputs[0].logprobs] == [
        list(d) for d in expected[0].outputs[0].logprobs]
    assert_pool_whole(multi)


def test_multi_step_with_penalties_gives_the_same_tokens(tiny_model_dir, single_step_llm):
    """Rows with repetition / frequency / presence penalties run several steps per call (each
    step's samples join the output tokens on the device) and give the single-step tokens; their
    calls are not continued before being read back (the host needs their outputs first)."""
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             repetition_penalty=1.8, frequency_penalty=0.7),
              SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True,
                             presence_penalty=1.5, logprobs=1),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)]
    check_multi_step_matches(tiny_model_dir, single_step_llm, params, continued=False)


def test_multi_step_with_min_tokens_gives_the_same_tokens(tiny_model_dir, single_step_llm):
    """Rows under min_tokens run several steps per call: their banned stop ids lapse on the
    device at min_tokens, inside a call. The stop id is the token seeded sampling draws right at
    min_tokens (and not before: banning a token that does not win a draw leaves the draw as it
    is), so a ban that outlived min_tokens changes the output."""
    sampled = dict(temperature=3.0, seed=11, ignore_eos=True)  # the tiny model repeats itself
    probe = single_step_llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, **sampled),
                                     use_tqdm=False)[0].outputs[0].token_ids
    lapses = [m for m in range(4, 9) if probe[m] not in probe[:m]]
    assert lapses, f"no usable stop id in the probe {probe}"
    params = [SamplingParams(max_tokens=m + 2, min_tokens=m, stop_token_ids=[probe[m]],
                             **sampled) for m in lapses]
    params.append(SamplingParams(temperature=0.7, seed=2, max_tokens=10, min_tokens=3,
                                 ignore_eos=True))
    check_multi_step_matches(tiny_model_dir, single_step_llm, params, continued=True,
                             prompts=[PROMPTS[1]] * len(lapses) + [PROMPTS[0]])


def check_multi_step_matches(tiny_model_dir, single_step_llm, params, *, continued: bool,
                             prompts=None):
    """The prompts under `params` with 4 steps per call give the single-step tokens; with
    `continued` False no call may be continued before it is read back."""
    prompts = prompts or PROMPTS[:len(params)]
    expected = single_step_llm.generate(prompts, params, use_tqdm=False)
    multi = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256, seed=1,
                num_scheduler_steps=4, enable_compilation_cache=False)
    calls = []
    runner = multi.engine.runner
    launch = runner.launch_decode_steps
    runner.launch_decode_steps = lambda *a: calls.append((a[2], a[3] is None)) or launch(*a)
    got = multi.generate(prompts, params, use_tqdm=False)
    assert calls and max(n for n, _ in calls) == 4
    if not continued:
        assert all(host_tokens for _, host_tokens in calls)  # no continuation on device tokens
    for want, out in zip(expected, got):
        w, o = want.outputs[0], out.outputs[0]
        assert (o.token_ids, o.finish_reason) == (w.token_ids, w.finish_reason)
        assert o.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=1e-4)
    assert_pool_whole(multi)


def test_continuations_are_dispatched_with_device_tokens(tiny_model_dir, single_step_llm):
    """While a multi-step call is in flight, the next one is dispatched with that call's last
    samples still on the device as its input (the host reads the first back afterwards); the
    tokens are those of single steps, also for a sequence that stops inside a call whose
    continuation is already dispatched (the rows left continue without it), and for one aborted
    while its call is in flight."""
    import jax

    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[3], PROMPTS[2]]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=4, max_tokens=27, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, stop=["é"])]
    expected = single_step_llm.generate(prompts, params, use_tqdm=False)
    multi = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256, seed=1,
                num_scheduler_steps=4, enable_compilation_cache=False)
    runner, engine = multi.engine.runner, multi.engine
    launches = []
    launch = runner.launch_decode_steps

    def spy(step_input, flags, num_steps, token_ids=None):
        live_rows = int((step_input.attention.decode.context_lens > 0).sum())
        launches.append((live_rows, token_ids))
        return launch(step_input, flags, num_steps, token_ids)

    runner.launch_decode_steps = spy
    got = multi.generate(prompts, params, use_tqdm=False)
    continued = [(rows, t) for rows, t in launches if t is not None]
    assert continued and all(isinstance(t, jax.Array) for _, t in continued)
    # the stop-string and the short sequences finish early; the others continue without them
    assert expected[3].outputs[0].finish_reason == "stop"
    assert len({rows for rows, _ in continued}) > 1
    for want, out in zip(expected, got):
        w, o = want.outputs[0], out.outputs[0]
        assert (o.token_ids, o.finish_reason) == (w.token_ids, w.finish_reason)
    assert_pool_whole(multi)

    tok = multi.get_tokenizer()
    for i in range(2):
        engine.add_request(f"r{i}", None, tok.encode(prompts[i]), params[i])
    while engine._in_flight is None:
        engine.step()
    engine.abort("r0")
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert set(outputs) == {"r1"}
    assert outputs["r1"].outputs[0].token_ids == expected[1].outputs[0].token_ids
    while engine._in_flight is not None:  # a dangling continuation is read back and dropped
        assert engine.step() == []
    assert_pool_whole(multi)


def test_full_batch_runs_ahead_while_requests_wait(tiny_model_dir, single_step_llm):
    """With every max_num_seqs seat taken, waiting requests cannot join before a finish, so
    decodes still run several steps per call (and continue in flight); each waiting request
    joins once a seat frees, and every output is the one single steps give."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 20, 14, 6)]
    expected = single_step_llm.generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256, seed=1, max_num_seqs=2,
              num_scheduler_steps=4, enable_compilation_cache=False)
    engine, runner = llm.engine, llm.engine.runner
    waiting_at_launch = []
    launch = runner.launch_decode_steps

    def spy(*args):
        waiting_at_launch.append(len(engine.scheduler.waiting))
        return launch(*args)

    runner.launch_decode_steps = spy
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert any(waiting_at_launch)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert_pool_whole(llm)


def test_multi_step_with_one_token_prompts_and_n(tiny_model_dir):
    """A one-token prompt's first step looks like a decode; its n > 1 siblings fork after it, so
    it must not run inside a multi-step call (this hung the engine before)."""
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=128, num_scheduler_steps=4,
              enable_compilation_cache=False)
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=9, ignore_eos=True)
    out = llm.generate(prompt_token_ids=[[7]], sampling_params=params, use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [9, 9, 9]
    assert_pool_whole(llm)


def test_triton_backend_without_jax_triton_says_how_to_install(tiny_model_dir):
    try:
        import jax_triton  # noqa: F401
        pytest.skip("jax_triton is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"jinfer\[triton\]"):
        LLM(str(tiny_model_dir), attention_backend="triton", enable_compilation_cache=False)


def test_warmup_compiles_what_requests_then_use(tiny_model_dir):
    """After warmup(), greedy single-prompt requests within the warmed-up shapes compile
    nothing new, and the pool is untouched (warm-up runs on the pad block)."""
    llm = LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, num_scheduler_steps=4, enable_compilation_cache=False)
    runner = llm.engine.runner
    k_before = np.asarray(runner.kv_cache.k)[:, 1:]
    result = llm.warmup(max_context=64)
    assert result["programs"] == runner.num_compiles > 0
    np.testing.assert_array_equal(np.asarray(runner.kv_cache.k)[:, 1:], k_before)
    num_compiles = runner.num_compiles
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    for prompt in PROMPTS[:3]:
        llm.generate(prompt, params, use_tqdm=False)
    assert runner.num_compiles == num_compiles
    assert_pool_whole(llm)


def test_dtype_auto_is_float32_on_the_cpu_and_bad_dtypes_say_what_to_use(tiny_model_dir):
    import jax
    import jax.numpy as jnp

    llm = LLM(str(tiny_model_dir), num_kv_blocks=16, max_model_len=64,
              enable_compilation_cache=False)
    expected = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    assert llm.engine.runner.kv_cache.k.dtype == expected
    with pytest.raises(ValueError, match="dtype='fp8' is not supported; choose 'auto' or one"):
        LLM(str(tiny_model_dir), dtype="fp8", enable_compilation_cache=False)
