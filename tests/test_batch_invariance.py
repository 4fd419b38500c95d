"""200 random requests together (prefix caching on, a pool small enough to preempt) give exactly
the tokens each gives alone, and the pool is whole afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import LLM, SamplingParams

NUM_REQUESTS = 200


def random_workload(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefixes = [list(rng.integers(3, vocab, rng.integers(16, 48))) for _ in range(6)]
    requests = []
    for i in range(NUM_REQUESTS):
        tail = list(rng.integers(3, vocab, rng.integers(1, 24)))
        prompt = (prefixes[rng.integers(len(prefixes))] if rng.random() < 0.7 else []) + tail
        params = SamplingParams(
            n=int(rng.integers(1, 5)), temperature=float(rng.choice([0.0, 0.7, 1.3])),
            top_p=float(rng.choice([1.0, 0.9])), top_k=int(rng.choice([0, 20])), seed=i,
            max_tokens=int(rng.integers(2, 14)), ignore_eos=bool(rng.random() < 0.5),
            stop=["e"] if rng.random() < 0.2 else None)
        requests.append(([int(t) for t in prompt], params))
    return requests


def completions(output):
    return [(c.token_ids, c.text, c.finish_reason) for c in output.outputs]


@pytest.mark.slow
def test_many_requests_together_equal_alone(tiny_model_dir):
    crowded = LLM(str(tiny_model_dir), num_kv_blocks=48, block_size=8, max_model_len=128,
                  max_num_seqs=32, max_num_batched_tokens=96, enable_compilation_cache=False)
    requests = random_workload(crowded.model_config.vocab_size)
    together = crowded.generate(prompt_token_ids=[p for p, _ in requests],
                                sampling_params=[s for _, s in requests], use_tqdm=False)
    stats = crowded.stats()
    assert stats["num_preemptions"] > 0, "the pool must be small enough to force preemption"
    assert stats["prefix_cache_hit_rate"] > 0
    assert crowded.engine.block_manager.is_whole()

    alone = LLM(str(tiny_model_dir), num_kv_blocks=256, block_size=8, max_model_len=128,
                enable_prefix_caching=False, enable_compilation_cache=False)
    for (prompt, params), out in zip(requests, together):
        expected = alone.generate(prompt_token_ids=[prompt], sampling_params=params,
                                  use_tqdm=False)[0]
        assert completions(out) == completions(expected), (prompt, params)
    assert alone.engine.block_manager.is_whole()
