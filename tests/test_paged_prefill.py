"""The Pallas ragged paged prefill kernel against dense float64 attention and the jnp reference.

On CPU the kernel runs in interpret mode (same kernel code, a modest set of cases that
together touch every value of each axis: GQA group 1/4/8 and a padded group of 3, head dim
64/128, block size 8/16/32, float32/bfloat16/float16, one page or several per step, one
tile or several per sequence); the `gpu`-marked tests run the full grid and engine-sized
shapes through the Triton lowering.

Each case packs several sequences back to back: a fresh prompt (no prefix), a chunk after a
cached prefix that is not a multiple of the block size, a decode-like single token, a
padding sequence (q_len 0, context 0) and a longer one, then padding tokens at the end.

Poisoning: interpret mode fills the kernel's output with NaN before it runs, so a row that no
program wrote shows up as NaN, and every test asserts a finite output. Stale pool slots
(past a sequence's context, never-used blocks, and block 0, the pad block) hold POISON
(finite, large) and sequences sit in shuffled physical blocks, so any read outside a
sequence's context moves the result far out of tolerance; keys of the sequence's own new
tokens past a query's position hold real values, so a causal-mask slip shows too.

Poisoned pools and tolerances: tests/kernel_cases.py.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import (PrefillPlan, make_plan, ragged_paged_attention_pallas,
                                          tile_map)
from pallas_kernels.reference import ragged_paged_attention_reference
from attention_oracle import dense_attention
from kernel_cases import (LAYER, LAYERS, POISON, TOLERANCE, assert_traced_layer_matches,
                          forget_before_window, rounded)

reference = jax.jit(ragged_paged_attention_reference,
                    static_argnames=("scale", "sliding_window", "logit_softcap"))


def dense_prefill(q, k, v, scale, **opts):
    """q [n, heads, dim] at positions ctx - n .. ctx - 1; k, v [ctx, kv_heads, dim] ->
    [n, heads, dim] float64, causal; opts: sliding_window, logit_softcap."""
    n, ctx = q.shape[0], k.shape[0]
    return dense_attention(q, k, v, ctx - n + np.arange(n), scale, **opts)


def make_case(rng, *, seqs, kv_heads, group, head_dim, block_size, dtype, pad_tokens,
              sliding_window=None):
    """Sequences (q_len, context_len) packed back to back in a shuffled, poisoned pool; with a
    sliding window the blocks before each sequence's first query's window are forgotten
    (NaN, some entries the pad block).

    Block 0 is the pad block (also poisoned); tables have one spare entry per row. Returns
    (q [tokens, heads, dim], k_pool, v_pool, tables, qsl, lens, contexts) where contexts[s]
    is (k, v) [ctx, kv_heads, dim] float64 of the dtype-rounded values.
    """
    max_blocks = max(-(-ctx // block_size) for _, ctx in seqs) + 1
    num_blocks = 1 + len(seqs) * max_blocks + 3  # a few never-used blocks too
    shape = (LAYERS, num_blocks, block_size, kv_heads, head_dim)
    k_pool = np.full(shape, POISON, np.float32)
    v_pool = np.full(shape, POISON, np.float32)
    free = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((len(seqs), max_blocks), np.int32)
    contexts = []
    for s, (_, ctx) in enumerate(seqs):
        used = -(-ctx // block_size)
        tables[s, :used] = free[s * max_blocks:s * max_blocks + used]
        k = rng.standard_normal((ctx, kv_heads, head_dim)).astype(np.float32)
        v = rng.standard_normal((ctx, kv_heads, head_dim)).astype(np.float32)
        t = np.arange(ctx)
        k_pool[LAYER, tables[s, t // block_size], t % block_size] = k
        v_pool[LAYER, tables[s, t // block_size], t % block_size] = v
        contexts.append((rounded(k, dtype), rounded(v, dtype)))
    if sliding_window is not None:
        first_seen = [max(ctx - n - sliding_window + 1, 0) for n, ctx in seqs]
        forgotten = forget_before_window(k_pool, v_pool, tables, first_seen, block_size)
        # Something to forget unless the window is wider than every context's first page.
        assert forgotten or all(first < block_size for first in first_seen)
    qsl = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    q = rng.standard_normal((qsl[-1] + pad_tokens, kv_heads * group, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k_pool, dtype), jnp.asarray(v_pool, dtype),
            jnp.asarray(tables), jnp.asarray(qsl), jnp.asarray([c for _, c in seqs], jnp.int32),
            contexts)


def mixed_seqs(block_size, long=33):
    """A fresh prompt, a chunk after a non-multiple prefix, a decode token, a padding sequence,
    a longer prompt after one full block."""
    return [(5, 5), (7, block_size + 5 + 7), (1, 2 * block_size + 3), (0, 0),
            (long, block_size + long)]


def check(seed, *, seqs, kv_heads, group, head_dim, block_size, dtype, pad_tokens=3,
          with_reference=True, kernel=ragged_paged_attention_pallas, sliding_window=None,
          logit_softcap=None, **kwargs):
    """Runs `kernel` (kwargs passed on) on a random ragged case; checks it against dense float64
    attention, exact zeros past the sequences, and the jnp reference. Returns the output."""
    rng = np.random.default_rng(seed)
    q, k_pool, v_pool, tables, qsl, lens, contexts = make_case(
        rng, seqs=seqs, kv_heads=kv_heads, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype, pad_tokens=pad_tokens,
        sliding_window=sliding_window)
    scale = head_dim ** -0.5
    opts = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    out = kernel(q, k_pool, v_pool, LAYER, tables, qsl, lens, scale=scale, **opts, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.isfinite(out).all()
    q64 = np.asarray(q.astype(jnp.float32), np.float64)
    bounds = np.asarray(qsl)
    expected = np.zeros_like(out)  # padding tokens: exact zeros
    for s, (k, v) in enumerate(contexts):
        rows = slice(bounds[s], bounds[s + 1])
        if rows.stop > rows.start:
            expected[rows] = dense_prefill(q64[rows], k, v, scale, **opts)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, expected, atol=tol, rtol=tol)
    assert (out[bounds[-1]:] == 0).all()
    if not with_reference:
        return out
    ref = reference(q, k_pool, v_pool, LAYER, tables, qsl, lens, scale=scale, **opts)
    np.testing.assert_allclose(out, np.asarray(ref.astype(jnp.float32), np.float64),
                               atol=tol, rtol=tol)
    return out


# (kv_heads, group, head_dim, block_size, dtype, kwargs): every value of each axis at least
# once, several pairs; the GPU test below runs the full product.
CPU_CASES = [
    (2, 4, 64, 8, jnp.float32, {"block_q": 4, "block_k": 16}),
    (2, 1, 128, 16, jnp.bfloat16, {"block_q": 16}),
    (1, 8, 64, 32, jnp.float16, {"block_q": 2}),
    (2, 4, 128, 32, jnp.float32, {}),
    (1, 4, 64, 16, jnp.bfloat16, {"block_q": 8, "block_k": 16}),
    (2, 3, 64, 8, jnp.float32, {"block_q": 4}),  # group 3: padded to 4 rows per token
]


@pytest.mark.parametrize("kv_heads,group,head_dim,block_size,dtype,kwargs", CPU_CASES)
def test_matches_dense_attention(kv_heads, group, head_dim, block_size, dtype, kwargs):
    check(0, seqs=mixed_seqs(block_size), kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, dtype=dtype, **kwargs)


# (seqs, window, softcap, block_size, dtype, kwargs): chunks after long prefixes (the blocks
# before their windows NaN), a decode token, a padding sequence, and a prompt as long as the
# window. Window 12 is narrower than a tile's span of windows (no step every row sees whole);
# window 40 has masked steps at both edges and whole steps between.
WINDOW_CASES = [
    ([(5, 5), (20, 78), (1, 53), (0, 0), (12, 12)], 12, 0.6, 8, jnp.float32,
     {"block_q": 8, "block_k": 16}),
    ([(5, 5), (33, 100), (1, 77), (0, 0), (40, 40)], 40, None, 16, jnp.bfloat16,
     {"block_q": 4, "block_k": 16}),
    (None, None, 0.5, 8, jnp.float32, {}),  # soft-capping alone, the mixed sequences
]


@pytest.mark.parametrize("seqs,window,softcap,block_size,dtype,kwargs", WINDOW_CASES)
def test_sliding_window_and_softcap(seqs, window, softcap, block_size, dtype, kwargs):
    check(3, seqs=seqs or mixed_seqs(block_size), kv_heads=1, group=4, head_dim=64,
          block_size=block_size, dtype=dtype, sliding_window=window, logit_softcap=softcap,
          **kwargs)


def test_long_sequence_many_steps():
    """One long chunk after a long prefix: many unmasked steps, a diagonal across several
    masked steps (block_q > block_k), tiles shifted back at the end of the rows."""
    check(1, seqs=[(70, 131), (3, 3)], kv_heads=1, group=4, head_dim=64, block_size=8,
          dtype=jnp.float32, pad_tokens=0, block_q=32, block_k=16)


def test_rows_shorter_than_a_tile():
    """Fewer packed rows than block_q (q is padded inside) and padding sequences first."""
    out = check(2, seqs=[(0, 0), (2, 9), (1, 1)], kv_heads=2, group=4, head_dim=64,
                block_size=8, dtype=jnp.float32, pad_tokens=2, block_q=8)
    assert (out[3:] == 0).all()


def test_traced_layer_under_jit():
    rng = np.random.default_rng(4)
    q, k_pool, v_pool, tables, qsl, lens, _ = make_case(
        rng, seqs=[(4, 10), (3, 3)], kv_heads=2, group=2, head_dim=64, block_size=8,
        dtype=jnp.float32, pad_tokens=1)
    assert_traced_layer_matches(lambda layer: ragged_paged_attention_pallas(
        q, k_pool, v_pool, layer, tables, qsl, lens, scale=0.125, block_q=8))


def test_tile_map_covers_every_row_once():
    """Own rows of the tiles partition [0, tokens); no tile straddles two sequences; the
    static length always suffices; the heaviest tile of the last sequence comes first."""
    rng = np.random.default_rng(5)
    num_seqs, tokens = 6, 160
    for block_q in (1, 4, 16):
        plan = make_plan(tokens, num_seqs, 1, 16, 64, 2, block_q, None)
        tiles = jax.jit(lambda qsl: tile_map(qsl, tokens, block_q, plan.num_tiles))
        for _ in range(12):
            q_lens = rng.integers(0, 27, size=num_seqs) * (rng.random(num_seqs) > 0.3)
            qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
            seq, start, bounds = (np.asarray(a) for a in tiles(jnp.asarray(qsl)))
            owner = np.full(tokens, -1)
            for s, t0 in zip(seq, start):
                t1 = min(t0 + block_q, bounds[s + 1])
                assert bounds[s] <= t0 <= bounds[s + 1]
                assert (owner[t0:t1] == -1).all()
                owner[t0:t1] = s
            expected = np.searchsorted(qsl[1:], np.arange(tokens), side="right")
            np.testing.assert_array_equal(owner, expected)  # tail rows: segment num_seqs
            first = seq[start < bounds[seq + 1]][0]  # first program with work: the tail's
            assert first == (num_seqs if qsl[-1] < tokens else np.flatnonzero(q_lens)[-1])


def test_plan_defaults():
    plan = make_plan(8192, 1, 4, 16, 128, 2, None, None)
    assert plan == PrefillPlan(block_q=32, block_k=64, group_rows=4, num_tiles=257)
    assert make_plan(8192, 1, 1, 16, 128, 4, None, None).block_k == 64  # f32: fits smem
    assert make_plan(5, 3, 1, 32, 64, 2, None, None).block_q == 16      # >= 16 rows
    assert make_plan(3, 1, 8, 16, 64, 2, None, None).block_q == 4       # short rows
    assert make_plan(64, 1, 3, 16, 64, 2, None, None).rows == 128       # group 3 -> 4 rows


def test_bad_input_raises_value_error():
    q = jnp.zeros((6, 8, 64))
    pool = jnp.zeros((1, 4, 8, 4, 64))
    tables, lens = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    qsl = jnp.array([0, 3, 6], jnp.int32)
    call = ragged_paged_attention_pallas
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        call(jnp.zeros((6, 6, 64)), pool, pool, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="out of range"):
        call(q, pool, pool, 1, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        call(q, pool, pool, 0, tables, qsl[1:], lens, scale=1.0)
    with pytest.raises(ValueError, match="context_lens"):
        call(q, pool, pool, 0, tables, qsl, lens[:1], scale=1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        call(q.astype(jnp.bfloat16), pool, pool, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="block_q"):
        call(q, pool, pool, 0, tables, qsl, lens, scale=1.0, block_q=4)  # 4 x 2 rows < 16
    with pytest.raises(ValueError, match="block_k"):
        call(q, pool, pool, 0, tables, qsl, lens, scale=1.0, block_k=24)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        odd = jnp.zeros((1, 4, 12, 4, 64))
        call(q, odd, odd, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match=r"\[num_tokens, num_heads, head_dim\]"):
        call(q[None], pool, pool, 0, tables, qsl, lens, scale=1.0)


GPU_GRID = list(itertools.product((1, 4, 8), (64, 128), (8, 16, 32),
                                  (jnp.float32, jnp.bfloat16, jnp.float16)))


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,block_size,dtype", GPU_GRID)
def test_gpu_full_grid(group, head_dim, block_size, dtype):
    """Against the float64 oracle only (a reference compile per shape would triple the time;
    the tests below compare with the reference too)."""
    check(0, seqs=mixed_seqs(block_size, long=150), kv_heads=2, group=group,
          head_dim=head_dim, block_size=block_size, dtype=dtype, interpret=False,
          with_reference=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{}, {"block_q": 16}, {"block_k": 128},
                                    {"block_q": 16, "block_k": 32, "num_warps": 4},
                                    {"num_stages": 3}])
def test_gpu_tile_variants(kwargs):
    check(6, seqs=mixed_seqs(16, long=300), kv_heads=2, group=4, head_dim=128, block_size=16,
          dtype=jnp.bfloat16, interpret=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(1, None), (40, 1.0), (200, None), (None, 1.0),
                                            (4096, None)])
@pytest.mark.parametrize("group,block_size,dtype,kwargs", [
    (4, 16, jnp.bfloat16, {}), (1, 8, jnp.float32, {"block_q": 16, "block_k": 32}),
    (8, 32, jnp.float16, {"block_k": 128})])
def test_gpu_window_and_softcap(window, softcap, group, block_size, dtype, kwargs):
    """Windows narrower than a step, across several steps and wider than every context, and
    soft-capping alone, over long chunks after prefixes (the blocks before the windows NaN)."""
    check(4, seqs=[(300, 900), (1, 500), (0, 0), (130, 130)], kv_heads=2, group=group,
          head_dim=128, block_size=block_size, dtype=dtype, interpret=False,
          sliding_window=window, logit_softcap=softcap, **kwargs)


@pytest.mark.big_memory
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_gpu_large_shapes(dtype):
    """Engine-sized heads (32 q / 8 KV, dim 128, block 16): a 2048-token prompt, a 1000-token
    chunk after a 1500-token prefix, decode tokens, a padding sequence, tail padding."""
    check(7, seqs=[(2048, 2048), (1000, 2500), (1, 777), (0, 0), (1, 1), (300, 300)],
          kv_heads=8, group=4, head_dim=128, block_size=16, dtype=dtype, pad_tokens=50,
          interpret=False)
