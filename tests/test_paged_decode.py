"""pallas_kernels/paged_decode.py: the Pallas paged decode kernel against dense float64 attention
and the jnp reference.

On CPU the kernel runs in interpret mode (same kernel code, a modest grid of cases); the
`gpu`-marked tests run the full grid and larger shapes through the Triton lowering.

Interpret mode fills the kernel's outputs with NaN before it runs, so a program that skipped a
write shows up as NaN, and every test asserts a finite output. Poisoned pools and tolerances:
tests/kernel_cases.py.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import (choose_num_splits, make_plan,
                                         paged_decode_attention_pallas)
from attention_oracle import dense_attention
from kernel_cases import (LAYER, LAYERS, POISON, TOLERANCE, assert_decode_argument_errors,
                          assert_traced_layer_matches, forget_before_window, reference,
                          rounded)


def dense_decode(q, k, v, scale, **opts):
    """q [heads, dim]; k, v [ctx, kv_heads, dim] -> [heads, dim] float64 (zeros when ctx 0),
    the query at the last position; opts: sliding_window, logit_softcap."""
    if k.shape[0] == 0:
        return np.zeros(q.shape)
    return dense_attention(q[None], k, v, np.array([k.shape[0] - 1]), scale, **opts)[0]


def make_case(rng, *, context_lens, kv_heads, group, head_dim, block_size, max_blocks, dtype,
              sliding_window=None):
    """Random sequences in a shuffled, poisoned pool; block 0 is the pad block (also poisoned);
    with a sliding window the blocks before it are forgotten (NaN, some entries the pad block).

    Returns (q [batch, heads, dim], k_pool, v_pool, tables, lens, contexts) where contexts[i]
    is (k, v) [ctx, kv_heads, dim] as float64 of the dtype-rounded values.
    """
    batch = len(context_lens)
    num_blocks = 1 + batch * max_blocks + 3  # a few never-used blocks too
    shape = (LAYERS, num_blocks, block_size, kv_heads, head_dim)
    k_pool = np.full(shape, POISON, np.float32)
    v_pool = np.full(shape, POISON, np.float32)
    free = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((batch, max_blocks), np.int32)
    contexts = []
    for i, ctx in enumerate(context_lens):
        used = -(-ctx // block_size)
        tables[i, :used] = free[i * max_blocks:i * max_blocks + used]
        k = rng.standard_normal((ctx, kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((ctx, kv_heads, head_dim)).astype(np.float32)
        for t in range(ctx):
            k_pool[LAYER, tables[i, t // block_size], t % block_size] = k[t]
            v_pool[LAYER, tables[i, t // block_size], t % block_size] = v[t]
        contexts.append((rounded(k, dtype), rounded(v, dtype)))
    if sliding_window is not None:
        first_seen = np.maximum(np.asarray(context_lens) - sliding_window, 0)
        forget_before_window(k_pool, v_pool, tables, first_seen, block_size)
    q = rng.standard_normal((batch, kv_heads * group, head_dim)).astype(np.float32)
    return (jnp.asarray(q, dtype), jnp.asarray(k_pool, dtype), jnp.asarray(v_pool, dtype),
            jnp.asarray(tables), jnp.asarray(context_lens, jnp.int32), contexts)


def contexts_for(batch, block_size, max_blocks):
    """1 token, a non-multiple of the block size, the full table (batch 1: a non-multiple)."""
    full = block_size * max_blocks
    if batch == 1:
        return [full - block_size // 2 - 1]
    return [1, block_size + 3, full][:batch] + [full - 1] * max(0, batch - 3)


def check(seed, *, batch, kv_heads, group, head_dim, block_size, num_splits, dtype,
          max_blocks=5, context_lens=None, kernel=paged_decode_attention_pallas,
          sliding_window=None, logit_softcap=None, **kwargs):
    """Runs `kernel` (the Pallas one, or another with its arguments) on one random case;
    asserts shape, dtype, finiteness, zeros for padding rows, and agreement with the dense
    float64 oracle and the jnp reference. Returns (its output as float64, the case's
    (q, k_pool, v_pool, tables, lens), scale)."""
    rng = np.random.default_rng(seed)
    lens = context_lens or contexts_for(batch, block_size, max_blocks)
    q, k_pool, v_pool, tables, lens_arr, contexts = make_case(
        rng, context_lens=lens, kv_heads=kv_heads, group=group, head_dim=head_dim,
        block_size=block_size, max_blocks=max_blocks, dtype=dtype, sliding_window=sliding_window)
    scale = head_dim ** -0.5
    opts = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    out = kernel(q, k_pool, v_pool, LAYER, tables, lens_arr, scale=scale,
                 num_splits=num_splits, **opts, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.isfinite(out).all()
    live = np.asarray(lens) > 0
    assert (out[~live] == 0).all()
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    expected = np.stack([dense_decode(q64[i], k, v, scale, **opts)
                         for i, (k, v) in enumerate(contexts)])
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, expected, atol=tol, rtol=tol)
    if live.any():  # the oracle's padding rows (context 0) are defined differently: skip them
        ref = reference(q[:, None], k_pool, v_pool, LAYER, tables, (lens_arr - 1)[:, None],
                        lens_arr, scale=scale, **opts)[:, 0]
        ref = np.asarray(ref.astype(jnp.float32), np.float64)
        np.testing.assert_allclose(out[live], ref[live], atol=tol, rtol=tol)
    return out, (q, k_pool, v_pool, tables, lens_arr), scale


# (batch, kv_heads, group, head_dim, block_size, num_splits, dtype): every value of each axis
# of the grid at least once, several pairs; the GPU test below runs the full product.
CPU_CASES = [
    (3, 2, 4, 64, 8, 3, jnp.float32),
    (3, 1, 4, 128, 16, 1, jnp.float32),
    (1, 2, 1, 64, 32, 3, jnp.bfloat16),
    (3, 2, 1, 128, 8, 1, jnp.bfloat16),
    (1, 1, 1, 64, 16, 1, jnp.float32),
    (3, 1, 4, 64, 32, 3, jnp.bfloat16),
    (3, 2, 4, 128, 32, 1, jnp.float32),
    (1, 2, 4, 128, 8, 3, jnp.bfloat16),
    (3, 2, 4, 64, 16, None, jnp.bfloat16),
    (3, 1, 1, 64, 8, 3, jnp.float16),
]


@pytest.mark.parametrize("batch,kv_heads,group,head_dim,block_size,num_splits,dtype", CPU_CASES)
def test_matches_dense_attention(batch, kv_heads, group, head_dim, block_size, num_splits,
                                 dtype):
    check(0, batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, num_splits=num_splits, dtype=dtype)


# (window, softcap, block_size, num_splits, pages_per_compute_block, dtype) over rows of
# context 1, equal to the window, and longer (the window's first block mid-table), so one
# window is longer than, equal to and shorter than the rows' contexts.
WINDOW_CASES = [
    (40, 0.7, 16, 3, 1, jnp.float32),        # three splits over the window's pages, capped
    (1, None, 8, None, None, jnp.bfloat16),  # the last token alone
    (None, 0.5, 8, 1, None, jnp.float32),    # soft-capping alone
]


@pytest.mark.parametrize("window,softcap,block_size,num_splits,step,dtype", WINDOW_CASES)
def test_sliding_window_and_softcap(window, softcap, block_size, num_splits, step, dtype):
    """The splits start at the window's first block: the blocks before it (NaN) are never
    read, and the outputs match the dense oracle and the jnp reference."""
    lens = [1, window or 23, 8 * block_size - 3, 5 * block_size + 2]
    check(6, batch=4, kv_heads=1, group=2, head_dim=64, block_size=block_size,
          num_splits=num_splits, dtype=dtype, max_blocks=8, context_lens=lens,
          sliding_window=window, logit_softcap=softcap, pages_per_compute_block=step)


def test_padding_rows_give_zeros():
    """Rows with context_len 0 (batch padding, table all pad block) give exact zeros, with one
    or several splits, and leave the other rows untouched."""
    for splits in (1, 3):
        out, _, _ = check(1, batch=3, kv_heads=2, group=4, head_dim=64, block_size=8,
                          num_splits=splits, dtype=jnp.float32, context_lens=[0, 19, 0])
        assert (out[0] == 0).all() and (out[2] == 0).all()


def test_small_steps_and_many_splits():
    """One page per step (block 32), more splits than pages (empty splits), a long table."""
    check(2, batch=3, kv_heads=2, group=4, head_dim=64, block_size=32, num_splits=7,
          dtype=jnp.float32, pages_per_compute_block=1)
    check(3, batch=2, kv_heads=1, group=4, head_dim=64, block_size=8, num_splits=2,
          dtype=jnp.float32, max_blocks=13, context_lens=[97, 45], pages_per_compute_block=4)


def test_traced_layer_under_jit():
    rng = np.random.default_rng(4)
    q, k_pool, v_pool, tables, lens, _ = make_case(
        rng, context_lens=[5, 12], kv_heads=2, group=2, head_dim=64, block_size=8,
        max_blocks=2, dtype=jnp.float32)
    assert_traced_layer_matches(lambda layer: paged_decode_attention_pallas(
        q, k_pool, v_pool, layer, tables, lens, scale=0.125, num_splits=2))


def test_plan_fills_the_gpu_and_covers_the_table():
    assert choose_num_splits(128, 8, 2048) == 1        # the batch alone fills the GPU
    assert choose_num_splits(128, 8, 16384) == 4       # long contexts: a split per 4,096 tokens
    assert choose_num_splits(1, 8, 16384) * 8 >= 132  # a lone long sequence still fills SMs
    assert choose_num_splits(1, 8, 64) == 1            # short contexts: no split overhead
    # Steps: 128 tokens where the programs fit in one wave (latency-bound), else 64.
    assert make_plan(1, 8, 4, 16, 32, None, None).pages_per_compute_block == 8
    assert make_plan(128, 8, 4, 16, 32, None, None).pages_per_compute_block == 4
    for batch, bs, max_blocks, splits in itertools.product(
            (1, 32), (8, 16, 32), (1, 5, 1024), (None, 1, 3)):
        plan = make_plan(batch, 8, 4, bs, max_blocks, splits, None)
        step = plan.pages_per_compute_block
        assert step & (step - 1) == 0 and step * bs >= 16
        assert plan.pages_per_split % step == 0
        assert plan.num_splits * plan.pages_per_split >= max_blocks
        assert splits is None or plan.num_splits == splits
        assert splits is not None or (plan.num_splits - 1) * plan.pages_per_split < max_blocks


def test_bad_input_raises_value_error():
    assert_decode_argument_errors(paged_decode_attention_pallas)


GPU_GRID = list(itertools.product((1, 3), (1, 2), (1, 4), (64, 128), (8, 16, 32), (1, 3),
                                  (jnp.float32, jnp.bfloat16)))


@pytest.mark.gpu
@pytest.mark.parametrize("batch,kv_heads,group,head_dim,block_size,num_splits,dtype", GPU_GRID)
def test_gpu_full_grid(batch, kv_heads, group, head_dim, block_size, num_splits, dtype):
    check(0, batch=batch, kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, num_splits=num_splits, dtype=dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(1, None), (100, 1.0), (4096, None), (None, 1.0)])
@pytest.mark.parametrize("block_size,num_splits,dtype", [(16, None, jnp.bfloat16),
                                                         (8, 3, jnp.float32),
                                                         (32, 1, jnp.float16)])
def test_gpu_window_and_softcap(window, softcap, block_size, num_splits, dtype):
    """Engine-sized heads over long contexts (the blocks before the window NaN): a window of
    one token, shorter than the contexts, longer than most, and soft-capping alone."""
    full = 160 * block_size
    check(8, batch=5, kv_heads=8, group=4, head_dim=128, block_size=block_size,
          num_splits=num_splits, dtype=dtype, max_blocks=160,
          context_lens=[1, min(window or 100, full), full, full // 2 + 5, 0],
          sliding_window=window, logit_softcap=softcap, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits,dtype", [(None, jnp.bfloat16), (1, jnp.bfloat16),
                                              (5, jnp.float16), (None, jnp.float32)])
def test_gpu_large_shapes(num_splits, dtype):
    """Engine-sized heads (32 q / 8 KV, dim 128, block 16) with long ragged contexts."""
    check(5, batch=6, kv_heads=8, group=4, head_dim=128, block_size=16, num_splits=num_splits,
          dtype=dtype, max_blocks=160, context_lens=[1, 17, 2559, 1000, 0, 2560],
          interpret=False)
