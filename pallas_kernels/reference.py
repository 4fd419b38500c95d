"""Plain-jnp paged attention: the oracle every Pallas kernel is checked against.

Reads K/V straight out of the paged pool through the block tables, so it is also the engine's
attention where the kernels are slower (the CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
) -> jax.Array:               # [batch, q_len, num_heads, head_dim]
    """Causal grouped-query attention of new tokens over their sequence's paged context.

    A query at position p sees every cached token at position <= p (its prefix, earlier chunks
    and the new tokens written this step). Covers prefill, chunked prefill, prefix-cache hits
    and decode (q_len == 1) alike. Accumulates in float32.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[3]
    group = num_heads // kv_heads
    k = gather_pages(k_pool, layer, block_tables)  # [batch, ctx, kv_heads, head_dim]
    v = gather_pages(v_pool, layer, block_tables)
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    scores = scores * scale
    kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    visible = (kv_pos[None, None, :] <= positions[:, :, None]) & (
        kv_pos[None, None, :] < context_lens[:, None, None])  # [batch, q_len, ctx]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    # Padding queries may see nothing; keep them finite so no NaN leaks into the pool.
    scores = jnp.where(visible.any(-1)[:, None, None, :, None], scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgst,btkd->bskgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
