"""The paged KV pool: device arrays, a pytree passed explicitly and donated to every step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jinfer.config import ModelConfig

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
