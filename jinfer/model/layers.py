"""The pieces every decoder family shares: RMSNorm and rotary position embeddings (with Llama 3's
long-context scaling). Pure functions over arrays; the families (jinfer.model.llama, ...)
compose them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., hidden] normalised by its root mean square (in float32, rounded back to x's
    dtype), times weight [hidden]."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, with Llama 3's long-context scaling when configured:
    wavelengths above original_max / low_freq_factor are stretched by `factor`, those below
    original_max / high_freq_factor kept, those between interpolated."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions [T] -> (cos, sin), each [T, 1, head_dim // 2]; computed once per step and
    shared by every layer's Q and K (pallas_kernels.reference.apply_rope applies them)."""
    angles = positions[:, None].astype(jnp.float32) * inv_freq  # [T, head_dim / 2]
    # The barrier keeps XLA from fusing cos/sin into every layer's RoPE (recomputing them per
    # head and layer: a measurable share of a CPU decode step).
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return cos[:, None, :], sin[:, None, :]

