"""Grouped matmul for the mixture-of-experts MLP: rows sorted by group, each group's rows times its
own matrix, reading only the matrices of groups that have rows (Pallas, Triton lowering).

    grouped_matmul(x [R, K], w [G, K, N], group_sizes [G]) -> [R, N]
    rows group_offsets[g] .. + group_sizes[g] of x times w[g]; sum(group_sizes) <= R, and rows
    past the groups give exact zeros. The same contract as `jax.lax.ragged_dot` (the reference,
    `grouped_matmul_reference`, is that call).

Why not `jax.lax.ragged_dot` on the GPU: measured on the H100 (scripts/bench_moe.py), XLA's
grouped matmul costs about what every group's matrix costs, whatever the rows: 439 us for one
Qwen3-30B-A3B decode token (8 of 128 experts, 75 MB touched: 27 us at the copy rate), and 27.5 ms
for 2048 tokens where one dense matmul of the same rows takes 0.3 ms. JAX's Mosaic GPU
`ragged_dot_mgpu` launches a tile for every group too (an empty group whose boundary falls inside
a row block still runs its K loop), so at decode it also reads every expert.

Design (megablox's group metadata, on the GPU):
- Tiles. The sorted rows are cut into blocks of `block_m`; a tile is one (group, row block) pair
  with rows of that group in it, in group order, so a group of 300 rows at block_m 64 spanning
  blocks 2..6 is five tiles, and a block shared by two groups is two tiles. Empty groups have no
  tile: a decode step of one token and 8 experts is 8 tiles and reads 8 matrices. The count is
  data dependent, its bound is static: cdiv(R, block_m) + min(G, R) - 1 (each non-empty group
  adds at most one block to the row blocks). `tile_map` computes (group, block, first row, end
  row) of each tile in jnp, before the kernel; tiles past the real count have no rows and return
  at once.
- Grid (tile, column block), the tile fastest: the row tiles of one group run side by side and
  share its [K, block_n] column slab in L2. A program loops over K in `block_k` steps (Triton
  pipelines the loads), accumulates in float32 and stores only its group's rows of the block
  (a masked store: the rows of a block shared by two groups are written by two programs, each
  its own).
- `block_m` from the rows per group: 16 (the smallest tensor-core tile) when the groups are
  small, as at decode, up to 64 for prefill chunks; block_n / block_k the largest of 128, 64,
  32, 16 that divide N / K.

Rows past sum(group_sizes) belong to no tile, so they are never written: the output starts as
zeros (one memset of [R, N]; an input_output_aliases zero buffer, so nothing else is copied).

Interpret mode (the default on a CPU backend) runs the same kernel in Pallas's interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

TILE_SIZES = (128, 64, 32, 16)  # block_n / block_k candidates, largest first


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The oracle: `jax.lax.ragged_dot` (rows past the groups are zeros there too)."""
    return lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))


def supported(x_shape, w_shape) -> bool:
    """Whether grouped_matmul takes these shapes (K and N multiples of 16); else use the
    reference."""
    return len(x_shape) == 2 and len(w_shape) == 3 and all(
        _tile(d) is not None for d in (w_shape[1], w_shape[2]))


def _tile(dim: int, cap: int = 128) -> int | None:
    return next((t for t in TILE_SIZES if t <= cap and dim % t == 0), None)


def check_operands(x, w, group_sizes, row_groups=None) -> None:
    """ValueError unless x [R, K], w [G, K, N] of one dtype and exactly one of group_sizes [G]
    and row_groups [R] (both kernels' contract)."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"want x [R, K] and w [G, K, N], got {x.shape} and {w.shape}")
    if (group_sizes is None) == (row_groups is None):
        raise ValueError("pass group_sizes (rows sorted by group) or row_groups (each row's "
                         "group), not both or neither")
    if group_sizes is not None and group_sizes.shape != (w.shape[0],):
        raise ValueError(f"group_sizes must be [{w.shape[0]}] (one per group), got "
                         f"{group_sizes.shape}")
    if row_groups is not None and row_groups.shape != (x.shape[0],):
        raise ValueError(f"row_groups must be [{x.shape[0]}] (one per row of x), got "
                         f"{row_groups.shape}")
    if x.dtype != w.dtype:
        raise ValueError(f"x and w must have one dtype, got {x.dtype} and {w.dtype}")


def default_block_m(num_rows: int, num_groups: int) -> int:
    """16 .. 64 by the average rows per group (a power of two): small groups (decode) waste
    little of a 16-row tile, large ones (prefill) amortise each column slab over 64 rows."""
    per_group = max(1, -(-num_rows // num_groups))
    return min(64, max(16, 1 << (per_group - 1).bit_length()))


def num_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
    """The static bound on (group, row block) tiles (module docstring)."""
    return pl.cdiv(num_rows, block_m) + min(num_groups, num_rows) - 1


def tile_map(group_sizes: jax.Array, num_rows: int, block_m: int, tiles: int):
    """group_sizes [G] -> (group, block, first row, end row), each [tiles] int32: the tiles in
    group order, then empty tiles (first row == end row == 0, group and block 0)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_block = starts // block_m
    last_block = jnp.maximum(ends - 1, 0) // block_m
    count = jnp.where(sizes > 0, last_block - first_block + 1, 0)  # tiles of each group
    tile_ends = jnp.cumsum(count)
    t = jnp.arange(tiles, dtype=jnp.int32)
    # The group of tile t: the first whose tiles end past t (empty groups end where the one
    # before them does, so they are never picked). One fused compare-and-count: the default
    # binary search is a while loop, which XLA:GPU steps through from the host.
    group = jnp.minimum(jnp.searchsorted(tile_ends, t, side="right", method="compare_all"),
                        sizes.shape[0] - 1).astype(jnp.int32)
    real = t < tile_ends[-1]
    block = first_block[group] + t - (tile_ends[group] - count[group])
    first = jnp.maximum(starts[group], block * block_m)
    end = jnp.minimum(ends[group], (block + 1) * block_m)
    zero = jnp.zeros_like(t)
    return (jnp.where(real, group, zero), jnp.where(real, block, zero),
            jnp.where(real, first, zero), jnp.where(real, end, zero))


def row_tiles(row_groups: jax.Array, num_groups: int, block_m: int):
    """row_groups [R] -> the tile map (group, block, first row, end row), each [R] int32, of
    one tile per row: row r is tile r of its own group, inside row block r // block_m; a row
    whose group is outside [0, num_groups) has an empty tile (no work, its output stays
    zero). For a decode step's few (token, expert) rows: no sort and no group sizes needed."""
    groups = row_groups.astype(jnp.int32)
    rows = jnp.arange(groups.shape[0], dtype=jnp.int32)
    live = (groups >= 0) & (groups < num_groups)
    zero = jnp.zeros_like(rows)
    return (jnp.where(live, groups, zero), rows // block_m, jnp.where(live, rows, zero),
            jnp.where(live, rows + 1, zero))


def tiles_of(group_sizes, row_groups, num_rows: int, num_groups: int, block_m: int):
    """The tile map of either operand form (see grouped_matmul) -> (group, block, first, end)."""
    if row_groups is not None:
        return row_tiles(row_groups, num_groups, block_m)
    return tile_map(group_sizes, num_rows, block_m, num_tiles(num_rows, num_groups, block_m))


def _kernel(group_ref, block_ref, first_ref, end_ref, x_ref, w_ref, zeros_ref, o_ref, *,
            block_m: int, block_n: int, block_k: int, steps: int, precision):
    del zeros_ref  # the output's initial zeros (aliased)
    t, j = pl.program_id(0), pl.program_id(1)
    first, end = first_ref[t], end_ref[t]

    @pl.when(end > first)
    def _():
        group = group_ref[t]
        row0 = pl.multiple_of(block_ref[t] * block_m, block_m)
        col0 = pl.multiple_of(j * block_n, block_n)

        def step(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xs = x_ref[pl.ds(row0, block_m), pl.ds(k0, block_k)]
            ws = w_ref[group, pl.ds(k0, block_k), pl.ds(col0, block_n)]
            return acc + lax.dot_general(xs, ws, (((1,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
        rows = row0 + lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)
        from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
        plgpu.store(o_ref.at[pl.ds(row0, block_m), pl.ds(col0, block_n)],
                    acc.astype(o_ref.dtype), mask=(rows >= first) & (rows < end))


def grouped_matmul(
    x: jax.Array,            # [R, K] rows sorted by group (or in any order with row_groups)
    w: jax.Array,            # [G, K, N]
    group_sizes: jax.Array | None = None,  # [G] int: rows of each group, in order; sum <= R
    *,
    row_groups: jax.Array | None = None,   # [R] int: instead, each row's own group
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:              # [R, N] in x's dtype
    """x's rows of group g times w[g] (module docstring), accumulated in float32 (float32 inputs
    exactly, no TF32). The groups come as group_sizes (rows sorted by group) or as row_groups
    (each row its own tile, `row_tiles`; a group outside [0, G) gives a zero row): the same
    products. block_m / block_n / block_k override the tile (block_m a power of two >= 16;
    block_n, block_k dividing N, K); interpret defaults to True on a CPU backend; num_warps /
    num_stages tune the Triton compile."""
    check_operands(x, w, group_sizes, row_groups)
    num_rows, k = x.shape
    num_groups, _, n = w.shape
    block_n = block_n or _tile(n)
    block_k = block_k or _tile(k)
    block_m = block_m or (16 if row_groups is not None
                          else default_block_m(num_rows, num_groups))
    if block_n is None or block_k is None or n % block_n or k % block_k:
        raise ValueError(f"K={k} and N={n} must be multiples of 16 (of block_k / block_n if "
                         "given); use grouped_matmul_reference otherwise")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    meta = tiles_of(group_sizes, row_groups, num_rows, num_groups, block_m)
    return _grouped_matmul(x, w, *meta, block_m=block_m, block_n=block_n, block_k=block_k,
                           interpret=bool(interpret), num_warps=num_warps,
                           num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "interpret",
                                             "num_warps", "num_stages"))
def _grouped_matmul(x, w, group, block, first, end, *, block_m, block_n, block_k, interpret,
                    num_warps, num_stages):
    num_rows, k = x.shape
    n = w.shape[2]
    padded = pl.cdiv(num_rows, block_m) * block_m  # every tile's block lies inside the rows
    if padded > num_rows:
        x = jnp.pad(x, ((0, padded - num_rows), (0, 0)))
    meta = (group, block, first, end)
    out_shape = jax.ShapeDtypeStruct((padded, n), x.dtype)
    operands = (*meta, x, w, jnp.zeros((padded, n), x.dtype))
    whole = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * len(a.shape))  # noqa: E731
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                               steps=k // block_k, precision=precision)
    out = pl.pallas_call(
        kernel, grid=(group.shape[0], n // block_n), in_specs=[whole(a) for a in operands],
        out_specs=whole(out_shape), out_shape=out_shape, interpret=interpret,
        input_output_aliases={len(operands) - 1: 0},
        compiler_params=_triton_params(num_warps, num_stages, block_m, block_n),
        name=f"grouped_matmul_m{block_m}_n{block_n}_k{block_k}",
    )(*operands)
    return out[:num_rows]


def _triton_params(num_warps, num_stages, block_m: int, block_n: int):
    """Triton compiler parameters (this also selects the Triton lowering over Mosaic GPU):
    4 warps, 8 for 64 x 128 tiles and up; 3 pipeline stages over K."""
    from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    if num_warps is None:
        num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    return params_cls(num_warps=num_warps, num_stages=3 if num_stages is None else num_stages)
