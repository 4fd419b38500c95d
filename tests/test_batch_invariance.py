"""Random requests together (prefix caching on, chunked prefill, a pool small enough to preempt,
n up to 4, stop strings, seeds, greedy and sampled rows mixed, multi-step decode calls) give
exactly the tokens each gives alone, and the pool is whole afterwards.

On the CPU this test's time is compiling step programs, one per batch bucket x block-table width
x sampler flags x decode steps per call, so its sizes are chosen to keep every code path of the
engine while compiling few programs:
- the alone runs reuse the batched LLM, its prefix cache emptied and switched off: one set of
  compiled programs serves both (a fresh LLM would compile the same programs again);
- prompts of at most 24 tokens and up to 13 generated: two block-table widths (the minimum bucket
  of 32 tokens and the next, 48), so batches still pad short rows' tables to a long row's width;
- num_scheduler_steps=4 has every multi-step path of the default 8 (a call of the limit, one of a
  smaller bucket, continuations) with one bucket fewer;
- 12 seats, fewer than the pool could run: the batched run also decodes several steps per call
  while requests wait, and halves those calls when the pool runs short.
"""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import LLM, SamplingParams

NUM_REQUESTS = 96
MAX_NUM_BATCHED_TOKENS = 48  # above every prompt: an alone prompt is prefilled in one chunk
STOP = ["e", "o"]


def random_workload(vocab: int, seed: int = 0):
    """Prompts of 1-24 tokens, 70% of them one of 6 shared prefixes of 8-16 tokens and a tail of
    1-8; n 1-4, greedy / sampled / top-p / top-k, a seed each, 2-13 tokens, ignore_eos half the
    time, stop strings a quarter of the time."""
    rng = np.random.default_rng(seed)
    prefixes = [list(rng.integers(3, vocab, rng.integers(8, 17))) for _ in range(6)]
    requests = []
    for i in range(NUM_REQUESTS):
        shared = rng.random() < 0.7
        tail = list(rng.integers(3, vocab, rng.integers(1, 9 if shared else 25)))
        prompt = (prefixes[rng.integers(len(prefixes))] if shared else []) + tail
        params = SamplingParams(
            n=int(rng.integers(1, 5)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_p=float(rng.choice([1.0, 0.9])), top_k=int(rng.choice([0, 20])), seed=i,
            max_tokens=int(rng.integers(2, 14)), ignore_eos=bool(rng.random() < 0.5),
            stop=STOP if rng.random() < 0.25 else None)
        requests.append(([int(t) for t in prompt], params))
    return requests


def completions(output):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in output.outputs]


@pytest.mark.slow
def test_many_requests_together_equal_alone(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), num_kv_blocks=24, block_size=8, max_model_len=40,
              max_num_seqs=12, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
              num_scheduler_steps=4, enable_compilation_cache=False)
    requests = random_workload(llm.model_config.vocab_size)
    assert max(len(prompt) for prompt, _ in requests) <= MAX_NUM_BATCHED_TOKENS
    together = llm.generate(prompt_token_ids=[p for p, _ in requests],
                            sampling_params=[s for _, s in requests], use_tqdm=False)
    stats = llm.stats()
    assert stats["num_preemptions"] > 0, "the pool must be small enough to force preemption"
    assert stats["prefix_cache_hit_rate"] > 0
    blocks = llm.engine.block_manager
    assert blocks.is_whole()
    assert any(c.stop_reason in STOP for out in together for c in out.outputs), \
        "no completion ended on a stop string: the workload no longer covers them"

    # Alone: one request at a time, on the same engine and compiled programs, nothing cached.
    blocks.reset_prefix_cache()
    blocks.enable_prefix_caching = False
    for (prompt, params), out in zip(requests, together):
        expected = llm.generate(prompt_token_ids=[prompt], sampling_params=params,
                                use_tqdm=False)[0]
        assert completions(out) == completions(expected), (prompt, params)
    alone = llm.stats()
    assert alone["num_preemptions"] == stats["num_preemptions"], "an alone run was preempted"
    assert alone["num_cached_blocks"] == 0
    assert blocks.is_whole()
