"""Real model shapes with random weights, for benchmarking without downloading a checkpoint.

`MODEL_SHAPES` holds the configs of published checkpoints (numbers from their config.json);
`random_params` fills the loader's stacked layout (`jinfer.model.decoder.param_shapes`, with
every weight the family's layers have) with random values generated on the device, leaf by leaf
and directly in the target dtype, so no model passes through host memory; `random_run_params`
makes the same values in the run layout, a layer at a time, for models near the device's size.
`config_to_hf_dict` gives the same shape to HF transformers (`AutoConfig.for_model(**d)`), so a
peer can be built on equal terms.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jinfer.loader.hf import load_hf_config, numpy_dtype
from jinfer.model.config import LinearRopeScaling, ModelConfig, RopeScaling
from jinfer.model.decoder import (fuse_layer, num_params,  # noqa: F401 (num_params re-exported)
                                  param_shapes)
from jinfer.model.families import family_of

# Numbers from each checkpoint's config.json on the Hugging Face Hub.
MODEL_SHAPES: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    # meta-llama/Llama-3.2-1B: 1.24B parameters
    "llama3-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=True),
    # meta-llama/Llama-3.1-8B: 8.03B parameters
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-70B: 70.6B parameters (141 GB in bf16: several GPUs)
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
        max_position_embeddings=131072, tie_word_embeddings=False),
    # Qwen/Qwen3-8B: 8.19B parameters; per-head q/k norms, head_dim 128 of hidden 4096 / 32
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False, model_type="qwen3",
        qk_norm=True),
    # google/gemma-3-12b-it's text model: 11.8B parameters; five 1024-token sliding-window
    # layers to one global, local RoPE base 1e4, global 1e6 with linear scaling 8
    "gemma3-12b": ModelConfig(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_layers=48,
        num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=LinearRopeScaling(factor=8.0), max_position_embeddings=131072,
        tie_word_embeddings=True, model_type="gemma3_text", qk_norm=True, post_norms=True,
        activation="gelu_tanh", embed_scale=math.sqrt(3840), query_pre_attn_scalar=256.0,
        layer_windows=tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(48)),
        local_rope_theta=10000.0),
    # mistralai/Mistral-7B-v0.1: 7.24B parameters; a 4096-token sliding window on every layer
    # (v0.2 and later have none: Llama's layer with a 32768 vocabulary)
    "mistral-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, tie_word_embeddings=False, model_type="mistral",
        layer_windows=(4096,) * 32),
    # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active; 128 experts of 768, 8 per token
    # (intermediate_size is each expert's), q/k norms, 4 KV heads of 128
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=768, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=False, model_type="qwen3_moe",
        qk_norm=True, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active; 8 experts of 14336, 2 per
    # token (93 GB in bf16: an H200, not an H100)
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=False, model_type="mixtral",
        num_experts=8, num_experts_per_tok=2),
}


def resolve_model_config(name_or_folder: str | os.PathLike) -> ModelConfig:
    """A MODEL_SHAPES name, or a folder holding a config.json, -> its ModelConfig."""
    if isinstance(name_or_folder, str) and name_or_folder in MODEL_SHAPES:
        return MODEL_SHAPES[name_or_folder]
    path = pathlib.Path(name_or_folder).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"{name_or_folder!r} is neither a model shape "
                         f"({', '.join(MODEL_SHAPES)}) nor a folder holding a config.json")
    return load_hf_config(path)


def kv_bytes_per_token(config: ModelConfig, itemsize: int) -> int:
    """Bytes of K and V that one token of context adds (and that a decode step reads)."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "ones"))
def _random_leaf(key: jax.Array, shape: tuple[int, ...], dtype: Any, ones: bool) -> jax.Array:
    if ones:
        return jnp.ones(shape, dtype)
    return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)


def random_params(config: ModelConfig, dtype: Any, seed: int = 0) -> dict:
    """Random device arrays in the loader's stacked layout (the keys and shapes of
    `allocate_params`): normal * 0.02 for the matrices and biases, ones for the norm weights
    (Gemma's too: its +1 is folded in at load).

    Values depend only on (seed, the leaf's name, its shape) and, for a layer's weight, the
    layer: each layer's slice is made by its own jitted call in `dtype` (the same values
    `random_run_params` gives), nothing is built on the host. `lm_head` is present only when
    the embeddings are untied. Stacking holds a leaf twice for a moment: for models too big for
    that, `random_run_params`.
    """
    dtype, key = numpy_dtype(dtype), jax.random.key(seed)
    shapes = param_shapes(config)
    params = {name: _leaf(key, name, shape, dtype) for name, shape in shapes.items()
              if name != "layers"}
    params["layers"] = {
        name: jnp.stack([_layer_leaf(key, name, i, shape[1:], dtype) for i in range(shape[0])])
        for name, shape in shapes["layers"].items()}
    return params


def random_run_params(config: ModelConfig, dtype: Any, seed: int = 0) -> dict:
    """`random_params` (the same values) made straight in the run layout
    (`jinfer.model.decoder.prepare_params`: a dict per layer, Q/K/V and gate/up fused), one
    layer's leaf at a time: the device holds the weights and one layer-leaf's scratch, so a
    model whose weights fit loads (Qwen3-30B-A3B's stacked experts are 36 GiB a name)."""
    dtype, key = numpy_dtype(dtype), jax.random.key(seed)
    shapes = param_shapes(config)
    params = {name: _leaf(key, name, shape, dtype) for name, shape in shapes.items()
              if name != "layers"}
    params["layers"] = [
        fuse_layer({name: _layer_leaf(key, name, i, shape[1:], dtype)
                    for name, shape in shapes["layers"].items()})
        for i in range(config.num_layers)]
    return params


def _leaf(key: jax.Array, name: str, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    leaf_key = jax.random.fold_in(key, zlib.crc32(name.encode()))
    return _random_leaf(leaf_key, tuple(shape), dtype, name.endswith("norm"))


def _layer_leaf(key: jax.Array, name: str, layer: int, shape: tuple[int, ...],
                dtype: Any) -> jax.Array:
    leaf_key = jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(f"layers.{name}".encode())),
                                  layer)
    return _random_leaf(leaf_key, tuple(shape), dtype, name.endswith("norm"))


def config_to_hf_dict(config: ModelConfig) -> dict:
    """`config` as its family's config.json (`transformers.AutoConfig.for_model(**d)` builds
    the same shape; written as config.json it loads back through
    `jinfer.loader.load_hf_config`)."""
    return family_of(config).config_to_hf(config)
