"""scripts/bench_persistent.py's kernel in interpret mode: the persistent four-projection chain
(split-K partial sums handed from phase to phase through global memory, grid barriers between
phases) computes what XLA's chain of dots computes, and leaves its barrier state reusable."""

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
