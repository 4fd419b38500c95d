"""pallas_kernels/grouped_matmul_mgpu.py (Mosaic GPU) against jax.lax.ragged_dot on fresh random
inputs: decode layouts (one row per group, most groups empty), groups with empty first / inner /
last neighbours, rows past the groups (zeros), one group; bad input. Mosaic GPU's interpreter on
the CPU; compiled on a Hopper GPU (gpu-marked)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

from pallas_kernels.grouped_matmul_mgpu import grouped_matmul_mgpu, supported  # noqa: E402
from pallas_kernels.paged_prefill_mgpu import hopper_gpu  # noqa: E402
from test_grouped_matmul import check as check_kernel  # noqa: E402
from test_grouped_matmul import check_row_groups as check_rows_kernel  # noqa: E402

check = functools.partial(check_kernel, kernel=grouped_matmul_mgpu)
check_row_groups = functools.partial(check_rows_kernel, kernel=grouped_matmul_mgpu)


# (rows, K, N, groups, kind, dtype, kwargs)
CPU_CASES = [
    (8, 128, 128, 16, "singles", jnp.bfloat16, {}),          # a decode step, k = 8
    (100, 64, 256, 5, "random", jnp.bfloat16, {"block_n": 64}),
    (130, 128, 128, 4, "tail", jnp.float16, {"max_concurrent_steps": 2}),
    (70, 64, 128, 6, "one", jnp.bfloat16, {}),
]


@pytest.mark.parametrize("rows,k,n,groups,kind,dtype,kwargs", CPU_CASES)
def test_interpret_matches_ragged_dot(rows, k, n, groups, kind, dtype, kwargs):
    check(rows, rows, k, n, groups, kind, dtype, interpret=True, **kwargs)


@pytest.mark.parametrize("rows,k,n,groups", [(16, 128, 128, 8), (70, 64, 256, 5)])
def test_interpret_row_groups(rows, k, n, groups):
    check_row_groups(rows, rows, k, n, groups, jnp.bfloat16, interpret=True)


def test_bad_input_says_what_is_wrong():
    x, w, sizes = jnp.zeros((8, 64), jnp.float32), jnp.zeros((4, 64, 128)), jnp.zeros(4, int)
    with pytest.raises(ValueError, match="bf16 / f16.*use grouped_matmul"):
        grouped_matmul_mgpu(x, w, sizes)
    with pytest.raises(ValueError, match="one per group"):
        grouped_matmul_mgpu(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), jnp.zeros(3, int))
    assert supported((8, 64), (4, 64, 128), jnp.bfloat16)
    assert not supported((8, 64), (4, 64, 96), jnp.bfloat16)


GPU_CASES = [
    (rows, k, n, groups, kind)
    for rows, kind in [(1, "singles"), (8, "singles"), (64, "random"), (333, "tail"),
                       (2048, "random"), (4096, "one")]
    for k, n, groups in [(2048, 1536, 128), (768, 2048, 128), (4096, 14336, 8)]
    if not (groups == 8 and rows > 333)
]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,groups,kind", GPU_CASES)
def test_gpu_matches_ragged_dot(rows, k, n, groups, kind):
    if not hopper_gpu():
        pytest.skip("Mosaic GPU's wgmma needs a Hopper GPU")
    check(rows + n, rows, k, n, groups, kind, jnp.bfloat16, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,groups", [(16, 2048, 1536, 128), (16, 768, 2048, 128),
                                             (4, 4096, 14336, 8), (64, 2048, 1536, 128)])
def test_gpu_row_groups(rows, k, n, groups):
    if not hopper_gpu():
        pytest.skip("Mosaic GPU's wgmma needs a Hopper GPU")
    check_row_groups(rows + k, rows, k, n, groups, jnp.bfloat16, interpret=False)
