"""Plain-jnp paged attention: the oracle every Pallas kernel is checked against.

Reads K/V straight out of the paged pool through the block tables, so it is also the engine's
attention where the kernels are slower (the CPU).

`paged_attention_reference` covers every case (prefill, chunked prefill, prefix hits, decode).
`paged_decode_attention` is the same maths for one query token per sequence, arranged for XLA
CPU: its dots have the sequence as their only batch dimension and read the gathered K/V in the
pool's own layout, where the general einsum (batch dims sequence and KV head) makes XLA transpose
the whole gathered context and run many tiny matmuls. tests/test_attention.py checks both against
dense NumPy attention.

Two per-layer options, static Python values (None: off, and then no extra work at all):
  sliding_window: a query at position p sees the keys at positions k with p - window < k <= p,
    the last `window` tokens including itself (Mistral, Gemma 2/3; Hugging Face's
    `sliding_window_overlay`, `kv_idx > q_idx - sliding_window`, and vLLM's flash-attention
    window (window - 1, 0) alike).
  logit_softcap: Gemma 2's attention-logit soft-capping, cap * tanh(logits / cap) on the scaled
    logits, before the mask and the softmax (Hugging Face's `softcap`).
Keys outside a window may hold anything (the block manager frees those blocks, reuses them and
points their table entries at the pad block): the references zero them in V as well, so even a
NaN there cannot reach the output through a zero probability.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x [..., hidden] normalised by its root mean square (in float32, rounded back to x's
    dtype), times weight [hidden]: the models' RMSNorm (jinfer.model.layers re-exports it)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face layout). x: [T, heads, head_dim]; cos, sin: [T, 1,
    head_dim // 2] (`jinfer.model.layers.rope_cos_sin`)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def soft_cap(logits: jax.Array, logit_softcap: Optional[float]) -> jax.Array:
    """cap * tanh(logits / cap) (Gemma 2's attention-logit soft-capping); logits as they are
    when None."""
    if logit_softcap is None:
        return logits
    return logit_softcap * jnp.tanh(logits / logit_softcap)


def visible_keys(positions: jax.Array, context_lens: jax.Array, num_keys: int,
                 sliding_window: Optional[int]) -> jax.Array:
    """[batch, q_len, num_keys] bool: key t is visible to the query at position p when
    t <= p, t < the context length and, with a window, t > p - window.

    positions [batch, q_len] int32; context_lens [batch] int32.
    """
    kv_pos = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]
    visible = (kv_pos <= positions[:, :, None]) & (kv_pos < context_lens[:, None, None])
    if sliding_window is not None:
        visible &= kv_pos > positions[:, :, None] - sliding_window
    return visible


def gather_pages(pool: jax.Array, layer: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Lays each sequence's blocks of one layer out contiguously.

    Indexes the stacked pool in one gather: slicing out the layer first would copy it (and, in
    the engine's layer scan, defeat the in-place update of the pool).

    Args:
      pool: [layers, num_blocks, block_size, kv_heads, head_dim] the K or V pool.
      layer: int32 scalar, which layer to read.
      block_tables: [batch, max_blocks] physical block of each logical block (padding: 0).
    Returns:
      [batch, max_blocks * block_size, kv_heads, head_dim]
    """
    batch, max_blocks = block_tables.shape
    _, _, block_size, kv_heads, head_dim = pool.shape
    pages = pool[layer, block_tables]  # [batch, max_blocks, block_size, kv_heads, head_dim]
    return pages.reshape(batch, max_blocks * block_size, kv_heads, head_dim)


def paged_attention_reference(
    q: jax.Array,             # [batch, q_len, num_heads, head_dim]
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer: jax.Array,         # int32 scalar
    block_tables: jax.Array,  # [batch, max_blocks] int32
    positions: jax.Array,     # [batch, q_len] int32, absolute position of each query token
    context_lens: jax.Array,  # [batch] int32, tokens in the pool for each sequence (incl. new)
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
) -> jax.Array:               # [batch, q_len, num_heads, head_dim]
    """Causal grouped-query attention of new tokens over their sequence's paged context.

    A query at position p sees every cached token at position <= p (its prefix, earlier chunks
    and the new tokens written this step), within the sliding window if one is given. Covers
    prefill, chunked prefill, prefix-cache hits and decode (q_len == 1) alike. Accumulates in
    float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[3]
    group = num_heads // kv_heads
    k = gather_pages(k_pool, layer, block_tables)  # [batch, ctx, kv_heads, head_dim]
    v = gather_pages(v_pool, layer, block_tables)
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * scale, logit_softcap)
    visible = visible_keys(positions, context_lens, k.shape[1], sliding_window)  # [b, q, ctx]
    if sliding_window is not None:  # keys no query sees may hold anything, NaN included
        v = jnp.where(visible.any(1)[:, :, None, None], v, 0)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # Padding queries may see nothing; keep them finite so no NaN leaks into the pool.
    scores = jnp.where(visible.any(-1)[:, None, None, :, None], scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def paged_decode_attention(
    q: jax.Array,             # [batch, 1, num_heads, head_dim]
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer: jax.Array,         # int32 scalar
    block_tables: jax.Array,  # [batch, max_blocks] int32
    positions: jax.Array,     # [batch, 1] int32, absolute position of the query token
    context_lens: jax.Array,  # [batch] int32, tokens in the pool for each sequence (incl. new)
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
) -> jax.Array:               # [batch, 1, num_heads, head_dim]
    """Decode attention (one query token per sequence) with sequence-only batched dots.

    Grouped-query attention without a KV-head batch dimension: each query head is spread over a
    [kv_heads * head_dim] row that is zero outside its own KV head's slice, so one dot against
    the gathered K rows [ctx, kv_heads * head_dim] gives every head's scores (the zero slices add
    nothing), and one dot of the probabilities with V gives [heads, kv_heads * head_dim], of
    which each head keeps its own KV head's slice. kv_heads times the (tiny) FLOPs of the
    einsum form, but no transposes of the context. Accumulates in float32.
    """
    batch, _, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[3]
    group = num_heads // kv_heads
    width = kv_heads * head_dim
    k = gather_pages(k_pool, layer, block_tables).reshape(batch, -1, width)  # [batch, ctx, width]
    v = gather_pages(v_pool, layer, block_tables).reshape(batch, -1, width)
    own = jnp.eye(kv_heads, dtype=q.dtype)  # [kv_heads, kv_heads]: head's KV head -> 1
    q_spread = (q.reshape(batch, kv_heads, group, 1, head_dim)
                * own[None, :, None, :, None]).reshape(batch, num_heads, width)
    scores = jnp.einsum("bhc,btc->bht", q_spread, k, preferred_element_type=jnp.float32)
    scores = soft_cap(scores * scale, logit_softcap)  # [batch, num_heads, ctx]
    visible = visible_keys(positions[:, :1], context_lens, k.shape[1], sliding_window)[:, 0]
    if sliding_window is not None:  # keys outside the window may hold anything, NaN included
        v = jnp.where(visible[:, :, None], v, 0)
    scores = jnp.where(visible[:, None, :], scores, -jnp.inf)
    scores = jnp.where(visible.any(-1)[:, None, None], scores, 0.0)  # padding rows: finite
    probs = jax.nn.softmax(scores, axis=-1)
    spread = jnp.einsum("bht,btc->bhc", probs.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)  # [batch, num_heads, width]
    out = jnp.einsum("bkgjd,kj->bkgd", spread.reshape(batch, kv_heads, group, kv_heads, head_dim),
                     own.astype(jnp.float32))  # keep each head's own KV head slice
    return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype)


def ragged_paged_attention_reference(
    q: jax.Array,                # [num_tokens, num_heads, head_dim], sequences back to back
    k_pool: jax.Array,           # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,           # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                       # int or int32 scalar
    block_tables: jax.Array,     # [num_seqs, max_blocks] int32
    query_start_loc: jax.Array,  # [num_seqs + 1] int32: seq s owns q[qsl[s]:qsl[s + 1]]
    context_lens: jax.Array,     # [num_seqs] int32, tokens in the pool per seq (incl. new)
    *,
    scale: float,
    sliding_window: Optional[int] = None,
    logit_softcap: Optional[float] = None,
) -> jax.Array:                  # [num_tokens, num_heads, head_dim]
    """The packed (ragged) layout of `paged_attention_reference`, for testing the kernel.

    Unpacks q into [num_seqs, num_tokens, ...] (every sequence padded to the whole packed
    length: memory is no concern here), gives query i of sequence s the position
    context_lens[s] - q_len_s + i (padding queries -1: they see nothing), runs the padded
    reference and packs the rows back. Rows past query_start_loc[-1] are zeros.
    """
    num_tokens = q.shape[0]
    starts, ends = query_start_loc[:-1], query_start_loc[1:]  # [num_seqs]
    i = jnp.arange(num_tokens, dtype=jnp.int32)
    own = i[None, :] < (ends - starts)[:, None]  # [num_seqs, num_tokens]
    rows = jnp.clip(starts[:, None] + i[None, :], 0, num_tokens - 1)
    positions = jnp.where(own, (context_lens - (ends - starts))[:, None] + i[None, :], -1)
    out = paged_attention_reference(q[rows], k_pool, v_pool, layer, block_tables, positions,
                                    context_lens, scale=scale, sliding_window=sliding_window,
                                    logit_softcap=logit_softcap)  # [num_seqs, num_tokens, ...]
    # the sequence owning packed row i (compare_all: no while loop)
    seq = jnp.searchsorted(ends, i, side="right", method="compare_all")
    live = seq < starts.shape[0]
    seq = jnp.minimum(seq, starts.shape[0] - 1)
    packed = out[seq, jnp.clip(i - starts[seq], 0, num_tokens - 1)]
    return jnp.where(live[:, None, None], packed, 0).astype(q.dtype)
