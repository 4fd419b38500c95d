"""The paged KV pool: device arrays, a pytree passed explicitly and donated to every step, and
the device-side block copies (copy-on-write) that the host's block manager asks for."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.config import ModelConfig
from jinfer.runner.buckets import copies_bucket

PAD_BLOCK = 0  # block 0 is never allocated: padded rows write into it and read from it


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer K and V pools, stacked over layers into one buffer each (donated and updated in
    place every step; the model indexes it with a static layer number).

    Layout [layers, num_blocks, block_size, kv_heads, head_dim]: writing a token's K/V is a plain
    row write at its slot (block * block_size + offset).
    """

    k: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: jax.Array  # [layers, num_blocks, block_size, kv_heads, head_dim]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    """Device bytes one block costs across all layers, K and V."""
    itemsize = jnp.dtype(dtype).itemsize
    return 2 * config.num_layers * block_size * config.kv_size * itemsize


def init_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype) -> KVCache:
    shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """kv_cache.{k,v}[:, dst] = kv_cache.{k,v}[:, src] for every layer, in place."""
    return KVCache(k=kv_cache.k.at[:, dst].set(kv_cache.k[:, src]),
                   v=kv_cache.v.at[:, dst].set(kv_cache.v[:, src]))


def copy_blocks(kv_cache: KVCache, copies: list[tuple[int, int]]) -> KVCache:
    """Copy-on-write: duplicates each (src, dst) block across all layers; the pool is donated.
    The copies are padded (`copies_bucket`) with pad-block self-copies, so a run compiles this
    at most log2(max copies) times."""
    pairs = np.full((copies_bucket(len(copies)), 2), PAD_BLOCK, np.int32)  # [n, (src, dst)]
    pairs[:len(copies)] = copies
    return _copy_blocks(kv_cache, pairs[:, 0], pairs[:, 1])
