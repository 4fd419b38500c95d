"""jinfer/model/layers.py against NumPy written from the formulas: RMSNorm, RoPE's inverse
frequencies (plain, and Llama 3's long-context scaling written per frequency as Hugging Face's
`_compute_llama3_parameters` does) and the cos/sin tables that apply_rope rotates with."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.model.config import LinearRopeScaling, LongRopeScaling, ModelConfig, RopeScaling
from jinfer.model.layers import (ACTIVATIONS, rms_norm, rope_attention_factor, rope_cos_sin,
                                 rope_inv_freq, soft_cap)
from jinfer.model.shapes import MODEL_SHAPES
from pallas_kernels.reference import apply_rope

TINY = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=10000.0)


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rms_norm(dtype, tolerance):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 48)) * 4).astype(np.float32)
    weight = (1 + 0.1 * rng.standard_normal(48)).astype(np.float32)
    x_in, w_in = jnp.asarray(x, dtype), jnp.asarray(weight, dtype)
    x64, w64 = np.asarray(x_in, np.float64), np.asarray(w_in, np.float64)
    want = w64 * x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-5)
    got = rms_norm(x_in, w_in, 1e-5)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance,
                               atol=tolerance)


def test_rope_inv_freq_plain():
    i = np.arange(TINY.head_dim // 2)
    want = TINY.rope_theta ** (-2 * i / TINY.head_dim)
    np.testing.assert_allclose(rope_inv_freq(TINY), want, rtol=1e-6)


def llama3_inv_freq(theta: float, dim: int, s: RopeScaling) -> np.ndarray:
    """Per frequency: wavelengths under original_max / high_freq_factor kept, over
    original_max / low_freq_factor divided by `factor`, in between interpolated."""
    out = []
    for freq in theta ** (-np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(freq)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(freq / s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize("shape", ["llama3-1b", "llama3-8b"])
def test_rope_inv_freq_llama3_scaling(shape):
    config = MODEL_SHAPES[shape]
    got = rope_inv_freq(config)
    want = llama3_inv_freq(config.rope_theta, config.head_dim, config.rope_scaling)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    # the fastest rotations are kept, the slowest stretched by the factor, some in between
    assert got[0] == plain[0]
    assert got[-1] == pytest.approx(plain[-1] / config.rope_scaling.factor, rel=1e-6)
    assert np.any((got < plain) & (got > plain / config.rope_scaling.factor))


def test_rope_cos_sin_and_rotation():
    positions = np.array([0, 1, 7, 300], np.int32)
    inv_freq = rope_inv_freq(TINY)
    cos, sin = rope_cos_sin(jnp.asarray(positions), inv_freq)
    angles = positions[:, None].astype(np.float64) * inv_freq  # [T, head_dim / 2]
    assert cos.shape == sin.shape == (4, 1, TINY.head_dim // 2)
    np.testing.assert_allclose(np.asarray(cos)[:, 0], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin)[:, 0], np.sin(angles), atol=1e-5)
    # rotate-half: each (x[j], x[j + half]) pair turned by its angle
    x = np.random.default_rng(1).standard_normal((4, 3, TINY.head_dim)).astype(np.float32)
    half = TINY.head_dim // 2
    a, b = x[..., :half], x[..., half:]
    c, s = np.cos(angles)[:, None], np.sin(angles)[:, None]
    want = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    np.testing.assert_allclose(np.asarray(apply_rope(jnp.asarray(x), cos, sin)), want,
                               atol=1e-4)


def test_rope_inv_freq_linear_longrope_and_local():
    """Linear scaling divides every frequency; LongRoPE divides each by its own factor (short or
    long set, by for_context); a windowed layer's base is its own and unscaled."""
    plain = rope_inv_freq(TINY)
    linear = dataclasses.replace(TINY, rope_scaling=LinearRopeScaling(4.0))
    np.testing.assert_allclose(rope_inv_freq(linear), plain / 4, rtol=1e-6)
    short, long = np.linspace(1, 2, 8), np.linspace(1, 9, 8)
    scaling = LongRopeScaling(tuple(short), tuple(long), original_max_position_embeddings=64,
                              attention_factor=1.25)
    config = dataclasses.replace(TINY, rope_scaling=scaling)
    np.testing.assert_allclose(rope_inv_freq(config.for_context(64)), plain / short, rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(config.for_context(65)), plain / long, rtol=1e-6)
    assert rope_attention_factor(config) == 1.25 and rope_attention_factor(linear) == 1.0
    assert linear.for_context(65) is linear
    local = dataclasses.replace(linear, local_rope_theta=500.0)
    np.testing.assert_allclose(rope_inv_freq(local, local=True),
                               500.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    cos, sin = rope_cos_sin(jnp.arange(3), plain, attention_factor=1.25)
    np.testing.assert_allclose(np.asarray(cos)[0, 0], 1.25, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, 1.25 ** 2, rtol=1e-5)


def test_activations_and_soft_cap():
    x = np.linspace(-4, 4, 9).astype(np.float32)
    tanh_gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x), tanh_gelu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ACTIVATIONS["silu"](x), x / (1 + np.exp(-x)), rtol=1e-5)
    np.testing.assert_allclose(soft_cap(jnp.asarray(x), 2.0), 2 * np.tanh(x / 2), rtol=1e-6)


@pytest.mark.parametrize("changes,words", [
    (dict(activation="relu"), ["'relu'", "gelu_tanh"]),
    (dict(layer_windows=(8, 8)), ["2 entries for 1 layers"]),
    (dict(layer_windows=(0,)), ["at least 1"]),
    (dict(rope_scaling=LongRopeScaling((1.0,), (1.0,), 64, 1.0)), ["LongRoPE", "8"]),
])
def test_model_config_rejects_bad_features(changes, words):
    with pytest.raises(ValueError) as info:
        dataclasses.replace(TINY, **changes)
    for word in words:
        assert word in str(info.value)
