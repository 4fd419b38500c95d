"""Warm-up (jinfer/runner/warmup.py) with its defaults: a small, bounded number of programs,
after which a default generate compiles nothing."""

from __future__ import annotations

from jinfer import LLM, SamplingParams


def test_default_warmup_is_bounded_and_covers_a_generate(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), enable_compilation_cache=False)
    result = llm.warmup()
    # Greedy and default sampling, each: 11 one-prompt prefill buckets (16..512 tokens) and 7
    # batch buckets x 3 block-table widths (CPU: 128, 256 and 512 tokens).
    assert result["programs"] == 2 * (11 + 7 * 3)
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
    builds each count (4, 2 and 1 steps) of every decode shape, so generations whose tails run
    4 + 2 + 1 steps compile nothing more."""
    from jinfer.config import KernelConfig
    llm = LLM(str(tiny_model_dir), enable_compilation_cache=False, max_num_seqs=4,
              max_num_batched_tokens=32, num_scheduler_steps=4,
              kernel_config=KernelConfig(decode_loop="scan", unroll_max_rows=0))
    result = llm.warmup(max_context=128)
    decode = [key for key in llm.engine.runner.programs._programs if key[0] == "decode_steps"]
    assert {key[3] for key in decode} == {1, 2, 4} and {key[4] for key in decode} == {"scan"}
    shapes = {key[1:3] for key in decode}
    assert len(decode) == 3 * len(shapes)  # every shape in every count
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (7, 5, 3)]
    llm.generate(["a", "b", "c"], params, use_tqdm=False)  # one-token prompts, as above
    assert llm.stats()["num_compiles"] == result["programs"]
    assert llm.engine.block_manager.is_whole()
