"""Device-side operations on the KV pool that the host's block manager asks for."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jinfer.kv_cache import PAD_BLOCK, KVCache


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """kv_cache.{k,v}[:, dst] = kv_cache.{k,v}[:, src] for every layer, in place."""
    return KVCache(k=kv_cache.k.at[:, dst].set(kv_cache.k[:, src]),
                   v=kv_cache.v.at[:, dst].set(kv_cache.v[:, src]))


def copy_blocks(kv_cache: KVCache, copies: list[tuple[int, int]]) -> KVCache:
    """Copy-on-write: duplicates each (src, dst) block across all layers; the pool is donated.

    The number of copies is padded to a power of two with pad-block self-copies, so a run
    compiles this at most log2(max copies) times.
    """
    size = 1 << max(0, (len(copies) - 1).bit_length())
    pairs = np.full((size, 2), PAD_BLOCK, np.int32)  # [size, (src, dst)]
    pairs[:len(copies)] = copies
    return _copy_blocks(kv_cache, pairs[:, 0], pairs[:, 1])
