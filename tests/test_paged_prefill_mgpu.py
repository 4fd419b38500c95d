"""The Mosaic GPU ragged paged prefill kernel against dense float64 attention and the jnp reference.

Same inputs and checks as tests/test_paged_prefill.py (whose case builder this reuses: several
sequences packed back to back in a shuffled pool poisoned outside their context, tail padding
rows, float64 oracle on the dtype-rounded values). On CPU the kernel runs in Mosaic GPU's
interpreter, which simulates the three warpgroups as threads, TMA copies, barriers and wgmma, and
fills the output with NaN first, so a row no CTA wrote shows up as NaN (every test asserts a
finite output); out-of-bounds reads raise (and then hang the test: the other simulated
warpgroups wait on their barriers forever). A few cases together touch every code path: query
groups of 1 / 2 / 3 (padded to 4) / 4 / 8 / 16 (one to eight slabs per warpgroup, the two
warpgroups on different tokens for group 1), head dims 64 / 128, block sizes 8 / 16 / 32 / 128
(pages per step 8 / 4 / 2, and half a page per step), ring lengths 2 and 3, several KV heads,
tiles shifted back at the end of the rows and fewer rows than a tile, and a sliding window with
soft-capping (pages before the window NaN, tests/kernel_cases.py). The `gpu`-marked tests run
the compiled kernel over the full grid, windows and soft-capping, and engine-sized shapes.

Tolerances as test_paged_prefill (bf16 2e-2, f16 1e-2): P is rounded to the input dtype before
the P V product, and exp2 runs in approximate math on the GPU.

Run `python tests/test_paged_prefill_mgpu.py` on a GPU to time the kernel against the Triton one.
"""

from __future__ import annotations

import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")  # needs absl-py too

from pallas_kernels.paged_prefill_mgpu import (  # noqa: E402
    MgpuPlan, _tile_info, interpret_params, make_plan, ragged_paged_attention_mgpu)
from pallas_kernels.reference import ragged_paged_attention_reference  # noqa: E402
from test_paged_prefill import check as paged_prefill_check  # noqa: E402
from test_paged_prefill import LAYER, make_case, mixed_seqs  # noqa: E402

reference = jax.jit(ragged_paged_attention_reference, static_argnames="scale")


@pytest.fixture(scope="module", autouse=True)
def compile_interpreted_warpgroups_once():
    """jax 0.10.2's Mosaic GPU interpreter compiles each simulated warpgroup's program anew for
    every CTA (~5 s each on a 2-core CPU); this caches the compiled program per program and
    argument types, so a case costs one compile. Left alone where the hook is absent."""
    try:
        from jax._src.pallas.mosaic.interpret import thread_map
    except ImportError:
        yield
        return
    original = getattr(thread_map, "_run_jaxpr", None)
    if original is None:
        yield
        return
    cache, lock = {}, threading.Lock()

    def run_cached(jaxpr, consts, *args):
        leaves = jax.tree.leaves((consts, args))
        key = (id(jaxpr), tuple((np.shape(x), np.asarray(x).dtype.str) for x in leaves))
        with lock:  # the warpgroups of a CTA arrive together: one compiles, the others wait
            entry = cache.setdefault(key, {"jaxpr": jaxpr, "lock": threading.Lock()})
        with entry["lock"]:
            if "run" not in entry:
                body = lambda c, *a: thread_map.jax_core.eval_jaxpr(jaxpr, c, *a)  # noqa: E731
                entry["run"] = jax.jit(body).trace(consts, *args).lower().compile()
        entry["run"](consts, *args)

    thread_map._run_jaxpr = run_cached
    yield
    thread_map._run_jaxpr = original


@pytest.fixture(autouse=True)
def fresh_interpreter_state():
    """The interpreter keeps global state that an exception leaves dirty."""
    yield
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    except ImportError:
        return
    interpret_pallas_call.reset_gpu_interpret_mode_state()


def check(seed, **case):
    """test_paged_prefill's check (dense float64 attention, zeros past the sequences, the jnp
    reference) on this kernel."""
    return paged_prefill_check(seed, kernel=ragged_paged_attention_mgpu, **case)


# (seqs, kv_heads, group, head_dim, block_size, dtype, kwargs); each a few CTAs (interpreted
# CTAs are slow), together every path listed in the module docstring.
CPU_CASES = [
    (mixed_seqs(16), 1, 4, 64, 16, jnp.bfloat16, {"block_k": 64}),
    ([(70, 231), (3, 3)], 1, 1, 128, 8, jnp.float16, {"block_k": 64, "stages": 3}),
    ([(9, 40), (20, 20)], 2, 3, 64, 32, jnp.bfloat16, {"block_k": 64}),
    ([(21, 150)], 1, 8, 64, 128, jnp.float16, {"block_k": 64}),
    ([(50, 120), (3, 70)], 1, 2, 64, 16, jnp.bfloat16, {"block_k": 64}),
    ([(11, 75)], 1, 16, 64, 16, jnp.bfloat16, {}),
]


@pytest.mark.parametrize("seqs,kv_heads,group,head_dim,block_size,dtype,kwargs", CPU_CASES)
def test_interpreted_matches_dense_attention(seqs, kv_heads, group, head_dim, block_size, dtype,
                                             kwargs):
    check(0, seqs=seqs, kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, dtype=dtype, **kwargs)


def test_interpreted_sliding_window_and_softcap():
    """A 40-token chunk after a 260-token prefix under a 150-token window: its first tile runs
    masked steps across the window's edge (whose first step starts with two NaN pages the
    producer must replace), a whole step, and the diagonal; a chunk shorter than the window;
    soft-capped logits."""
    check(3, seqs=[(40, 300), (3, 70)], kv_heads=1, group=4, head_dim=64, block_size=16,
          dtype=jnp.bfloat16, block_k=64, sliding_window=150, logit_softcap=0.5)


def test_interpreted_pipeline_has_no_races():
    """Mosaic GPU's race detector over the K/V ring: a slot is refilled only after both compute
    warpgroups released it (it flags a release moved before the S = Q K^T step)."""
    interpreter = pytest.importorskip(
        "jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call")
    check(9, seqs=[(40, 300), (5, 5)], kv_heads=1, group=4, head_dim=64, block_size=16,
          dtype=jnp.bfloat16, block_k=64, interpret=interpret_params(detect_races=True),
          with_reference=False)
    assert not interpreter.get_races().races_found


def test_rows_shorter_than_a_tile():
    """Fewer packed rows than block_q (q is padded inside) and padding sequences first."""
    out = check(2, seqs=[(0, 0), (2, 9), (1, 1)], kv_heads=2, group=4, head_dim=64,
                block_size=8, dtype=jnp.bfloat16, pad_tokens=2, block_k=64)
    assert (out[3:] == 0).all()


def test_traced_layer_under_jit():
    """The layer may be a traced int32 scalar (a layer scan)."""
    rng = np.random.default_rng(4)
    q, k_pool, v_pool, tables, qsl, lens, _ = make_case(
        rng, seqs=[(4, 10), (3, 3)], kv_heads=1, group=4, head_dim=64, block_size=16,
        dtype=jnp.bfloat16, pad_tokens=1)
    run = jax.jit(lambda layer: ragged_paged_attention_mgpu(
        q, k_pool, v_pool, layer, tables, qsl, lens, scale=0.125, block_k=64))
    out = np.asarray(run(jnp.int32(LAYER)), np.float32)
    ref = reference(q, k_pool, v_pool, LAYER, tables, qsl, lens, scale=0.125)
    np.testing.assert_allclose(out, np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)


def test_tile_info_steps():
    """Key steps per tile: up to the causal limit of its last own row, unmasked while every own
    row sees the whole step; tiles shifted back keep their own rows."""
    plan = make_plan(40, 2, 4, 16, block_k=64)  # 32-token tiles
    qsl = jnp.array([0, 35, 38], jnp.int32)
    lens = jnp.array([100, 3], jnp.int32)  # seq 0: a 65-token prefix, positions 65 .. 99
    info = np.asarray(_tile_info(qsl, lens, 39, 40, plan))
    rows = {tuple(r[[0, 1, 2, 3]]): r for r in info if r[3] > r[2]}  # (seq, row0, lo, hi)
    first = rows[(0, 0, 0, 32)]       # positions 65 .. 96: step 0 whole, step 1 masked
    assert first[4] == 65 and first[5] == 1 and first[6] == 2
    last = rows[(0, 8, 24, 27)]       # tokens 32 .. 34, shifted back to end at row 40
    assert last[4] == 73 and last[5] == 1 and last[6] == 2
    tail = rows[(2, 8, 30, 31)]       # padding row 38 (row 39 pads q only): no keys
    assert tail[6] == 0
    assert rows[(1, 8, 27, 30)][4] == -27  # seq 1's tokens at positions 0 .. 2


@pytest.mark.parametrize("seed", range(4))
def test_tile_windows_are_aligned_and_cover_every_row(seed):
    """TMA into the (8, 64)-tiled Q slabs needs each tile's first q row to be a multiple of 8:
    every tile's window starts on one, stays inside the padded q, holds its own rows, and the
    own rows of all tiles cover each output row exactly once, with its own sequence."""
    rng = np.random.default_rng(seed)
    for group in (1, 2, 4, 8, 16):
        lens = rng.integers(0, 60, size=rng.integers(1, 7))
        lens[rng.random(lens.shape) < 0.3] = rng.integers(0, 3)  # short and empty sequences
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        num_tokens = int(qsl[-1]) + int(rng.integers(0, 12))
        plan = make_plan(num_tokens, len(lens), group, 16)
        num_rows = max(-(-num_tokens // 8) * 8, plan.block_q)
        info = np.asarray(_tile_info(jnp.asarray(qsl), jnp.asarray(lens + 5, jnp.int32),
                                     num_tokens, num_rows, plan))
        assert info.shape == (plan.num_tiles, 8)
        seq_of_row = np.searchsorted(qsl, np.arange(num_tokens), side="right") - 1
        covered = np.zeros(num_tokens, int)
        for seq, row0, lo, hi in info[:, :4]:
            if hi <= lo:
                continue
            assert row0 % 8 == 0 and 0 <= row0 <= num_rows - plan.block_q
            assert 0 <= lo < hi <= plan.block_q
            assert (np.minimum(seq_of_row[row0 + lo:row0 + hi], len(lens)) == seq).all()
            covered[row0 + lo:row0 + hi] += 1
        assert (covered == 1).all()


def test_plan():
    assert make_plan(8192, 1, 4, 16) == MgpuPlan(
        block_q=32, block_k=128, stages=2, group=4, group_rows=4, block_size=16,
        num_tiles=259, interpret=False)
    assert make_plan(100, 2, 1, 16).slabs_per_wg == 1            # 128 tokens, 64 per wg
    assert make_plan(100, 2, 8, 16).slabs_per_wg == 4            # 16 tokens x 4 heads
    assert make_plan(100, 2, 3, 32, block_k=64).copies_per_step == 2


def test_bad_input_raises_value_error():
    q = jnp.zeros((6, 8, 64), jnp.bfloat16)
    pool = jnp.zeros((1, 4, 16, 2, 64), jnp.bfloat16)
    tables, lens = jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32)
    qsl = jnp.array([0, 3, 6], jnp.int32)
    call = ragged_paged_attention_mgpu
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        call(q.astype(jnp.float32), pool.astype(jnp.float32), pool.astype(jnp.float32), 0,
             tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        wide = jnp.zeros((1, 4, 16, 2, 256), jnp.bfloat16)
        call(jnp.zeros((6, 8, 256), jnp.bfloat16), wide, wide, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="block_size >= 8"):
        small = jnp.zeros((1, 4, 4, 2, 64), jnp.bfloat16)
        call(q, small, small, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="at most 16 query heads"):
        one = jnp.zeros((1, 4, 16, 1, 64), jnp.bfloat16)
        call(jnp.zeros((6, 32, 64), jnp.bfloat16), one, one, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="block_k must be 64 or 128"):
        call(q, pool, pool, 0, tables, qsl, lens, scale=1.0, block_k=32)
    with pytest.raises(ValueError, match="shared memory"):
        call(q.reshape(6, 4, 128), pool.reshape(1, 4, 16, 1, 128),
             pool.reshape(1, 4, 16, 1, 128), 0, tables, qsl, lens, scale=1.0, stages=4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):  # paged_prefill's checks
        call(jnp.zeros((6, 5, 64), jnp.bfloat16), pool, pool, 0, tables, qsl, lens, scale=1.0)
    with pytest.raises(ValueError, match="out of range"):
        call(q, pool, pool, 1, tables, qsl, lens, scale=1.0)


GPU_GRID = list(itertools.product((1, 2, 4, 5, 8), (64, 128), (8, 16, 32),
                                  (jnp.bfloat16, jnp.float16)))


@pytest.mark.gpu
@pytest.mark.parametrize("group,head_dim,block_size,dtype", GPU_GRID)
def test_gpu_full_grid(group, head_dim, block_size, dtype):
    check(0, seqs=mixed_seqs(block_size, long=150), kv_heads=2, group=group,
          head_dim=head_dim, block_size=block_size, dtype=dtype, interpret=False,
          with_reference=False)


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(1, None), (40, None), (200, 0.5), (None, 0.5),
                                            (4096, 50.0)])
@pytest.mark.parametrize("group,head_dim,block_size,kwargs", [
    (4, 128, 16, {}), (1, 64, 8, {"block_k": 64}), (8, 64, 32, {"block_k": 64, "stages": 3})])
def test_gpu_window_and_softcap(window, softcap, group, head_dim, block_size, kwargs):
    """Sliding windows narrower than a step, across several steps and wider than every
    context, soft-capping alone and both, over long chunks after prefixes (pages before the
    windows NaN)."""
    check(4, seqs=[(300, 900), (1, 500), (0, 0), (130, 130)], kv_heads=2, group=group,
          head_dim=head_dim, block_size=block_size, dtype=jnp.bfloat16, interpret=False,
          sliding_window=window, logit_softcap=softcap, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{}, {"block_k": 64}, {"block_k": 64, "stages": 3},
                                    {"block_k": 64, "stages": 4}])
def test_gpu_pipeline_variants(kwargs):
    check(6, seqs=mixed_seqs(16, long=300), kv_heads=2, group=4, head_dim=128, block_size=16,
          dtype=jnp.bfloat16, interpret=False, **kwargs)


@pytest.mark.big_memory
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_large_shapes(dtype):
    """Engine-sized heads (32 q / 8 KV, dim 128, block 16): a 2048-token prompt, a 1000-token
    chunk after a 1500-token prefix, decode tokens, a padding sequence, tail padding."""
    check(7, seqs=[(2048, 2048), (1000, 2500), (1, 777), (0, 0), (1, 1), (300, 300)],
          kv_heads=8, group=4, head_dim=128, block_size=16, dtype=dtype, pad_tokens=50,
          interpret=False)


@pytest.mark.gpu
def test_gpu_matches_triton_kernel():
    """One 4,096-token prompt with engine-sized heads: agrees with the Triton kernel."""
    from pallas_kernels.paged_prefill import ragged_paged_attention_pallas
    args = prompt_inputs(4096, np.random.default_rng(8))
    ours = ragged_paged_attention_mgpu(*args, scale=128 ** -0.5, interpret=False)
    theirs = ragged_paged_attention_pallas(*args, scale=128 ** -0.5)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                               atol=2e-2, rtol=2e-2)


def prompt_inputs(tokens: int, rng, *, heads=32, kv_heads=8, head_dim=128, block_size=16,
                  dtype=jnp.bfloat16):
    """One fresh prompt of `tokens` tokens in a 2-layer pool (layer 1, shuffled pages)."""
    num_blocks = tokens // block_size + 8
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    k_pool = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pool = jnp.asarray(rng.standard_normal(shape), dtype)
    tables = jnp.asarray(rng.permutation(num_blocks)[None, :tokens // block_size], jnp.int32)
    q = jnp.asarray(rng.standard_normal((tokens, heads, head_dim)), dtype)
    return (q, k_pool, v_pool, 1, tables, jnp.array([0, tokens], jnp.int32),
            jnp.array([tokens], jnp.int32))


def time_kernels(tokens: int, iters: int = 20, **mgpu_kwargs) -> None:
    """Times the Mosaic GPU and Triton kernels on one prompt; prints ms and causal TFLOP/s."""
    import time

    from pallas_kernels.paged_prefill import ragged_paged_attention_pallas
    args = prompt_inputs(tokens, np.random.default_rng(0))
    heads, head_dim = args[0].shape[1:]
    flops = 4 * heads * head_dim * tokens * (tokens + 1) / 2  # QK^T and PV, causal
    kernels = {
        "mgpu": jax.jit(lambda *a: ragged_paged_attention_mgpu(
            *a, scale=head_dim ** -0.5, interpret=False, **mgpu_kwargs)),
        "triton": jax.jit(lambda *a: ragged_paged_attention_pallas(*a, scale=head_dim ** -0.5)),
    }
    outs = {}
    for name, fn in kernels.items():
        outs[name] = fn(*args).block_until_ready()  # compile
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        out.block_until_ready()
        ms = (time.perf_counter() - start) / iters * 1e3
        print(f"{tokens} tokens {name:6s} {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s "
              f"{mgpu_kwargs if name == 'mgpu' else ''}")
    diff = np.abs(np.asarray(outs["mgpu"], np.float32) - np.asarray(outs["triton"], np.float32))
    print(f"{tokens} tokens max |mgpu - triton| = {diff.max():.3g}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Time the Mosaic GPU prefill kernel (GPU).")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 4096])
    parser.add_argument("--block-k", type=int, default=None)
    parser.add_argument("--stages", type=int, default=None)
    parser.add_argument("--iters", type=int, default=20)
    cli = parser.parse_args()
    for n in cli.tokens:
        time_kernels(n, cli.iters, block_k=cli.block_k, stages=cli.stages)
