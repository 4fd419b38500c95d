"""Tests for jinfer.model.shapes: the published shapes, random weights in the loader's layout,
and the LlamaConfig dict (checked against transformers, built on torch's meta device)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest

from jinfer.model.config import LinearRopeScaling, ModelConfig, RopeScaling
from jinfer.loader.hf import allocate_params, load_hf_config, numpy_dtype
from jinfer.model.decoder import prepare_params
from jinfer.model.shapes import (MODEL_SHAPES, config_to_hf_dict, kv_bytes_per_token,
                                 num_params, random_params, random_run_params,
                                 resolve_model_config)

HAS_HF = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")

SMALL = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8)


def _shapes(tree) -> dict:
    return jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), tree)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_params_has_the_loader_layout(tied, dtype):
    config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
    params = random_params(config, dtype, seed=0)
    assert _shapes(params) == _shapes(allocate_params(config, numpy_dtype(dtype)))
    assert ("lm_head" in params) == (not tied)
    assert all(isinstance(a, jax.Array) for a in jax.tree.leaves(params))


def test_random_params_values():
    params = random_params(SMALL, "float32", seed=0)
    for name in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(params["layers"][name], 1.0)
    np.testing.assert_array_equal(params["final_norm"], 1.0)
    w_gate = np.asarray(params["layers"]["w_gate"])
    assert 0.015 < w_gate.std() < 0.025 and abs(w_gate.mean()) < 0.005
    assert not np.array_equal(w_gate, params["layers"]["w_up"])  # each leaf its own key
    assert not np.array_equal(w_gate[0], w_gate[1])  # each layer its own values
    again = random_params(SMALL, "float32", seed=0)["layers"]["w_gate"]
    other = random_params(SMALL, "float32", seed=1)["layers"]["w_gate"]
    np.testing.assert_array_equal(w_gate, again)
    assert not np.array_equal(w_gate, other)


@pytest.mark.parametrize("config", [
    SMALL, dataclasses.replace(SMALL, num_experts=4, num_experts_per_tok=2, qkv_bias=True)])
def test_random_run_params_are_random_params_in_the_run_layout(config):
    """The dummy load's layer-at-a-time maker gives prepare_params(random_params(...)) exactly:
    the same values, fused the same way, whichever route a model is made by."""
    want = prepare_params(random_params(config, "float32", seed=3))
    got = random_run_params(config, "float32", seed=3)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_random_params_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="Unsupported dtype"):
        random_params(SMALL, "int8")


def test_published_numbers():
    one_b, eight_b = MODEL_SHAPES["llama3-1b"], MODEL_SHAPES["llama3-8b"]
    assert (one_b.hidden_size, one_b.num_layers, one_b.num_heads, one_b.num_kv_heads,
            one_b.head_dim, one_b.intermediate_size, one_b.vocab_size) == (
        2048, 16, 32, 8, 64, 8192, 128256)
    assert one_b.tie_word_embeddings and one_b.rope_theta == 500000.0
    assert one_b.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert (eight_b.hidden_size, eight_b.num_layers, eight_b.num_heads, eight_b.num_kv_heads,
            eight_b.head_dim, eight_b.intermediate_size, eight_b.vocab_size) == (
        4096, 32, 32, 8, 128, 14336, 128256)
    assert not eight_b.tie_word_embeddings and eight_b.rope_theta == 500000.0
    assert eight_b.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    for config in (one_b, eight_b):
        assert config.max_position_embeddings == 131072 and config.rms_norm_eps == 1e-5
    smol = MODEL_SHAPES["smollm2-135m"]
    assert (smol.hidden_size, smol.num_layers, smol.num_heads, smol.num_kv_heads,
            smol.vocab_size, smol.rope_scaling) == (576, 30, 9, 3, 49152, None)
    assert round(num_params(one_b) / 1e9, 2) == 1.24
    assert round(num_params(eight_b) / 1e9, 2) == 8.03
    assert round(num_params(smol) / 1e6) == 135
    assert kv_bytes_per_token(one_b, 2) == 32 * 1024  # 16 layers x K,V x 8 heads x 64 x 2 B
    moe = MODEL_SHAPES["qwen3-30b-a3b"]
    assert (moe.num_experts, moe.num_experts_per_tok, moe.intermediate_size) == (128, 8, 768)
    assert round(num_params(moe) / 1e9, 1) == 30.5
    assert round(num_params(MODEL_SHAPES["mixtral-8x7b"]) / 1e9, 1) == 46.7


def test_random_params_of_experts_have_the_loader_layout():
    config = dataclasses.replace(SMALL, num_experts=4, num_experts_per_tok=2)
    params = random_params(config, "float32", seed=0)
    assert _shapes(params) == _shapes(allocate_params(config, np.dtype("float32")))
    layers = params["layers"]
    assert layers["w_gate"].shape == (2, 4, 32, 48) and layers["w_down"].shape == (2, 4, 48, 32)
    assert layers["router_w"].shape == (2, 32, 4)


@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_hf_dict_loads_back_through_the_loader(name, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_dict(MODEL_SHAPES[name])))
    assert load_hf_config(tmp_path) == MODEL_SHAPES[name]
    assert resolve_model_config(str(tmp_path)) == MODEL_SHAPES[name]
    assert resolve_model_config(name) is MODEL_SHAPES[name]


def test_resolve_model_config_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="llama3-1b"):
        resolve_model_config("llama3-405b")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_config(str(tmp_path))


@needs_hf
@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_transformers_builds_the_same_shape(name):
    import torch
    import transformers
    config = MODEL_SHAPES[name]
    hf_config = transformers.AutoConfig.for_model(**config_to_hf_dict(config))
    assert hf_config.model_type == config.model_type
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads,
            hf_config.num_key_value_heads, hf_config.head_dim, hf_config.intermediate_size,
            hf_config.vocab_size, hf_config.tie_word_embeddings) == (
        config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads,
        config.head_dim, config.intermediate_size, config.vocab_size,
        config.tie_word_embeddings)
    rope = hf_config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: one entry per layer type
    assert rope["rope_theta"] == config.rope_theta
    if config.rope_scaling is not None:
        kind = "linear" if isinstance(config.rope_scaling, LinearRopeScaling) else "llama3"
        assert rope["rope_type"] == kind and rope["factor"] == config.rope_scaling.factor
    if config.layer_windows is not None:
        sliding = [w is not None for w in config.layer_windows]
        types = getattr(hf_config, "layer_types", None) or ["sliding_attention"] * len(sliding)
        assert [t == "sliding_attention" for t in types] == sliding
        assert hf_config.sliding_window == max(w for w in config.layer_windows if w)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    unique = {id(p): p.numel() for p in model.parameters()}  # a tied head counted once
    assert sum(unique.values()) == num_params(config)


def test_new_family_shapes():
    """Qwen3-8B, Gemma-3-12B and Mistral-7B-v0.1 as their config.json say."""
    qwen, gemma, mistral = (MODEL_SHAPES[n] for n in ("qwen3-8b", "gemma3-12b", "mistral-7b"))
    assert qwen.qk_norm and qwen.head_dim == 128 and not qwen.qkv_bias
    assert round(num_params(qwen) / 1e9, 2) == 8.19
    assert gemma.layer_windows.count(None) == 8 and set(gemma.layer_windows) == {None, 1024}
    assert gemma.window(5) is None and gemma.window(4) == 1024
    assert (gemma.local_rope_theta, gemma.rope_scaling) == (10000.0, LinearRopeScaling(8.0))
    assert round(num_params(gemma) / 1e9, 1) == 11.8
    assert mistral.layer_windows == (4096,) * 32
    assert round(num_params(mistral) / 1e9, 2) == 7.24
    # blocks behind the window are released only where every layer has one
    assert (mistral.kv_window, gemma.kv_window, qwen.kv_window) == (4096, None, None)
    # the persistent layer kernels take Llama's and Qwen3's layers (dense and experts)
    assert all(MODEL_SHAPES[name].kernel_layers for name in ("llama3-1b", "qwen3-30b-a3b"))
    assert qwen.kernel_layers and not any(c.kernel_layers for c in (gemma, mistral))


@pytest.mark.parametrize("features", [dict(qkv_bias=True), dict(qk_norm=True),
                                      dict(qk_norm=True, post_norms=True)])
def test_random_params_have_every_weight_of_the_family(features):
    """Dummy weights include a family's Q/K/V biases, q/k norms and post norms."""
    config = dataclasses.replace(SMALL, **features)
    params = random_params(config, "float32")
    assert _shapes(params) == _shapes(allocate_params(config, numpy_dtype("float32")))
    layers = params["layers"]
    assert ({"bq", "bk", "bv"} <= set(layers)) == config.qkv_bias
    assert ({"q_norm", "k_norm"} <= set(layers)) == config.qk_norm
    assert ({"attn_post_norm", "mlp_post_norm"} <= set(layers)) == config.post_norms
    for name in layers:
        if name.endswith("norm"):
            np.testing.assert_array_equal(layers[name], 1.0)
