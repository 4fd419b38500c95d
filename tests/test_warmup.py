"""Warm-up (jinfer/runner/warmup.py) with its defaults: a small, bounded number of programs,
after which a default generate compiles nothing."""

from __future__ import annotations

from jinfer import LLM, SamplingParams
from jinfer.runner.warmup import context_within_budget, warmup_program_count


def test_default_warmup_is_bounded_and_covers_a_generate(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), enable_compilation_cache=False)
    result = llm.warmup()
    # Greedy and default sampling, each: 11 one-prompt prefill buckets (16..512 tokens) and 7
    # batch buckets x 3 block-table widths (CPU: 128, 256 and 512 tokens).
    assert result["programs"] == 2 * (11 + 7 * 3)
    assert warmup_program_count(llm.engine.runner, 512) == result["programs"]  # counted ahead
    assert llm.stats()["num_compiles"] == result["programs"]
    llm.generate(["Why is the sky blue?"], SamplingParams(temperature=0, max_tokens=40),
                 use_tqdm=False)
    llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=20, seed=0),
             use_tqdm=False)  # default sampling (temperature 1)
    llm.generate(["a", "b", "c"], SamplingParams(temperature=0, max_tokens=30),
                 use_tqdm=False)  # one-token prompts: decode rows from the start, batch of 3
    assert llm.stats()["num_compiles"] == result["programs"]
    assert llm.engine.block_manager.is_whole()


def test_scan_warmup_builds_every_step_count_and_covers_the_tails(tiny_model_dir):
    """decode_loop="scan" (the GPU's loop: one program per step count) on the CPU: warm-up
    builds each count (4 steps and 1) of every decode shape, so generations whose tails run as
    single steps compile nothing more."""
    from jinfer.config import KernelConfig
    llm = LLM(str(tiny_model_dir), enable_compilation_cache=False, max_num_seqs=4,
              max_num_batched_tokens=32, num_scheduler_steps=4,
              kernel_config=KernelConfig(decode_loop="scan", unroll_max_rows=0))
    result = llm.warmup(max_context=128)
    decode = [key for key in llm.engine.runner.programs._programs if key[0] == "decode_steps"]
    assert {key[3] for key in decode} == {1, 4} and {key[4] for key in decode} == {"scan"}
    shapes = {key[1:3] for key in decode}
    assert len(decode) == 2 * len(shapes)  # every shape in every count
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (7, 5, 3)]
    llm.generate(["a", "b", "c"], params, use_tqdm=False)  # one-token prompts, as above
    assert llm.stats()["num_compiles"] == result["programs"]
    assert llm.engine.block_manager.is_whole()


def test_a_capped_process_warms_what_its_budget_holds(tiny_model_dir):
    """The server's warm-up context on a capped process (the CPU's 80 programs): the largest
    of 2048, 1024, ... tokens whose programs fit the budget, counted without compiling."""
    llm = LLM(str(tiny_model_dir), enable_compilation_cache=False, max_model_len=2048)
    runner = llm.engine.runner
    assert warmup_program_count(runner, 2048) == 2 * (11 + 7 * 5)  # widths 128 .. 2048: 92
    assert context_within_budget(runner, 2048, 64) == 512  # 1024 would be 2 * (11 + 7 * 4)
    assert context_within_budget(runner, 2048, 100) == 2048
    assert runner.num_compiles == 0
