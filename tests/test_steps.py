"""The device step programs (jinfer/runner/steps.py): one decode program serves every step
count, the compile budget bounds the programs a process holds, and prompt logprobs run in step
variants of their own."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jinfer import LLM, SamplingParams
from jinfer.config import KernelConfig
from jinfer.runner import steps

PROMPTS = ["The quick brown fox", "Why is the sky blue?", "12345"]


def _llm(tiny_model_dir, **kwargs):
    return LLM(str(tiny_model_dir), num_kv_blocks=64, max_model_len=256,
               enable_compilation_cache=False, **kwargs)


def test_one_decode_program_serves_every_step_count(tiny_model_dir):
    """A loop with a dynamic trip count: 8- and 6-step calls of one shape (the tail in one call,
    as the scheduler gives a runner that takes any count) share one program, and give the
    tokens of single steps."""
    llm = _llm(tiny_model_dir, num_scheduler_steps=8,
               kernel_config=KernelConfig(unroll_max_rows=0, decode_loop="while"))
    runner = llm.engine.runner
    counts = []
    launch = runner.launch_decode_steps
    runner.launch_decode_steps = lambda *a: counts.append(a[2]) or launch(*a)
    assert runner.takes_any_step_count(1)
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)  # 1 + 8 + 6
    got = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    assert counts == [8, 6]
    decode_programs = [k for k in runner.programs._programs if k[0] == "decode_steps"]
    assert len(decode_programs) == 1
    single = _llm(tiny_model_dir, num_scheduler_steps=1)
    assert single.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids == got


def test_scan_loop_has_one_program_per_step_count_and_the_same_tokens(tiny_model_dir):
    """decode_loop="scan" (the GPU default): a static step count per program, 8- and 1-step
    calls each their own, the tokens of the while loop."""
    params = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)  # scan: 8 + 6 x 1
    got = {}
    for loop in ("scan", "while"):
        llm = _llm(tiny_model_dir, num_scheduler_steps=8,
                   kernel_config=KernelConfig(unroll_max_rows=0, decode_loop=loop))
        got[loop] = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        counts = {k[3] for k in llm.engine.runner.programs._programs
                  if k[0] == "decode_steps" and k[4] == loop}
        assert counts == ({8, 1} if loop == "scan" else {8}), (loop, counts)
    assert ([o.outputs[0].token_ids for o in got["scan"]]
            == [o.outputs[0].token_ids for o in got["while"]])
    with pytest.raises(ValueError, match="decode_loop must be"):
        KernelConfig(decode_loop="fori")


def test_unrolled_calls_have_one_program_per_step_count(tiny_model_dir):
    llm = _llm(tiny_model_dir, num_scheduler_steps=4,
               kernel_config=KernelConfig(unroll_max_rows=4))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(PROMPTS[:1], params, use_tqdm=False)
    unrolled = {k[3] for k in llm.engine.runner.programs._programs
                if k[0] == "decode_steps" and k[4] == "unrolled"}
    assert len(unrolled) >= 2  # e.g. 1 and 4 steps


def test_programs_past_the_budget_are_dropped_and_generation_goes_on(tiny_model_dir):
    llm = _llm(tiny_model_dir, max_programs=2)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = _llm(tiny_model_dir).generate(PROMPTS, params, use_tqdm=False)
    got = []
    for prompt in PROMPTS:  # different lengths: new prefill shapes
        got += llm.generate([prompt], params, use_tqdm=False)
    got_batch = llm.generate(PROMPTS, params, use_tqdm=False)  # new batch shapes
    programs = llm.engine.runner.programs
    assert programs.num_evictions >= 1 and programs.num_programs <= 2
    for a, b, c in zip(want, got, got_batch):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids
    assert llm.engine.block_manager.is_whole()


def test_execute_decode_steps_returns_the_steps_asked(tiny_model_dir):
    from jinfer.runner.warmup import greedy_rows, pad_block_items
    llm = _llm(tiny_model_dir, num_scheduler_steps=8)
    runner = llm.engine.runner
    items = pad_block_items(2, 20, 1, 16)
    step_input, flags = runner.prepare(items, [], greedy_rows(items), 0)
    out = runner.execute_decode_steps(step_input, flags, 3)
    assert np.asarray(out.tokens).shape == (3, 2)


def _prompt_logprobs_programs(llm) -> list:
    return [key for key in llm.engine.runner.programs._programs
            if "PromptLogprobsInput" in str(key[1].treedef)]


def test_prompt_logprobs_run_in_step_variants_of_their_own(tiny_model_dir):
    """Only steps whose prompt chunks ask for prompt logprobs build other programs (prefill
    steps, one per top-N bucket): a run without them builds and uses what it did before."""
    llm = _llm(tiny_model_dir)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    plain = set(llm.engine.runner.programs._programs)
    assert not _prompt_logprobs_programs(llm)
    for k in (0, 1, 3):  # top-N buckets 1, 1, 5
        scored = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=k)
        llm.generate(PROMPTS, scored, use_tqdm=False)
    new = set(llm.engine.runner.programs._programs) - plain
    assert new == set(_prompt_logprobs_programs(llm))
    assert {key[0] for key in new} == {"step"} and len(new) == 2
    compiles = llm.stats()["num_compiles"]
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.stats()["num_compiles"] == compiles
    assert llm.engine.block_manager.is_whole()


def test_prompt_logprobs_are_scored_a_few_rows_at_a_time(tiny_model_dir, monkeypatch):
    """Rows of the scoring loop do not change the scores: 5 rows at a time (several
    iterations and a remainder) against the oracle."""
    monkeypatch.setattr(steps, "PROMPT_LOGPROBS_ROWS", 5)
    llm = _llm(tiny_model_dir)
    ids = llm.get_tokenizer().encode(" ".join(PROMPTS))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    entries = llm.generate(prompt_token_ids=[ids], sampling_params=params,
                           use_tqdm=False)[0].prompt_logprobs
    ref = np.asarray(jax.nn.log_softmax(llm.prompt_logits(ids), axis=-1))
    got = [entry[token].logprob for token, entry in zip(ids[1:], entries[1:])]
    np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)


def test_unrolling_by_default_only_for_small_models_on_gpu():
    """KernelConfig.unroll_max_rows=None: 2 on GPU up to UNROLL_MAX_PARAMS parameters (the
    unrolled program's compile grows with layers x steps), 0 past it and on the CPU."""
    from jinfer.model.shapes import MODEL_SHAPES
    assert steps.default_unroll_max_rows(MODEL_SHAPES["llama3-1b"], on_gpu=True) == 2
    assert steps.default_unroll_max_rows(MODEL_SHAPES["qwen3-8b"], on_gpu=True) == 0
    assert steps.default_unroll_max_rows(MODEL_SHAPES["qwen3-30b-a3b"], on_gpu=True) == 0
    assert steps.default_unroll_max_rows(MODEL_SHAPES["llama3-1b"], on_gpu=False) == 0


def test_cpu_steps_take_the_cpu_options_this_xla_knows():
    assert steps.step_compiler_options("gpu") == steps.STEP_COMPILER_OPTIONS
    known = steps.step_compiler_options("cpu", {"xla_cpu_enable_fast_min_max": False})
    assert known == {**steps.STEP_COMPILER_OPTIONS, "xla_cpu_enable_fast_min_max": False}
    unknown = steps.step_compiler_options("cpu", {"xla_cpu_no_such_option": ""})
    assert unknown == steps.STEP_COMPILER_OPTIONS
