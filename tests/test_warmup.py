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
