"""Batch-1 decode through the persistent layer kernels (pallas_kernels/decode_layer_mgpu.py): the
glue between a Llama-style decoder stack and the kernels.

At batch 1 a decode step streams the weights once and does almost no arithmetic, and XLA's ~11
kernels per layer lose time at each boundary. `one_row_decode` runs the stack over the step's
one decode row as: the first layer's norm and QKV projection (one kernel), then per layer the
backend's fused attention kernel and one layer kernel for the output projection, the MLP with
both residual adds and norms, and the next layer's norm and QKV projection (the last layer's:
the final norm). The row stays in the kernels' own forms between them: QKV as float32 split-K
partial sums, which the attention kernel adds up itself, and the attention output as its
context splits' softmax states, which the layer kernel merges as it reads them (two XLA kernels
less per layer). One grid-barrier counter goes through all the kernels (zeroed once per step,
not by a memset before each kernel).

Qwen3's layers run here too: the fused attention kernel applies the q/k head norms as it sums
the QKV partials. A mixture-of-experts layer (Qwen3-MoE) runs its tail as two kernels, because
the experts' weights to stream depend on the router: the router kernel (wo, residual, MLP norm,
router logits as partials), the routing in XLA (moe.route: the top-k experts and their weights,
a few small kernels), and the experts' kernel (their gate/up and down projections over the
top-k experts' matrices, each activation weighted, then the next layer's norm and QKV).

`layer_kernel_tiling` says whether a model's layers fit the kernels (ModelConfig.kernel_layers,
in a tiling its shapes split into); the runner asks it once and passes the tiling to
`jinfer.model.decoder.forward_hidden`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jinfer.model.attention import AttentionBackend, StepAttention, attend
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache
from jinfer.model.moe import route
from pallas_kernels.decode_layer_mgpu import (decode_layer_tail_mgpu, decode_moe_experts_mgpu,
                                              decode_moe_router_mgpu, decode_row_qkv_mgpu,
                                              new_barrier_counter)
from pallas_kernels.decode_layer_plan import TailShape, TailTiling, plan_tail


def layer_kernel_tiling(config: ModelConfig, dtype, tiling: TailTiling) -> Optional[TailTiling]:
    """`tiling` if the persistent layer kernels take this model's layers in `dtype`
    (ModelConfig.kernel_layers; bf16; shapes the tiling splits over its CTAs), else None (XLA
    runs the layers)."""
    if not config.kernel_layers or jnp.dtype(dtype) != jnp.bfloat16:
        return None
    qkv_size = config.q_size + 2 * config.kv_size
    try:
        for next_qkv in (qkv_size, 0):  # every layer but the last; the last
            plan_tail(_tail_shape(config, next_qkv), tiling)
    except ValueError:
        return None
    return tiling


def _tail_shape(config: ModelConfig, next_qkv: int) -> TailShape:
    return TailShape(config.hidden_size, config.q_size, config.intermediate_size, next_qkv,
                     config.rms_norm_eps, config.num_experts, config.num_experts_per_tok)


def one_row_decode(params: dict, kv_cache: KVCache, h: jax.Array, meta: StepAttention, *,
                   config: ModelConfig, backend: AttentionBackend,
                   rope: tuple[jax.Array, jax.Array],
                   tiling: TailTiling) -> tuple[jax.Array, KVCache]:
    """The decoder stack over one decode row h [1, hidden] (the token's embedding) in the
    layer kernels (module docstring): params in jinfer.model.decoder's run layout, rope the
    step's (cos, sin) [1, 1, head_dim // 2]. Returns the final-normed row [1, hidden] and the
    updated pool."""
    layers, eps = params["layers"], config.rms_norm_eps
    barrier = new_barrier_counter()
    first = _row_qkv(h[0], layers[0]["attn_norm"], layers[0]["wqkv"], barrier, eps=eps,
                     tiling=tiling)
    qkv, barrier = first["part_qkv"], first["barrier"]  # [splits, width]
    for layer, lp in enumerate(layers):
        following = layers[layer + 1] if layer + 1 < len(layers) else {}
        next_layer = (following.get("attn_norm"), following.get("wqkv"),
                      None if following else params["final_norm"])
        with jax.named_scope(f"layer_{layer}"):
            with jax.named_scope("attention"):
                attn, kv_cache = _decode_row_attention(config, lp, qkv[:, None], layer,
                                                       kv_cache, meta, backend, rope)
            if config.num_experts:
                tail = _moe_tail(config, h[0], attn, lp, next_layer, barrier, tiling)
            else:
                tail = _layer_tail(h[0], attn, lp["wo"], lp["mlp_norm"], lp["w_gate_up"],
                                   lp["w_down"], *next_layer, barrier, eps=eps, tiling=tiling)
            barrier = tail["barrier"]
            if following:
                h, qkv = tail["h2"][None], tail["part_qkv"]
    return tail["x"][None], kv_cache


def _moe_tail(config, h, attn, lp, next_layer, barrier, tiling):
    """A mixture-of-experts layer after attention: the router kernel (wo, residual, norm,
    router logits), the routing in XLA (the top-k experts and their weights, ranked by
    compares rather than sorted: `top_k_by_rank`; the experts' kernel streams their weights,
    so it needs them at launch), the experts' kernel (their SwiGLU, weighted, and the next
    layer's QKV or the final norm)."""
    eps, top_k = config.rms_norm_eps, config.num_experts_per_tok
    with jax.named_scope("mlp"):
        first = _moe_router(h, attn, lp["wo"], lp["mlp_norm"], lp["router_w"], barrier,
                            eps=eps, top_k=top_k, tiling=tiling)
        with jax.named_scope("route"):
            # Rounded to the model's dtype as x @ router_w is in the XLA layers and in
            # transformers: the top-k of float32 logits would break bf16's near-ties otherwise.
            logits = first["part_logits"].sum(0)[None].astype(h.dtype)
            weights, ids = route(logits, top_k, config.norm_topk_prob, by_rank=True)
        return _moe_experts(first["h1"], lp["mlp_norm"], ids[0], weights[0], lp["w_gate_up"],
                            lp["w_down"], *next_layer, first["barrier"], eps=eps,
                            tiling=tiling)


def _decode_row_attention(config, lp, qkv, layer, kv_cache, meta, backend, rope):
    """Attention of one decode row given as its QKV row [1, width] or as float32 partial sums
    of it [splits, 1, width] -> (the layer kernel's `attn`, the pool). With the backend's fused
    decode kernel: the partial sums go in as they are and the output comes back as its context
    splits (acc, max, sum) [splits, q_size] (the kernel adds the sums, the layer kernel merges
    the splits: two XLA kernels less per layer); else through `attend`, a bf16 row."""
    scale = config.attention_scale
    qk_norm = (lp["q_norm"], lp["k_norm"], config.rms_norm_eps) if config.qk_norm else None
    if backend.fused_decode is not None and backend.fused_supports(kv_cache.block_size,
                                                                   config.head_dim):
        cos, sin = rope
        norm_opts = {} if qk_norm is None else dict(qk_norm=qk_norm[:2], qk_norm_eps=qk_norm[2])
        splits, k_pool, v_pool = backend.fused_decode(
            qkv, cos[:1, 0], sin[:1, 0], kv_cache.k, kv_cache.v, layer, meta.slot_mapping[:1],
            meta.decode, config.num_heads, scale, partials=True, **norm_opts)
        return tuple(x[:, 0] for x in splits), KVCache(k=k_pool, v=v_pool)
    if qkv.ndim == 3:
        qkv = qkv.sum(0).astype(kv_cache.k.dtype)
    out, k_pool, v_pool = attend(backend, qkv, *rope, kv_cache.k, kv_cache.v, layer, meta,
                                 num_heads=config.num_heads, scale=scale, qk_norm=qk_norm)
    return out[0], KVCache(k=k_pool, v=v_pool)


@functools.partial(jax.jit, static_argnames=("eps", "tiling"))
def _layer_tail(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm, next_wqkv, final_norm,
                barrier, *, eps, tiling):
    """decode_layer_tail_mgpu as one jitted function: every layer's call lowers to a call of
    the same function, so a step program lowers the kernel once, not once per layer (~0.5 s of
    Python each)."""
    return decode_layer_tail_mgpu(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm,
                                  next_wqkv, final_norm=final_norm, eps=eps, tiling=tiling,
                                  barrier=barrier)


@functools.partial(jax.jit, static_argnames=("eps", "top_k", "tiling"))
def _moe_router(h, attn, wo, mlp_norm, router_w, barrier, *, eps, top_k, tiling):
    return decode_moe_router_mgpu(h, attn, wo, mlp_norm, router_w, eps=eps, top_k=top_k,
                                  tiling=tiling, barrier=barrier)


@functools.partial(jax.jit, static_argnames=("eps", "tiling"))
def _moe_experts(h1, mlp_norm, expert_ids, expert_weights, w_gate_up, w_down, next_norm,
                 next_wqkv, final_norm, barrier, *, eps, tiling):
    return decode_moe_experts_mgpu(h1, mlp_norm, expert_ids, expert_weights, w_gate_up, w_down,
                                   next_norm, next_wqkv, final_norm=final_norm, eps=eps,
                                   tiling=tiling, barrier=barrier)


@functools.partial(jax.jit, static_argnames=("eps", "tiling"))
def _row_qkv(h, norm, wqkv, barrier, *, eps, tiling):
    return decode_row_qkv_mgpu(h, norm, wqkv, eps=eps, tiling=tiling, barrier=barrier)
