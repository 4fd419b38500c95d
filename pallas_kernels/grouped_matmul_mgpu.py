"""Grouped matmul for the mixture-of-experts MLP on Hopper: Pallas's Mosaic GPU backend (wgmma,
TMA), reading only the matrices of groups that have rows.

The contract of `grouped_matmul.grouped_matmul` (the Triton-lowered kernel, whose docstring has
the design this one shares; `grouped_matmul_reference` is the oracle):

    grouped_matmul_mgpu(x [R, K], w [G, K, N], group_sizes [G]) -> [R, N]

Narrower in what it takes: bf16 / f16, K a multiple of block_k and N of block_n (64 / 128 by
default); `supported` says, and the caller falls back to the Triton kernel otherwise.

Built on JAX's `jax.experimental.pallas.ops.gpu.ragged_dot_mgpu` (per output tile a pipelined
K loop of TMA copies into shared memory and wgmma into a register accumulator, then a ladder of
power-of-two TMA stores for the tile's rows), with one change that matters at decode sizes: the
work list. JAX's kernel walks every (row block, group) pair its unrolled loop over the groups
can map a tile to, so a group with no rows whose boundary falls inside a row block still runs
its K loop and reads its matrix, and so does every tile past the real ones (as group 0): by its
code, a decode step of 8 rows over 128 experts runs 128 tiles, most of them reading an expert
without rows (not measured here). Here the tiles are `grouped_matmul.tile_map`'s (group, row
block) pairs of groups that have rows (or `row_tiles`' one per row), computed before the
kernel; tiles past their count, and so every expert without rows, do nothing. One CTA a
(tile, column block), not JAX's persistent loop over the SMs: the empty tiles end at once, and
the grid needs no loop API that changed across JAX versions.

Rows: the tile's row block is block_m (64, one warpgroup's wgmma M) rows of x, padded to a
multiple of block_m; only the tile's own rows [first, end) are stored. Rows past the groups are
zeroed after the kernel (they belong to no tile).

Interpret mode (the default on a CPU backend) runs the kernel in Mosaic GPU's interpreter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.grouped_matmul import check_operands, tiles_of

BLOCK_M = 64  # one warpgroup's wgmma M


def supported(x_shape, w_shape, dtype, block_n: int = 128, block_k: int = 64) -> bool:
    """Whether this kernel takes these shapes and dtype (else use grouped_matmul)."""
    return (len(x_shape) == 2 and len(w_shape) == 3 and jnp.dtype(dtype) in (
        jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and w_shape[1] % block_k == 0 and w_shape[2] % block_n == 0)


def grouped_matmul_mgpu(
    x: jax.Array,            # [R, K] rows sorted by group (or in any order with row_groups)
    w: jax.Array,            # [G, K, N]
    group_sizes: jax.Array | None = None,  # [G] int: rows of each group, in order; sum <= R
    *,
    row_groups: jax.Array | None = None,   # [R] int: instead, each row's own group
    block_n: int = 128,
    block_k: int = 64,
    max_concurrent_steps: int = 4,
    interpret: bool | None = None,
) -> jax.Array:              # [R, N] in x's dtype
    """x's rows of group g times w[g] (module docstring), accumulated in float32; the groups
    as group_sizes or row_groups, as `grouped_matmul` takes them. block_n / block_k: the
    output tile's width and the K step (dividing N and K); max_concurrent_steps: the K
    pipeline's depth; interpret defaults to True on a CPU backend."""
    check_operands(x, w, group_sizes, row_groups)
    if not supported(x.shape, w.shape, x.dtype, block_n, block_k):
        raise ValueError(f"the Mosaic GPU grouped matmul takes bf16 / f16 with K a multiple of "
                         f"{block_k} and N of {block_n}, got {x.dtype}, K={w.shape[1]}, "
                         f"N={w.shape[2]}; use grouped_matmul (the Triton kernel) instead")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    num_rows, num_groups = x.shape[0], w.shape[0]
    meta = tiles_of(group_sizes, row_groups, num_rows, num_groups, BLOCK_M)
    if row_groups is None:  # the rows past the groups belong to no tile
        covered = jnp.arange(num_rows) < jnp.sum(group_sizes)
    else:  # a row is its own tile
        covered = meta[3] > meta[2]
    return _grouped_matmul(x, w, *meta, covered, block_n=block_n, block_k=block_k,
                           max_concurrent_steps=max_concurrent_steps, interpret=bool(interpret))


def _pipeline_specs(plgpu, blocks):
    """emit_pipeline's in_specs, each slot released one step late (so a wgmma may still read
    it): `delay_release` is a BlockSpec field in newer JAX and an emit_pipeline argument in
    older; -> (specs, extra emit_pipeline arguments)."""
    try:
        return [plgpu.BlockSpec(shape, index, delay_release=1) for shape, index in blocks], {}
    except TypeError:
        return [plgpu.BlockSpec(shape, index) for shape, index in blocks], {"delay_release": 1}


def _interpret_params():
    try:
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:  # jax 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "max_concurrent_steps",
                                             "interpret"))
def _grouped_matmul(x, w, group, block, first, end, covered, *, block_n, block_k,
                    max_concurrent_steps, interpret):
    from jax.experimental.pallas import mosaic_gpu as plgpu
    num_rows, k = x.shape
    n = w.shape[2]
    block_m = BLOCK_M
    tiles = group.shape[0]
    padded = pl.cdiv(num_rows, block_m) * block_m
    if padded > num_rows:
        x = jnp.pad(x, ((0, padded - num_rows), (0, 0)))
    grid_n = n // block_n

    def body(group_gmem, block_gmem, first_gmem, end_gmem, x_gmem, w_gmem, o_gmem):
        t, j = lax.axis_index("tile"), lax.axis_index("col")
        tile_first, tile_end = first_gmem[t], end_gmem[t]

        @pl.when(tile_end > tile_first)  # tiles past the count (no rows): nothing to do
        def _():
            g, b = group_gmem[t], block_gmem[t]

            def acc_scope(acc_ref):
                specs, options = _pipeline_specs(plgpu, [
                    ((block_m, block_k), lambda kk: (b, kk)),
                    ((block_k, block_n), lambda kk: (kk, j))])
                plgpu.emit_pipeline(
                    lambda _, x_smem, w_smem: plgpu.wgmma(acc_ref, x_smem, w_smem),
                    grid=(k // block_k,), in_specs=specs,
                    max_concurrent_steps=max_concurrent_steps, **options,
                )(x_gmem, w_gmem.at[g])
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

            @functools.partial(pl.run_scoped,
                               o_smem=plgpu.SMEM((block_m, block_n), dtype=o_gmem.dtype))
            def _(o_smem):
                o_smem[...] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                # The tile's rows [first, end) of its block, by a ladder of power-of-two TMA
                # stores (a store's shape is static; the row count is not).
                row = tile_first - b * block_m
                size = tile_end - tile_first
                remaining = block_m
                while remaining > 0:
                    rows = 1 << int(math.log2(remaining))
                    remaining //= 2

                    @pl.when(size & rows != 0)
                    def _(row=row, rows=rows):
                        plgpu.copy_smem_to_gmem(
                            o_smem.at[pl.ds(row, rows)],
                            o_gmem.at[pl.ds(b * block_m + row, rows),
                                      pl.ds(j * block_n, block_n)])

                    row = row + (size & rows)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    # Grid (tile, column block), tiles fastest: a group's row tiles run side by side and share
    # its [K, block_n] column slab in L2.
    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((padded, n), x.dtype), grid=(tiles, grid_n),
        grid_names=("tile", "col"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None)
    out = kernel(group, block, first, end, x, w)[:num_rows]
    return jnp.where(covered[:, None], out, jnp.zeros((), out.dtype))  # no tile: no write
