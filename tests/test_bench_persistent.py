"""scripts/bench_persistent.py's kernels in interpret mode: the persistent four-projection chain
(split-K partial sums handed from phase to phase through global memory, grid barriers between
phases) computes what XLA's chain of dots computes, and leaves its barrier state reusable;
scripts/bench_persistent_mgpu.py's warp-specialised streaming kernel sums what NumPy sums."""

import importlib.util
import pathlib
import sys

import pytest

_scripts = pathlib.Path(__file__).parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("bench_persistent",
                                               _scripts / "bench_persistent.py")
bench_persistent = importlib.util.module_from_spec(_spec)
sys.modules["bench_persistent"] = bench_persistent  # dataclasses look their module up
_spec.loader.exec_module(bench_persistent)


@pytest.mark.parametrize("splits,block_n,block_k", [((2, 2, 1, 4), 32, 32),
                                                    ((1, 4, 2, 2), 64, 16)])
def test_chain_matches_xla_and_resets_the_barrier(splits, block_n, block_k):
    layer = bench_persistent.Layer(hidden=256, qkv=384, ffn=512)
    tiling = bench_persistent.Tiling(splits, block_n, block_k)
    err, scale, sync = bench_persistent.check_interpret(layer, tiling)
    # Each projection is rounded to bf16 as XLA's is; the float32 partial sums may add in
    # another order, which can move a rounding by one bf16 step (2**-8 relative) per phase.
    assert err <= 4 * 2.0 ** -8 * scale, (err, scale)
    assert sync == [0, 3]  # no arrival left over, one generation per barrier


_spec_mgpu = importlib.util.spec_from_file_location("bench_persistent_mgpu",
                                                    _scripts / "bench_persistent_mgpu.py")
bench_persistent_mgpu = importlib.util.module_from_spec(_spec_mgpu)
sys.modules["bench_persistent_mgpu"] = bench_persistent_mgpu
sys.path.insert(0, str(_scripts))  # it imports bench_persistent
_spec_mgpu.loader.exec_module(bench_persistent_mgpu)


@pytest.mark.parametrize("layout", ["rows", "chunks"])
def test_mosaic_gpu_stream_matches_numpy(layout):
    """The Mosaic GPU kernel's producer/consumer ring (TMA copies, slot barriers, wgmma with the
    row padded to 64) in Mosaic GPU's interpreter: every CTA's sum of tile products; with the
    weights as [K, N] rows or re-laid out chunk by chunk in each CTA's step order."""
    layer = bench_persistent.Layer(hidden=256, qkv=384, ffn=512)
    tiling = bench_persistent_mgpu.MgpuTiling((2, 4, 1, 4), block_n=64, block_k=64, stages=2,
                                              num_ctas=4)
    err, scale = bench_persistent_mgpu.check_interpret(layer, tiling, layout)
    assert err <= 1e-5 * scale, (err, scale)  # float32 sums of bf16 products, other order


def test_fewest_splits_deal_tiles_evenly():
    """--chunks: per projection the smallest split-K factor whose tiles the CTAs share evenly,
    in whole chunks."""
    layer = bench_persistent.Layer()
    for block_k, block_n in [(128, 64), (64, 128), (64, 256)]:
        splits = bench_persistent_mgpu.fewest_splits(layer, block_k, block_n)
        for (k, n), s in zip(layer.shapes, splits):
            assert (s * (n // block_n)) % 128 == 0 and (k // s) % block_k == 0
            assert all((t * (n // block_n)) % 128 or (k // t) % block_k for t in range(1, s))
    assert bench_persistent_mgpu.fewest_splits(layer, 128, 64) == (8, 4, 1, 4)
