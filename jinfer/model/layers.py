"""The pieces every decoder family shares: RMSNorm, the gated MLP's activations, tanh soft-capping
and rotary position embeddings (plain, or scaled as Llama 3, linearly, or as LongRoPE). Pure
functions over arrays; jinfer.model.decoder composes them."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.config import LinearRopeScaling, LongRopeScaling, ModelConfig, RopeScaling
from pallas_kernels.reference import rms_norm  # noqa: F401  (the models' RMSNorm)

# ModelConfig.activation -> the function on the gate half of the MLP (transformers' "silu",
# "gelu_pytorch_tanh" and "gelu").
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap)."""
    return cap * jnp.tanh(x / cap)


def rope_inv_freq(config: ModelConfig, *, local: bool = False) -> np.ndarray:
    """[head_dim // 2] inverse frequencies of the global layers' RoPE (rope_theta with its
    scaling), or with `local` of the windowed layers' (local_rope_theta, unscaled)."""
    dim = config.head_dim
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = None if local else config.rope_scaling
    if isinstance(scaling, LinearRopeScaling):
        inv_freq = inv_freq / scaling.factor
    elif isinstance(scaling, LongRopeScaling):
        inv_freq = inv_freq / np.asarray(scaling.factors, np.float64)
    elif isinstance(scaling, RopeScaling):
        inv_freq = llama3_scaled(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def llama3_scaled(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    """Llama 3's long-context scaling: wavelengths above original_max / low_freq_factor are
    stretched by `factor`, those below original_max / high_freq_factor kept, those between
    interpolated."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def rope_attention_factor(config: ModelConfig) -> float:
    """What the global layers' cos and sin are multiplied by (LongRoPE's attention factor;
    1 for every other RoPE)."""
    scaling = config.rope_scaling
    return scaling.attention_factor if isinstance(scaling, LongRopeScaling) else 1.0


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray,
                 attention_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """positions [T] -> (cos, sin), each [T, 1, head_dim // 2] (times attention_factor);
    computed once per step and shared by every layer's Q and K
    (pallas_kernels.reference.apply_rope applies them)."""
    angles = positions[:, None].astype(jnp.float32) * inv_freq  # [T, head_dim / 2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    # The barrier asks XLA not to fuse cos/sin into every layer's RoPE (recomputing them per
    # head and layer). XLA:CPU (jax 0.10) drops it before fusing, so the decode loop carries
    # the tables in its state instead (jinfer.runner.steps._decode_steps).
    cos, sin = jax.lax.optimization_barrier((cos, sin))
    return cos[:, None, :], sin[:, None, :]
