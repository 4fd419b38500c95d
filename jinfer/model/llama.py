"""The Llama-family decoder as pure functions over a params pytree and the paged KV pool.

Covers Llama 2, Llama 3.x (with llama3 RoPE scaling) and SmolLM/SmolLM2: RMSNorm, grouped-query
attention with rotate-half RoPE, SwiGLU MLP, tied or untied output embeddings.

The layer loop is unrolled in Python over a list of per-layer weight dicts. A `lax.scan` over
stacked weights compiles several times faster, but XLA copies each layer's weights out of the stack
at every step (a dynamic slice feeding a matmul), which made CPU decode 1.7x slower when measured;
the KV pool stays one stacked array, indexed by a static layer number, updated in place.

What the runner calls: `prepare_params` (loader layout -> run layout), `forward_hidden` (the
stack over a step's packed row) and `compute_logits`. The layers every family shares (RMSNorm,
RoPE) are in jinfer.model.layers; a decode step of one row can run the stack in the persistent
layer kernel instead (jinfer.model.layer_kernel).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.attention import AttentionBackend, StepAttention, attend
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache
from jinfer.model.layer_kernel import one_row_decode
from jinfer.model.layers import rms_norm, rope_cos_sin, rope_inv_freq
from pallas_kernels.decode_layer_plan import TailTiling


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

    `layer_tiling` (see jinfer.model.layer_kernel.layer_kernel_tiling): a decode-only step of
    one row runs each layer's projections after attention in the persistent layer kernel, with
    that tiling (`one_row_decode`); other steps, and None, run the layers as XLA matmuls.
    """
    rope = rope_cos_sin(meta.positions, rope_inv_freq(config))
    h = params["embed"][token_ids]
    if layer_tiling is not None and meta.prefill is None and token_ids.shape[0] == 1:
        return one_row_decode(params, kv_cache, h, meta, config=config, backend=backend,
                              rope=rope, tiling=layer_tiling)
    for layer, lp in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{layer}"):
            h, kv_cache = _attention_block(config, lp, h, layer, kv_cache, meta, backend, rope)
            h = _mlp_block(config, lp, h)
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), kv_cache


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
    """hidden [..., hidden] -> float32 logits [..., vocab], through the input embedding
    [vocab, hidden] when tied, else params["lm_head"] [hidden, vocab]."""
    if config.tie_word_embeddings:
        logits = hidden @ params["embed"].T
    else:
        logits = hidden @ params["lm_head"]
    return logits.astype(jnp.float32)
