"""`LLM` construction and its public API for research code: from_params, get_params,
update_weights, stats()["num_compiles"], and the conventions of its arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import LLM, SamplingParams
from jinfer.loader import load_weights

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_kv_blocks=32, max_model_len=128,
               enable_compilation_cache=False)


def test_from_params_gives_the_loaded_models_tokens(llm, tiny_model_dir):
    """The same weights through from_params (in the loaders' stacked layout and in the run
    layout get_params returns) generate the same tokens as the loaded model."""
    want = llm.generate(["hello world"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    config, stacked, _ = load_weights(tiny_model_dir, "float32")
    for params in (stacked, llm.get_params()):
        other = LLM.from_params(config, params, llm.get_tokenizer(), num_kv_blocks=32,
                                max_model_len=128, enable_compilation_cache=False)
        got = other.generate(["hello world"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want
        assert other.engine.block_manager.is_whole()


def test_update_weights_changes_outputs_without_a_compile(llm):
    params = llm.get_params()
    before = llm.generate(["the sky"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    compiles = llm.stats()["num_compiles"]
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    noisy = treedef.unflatten([a + rng.standard_normal(a.shape).astype(a.dtype) * 0.3
                               for a in leaves])
    llm.update_weights(noisy)
    assert llm.stats()["num_cached_blocks"] == 0  # K/V of the old weights are not reused
    after = llm.generate(["the sky"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.stats()["num_compiles"] == compiles  # same shapes: no new program
    assert after != before
    llm.update_weights(params)  # and back: the original tokens again
    assert llm.generate(["the sky"], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before
    assert llm.engine.block_manager.is_whole()


def test_update_weights_refuses_other_shapes_and_dtypes(llm):
    params = llm.get_params()
    wrong_dtype = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match="float32.*bfloat16|bfloat16.*float32"):
        llm.update_weights(wrong_dtype)
    wrong_shape = dict(params, embed=params["embed"][:-1])
    with pytest.raises(ValueError, match=r"\['embed'\]"):
        llm.update_weights(wrong_shape)
    with pytest.raises(ValueError, match="structure"):
        llm.update_weights(dict(params, layers=params["layers"][:-1]))
    assert llm.get_params() is params  # nothing was swapped


def test_num_compiles_counts_new_programs_only(llm):
    llm.generate(["count me"], GREEDY, use_tqdm=False)
    compiles = llm.stats()["num_compiles"]
    assert compiles >= 2  # a prefill and a decode program at least
    llm.generate(["count me too"], GREEDY, use_tqdm=False)
    assert llm.stats()["num_compiles"] == compiles


def test_a_dict_for_sampling_params_names_sampling_params(llm):
    with pytest.raises(TypeError, match=r"SamplingParams\(\*\*\{'max_tokens': 3\}\)"):
        llm.generate("hi", {"max_tokens": 3}, use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(["a", "b"], [GREEDY, {"temperature": 0}], use_tqdm=False)
    assert llm.engine.block_manager.is_whole()
    assert not llm.engine.has_unfinished_requests()


def test_unknown_option_lists_the_options(tiny_model_dir):
    with pytest.raises(TypeError, match="max_num_seq.*max_num_seqs"):
        LLM(str(tiny_model_dir), max_num_seq=4)


def test_chat_reports_the_templated_prompt(llm):
    messages = [{"role": "user", "content": "Hi there"}]
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    template = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
    assert out.prompt == template and "Hi there" in out.prompt
    assert out.prompt_token_ids == llm.get_tokenizer().encode(template, add_special_tokens=False)


def test_from_params_checks_the_pytree():
    from jinfer.model.shapes import MODEL_SHAPES
    with pytest.raises(ValueError, match="get_params"):
        LLM.from_params(MODEL_SHAPES["smollm2-135m"], {"weights": np.zeros(3)})


# -- prompt logprobs ---------------------------------------------------------------------------
SCORED = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
PLAIN = "Why is the sky blue?"
NEAR_TIE = 1e-5  # float32 logprobs of one position, computed by two programs


@pytest.fixture(scope="module")
def chunked_llm(tiny_model_dir):
    """Prompts prefilled 16 tokens a step, with prefix caching (the default)."""
    return LLM(str(tiny_model_dir), num_kv_blocks=32, max_model_len=128,
               max_num_batched_tokens=16, enable_compilation_cache=False)


def assert_prompt_logprobs(llm, ids: list[int], entries: list, top_n: int) -> None:
    """`entries` (a RequestOutput's prompt_logprobs for prompt_logprobs=top_n) against the
    oracle log_softmax(llm.prompt_logits(ids)): per prompt token its logprob and rank, the
    top_n ids (up to near-ties) and their logprobs, every decoded token."""
    ref = np.asarray(jax.nn.log_softmax(llm.prompt_logits(ids), axis=-1))  # [len, vocab]
    tokenizer = llm.get_tokenizer()
    assert len(entries) == len(ids) and entries[0] is None
    for position, (token, entry) in enumerate(zip(ids[1:], entries[1:]), 1):
        want = ref[position - 1]
        for token_id, logprob in entry.items():
            assert logprob.logprob == pytest.approx(want[token_id], abs=NEAR_TIE)
            assert logprob.decoded_token == tokenizer.decode([token_id],
                                                             skip_special_tokens=False)
        rank = entry[token].rank
        assert 1 + (want > want[token] + NEAR_TIE).sum() <= rank
        assert rank <= 1 + (want > want[token] - NEAR_TIE).sum()
        top = sorted(entry, key=lambda t: entry[t].rank)[:top_n]
        assert [entry[t].rank for t in top] == list(range(1, top_n + 1))
        assert (want[top] >= np.sort(want)[::-1][top_n - 1] - NEAR_TIE).all()
        assert set(entry) == set(top) | {token}


@pytest.mark.parametrize("chunked", [False, True], ids=["one_chunk", "chunked"])
def test_prompt_logprobs_are_the_log_softmax_of_the_prompt_logits(llm, chunked_llm, chunked):
    """A scored prompt in a batch with one that is not (its tokens and logprobs are those of
    a run alone) and one scored with top-0; then the scored prompt again: no prefix-cache hit,
    every position computed again, the same entries."""
    llm = chunked_llm if chunked else llm
    tokenizer = llm.get_tokenizer()
    ids, plain_ids = tokenizer.encode(SCORED), tokenizer.encode(PLAIN)
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    alone = llm.generate(prompt_token_ids=[plain_ids], sampling_params=plain, use_tqdm=False)
    scored = [SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k) for k in (5, 0)]
    outputs = llm.generate(prompt_token_ids=[ids, plain_ids, ids[:9]],
                           sampling_params=[scored[0], plain, scored[1]], use_tqdm=False)
    assert_prompt_logprobs(llm, ids, outputs[0].prompt_logprobs, 5)
    assert_prompt_logprobs(llm, ids[:9], outputs[2].prompt_logprobs, 0)
    assert outputs[1].prompt_logprobs is None
    assert outputs[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert outputs[1].outputs[0].logprobs == alone[0].outputs[0].logprobs
    computed = llm.stats()["num_computed_prompt_tokens"]
    again = llm.generate(prompt_token_ids=[ids], sampling_params=scored[0], use_tqdm=False)
    assert llm.stats()["num_computed_prompt_tokens"] == computed + len(ids)
    assert again[0].prompt_logprobs == outputs[0].prompt_logprobs
    assert llm.engine.block_manager.is_whole()


def test_parallel_samples_get_the_prompt_logprobs_once(chunked_llm):
    ids = chunked_llm.get_tokenizer().encode(SCORED)
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=3, prompt_logprobs=2)
    computed = chunked_llm.stats()["num_computed_prompt_tokens"]
    out = chunked_llm.generate(prompt_token_ids=[ids], sampling_params=params,
                               use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert_prompt_logprobs(chunked_llm, ids, out.prompt_logprobs, 2)
    # the prompt once, then each sibling's last prompt token (for logits of its own)
    assert chunked_llm.stats()["num_computed_prompt_tokens"] == computed + len(ids) + 2
    assert chunked_llm.engine.block_manager.is_whole()


def test_the_first_streamed_output_has_every_prompt_logprob(chunked_llm):
    ids = chunked_llm.get_tokenizer().encode(SCORED)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, prompt_logprobs=1)
    stream = chunked_llm.stream_outputs(ids, params)
    first = next(stream)
    stream.close()  # aborts the request
    assert len(first.outputs[0].token_ids) == 1
    assert_prompt_logprobs(chunked_llm, ids, first.prompt_logprobs, 1)
    assert chunked_llm.engine.block_manager.is_whole()
