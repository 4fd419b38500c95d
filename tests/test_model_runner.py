"""The ModelRunner (jinfer/runner/model_runner.py): built with its final pool; decode-only
steps run on the decode-steps program; block copies, new weights and prompt logits go through
it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jinfer import LLM
from jinfer.runner.warmup import greedy_rows, pad_block_items


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_kv_blocks=24, max_model_len=128,
               enable_compilation_cache=False)


def test_runner_holds_the_pool_it_was_built_with(llm):
    runner = llm.engine.runner
    assert runner.kv_cache.num_blocks == 24 == llm.engine.block_manager.num_blocks


def test_a_decode_only_step_runs_on_the_decode_steps_program(llm):
    runner = llm.engine.runner
    items = pad_block_items(1, 20, 1, runner.block_size)
    step_input, flags = runner.prepare(items, [], greedy_rows(items), 0)
    single, scores = runner.execute(step_input, flags)
    assert scores is None
    several = runner.execute_decode_steps(step_input, flags, 1)
    np.testing.assert_array_equal(single.tokens, several.tokens[0])
    kinds = {key[0] for key in runner.programs._programs}
    assert "step" not in kinds and "decode_steps" in kinds


def test_copy_blocks_copies_every_layer(llm):
    runner = llm.engine.runner
    k = np.array(runner.kv_cache.k)
    k[:, 5] = np.random.default_rng(0).standard_normal(k[:, 5].shape)
    runner.kv_cache = type(runner.kv_cache)(k=jax.numpy.asarray(k), v=runner.kv_cache.v)
    runner.copy_blocks([(5, 7)])
    np.testing.assert_array_equal(np.asarray(runner.kv_cache.k)[:, 7], k[:, 5])


def test_prompt_logits_match_the_last_token_of_generate(llm):
    ids = llm.get_tokenizer().encode("The quick brown fox")
    logits = llm.prompt_logits(ids)
    assert logits.shape == (len(ids), llm.model_config.vocab_size)
    from jinfer import SamplingParams
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] == int(np.argmax(logits[-1]))
    assert llm.engine.block_manager.is_whole()
