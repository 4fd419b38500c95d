"""The Pallas KV-write kernel against a NumPy oracle and the jnp reference, bitwise.

On CPU the kernel runs in interpret mode (same kernel code, a modest grid of cases); the
`gpu`-marked tests run the full grid, launch variants, a pool over 4 GiB (64-bit offsets) and
the in-place checks through the Triton lowering.

A write is a copy, so every comparison is bitwise (on the raw bits, not the values): the whole
output pool must equal the input pool with exactly the valid tokens' rows replaced, which
checks both that the rows land and that nothing else moves. Each case mixes in skipped tokens
(negative slots and slots past the pool) so that every kernel launch also tests the skip.
"""

from __future__ import annotations

import itertools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.kv_write import write_kv_pallas, write_kv_reference

LAYERS = 3
SPARE_BLOCKS = 3  # blocks beyond what the tokens need, so some rows are never written
SKIP_SLOTS = (-1, -7, -2**31)  # plus capacity and capacity + 5, added per case


def bits(x) -> np.ndarray:
    """The raw bits of an array (bitwise comparison; NaN == NaN, -0 != +0)."""
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}")


def make_case(rng, *, num_tokens, block_size, kv_heads, head_dim, dtype, new_dtype=None,
              num_blocks=None):
    """Random pools and rows; distinct slots, about one token in six skipped.

    Returns (k_pool, v_pool, slots [num_tokens] int32, k_new, v_new) as jax arrays.
    """
    num_blocks = num_blocks or -(-num_tokens // block_size) + SPARE_BLOCKS
    capacity = num_blocks * block_size
    shape = (LAYERS, num_blocks, block_size, kv_heads, head_dim)
    k_pool = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pool = jnp.asarray(rng.standard_normal(shape), dtype)
    slots = rng.permutation(capacity)[:num_tokens].astype(np.int32)
    skips = np.array(SKIP_SLOTS + (capacity, capacity + 5), np.int32)
    skipped = rng.random(num_tokens) < 1 / 6
    slots[skipped] = rng.choice(skips, skipped.sum())
    rows = (num_tokens, kv_heads, head_dim)
    new_dtype = new_dtype or dtype
    k_new = jnp.asarray(rng.standard_normal(rows), new_dtype)
    v_new = jnp.asarray(rng.standard_normal(rows), new_dtype)
    return k_pool, v_pool, jnp.asarray(slots), k_new, v_new


def expected_pool(pool, layer, slots, new) -> np.ndarray:
    """NumPy oracle: the pool with each in-range slot's row replaced (slots are distinct)."""
    out = np.array(pool)
    new = np.asarray(jnp.asarray(new).astype(pool.dtype))
    block_size = pool.shape[2]
    for t, slot in enumerate(np.asarray(slots)):
        if 0 <= slot < pool.shape[1] * block_size:
            out[layer, slot // block_size, slot % block_size] = new[t]
    return out


def check(seed, *, layer, tokens_per_program=None, interpret=None, **case):
    rng = np.random.default_rng(seed)
    k_pool, v_pool, slots, k_new, v_new = make_case(rng, **case)
    out = write_kv_pallas(k_pool, v_pool, layer, slots, k_new, v_new,
                          tokens_per_program=tokens_per_program, interpret=interpret)
    ref = write_kv_reference(k_pool, v_pool, layer, slots, k_new, v_new)
    for pool, new, got, want in zip((k_pool, v_pool), (k_new, v_new), out, ref):
        assert got.shape == pool.shape and got.dtype == pool.dtype
        oracle = bits(expected_pool(pool, layer, slots, new))
        np.testing.assert_array_equal(bits(got), oracle)
        np.testing.assert_array_equal(bits(want), oracle)


# (num_tokens, dtype, block_size, head_dim, kv_heads, layer): every value of each axis of the
# issue's grid at least once, layer 0 and the last; the GPU test below runs the full product.
CPU_CASES = [
    (1, jnp.float32, 8, 64, 1, 0),
    (37, jnp.bfloat16, 16, 128, 8, LAYERS - 1),
    (100, jnp.float16, 32, 64, 8, LAYERS - 1),
    (16, jnp.bfloat16, 8, 128, 1, 0),
    (64, jnp.float32, 32, 128, 8, 0),
    (5, jnp.float16, 16, 64, 1, LAYERS - 1),
]


@pytest.mark.parametrize("num_tokens,dtype,block_size,head_dim,kv_heads,layer", CPU_CASES)
def test_matches_oracle_bitwise(num_tokens, dtype, block_size, head_dim, kv_heads, layer):
    check(0, layer=layer, num_tokens=num_tokens, block_size=block_size, kv_heads=kv_heads,
          head_dim=head_dim, dtype=dtype)


def test_launch_variants_and_odd_rows():
    """Several tokens per program with a ragged last program, rows split into power-of-two
    tiles (3 and 5 KV heads, head_dim 96), new rows cast to the pool dtype both ways. (On the
    GPU, 5 float32 heads of dim 96 once defaulted to 3 warps, which crashed Triton.)"""
    check(1, layer=1, num_tokens=22, block_size=8, kv_heads=3, head_dim=64, dtype=jnp.bfloat16,
          new_dtype=jnp.float32, tokens_per_program=3)
    check(2, layer=0, num_tokens=13, block_size=16, kv_heads=5, head_dim=96, dtype=jnp.float32,
          new_dtype=jnp.bfloat16, tokens_per_program=2)


def test_all_skipped_and_empty():
    """Only skip slots: the pools come back bitwise unchanged; zero tokens: no launch."""
    rng = np.random.default_rng(6)
    k_pool, v_pool, _, k_new, v_new = make_case(rng, num_tokens=6, block_size=8, kv_heads=2,
                                                head_dim=64, dtype=jnp.bfloat16)
    slots = jnp.array([-1, -1, 2**31 - 1, -3, k_pool.shape[1] * 8, -1], jnp.int32)
    for fn in (write_kv_pallas, write_kv_reference):
        out_k, out_v = fn(k_pool, v_pool, 0, slots, k_new, v_new)
        np.testing.assert_array_equal(bits(out_k), bits(k_pool))
        np.testing.assert_array_equal(bits(out_v), bits(v_pool))
        out_k, _ = fn(k_pool, v_pool, 0, slots[:0], k_new[:0], v_new[:0])
        np.testing.assert_array_equal(bits(out_k), bits(k_pool))


def test_duplicate_slots_keep_one_writers_elements():
    """Duplicate slots (padding tokens on the pad slot): each element of the row comes from one
    of the duplicates (which one is unspecified); every other row is exact."""
    rng = np.random.default_rng(7)
    k_pool, v_pool, _, k_new, v_new = make_case(rng, num_tokens=8, block_size=8, kv_heads=2,
                                                head_dim=64, dtype=jnp.float32)
    slots = np.array([0, 5, 0, 0, 9, 5, 17, 0], np.int32)
    for fn in (write_kv_pallas, write_kv_reference):
        out = fn(k_pool, v_pool, 1, jnp.asarray(slots), k_new, v_new)
        for pool, new, got in zip((k_pool, v_pool), (k_new, v_new), out):
            got, new = np.asarray(got), np.asarray(new)
            unique = np.array([slot if (slots == slot).sum() == 1 else -1 for slot in slots])
            want = expected_pool(pool, 1, unique, new)
            for slot in (0, 5):
                row = got[1, slot // 8, slot % 8]
                assert (row[None] == new[slots == slot]).any(axis=0).all()
                want[1, slot // 8, slot % 8] = row
            np.testing.assert_array_equal(bits(got), bits(want))


def test_traced_layer_under_jit():
    """The layer may be traced (a layer loop); out of range it writes nothing (both paths)."""
    rng = np.random.default_rng(8)
    k_pool, v_pool, slots, k_new, v_new = make_case(rng, num_tokens=10, block_size=8,
                                                    kv_heads=2, head_dim=64, dtype=jnp.float32)
    for fn in (write_kv_pallas, write_kv_reference):
        run = jax.jit(lambda layer, fn=fn: fn(k_pool, v_pool, layer, slots, k_new, v_new)[0])
        np.testing.assert_array_equal(
            bits(run(jnp.int32(2))), bits(expected_pool(k_pool, 2, slots, k_new)))
        for bad in (-1, LAYERS):
            np.testing.assert_array_equal(bits(run(jnp.int32(bad))), bits(k_pool))


def pool_copies(compiled_text: str, shape) -> list[str]:
    """Compiled-HLO copy instructions of a pool-shaped array (a copy of the whole pool)."""
    dims = "[" + ",".join(map(str, shape)) + "]"
    return [line.strip() for line in compiled_text.splitlines()
            if re.search(r"\bcopy(-start)?\(", line) and dims in line]


def donation_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "donat" in str(w.message).lower()]


def check_in_place(fn, shape, dtype, num_tokens, **kwargs):
    """Under donation the outputs reuse the pools' buffers: same pointers, no donation
    warning, no pool-sized copy in the compiled HLO; the write still lands."""
    rng = np.random.default_rng(9)
    k_pool, v_pool, slots, k_new, v_new = make_case(
        rng, num_tokens=num_tokens, block_size=shape[2], kv_heads=shape[3], head_dim=shape[4],
        dtype=dtype, num_blocks=shape[1])
    want = bits(expected_pool(k_pool, 1, slots, k_new))
    step = jax.jit(lambda kp, vp, s, k, v: fn(kp, vp, 1, s, k, v, **kwargs),
                   donate_argnums=(0, 1))
    assert not pool_copies(step.lower(k_pool, v_pool, slots, k_new, v_new).compile().as_text(),
                           k_pool.shape)
    pointers = (k_pool.unsafe_buffer_pointer(), v_pool.unsafe_buffer_pointer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # e.g. "Some donated buffers were not usable"
        out_k, out_v = step(k_pool, v_pool, slots, k_new, v_new)
    assert not donation_warnings(caught)
    assert (out_k.unsafe_buffer_pointer(), out_v.unsafe_buffer_pointer()) == pointers
    assert k_pool.is_deleted() and v_pool.is_deleted()
    np.testing.assert_array_equal(bits(out_k), want)


def test_in_place_under_donation():
    check_in_place(write_kv_pallas, (2, 8, 8, 2, 64), jnp.bfloat16, 20)


def test_no_donation_leaves_the_input_pool():
    rng = np.random.default_rng(10)
    k_pool, v_pool, slots, k_new, v_new = make_case(rng, num_tokens=5, block_size=8,
                                                    kv_heads=2, head_dim=64, dtype=jnp.float32)
    before = bits(k_pool).copy()
    out_k, _ = jax.jit(write_kv_pallas)(k_pool, v_pool, 1, slots, k_new, v_new)
    np.testing.assert_array_equal(bits(k_pool), before)
    assert (bits(out_k) != before).any()


def test_bad_input_raises():
    pool = jnp.zeros((2, 4, 8, 2, 64), jnp.bfloat16)
    slots, new = jnp.zeros((3,), jnp.int32), jnp.zeros((3, 2, 64), jnp.float32)
    for fn in (write_kv_pallas, write_kv_reference):
        with pytest.raises(ValueError, match="out of range"):
            fn(pool, pool, 2, slots, new, new)
        with pytest.raises(ValueError, match="both be"):
            fn(pool, pool[:1], 0, slots, new, new)
        with pytest.raises(ValueError, match="reshape"):
            fn(pool, pool, 0, slots.reshape(1, 3), new, new)
        with pytest.raises(ValueError, match="num_tokens, kv_heads, head_dim"):
            fn(pool, pool, 0, slots, new[:, :1], new)
        with pytest.raises(TypeError, match="share one floating dtype"):
            fn(pool, pool.astype(jnp.float32), 0, slots, new, new)
        with pytest.raises(TypeError, match="v_new must be floating"):
            fn(pool, pool, 0, slots, new, new.astype(jnp.int32))
    with pytest.raises(ValueError, match="tokens_per_program"):
        write_kv_pallas(pool, pool, 0, slots, new, new, tokens_per_program=0)
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        write_kv_pallas(pool, pool, 0, slots, new, new, num_warps=3)


GPU_GRID = list(itertools.product(
    (jnp.float32, jnp.bfloat16, jnp.float16), (8, 16, 32), (64, 128), (1, 8),
    ((1, LAYERS - 1), (77, 0), (1000, LAYERS - 1))))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,block_size,head_dim,kv_heads,tokens_layer", GPU_GRID)
def test_gpu_full_grid(dtype, block_size, head_dim, kv_heads, tokens_layer):
    num_tokens, layer = tokens_layer
    check(0, layer=layer, num_tokens=num_tokens, block_size=block_size, kv_heads=kv_heads,
          head_dim=head_dim, dtype=dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_per_program", [1, 2, 4, 8])
@pytest.mark.parametrize("kv_heads,head_dim", [(8, 128), (3, 64), (5, 96)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_launch_variants(tokens_per_program, kv_heads, head_dim, dtype):
    check(11, layer=1, num_tokens=333, block_size=16, kv_heads=kv_heads, head_dim=head_dim,
          dtype=dtype, tokens_per_program=tokens_per_program, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [write_kv_pallas, write_kv_reference])
def test_gpu_in_place_under_donation(fn):
    """Engine-sized pool (16 layers x 1024 blocks x 16 x 8 x 128 bf16, 512 MiB each)."""
    check_in_place(fn, (16, 1024, 16, 8, 128), jnp.bfloat16, 2048)


@pytest.mark.gpu
def test_gpu_in_place_in_a_layer_loop():
    """The pools carried through a fori_loop over layers (traced layer), donated: in place."""
    shape = (8, 256, 16, 8, 128)
    k_pool, v_pool = jnp.zeros(shape, jnp.bfloat16), jnp.ones(shape, jnp.bfloat16)
    slots = jnp.arange(0, 4096, 7, dtype=jnp.int32)
    new = jnp.full((slots.shape[0], 8, 128), 2.0, jnp.bfloat16)

    def write_all_layers(kp, vp):
        body = lambda layer, pools: write_kv_pallas(*pools, layer, slots, new, new)  # noqa: E731
        return lax.fori_loop(0, shape[0], body, (kp, vp))

    step = jax.jit(write_all_layers, donate_argnums=(0, 1))
    assert not pool_copies(step.lower(k_pool, v_pool).compile().as_text(), shape)
    pointers = (k_pool.unsafe_buffer_pointer(), v_pool.unsafe_buffer_pointer())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_k, out_v = step(k_pool, v_pool)
    assert not donation_warnings(caught)
    assert (out_k.unsafe_buffer_pointer(), out_v.unsafe_buffer_pointer()) == pointers
    written = np.zeros(shape[1] * shape[2], bool)
    written[np.asarray(slots)] = True
    out_k = np.asarray(out_k.astype(jnp.float32)).reshape(shape[0], -1, 8, 128)
    assert (out_k[:, written] == 2).all() and (out_k[:, ~written] == 0).all()


@pytest.mark.big_memory
@pytest.mark.gpu
def test_gpu_pool_over_4_gib():
    """A 5 GiB pool (64-bit offsets in the Triton lowering), writing near its end."""
    shape = (40, 4096, 16, 8, 128)  # bf16: 5 GiB per pool
    k_pool = jnp.zeros(shape, jnp.bfloat16)
    v_pool = jnp.zeros(shape, jnp.bfloat16)
    capacity = shape[1] * shape[2]
    slots = jnp.asarray(np.r_[0, capacity - 1, capacity - 17, 12345], jnp.int32)
    rng = np.random.default_rng(12)
    k_new = jnp.asarray(rng.standard_normal((4, 8, 128)), jnp.bfloat16)
    step = jax.jit(lambda kp, vp: write_kv_pallas(kp, vp, shape[0] - 1, slots, k_new, k_new),
                   donate_argnums=(0, 1))
    out_k, _ = step(k_pool, v_pool)
    rows = out_k[shape[0] - 1].reshape(capacity, 8, 128)[slots]
    np.testing.assert_array_equal(bits(rows), bits(k_new))
    assert int(jnp.count_nonzero(out_k)) == int(jnp.count_nonzero(k_new))  # nothing else
