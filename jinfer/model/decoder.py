"""The decoder every family runs, as pure functions over a params pytree and the paged KV pool.

One layer, with ModelConfig's optional steps in brackets (each off by default: with all of them
off this is Llama's layer, operation for operation):

  attention  RMSNorm -> QKV projection [+ bias] [-> per-head q/k RMSNorm] -> RoPE -> K/V write
             -> paged attention [in a sliding window] [with soft-capped logits] -> output
             projection [-> RMSNorm] -> residual add
  MLP        RMSNorm -> gated MLP (SwiGLU or GeGLU), or [the top-k of several experts' SwiGLU
             MLPs, jinfer.model.moe] [-> RMSNorm] -> residual add

around an embedding [times a scale] and a final RMSNorm -> logits [soft-capped]. Windowed
layers may take RoPE of their own base. The families (jinfer.model.families) differ only in
their ModelConfig and in where their checkpoints keep these weights.

The layer loop is unrolled in Python over a list of per-layer weight dicts. A `lax.scan` over
stacked weights compiles several times faster, but XLA copies each layer's weights out of the stack
at every step (a dynamic slice feeding a matmul), which made CPU decode 1.7x slower when measured;
the KV pool stays one stacked array, indexed by a static layer number, updated in place.

What the runner calls: `prepare_params` (loader layout -> run layout), `forward_hidden` (the
stack over a step's packed row) and `compute_logits`. `param_shapes` describes every weight
once (the loaders allocate from it, jinfer.model.shapes.random_params fills it). A decode step
of one row of a Llama-layered model can run the stack in the persistent layer kernel instead
(jinfer.model.layer_kernel).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.attention import AttentionBackend, StepAttention, attend
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import PAD_BLOCK, KVCache
from jinfer.model.layer_kernel import one_row_decode
from jinfer.model.layers import (ACTIVATIONS, rms_norm, rope_attention_factor, rope_cos_sin,
                                 rope_inv_freq, soft_cap)
from jinfer.model.moe import moe_mlp
from pallas_kernels.decode_layer_plan import TailTiling

# Run-layout weights fused from loader-layout ones (fewer, larger matmuls), concatenated along
# their output axis.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def num_params(config: ModelConfig) -> int:
    """Parameters of the model (the tied embedding counted once)."""
    shapes = param_shapes(config)
    layers = shapes.pop("layers")
    return sum(math.prod(s) for s in [*shapes.values(), *layers.values()])


def param_shapes(config: ModelConfig) -> dict:
    """Shape of every leaf of the loader-layout params: matrices stored [in, out], each layer's
    weights stacked over layers ({"layers": {name: [layers, ...]}})."""
    d, v, n = config.hidden_size, config.vocab_size, config.num_layers
    layer = {**_attention_shapes(config), **_mlp_shapes(config)}
    shapes = {"embed": (v, d), "layers": {name: (n, *s) for name, s in layer.items()},
              "final_norm": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def _attention_shapes(config: ModelConfig) -> dict:
    d, q, kv = config.hidden_size, config.q_size, config.kv_size
    shapes = {"attn_norm": (d,), "wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d)}
    if config.qkv_bias:
        shapes |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    if config.qk_norm:
        shapes |= {"q_norm": (config.head_dim,), "k_norm": (config.head_dim,)}
    if config.post_norms:
        shapes["attn_post_norm"] = (d,)
    return shapes


def _mlp_shapes(config: ModelConfig) -> dict:
    """The gated MLP's weights; with experts, each with the expert axis in front and the
    router's [hidden, experts] (fused like the dense ones: w_gate_up [E, hidden, 2 * I])."""
    d, f, e = config.hidden_size, config.intermediate_size, config.num_experts
    experts = (e,) if e else ()
    shapes = {"mlp_norm": (d,), "w_gate": (*experts, d, f), "w_up": (*experts, d, f),
              "w_down": (*experts, f, d)}
    if e:
        shapes["router_w"] = (d, e)
    if config.post_norms:
        shapes["mlp_post_norm"] = (d,)
    return shapes


def prepare_params(params: dict) -> dict:
    """Loader layout -> run layout: a list of per-layer dicts, with Q/K/V (weights and biases)
    and gate/up fused (FUSED); every other weight passes through as it is.

    The loader stacks layers ({name: [layers, ...]}); NumPy views keep this free of copies until
    the fused weights are concatenated. Device arrays (random weights made on device) stay on
    device.
    """
    stacked = params["layers"]
    layers = [fuse_layer({name: w[i] for name, w in stacked.items()})
              for i in range(len(stacked["wq"]))]
    return {**params, "layers": layers}


def fuse_layer(layer: dict) -> dict:
    """One layer's loader-layout weights -> its run layout: the parts of each FUSED weight
    concatenated on their last axis (on device for device arrays, else in NumPy)."""
    xp = jnp if isinstance(layer["wq"], jax.Array) else np
    fused_parts = {part for parts in FUSED.values() for part in parts}
    out = {name: w for name, w in layer.items() if name not in fused_parts}
    for fused, parts in FUSED.items():
        if parts[0] in layer:
            out[fused] = xp.concatenate([layer[part] for part in parts], -1)
    return out


def forward_hidden(
    params: dict,
    kv_cache: KVCache,
    token_ids: jax.Array,  # [T] int32, the step's packed row
    meta: StepAttention,
    *,
    config: ModelConfig,
    backend: AttentionBackend,
    layer_tiling: Optional[TailTiling] = None,
    moe_impl: str = "ragged_dot",
    rope=None,
) -> tuple[jax.Array, KVCache]:
    """Runs the decoder stack over one packed row of tokens (decode rows, then prompt chunks);
    returns the final-normed hidden states [T, hidden] and the updated pool.

    `layer_tiling` (see jinfer.model.layer_kernel.layer_kernel_tiling, None unless the layers
    are Llama's): a decode-only step of one row runs each layer's projections after attention
    in the persistent layer kernel, with that tiling (`one_row_decode`); other steps, and None,
    run the layers as XLA matmuls. `moe_impl`: how expert layers run their experts
    (jinfer.model.moe.moe_mlp's impl). `rope`: `rope_tables(config, meta.positions)` computed
    by the caller (a loop of decode steps carries them from step to step), or None: here.
    """
    global_rope, local_rope = rope_tables(config, meta.positions) if rope is None else rope
    h = _embed(params["embed"], token_ids, config)  # [T, hidden]
    if config.embed_scale is not None:
        h = h * jnp.asarray(config.embed_scale, h.dtype)
    if layer_tiling is not None and meta.prefill is None and token_ids.shape[0] == 1:
        assert config.kernel_layers, "the layer kernels run Llama's and Qwen3's layers only"
        return one_row_decode(params, kv_cache, h, meta, config=config, backend=backend,
                              rope=global_rope, tiling=layer_tiling)
    # Mixture of experts: the step's padding rows (they write into the pad block) are routed
    # with no experts of their own (jinfer.model.moe.moe_mlp's `valid`).
    valid = (meta.slot_mapping // kv_cache.k.shape[2] != PAD_BLOCK) if config.num_experts else None
    for layer, lp in enumerate(params["layers"]):
        rope = global_rope if config.window(layer) is None else local_rope
        with jax.named_scope(f"layer_{layer}"):
            with jax.named_scope("attention"):
                h, kv_cache = _attention_block(config, layer, lp, h, kv_cache, meta, backend,
                                               rope)
            with jax.named_scope("mlp"):
                h = _mlp_block(config, lp, h, valid, moe_impl)
    return rms_norm(h, params["final_norm"], config.rms_norm_eps), kv_cache


def rope_tables(config: ModelConfig, positions: jax.Array):
    """The step's RoPE (cos, sin) of the global layers and of the windowed ones (the same
    tables unless the windowed layers have a base of their own)."""
    global_rope = rope_cos_sin(positions, rope_inv_freq(config), rope_attention_factor(config))
    if config.local_rope_theta is None:
        return global_rope, global_rope
    return global_rope, rope_cos_sin(positions, rope_inv_freq(config, local=True))


def _attention_block(config, layer, lp, h, kv, meta: StepAttention, backend, rope):
    """One layer's attention sublayer over the packed row h [T, hidden]: norm -> QKV -> RoPE ->
    write K/V -> paged attention (decode rows and prompt chunks, each by its backend)."""
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    qkv = x @ lp["wqkv"]  # [T, q_size + 2 * kv_size]
    if config.qkv_bias:
        qkv = qkv + lp["bqkv"]
    qk_norm = ((lp["q_norm"], lp["k_norm"], config.rms_norm_eps) if config.qk_norm
               else None)
    out, k_pool, v_pool = attend(backend, qkv, *rope, kv.k, kv.v, layer, meta,
                                 num_heads=config.num_heads, scale=config.attention_scale,
                                 sliding_window=config.window(layer),
                                 logit_softcap=config.attn_logit_softcap, qk_norm=qk_norm)
    out = _tp_sum(out @ lp["wo"], config)
    if config.post_norms:
        out = rms_norm(out, lp["attn_post_norm"], config.rms_norm_eps)
    return h + out, KVCache(k=k_pool, v=v_pool)


def _mlp_block(config, lp, h, valid=None, moe_impl="ragged_dot"):
    """One layer's MLP sublayer over h [T, hidden]: norm -> MLP [-> norm] -> residual add.
    valid [T] and moe_impl (experts only): which rows are tokens, not padding; the experts'
    implementation."""
    out = _tp_sum(_mlp(config, lp, rms_norm(h, lp["mlp_norm"], config.rms_norm_eps), valid,
                       moe_impl), config)
    if config.post_norms:
        out = rms_norm(out, lp["mlp_post_norm"], config.rms_norm_eps)
    return h + out


def _mlp(config, lp, x, valid=None, moe_impl="ragged_dot"):
    """The gated MLP over the normed row x [T, hidden] -> [T, hidden]: dense, or each token
    through its top-k experts."""
    if config.num_experts:
        # Expert parallelism (jinfer.runner.sharding): this device holds a slice of the
        # experts, the device index's slice.
        num_local = lp["w_gate_up"].shape[0]
        offset = (0 if num_local == config.num_experts
                  else jax.lax.axis_index(config.tp_axis) * num_local)
        return moe_mlp(x, lp["router_w"], lp["w_gate_up"], lp["w_down"],
                       config.num_experts_per_tok, config.norm_topk_prob, impl=moe_impl,
                       valid=valid, expert_offset=offset)
    gate, up = jnp.split(x @ lp["w_gate_up"], 2, axis=-1)
    return (ACTIVATIONS[config.activation](gate) * up) @ lp["w_down"]


def compute_logits(params: dict, hidden: jax.Array, config: ModelConfig) -> jax.Array:
    """hidden [..., hidden] -> float32 logits [..., vocab], through the input embedding
    [vocab, hidden] when tied, else params["lm_head"] [hidden, vocab]; soft-capped where the
    config says."""
    if config.tie_word_embeddings:
        logits = hidden @ params["embed"].T
    else:
        logits = hidden @ params["lm_head"]
    logits = logits.astype(jnp.float32)
    if config.final_logit_softcap is not None:
        logits = soft_cap(logits, config.final_logit_softcap)
    if config.tp_axis is not None:  # this device's slice of the (padded) vocabulary -> all
        logits = jax.lax.all_gather(logits, config.tp_axis, axis=logits.ndim - 1,
                                    tiled=True)[..., :config.vocab_size]
    return logits


# Tensor parallelism (jinfer.runner.sharding): inside its shard_map, `config` is one device's
# (its heads, its slice of the MLP and of the vocabulary) and names the mesh axis in `tp_axis`;
# these are the only places the devices communicate. With tp_axis None they are no-ops.

def _tp_sum(x: jax.Array, config: ModelConfig) -> jax.Array:
    """x summed over the tensor-parallel devices: each holds the partial product of its heads'
    (or its MLP slice's) rows of a row-split projection."""
    if config.tp_axis is None:
        return x
    with jax.named_scope("all_reduce"):
        return jax.lax.psum(x, config.tp_axis)


def _embed(table: jax.Array, token_ids: jax.Array, config: ModelConfig) -> jax.Array:
    """The rows of token_ids [T] in the embedding table -> [T, hidden]. Under tensor
    parallelism each device holds a contiguous slice of the vocabulary's rows: it looks up the
    tokens that fall in its slice, zeros for the others, and a psum assembles the rows."""
    if config.tp_axis is None:
        return table[token_ids]
    rows = table.shape[0]
    local = token_ids - jax.lax.axis_index(config.tp_axis) * rows
    mine = (local >= 0) & (local < rows)
    h = jnp.where(mine[:, None], table[jnp.where(mine, local, 0)], jnp.zeros((), table.dtype))
    return jax.lax.psum(h, config.tp_axis)
