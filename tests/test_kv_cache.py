"""Copy-on-write block copies on device: right contents, every layer, pool updated in place."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from jinfer.model.kv_cache import copy_blocks
from jinfer.model.kv_cache import KVCache


def test_copy_blocks_in_place():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 10, 4, 2, 8)).astype(np.float32)  # [layers, blocks, bs, h, d]
    v = rng.standard_normal(k.shape).astype(np.float32)
    cache = KVCache(k=jnp.asarray(k), v=jnp.asarray(v))
    before = cache.k.unsafe_buffer_pointer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "donated buffers were not usable" warning fails
        out = copy_blocks(cache, [(2, 7), (5, 9), (3, 1)])
    expected_k, expected_v = k.copy(), v.copy()
    for src, dst in [(2, 7), (5, 9), (3, 1)]:
        expected_k[:, dst], expected_v[:, dst] = k[:, src], v[:, src]
    np.testing.assert_array_equal(np.asarray(out.k), expected_k)
    np.testing.assert_array_equal(np.asarray(out.v), expected_v)
    assert out.k.unsafe_buffer_pointer() == before
