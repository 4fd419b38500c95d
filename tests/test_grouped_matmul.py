"""pallas_kernels/grouped_matmul.py against its reference (jax.lax.ragged_dot) on fresh random
inputs over a grid of shapes and group layouts: empty groups (first, inside, last), one group,
groups sharing a row block, rows past the groups (exact zeros), every block_m; the tile map's
invariants; bad input. Interpret mode on the CPU, compiled (Triton) on the GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (default_block_m, grouped_matmul,
                                           grouped_matmul_reference, num_tiles, row_tiles,
                                           supported, tile_map)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 5e-3}


def layout(rng, rows: int, groups: int, kind: str) -> np.ndarray:
    """Group sizes summing to `rows` (or fewer for "tail"): random with some empty groups,
    everything in one group, one row each (decode), or leaving rows past the groups."""
    if kind == "one":
        sizes = np.zeros(groups, np.int64)
        sizes[rng.integers(groups)] = rows
    elif kind == "singles":  # decode: a few rows, each its own group, empty groups between
        sizes = np.zeros(groups, np.int64)
        sizes[rng.choice(groups, size=min(rows, groups), replace=False)] = 1
        sizes[rng.integers(groups)] += rows - sizes.sum()
    else:
        total = rows - (rows // 5 if kind == "tail" else 0)
        p = rng.random(groups) * (rng.random(groups) > 0.3)  # about a third empty
        p[[0, -1]] = 0.0  # the first and last groups empty
        if not p.any():
            p[groups // 2] = 1.0
        sizes = rng.multinomial(total, p / p.sum())
    return sizes.astype(np.int32)


def check(seed, rows, k, n, groups, kind, dtype, *, interpret=None, kernel=grouped_matmul,
          **kwargs):
    """`kernel` (a grouped matmul's signature) on a random case against ragged_dot in float32,
    rows past the groups exact zeros."""
    rng = np.random.default_rng(seed)
    sizes = layout(rng, rows, groups, kind)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)) * k ** -0.5, dtype)
    got = kernel(x, w, jnp.asarray(sizes), interpret=interpret, **kwargs)
    want = grouped_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                    jnp.asarray(sizes))
    assert got.shape == (rows, n) and got.dtype == dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=tol,
                               rtol=tol, err_msg=f"sizes {sizes.tolist()}")
    assert (np.asarray(got[sizes.sum():]) == 0).all()  # rows past the groups


def check_row_groups(seed, rows, k, n, groups, dtype, *, interpret=None, kernel=grouped_matmul,
                     **kwargs):
    """`kernel` with row_groups (rows in any order, each its own group; some outside [0, G),
    as a decode step's padding rows and another slice's experts are) against each row times
    its group's matrix in float32; rows of no group exact zeros."""
    rng = np.random.default_rng(seed)
    row_groups = rng.integers(-1, groups + 1, rows).astype(np.int32)  # -1 and G: no group
    row_groups[0] = rng.integers(groups)
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((groups, k, n)) * k ** -0.5, dtype)
    got = kernel(x, w, row_groups=jnp.asarray(row_groups), interpret=interpret, **kwargs)
    live = (row_groups >= 0) & (row_groups < groups)
    x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32)
    want = np.stack([x32[r] @ w32[g] if ok else np.zeros(n, np.float32)
                     for r, (g, ok) in enumerate(zip(row_groups, live))])
    assert got.shape == (rows, n) and got.dtype == dtype
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol,
                               err_msg=f"row groups {row_groups.tolist()}")
    assert (np.asarray(got)[~live] == 0).all()


@pytest.mark.parametrize("rows,k,n,groups,dtype,kwargs", [
    (16, 64, 32, 8, jnp.float32, {}), (5, 32, 48, 3, jnp.float32, {"block_m": 32}),
    (40, 32, 16, 64, jnp.bfloat16, {})])
def test_row_groups_match_each_rows_matrix(rows, k, n, groups, dtype, kwargs):
    check_row_groups(rows, rows, k, n, groups, dtype, **kwargs)


def test_row_tiles_one_tile_per_row():
    group, block, first, end = map(np.asarray, row_tiles(jnp.asarray([3, -1, 0, 8, 7]), 8, 16))
    np.testing.assert_array_equal(group, [3, 0, 0, 0, 7])
    np.testing.assert_array_equal(block, [0, 0, 0, 0, 0])
    np.testing.assert_array_equal(first, [0, 0, 2, 0, 4])
    np.testing.assert_array_equal(end, [1, 0, 3, 0, 5])  # rows 1 and 3 (no group): empty


# (rows, K, N, groups, kind, dtype, kwargs): each layout, each block_m, several tile widths.
CPU_CASES = [
    (8, 64, 32, 8, "singles", jnp.float32, {}),                    # a decode step, k = 8
    (2, 32, 48, 16, "singles", jnp.float32, {}),
    (37, 32, 48, 5, "random", jnp.float32, {"block_m": 16}),
    (100, 64, 64, 3, "random", jnp.float32, {"block_m": 32, "block_k": 16}),
    (130, 16, 32, 4, "tail", jnp.float32, {"block_m": 64}),
    (50, 32, 16, 6, "one", jnp.float32, {}),
    (64, 48, 80, 8, "random", jnp.bfloat16, {}),
    (21, 32, 32, 3, "tail", jnp.float16, {"block_n": 16}),
]


@pytest.mark.parametrize("rows,k,n,groups,kind,dtype,kwargs", CPU_CASES)
def test_matches_ragged_dot(rows, k, n, groups, kind, dtype, kwargs):
    check(rows, rows, k, n, groups, kind, dtype, **kwargs)


def test_tile_map_has_no_loop():
    """The tile map runs before every grouped matmul of every MoE layer: it lowers to straight
    fused ops, no while loop (jnp.searchsorted's default binary search is one, and XLA:GPU
    steps through a while loop from the host)."""
    lowered = jax.jit(tile_map, static_argnums=(1, 2, 3)).lower(
        jnp.zeros(128, jnp.int32), 16, 16, num_tiles(16, 128, 16))
    assert "while" not in lowered.as_text()


@pytest.mark.parametrize("rows,groups,block_m", [(8, 8, 16), (100, 3, 32), (1000, 128, 16),
                                                 (16384, 128, 64), (5, 12, 16)])
def test_tile_map_covers_each_grouped_row_once(rows, groups, block_m):
    """Every row of a group lies in exactly one real tile of that group, inside the tile's
    block; tiles are in group order; the static bound holds; tiles past the count are empty."""
    rng = np.random.default_rng(rows)
    for kind in ("random", "singles", "one", "tail"):
        sizes = layout(rng, rows, groups, kind)
        tiles = num_tiles(rows, groups, block_m)
        group, block, first, end = map(np.asarray, tile_map(jnp.asarray(sizes), rows, block_m,
                                                            tiles))
        real = end > first
        covered = np.zeros(rows, np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        for g, b, f, e in zip(group[real], block[real], first[real], end[real]):
            assert b * block_m <= f < e <= (b + 1) * block_m
            assert offsets[g] <= f and e <= offsets[g + 1]
            covered[f:e] += 1
        assert (covered[:sizes.sum()] == 1).all() and (covered[sizes.sum():] == 0).all()
        assert (np.diff(group[real]) >= 0).all()
        assert not real[real.sum():].any()  # the real tiles come first
        expected = sum(len(range(o // block_m, (o + s - 1) // block_m + 1))
                       for o, s in zip(offsets[:-1], sizes) if s)
        assert real.sum() == expected <= tiles


def test_block_m_follows_rows_per_group():
    assert default_block_m(8, 128) == 16        # decode: 8 rows over 128 experts
    assert default_block_m(512, 8) == 64        # prefill: 64 rows per expert
    assert default_block_m(16384, 128) == 64
    assert default_block_m(96, 3) == 32


def test_one_program_for_every_routing():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((24, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 32, 16)), jnp.float32)
    fn = jax.jit(grouped_matmul)
    for kind in ("random", "one", "tail"):
        sizes = jnp.asarray(layout(rng, 24, 6, kind))
        np.testing.assert_allclose(np.asarray(fn(x, w, sizes)),
                                   np.asarray(grouped_matmul_reference(x, w, sizes)),
                                   rtol=1e-5, atol=1e-5)
    assert fn._cache_size() == 1


def test_bad_input_says_what_is_wrong():
    x, w = jnp.zeros((8, 32)), jnp.zeros((4, 32, 16))
    with pytest.raises(ValueError, match="one per group"):
        grouped_matmul(x, w, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"x \[R, K\] and w \[G, K, N\]"):
        grouped_matmul(x, jnp.zeros((4, 16, 16)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="multiples of 16"):
        grouped_matmul(jnp.zeros((8, 24)), jnp.zeros((4, 24, 16)), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="power of two"):
        grouped_matmul(x, w, jnp.zeros((4,), jnp.int32), block_m=24)
    with pytest.raises(ValueError, match="one dtype"):
        grouped_matmul(x, w.astype(jnp.bfloat16), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="not both or neither"):
        grouped_matmul(x, w)
    with pytest.raises(ValueError, match="not both or neither"):
        grouped_matmul(x, w, jnp.zeros((4,), jnp.int32), row_groups=jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="one per row of x"):
        grouped_matmul(x, w, row_groups=jnp.zeros(7, jnp.int32))
    assert not supported((8, 24), (4, 24, 16)) and supported((8, 32), (4, 32, 16))


# The GPU grid: the model shapes' per-layer matmuls (Qwen3-30B-A3B: hidden 2048, 2 x 768 gate/up,
# 128 experts; Mixtral: hidden 4096 -> 2 x 14336, 8 experts) at decode and prefill row counts,
# and the small shapes in every dtype.
GPU_CASES = [
    (rows, k, n, groups, kind, dtype)
    for rows, kind in [(1, "singles"), (8, "singles"), (64, "random"), (333, "tail"),
                       (2048, "random"), (4096, "one")]
    for k, n, groups in [(2048, 1536, 128), (768, 2048, 128), (256, 512, 8)]
    for dtype in ([jnp.bfloat16] if k >= 768 else [jnp.bfloat16, jnp.float16, jnp.float32])
]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,groups,kind,dtype", GPU_CASES)
def test_gpu_matches_ragged_dot(rows, k, n, groups, kind, dtype):
    check(rows + k, rows, k, n, groups, kind, dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{"block_m": 16}, {"block_m": 64, "block_k": 64},
                                    {"block_n": 64, "num_warps": 4}, {"num_stages": 2}])
def test_gpu_tile_variants(kwargs):
    check(5, 700, 1024, 512, 16, "random", jnp.bfloat16, interpret=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,groups", [(16, 2048, 1536, 128), (16, 768, 2048, 128),
                                             (4, 4096, 14336, 8), (64, 2048, 1536, 128)])
def test_gpu_row_groups(rows, k, n, groups):
    check_row_groups(rows + k, rows, k, n, groups, jnp.bfloat16, interpret=False)


@pytest.mark.gpu
def test_gpu_mixtral_shape():
    check(6, 256, 4096, 14336, 8, "random", jnp.bfloat16, interpret=False)
