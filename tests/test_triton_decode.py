"""The Triton-language decode kernel (jax-triton) against dense float64 attention and against
the Pallas kernel, on fresh random inputs in poisoned pools.

The kernel tests need an NVIDIA GPU and the optional extra (`pip install "jinfer[triton]"`):
they are `gpu`-marked and skip where triton or jax_triton cannot be imported (jax_triton also
refuses a JAX without GPU support). The two argument/installation tests at the end run anywhere.

The case builder, the oracle and the tolerances are those of tests/test_paged_decode.py
(imported: pytest puts tests/ on sys.path): stale pool slots and the pad block hold POISON, so
any read past a context or of another sequence's block moves a result far out of tolerance.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import paged_decode_attention_pallas
from pallas_kernels.triton_decode import paged_decode_attention_triton
from kernel_cases import (LAYER, TOLERANCE, assert_decode_argument_errors,
                          assert_traced_layer_matches)
from test_paged_decode import check as check_decode
from test_paged_decode import make_case


@pytest.fixture
def triton_extra():
    pytest.importorskip("triton")
    pytest.importorskip("jax_triton")


def contexts_for(batch: int, block_size: int, max_blocks: int) -> list[int]:
    """Batch 1: a non-multiple of the block size; batch 3: just past a block, a padding row
    (0) and the full table; batch 8 adds one token and ragged lengths."""
    full = block_size * max_blocks
    if batch == 1:
        return [full - block_size // 2 - 1]
    ragged = [block_size + 3, 0, full, 1, full - 1, 2 * block_size - 1, 3, full - block_size // 2]
    return ragged[:batch]


def check(seed, *, batch, block_size, num_splits, dtype, max_blocks=5, context_lens=None,
          **kwargs):
    """test_paged_decode's checks on the Triton kernel (with this file's contexts), then
    agreement with the Pallas kernel on the same case. Returns the Triton output."""
    lens = context_lens or contexts_for(batch, block_size, max_blocks)
    out, case, scale = check_decode(seed, batch=batch, block_size=block_size,
                                    num_splits=num_splits, dtype=dtype, max_blocks=max_blocks,
                                    context_lens=lens, kernel=paged_decode_attention_triton,
                                    **kwargs)
    group_kwargs = {k: v for k, v in kwargs.items() if k not in ("kv_heads", "group", "head_dim")}
    pallas = paged_decode_attention_pallas(*case[:3], LAYER, *case[3:], scale=scale,
                                           num_splits=num_splits, interpret=False, **group_kwargs)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out, np.asarray(pallas.astype(jnp.float32), np.float64),
                               atol=tol, rtol=tol)
    return out


# Every (group, head_dim, block_size, dtype) tile, each with one and with several splits; the
# batch (1, 3 or 8) follows (block_size, dtype), so each batch meets every block size, every
# dtype, every group and head dim, and both split counts. 108 cases, a distinct seed each.
TILES = list(itertools.product((1, 4, 8), (64, 128), (8, 16, 32),
                               (jnp.float32, jnp.bfloat16, jnp.float16)))
GPU_GRID = [(2 * i + (splits > 1), (1, 3, 8)[(i + i // 3) % 3], group, head_dim, block_size,
             splits, dtype)
            for i, (group, head_dim, block_size, dtype) in enumerate(TILES) for splits in (1, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("seed,batch,group,head_dim,block_size,num_splits,dtype", GPU_GRID)
def test_matches_dense_and_pallas(triton_extra, seed, batch, group, head_dim, block_size,
                                  num_splits, dtype):
    check(seed, batch=batch, kv_heads=2, group=group, head_dim=head_dim, block_size=block_size,
          num_splits=num_splits, dtype=dtype)


@pytest.mark.gpu
def test_padding_rows_and_empty_splits(triton_extra):
    """All-padding batches, more splits than pages (empty splits), one page per step."""
    for splits in (1, 3):
        check(1, batch=3, kv_heads=2, group=4, head_dim=64, block_size=8, num_splits=splits,
              dtype=jnp.float32, context_lens=[0, 0, 0])
    check(2, batch=3, kv_heads=2, group=4, head_dim=64, block_size=32, num_splits=7,
          dtype=jnp.float32, pages_per_compute_block=1)
    check(3, batch=2, kv_heads=1, group=4, head_dim=64, block_size=8, num_splits=2,
          dtype=jnp.bfloat16, max_blocks=13, context_lens=[97, 45], pages_per_compute_block=4)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits,dtype", [(None, jnp.bfloat16), (1, jnp.bfloat16),
                                              (5, jnp.float16), (None, jnp.float32)])
def test_large_shapes(triton_extra, num_splits, dtype):
    """Engine-sized heads (32 q / 8 KV, dim 128, block 16) with long ragged contexts."""
    check(5, batch=6, kv_heads=8, group=4, head_dim=128, block_size=16, num_splits=num_splits,
          dtype=dtype, max_blocks=160, context_lens=[1, 17, 2559, 1000, 0, 2560])


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(1, None), (100, 1.0), (4096, None), (None, 1.0)])
@pytest.mark.parametrize("block_size,num_splits,dtype", [(16, None, jnp.bfloat16),
                                                         (8, 3, jnp.float32),
                                                         (32, 1, jnp.float16)])
def test_window_and_softcap(triton_extra, window, softcap, block_size, num_splits, dtype):
    """Engine-sized heads over long contexts (the blocks before the window NaN: masked loads
    never read them): a window of one token, shorter than the contexts, longer than most,
    and soft-capping alone; against dense attention and the Pallas kernel."""
    full = 160 * block_size
    check(9, batch=5, kv_heads=8, group=4, head_dim=128, block_size=block_size,
          num_splits=num_splits, dtype=dtype, max_blocks=160,
          context_lens=[1, min(window or 100, full), full, full // 2 + 5, 0],
          sliding_window=window, logit_softcap=softcap)


@pytest.mark.gpu
def test_traced_layer_under_jit(triton_extra):
    rng = np.random.default_rng(4)
    q, k_pool, v_pool, tables, lens, _ = make_case(
        rng, context_lens=[5, 12], kv_heads=2, group=2, head_dim=64, block_size=8,
        max_blocks=2, dtype=jnp.float32)
    assert_traced_layer_matches(lambda layer: paged_decode_attention_triton(
        q, k_pool, v_pool, layer, tables, lens, scale=0.125, num_splits=2))


def test_bad_input_raises_value_error():
    """Checked before triton is needed, so this runs on any machine."""
    assert_decode_argument_errors(paged_decode_attention_triton)
    tables, lens = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    with pytest.raises(ValueError, match="power-of-two block_size"):
        paged_decode_attention_triton(jnp.zeros((2, 8, 64)), jnp.zeros((1, 4, 6, 4, 64)),
                                      jnp.zeros((1, 4, 6, 4, 64)), 0, tables, lens, scale=1.0)


def test_without_the_extra_raises_install_hint():
    """Where jax_triton cannot be imported, the call says how to install the extra."""
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("jax_triton is installed")
    pool = jnp.zeros((1, 4, 8, 2, 64))
    with pytest.raises(ImportError, match=r'pip install "jinfer\[triton\]"'):
        paged_decode_attention_triton(jnp.zeros((1, 4, 64)), pool, pool, 0,
                                      jnp.zeros((1, 2), jnp.int32), jnp.ones((1,), jnp.int32),
                                      scale=1.0)
