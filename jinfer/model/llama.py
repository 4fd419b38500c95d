"""The Llama-family decoder as pure functions over a params pytree and the paged KV pool.

Covers Llama 2, Llama 3.x (with llama3 RoPE scaling) and SmolLM/SmolLM2: RMSNorm, grouped-query
attention with rotate-half RoPE, SwiGLU MLP, tied or untied output embeddings.

The layer loop is unrolled in Python over a list of per-layer weight dicts. A `lax.scan` over
stacked weights compiles several times faster, but XLA copies each layer's weights out of the stack
at every step (a dynamic slice feeding a matmul), which made CPU decode 1.7x slower when measured;
the KV pool stays one stacked array, indexed by a static layer number, updated in place.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.attention import AttentionBackend, StepAttention, attend
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache
from pallas_kernels.decode_layer_mgpu import (KEYS, AttentionShape, RowAttention, TailShape,
                                              TailTiling, attention_splits,
                                              decode_layer_tail_mgpu, decode_row_qkv_mgpu,
                                              new_barrier_counter, plan_tail, rope_rows)


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
    """positions [T] -> (cos, sin), each [T, 1, head_dim // 2]; computed once per step and
    shared by every layer's Q and K."""
    angles = positions[:, None].astype(jnp.float32) * inv_freq  # [T, head_dim / 2]
    # The barrier keeps XLA from fusing cos/sin into every layer's RoPE (recomputing them per
    # head and layer: a measurable share of a CPU decode step).
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return cos[:, None, :], sin[:, None, :]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def _attention_block(config, lp, h, layer, kv, meta: StepAttention, backend, rope):
    """One layer's attention sublayer over the packed row h [T, hidden]: norm -> QKV -> RoPE ->
    write K/V -> paged attention (decode rows and prompt chunks, each by its backend)."""
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    qkv = x @ lp["wqkv"]  # [T, q_size + 2 * kv_size]
    out, k_pool, v_pool = attend(backend, qkv, *rope, kv.k, kv.v, layer, meta,
                                 num_heads=config.num_heads,
                                 scale=1.0 / math.sqrt(config.head_dim))
    return h + out @ lp["wo"], KVCache(k=k_pool, v=v_pool)


def _mlp_block(config, lp, h):
    x = rms_norm(h, lp["mlp_norm"], config.rms_norm_eps)
    gate, up = jnp.split(x @ lp["w_gate_up"], 2, axis=-1)
    return h + (jax.nn.silu(gate) * up) @ lp["w_down"]


def forward_hidden(
    params: dict,
    kv_cache: KVCache,
    token_ids: jax.Array,  # [T] int32, the step's packed row
    meta: StepAttention,
    *,
    config: ModelConfig,
    backend: AttentionBackend,
    layer_tiling: Optional[TailTiling] = None,
) -> tuple[jax.Array, KVCache]:
    """Runs the decoder stack over one packed row of tokens (decode rows, then prompt chunks);
    returns the final-normed hidden states [T, hidden] and the updated pool.

    `layer_tiling` (see `layer_kernel_tiling`): a decode-only step of one row runs each layer's
    projections after attention in the persistent layer kernel, with that tiling; other steps,
    and None, run the layers as XLA matmuls.
    """
    rope = rope_cos_sin(meta.positions, rope_inv_freq(config))
    h = params["embed"][token_ids]
    if layer_tiling is not None and meta.prefill is None and token_ids.shape[0] == 1:
        return _one_row_decode(params, kv_cache, h, meta, config, backend, rope, layer_tiling)
    for layer, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{layer}"):
            h, kv_cache = _attention_block(config, lp, h, layer, kv_cache, meta, backend, rope)
            h = _mlp_block(config, lp, h)
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), kv_cache


def _one_row_decode(params, kv_cache, h, meta, config, backend, rope, tiling):
    """The decoder stack over one decode row h [1, hidden], final-normed, in
    pallas_kernels/decode_layer_mgpu.py's persistent kernels (at batch 1 a step streams the
    weights once, and XLA's ~11 kernels per layer lose time at each boundary): the first
    layer's norm and QKV projection, then per layer the attention kernel and one kernel for
    the output projection, the MLP with both residual adds and norms, and the next layer's
    norm and QKV projection (the last layer's: the final norm). QKV rows go to the fused
    attention kernel as the float32 split-K partial sums the kernels write, which it adds up
    itself (`_decode_row_attention`). One grid-barrier counter goes through all the kernels
    (zeroed once per step, not by a memset before each kernel).

    With `tiling.attention` (where `_kernel_attention` allows it) each layer's attention is the
    layer kernel's first phase instead (RoPE, the K/V write, paged attention over context
    splits): one kernel per layer. Its step inputs: RoPE's rows at the position, the block
    table padded to whole key steps, (context before the new token, its slot)."""
    layers, eps = params["layers"], config.rms_norm_eps
    barrier = new_barrier_counter()
    first = _row_qkv(h[0], layers[0]["attn_norm"], layers[0]["wqkv"], barrier, eps=eps,
                     tiling=tiling)
    qkv, barrier = first["part_qkv"], first["barrier"]  # [splits, width]
    own_attention = _kernel_attention(config, kv_cache, tiling)
    if own_attention:
        cos, sin = rope
        rope_row = rope_rows(cos[0, 0], sin[0, 0])
        table = meta.decode.block_tables[0]
        pages = jnp.pad(table, (0, -table.shape[0] % max(KEYS // kv_cache.block_size, 1)))
        context = jnp.stack([meta.decode.context_lens[0] - 1,
                             meta.slot_mapping[0]]).astype(jnp.int32)
    for layer, lp in enumerate(layers):
        following = layers[layer + 1] if layer + 1 < len(layers) else {}
        with jax.named_scope(f"layer_{layer}"):
            if own_attention:
                attn = RowAttention(qkv, rope_row, kv_cache.k, kv_cache.v, pages, context,
                                    jnp.full((1,), layer, jnp.int32))
            else:
                attn, kv_cache = _decode_row_attention(config, qkv[:, None], layer, kv_cache,
                                                       meta, backend, rope)
            tail = _layer_tail(
                h[0], attn, lp["wo"], lp["mlp_norm"], lp["w_gate_up"], lp["w_down"],
                following.get("attn_norm"), following.get("wqkv"),
                None if following else params["final_norm"], barrier, eps=eps, tiling=tiling,
                attn_scale=1.0 / math.sqrt(config.head_dim) if own_attention else None)
            barrier = tail["barrier"]
            if own_attention:
                kv_cache = KVCache(k=tail["k_pool"], v=tail["v_pool"])
            if following:
                h, qkv = tail["h2"][None], tail["part_qkv"]
    return tail["x"][None], kv_cache


def _kernel_attention(config, kv_cache, tiling) -> bool:
    """Whether the layer kernel computes the layers' attention itself (its first phase): on a
    GPU, where the shapes fit. Not in Mosaic GPU's interpreter (CPU): inside a jitted step
    (jax 0.10.2) its threads deadlocked intermittently on the phase's barriers (the kernel-level
    interpret tests call the kernel outside jit)."""
    if (not tiling.attention or jax.default_backend() == "cpu"
            or kv_cache.k.dtype != jnp.bfloat16 or tiling.block_n != config.head_dim):
        return False
    try:
        attention_splits(AttentionShape(config.num_heads, config.num_kv_heads, config.head_dim,
                                        kv_cache.block_size, kv_cache.num_blocks, 1.0), tiling)
    except ValueError:
        return False
    return True


def _decode_row_attention(config, qkv, layer, kv_cache, meta, backend, rope):
    """Attention of one decode row given as its QKV row [1, width] or as float32 partial sums
    of it [splits, 1, width] -> (the layer kernel's `attn`, the pool). With the backend's fused
    decode kernel: the partial sums go in as they are and the output comes back as its context
    splits (acc, max, sum) [splits, q_size] (the kernel adds the sums, the layer kernel merges
    the splits: two XLA kernels less per layer); else through `attend`, a bf16 row."""
    scale = 1.0 / math.sqrt(config.head_dim)
    if backend.fused_decode is not None and backend.fused_supports(kv_cache.block_size,
                                                                   config.head_dim):
        cos, sin = rope
        splits, k_pool, v_pool = backend.fused_decode(
            qkv, cos[:1, 0], sin[:1, 0], kv_cache.k, kv_cache.v, layer, meta.slot_mapping[:1],
            meta.decode, config.num_heads, scale, partials=True)
        return tuple(x[:, 0] for x in splits), KVCache(k=k_pool, v=v_pool)
    if qkv.ndim == 3:
        qkv = qkv.sum(0).astype(kv_cache.k.dtype)
    out, k_pool, v_pool = attend(backend, qkv, *rope, kv_cache.k, kv_cache.v, layer, meta,
                                 num_heads=config.num_heads, scale=scale)
    return out[0], KVCache(k=k_pool, v=v_pool)


@functools.partial(jax.jit, static_argnames=("eps", "tiling", "attn_scale"))
def _layer_tail(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm, next_wqkv, final_norm,
                barrier, *, eps, tiling, attn_scale=None):
    """decode_layer_tail_mgpu as one jitted function: every layer's call lowers to a call of
    the same function, so a step program lowers the kernel once, not once per layer (~0.5 s of
    Python each)."""
    return decode_layer_tail_mgpu(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm,
                                  next_wqkv, final_norm=final_norm, eps=eps, tiling=tiling,
                                  barrier=barrier, attn_scale=attn_scale)


@functools.partial(jax.jit, static_argnames=("eps", "tiling"))
def _row_qkv(h, norm, wqkv, barrier, *, eps, tiling):
    return decode_row_qkv_mgpu(h, norm, wqkv, eps=eps, tiling=tiling, barrier=barrier)


def layer_kernel_tiling(config: ModelConfig, dtype, tiling: TailTiling) -> Optional[TailTiling]:
    """`tiling` if the persistent layer kernel takes this model's layers in `dtype` (bf16, and
    shapes the tiling splits evenly over its CTAs), else None (XLA runs the layers)."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return None
    qkv_size = config.q_size + 2 * config.kv_size
    try:
        for next_qkv in (qkv_size, 0):  # every layer but the last; the last
            plan_tail(TailShape(config.hidden_size, config.q_size, config.intermediate_size,
                                next_qkv, config.rms_norm_eps), tiling)
    except ValueError:
        return None
    return tiling


def prepare_params(params: dict) -> dict:
    """Loader layout -> run layout: a list of per-layer dicts, with the Q/K/V projections fused
    into one `wqkv` and gate/up into one `w_gate_up` (fewer, larger matmuls).

    The loader stacks layers ({name: [layers, ...]}); NumPy views keep this free of copies until
    the fused weights are concatenated. Device arrays (random weights made on device) stay on
    device.
    """
    stacked = params["layers"]
    xp = jnp if isinstance(stacked["wq"], jax.Array) else np
    layers = []
    for i in range(len(stacked["wq"])):
        layers.append({
            "attn_norm": stacked["attn_norm"][i],
            "wqkv": xp.concatenate([stacked["wq"][i], stacked["wk"][i], stacked["wv"][i]], 1),
            "wo": stacked["wo"][i],
            "mlp_norm": stacked["mlp_norm"][i],
            "w_gate_up": xp.concatenate([stacked["w_gate"][i], stacked["w_up"][i]], 1),
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
