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
