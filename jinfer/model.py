"""The Llama-family decoder as pure functions over a params pytree and the paged KV pool.

Covers Llama 2, Llama 3.x (with llama3 RoPE scaling) and SmolLM/SmolLM2: RMSNorm, grouped-query
attention with rotate-half RoPE, SwiGLU MLP, tied or untied output embeddings.

The layer loop is unrolled in Python over a list of per-layer weight dicts. A `lax.scan` over
stacked weights compiles several times faster, but XLA copies each layer's weights out of the stack
at every step (a dynamic slice feeding a matmul), which made CPU decode 1.7x slower when measured;
the KV pool stays one stacked array, indexed by a static layer number, updated in place.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.attention import AttentionFn, AttentionMetadata, PackedTokens
from jinfer.config import ModelConfig
from jinfer.kv_cache import KVCache


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies, with Llama 3's long-context scaling when configured."""
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
    """positions [batch, q_len] -> (cos, sin), each [batch, q_len, 1, head_dim // 2]; computed
    once per step and shared by every layer's Q and K."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, q_len, head_dim/2]
    # The barrier keeps XLA from fusing cos/sin into every layer's RoPE (recomputing them per
    # head and layer: a measurable share of a CPU decode step).
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x: [batch, q_len, heads, head_dim];
    cos, sin: [batch, q_len, 1, head_dim // 2] from `rope_cos_sin`."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _write_kv(pool: jax.Array, layer: int, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Writes new K or V rows at their slots of one layer, in place.

    pool: [layers, num_blocks, block_size, kv_heads, head_dim]; slots: [batch, q_len];
    new: [batch, q_len, kv_heads, head_dim]. Indexes (layer, block, offset) directly: a reshape
    of the pool here would make XLA copy the whole pool at every layer.
    """
    block_size = pool.shape[2]
    slots = slots.reshape(-1)
    return pool.at[layer, slots // block_size, slots % block_size].set(
        new.reshape(-1, *pool.shape[3:]).astype(pool.dtype))


def _attention_block(config, lp, h, layer, kv, meta, packed, attn_fn, rope):
    """One layer's attention sublayer: norm -> QKV -> RoPE -> write K/V -> paged attention.

    h: [rows, tokens, hidden]. Unpacked, rows are the attention's sequences; packed (`packed` not
    None) h is [1, num_tokens, hidden] and only the attention sees the per-sequence layout.
    """
    rows, tokens, _ = h.shape
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    qkv = x @ lp["wqkv"]  # [rows, tokens, q_size + 2 * kv_size]
    q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    q = apply_rope(q.reshape(rows, tokens, config.num_heads, config.head_dim), *rope)
    k = apply_rope(k.reshape(rows, tokens, config.num_kv_heads, config.head_dim), *rope)
    v = v.reshape(rows, tokens, config.num_kv_heads, config.head_dim)
    slots = meta.slot_mapping if packed is None else packed.slot_mapping
    k_pool = _write_kv(kv.k, layer, slots, k)
    v_pool = _write_kv(kv.v, layer, slots, v)
    if packed is not None:  # [1, tokens, heads, dim] -> [seqs, q_len, heads, dim]
        q = q[0][packed.to_rows]
    out = attn_fn(q, k_pool, v_pool, layer, meta, 1.0 / math.sqrt(config.head_dim))
    if packed is not None:  # back to [1, tokens, heads, dim]
        out = out.reshape(-1, config.num_heads, config.head_dim)[packed.to_tokens][None]
    out = out.reshape(rows, tokens, config.q_size) @ lp["wo"]
    return h + out, KVCache(k=k_pool, v=v_pool)


def _mlp_block(config, lp, h):
    x = rms_norm(h, lp["mlp_norm"], config.rms_norm_eps)
    gate, up = jnp.split(x @ lp["w_gate_up"], 2, axis=-1)
    return h + (jax.nn.silu(gate) * up) @ lp["w_down"]


def forward_hidden(
    params: dict,
    kv_cache: KVCache,
    token_ids: jax.Array,  # [batch, q_len] int32
    meta: AttentionMetadata,
    *,
    config: ModelConfig,
    attn_fn: AttentionFn,
    packed: Optional[PackedTokens] = None,
) -> tuple[jax.Array, KVCache]:
    """Runs the decoder stack; returns the final-normed hidden states [batch, q_len, hidden].

    With `packed`, token_ids is [1, num_tokens]: several sequences' prompt chunks back to back,
    so the matmuls skip the per-sequence padding; `meta` still describes the attention's
    per-sequence layout [seqs, q_len] and `packed` maps between the two.
    """
    positions = meta.positions if packed is None else packed.positions
    rope = rope_cos_sin(positions, rope_inv_freq(config))
    h = params["embed"][token_ids]
    for layer, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{layer}"):
            h, kv_cache = _attention_block(config, lp, h, layer, kv_cache, meta, packed,
                                           attn_fn, rope)
            h = _mlp_block(config, lp, h)
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), kv_cache


def prepare_params(params: dict) -> dict:
    """Loader layout -> run layout: a list of per-layer dicts, with the Q/K/V projections fused
    into one `wqkv` and gate/up into one `w_gate_up` (fewer, larger matmuls).

    The loader stacks layers ({name: [layers, ...]}); NumPy views keep this free of copies until
    the fused weights are concatenated.
    """
    stacked = params["layers"]
    layers = []
    for i in range(len(stacked["wq"])):
        layers.append({
            "attn_norm": stacked["attn_norm"][i],
            "wqkv": np.concatenate([stacked["wq"][i], stacked["wk"][i], stacked["wv"][i]], 1),
            "wo": stacked["wo"][i],
            "mlp_norm": stacked["mlp_norm"][i],
            "w_gate_up": np.concatenate([stacked["w_gate"][i], stacked["w_up"][i]], 1),
            "w_down": stacked["w_down"][i],
        })
    return {**params, "layers": layers}


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden [..., hidden] -> float32 logits [..., vocab]."""
    if config.tie_word_embeddings:
        logits = hidden @ params["embed"].T
    else:
        logits = hidden @ params["lm_head"]
    return logits.astype(jnp.float32)
