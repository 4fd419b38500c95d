"""What the attention-kernel tests share: poisoned pools, blocks forgotten before a sliding
window, tolerances, the rounding the kernel sees, and the traced-layer check.

Pools hold POISON (finite, large) wherever no real key or value was written, so reading a stale
slot, another sequence's block or the pad block moves a result far out of tolerance. Blocks
wholly before a sequence's sliding window hold NaN (`forget_before_window`): a kernel must never
read them, not even masked (a zero probability times a NaN value is NaN).
Tolerances: float32 tightly (float32 accumulation); bfloat16 / float16 inputs are rounded once
(`rounded`) so the float64 oracle sees what the kernel sees, and the rest is the kernel's
rounding of the softmax probabilities before P.V and of its output (2^-9 relative for bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import paged_attention_reference

POISON = 1e4
LAYERS, LAYER = 2, 1  # pools of two layers; the kernels read layer 1, layer 0 is all POISON
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 1e-2}
# The jnp reference as one compiled program (run op by op it compiles every op for every new
# shape: seconds per case on the CPU).
reference = jax.jit(paged_attention_reference,
                    static_argnames=("scale", "sliding_window", "logit_softcap"))


def forget_before_window(k_pool, v_pool, tables, first_seen, block_size: int) -> int:
    """What the block manager may do to the blocks wholly before a sequence's sliding window:
    free them (they then hold anything: NaN here) and point their table entries at the pad
    block (every other one, counting back from the window, so the page right before it, the
    likeliest to be read by mistake, keeps its NaN block). first_seen[i]: the first position
    any query of sequence i sees. NumPy pools and tables, changed in place; returns how many
    blocks were forgotten."""
    forgotten = 0
    for i, first in enumerate(first_seen):
        window_page = first // block_size
        for page in range(window_page):
            k_pool[LAYER, tables[i, page]] = v_pool[LAYER, tables[i, page]] = np.nan
            if (window_page - page) % 2 == 0:
                tables[i, page] = 0
            forgotten += 1
    return forgotten


def rounded(a, dtype):
    """a's values after a round trip through dtype, as float64 (what the kernel sees)."""
    return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)


def assert_traced_layer_matches(kernel):
    """`kernel(layer)` with the layer a traced int32 scalar (a layer scan) equals the static
    index, and layer 0 (all POISON) gives something else."""
    traced = jax.jit(kernel)
    static = np.asarray(kernel(LAYER))
    np.testing.assert_array_equal(np.asarray(traced(jnp.int32(LAYER))), static)
    assert np.abs(np.asarray(traced(jnp.int32(0)))).max() > 1.0


def assert_decode_argument_errors(kernel):
    """A paged decode kernel's (Pallas or Triton) argument checks: heads not a multiple of
    kv_heads, a layer out of range, pages per compute block not a power of two."""
    q = jnp.zeros((2, 6, 64))
    pool = jnp.zeros((1, 4, 8, 4, 64))
    tables, lens = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        kernel(q, pool, pool, 0, tables, lens, scale=1.0)
    q = jnp.zeros((2, 8, 64))
    with pytest.raises(ValueError, match="out of range"):
        kernel(q, pool, pool, 1, tables, lens, scale=1.0)
    with pytest.raises(ValueError, match="power of two"):
        kernel(q, pool, pool, 0, tables, lens, scale=1.0, pages_per_compute_block=3)
