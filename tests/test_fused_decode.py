"""The fused decode kernel (RoPE + KV write + paged decode attention) against its jnp reference,
the unfused composition `fused_decode_reference` (itself built from the references that
tests/test_attention.py, test_kv_write.py and test_paged_decode.py check against dense NumPy).

On CPU the kernel runs in interpret mode over a modest grid; the `gpu`-marked tests run a
larger grid and engine-sized shapes through the Triton lowering.

Poisoning: every pool slot that no sequence owns, and the slot each new token is written to,
holds POISON (finite, large) before the call, so reading a stale slot, another sequence's block
or the new token's slot from the pool instead of registers moves the output far out of
tolerance; interpret mode fills the kernel's fresh outputs with NaN first, so a skipped write
shows as NaN. Outside the written slots the pools must come back bit for bit unchanged.

Tolerances as in test_paged_decode.py: float32 2e-5; bfloat16 2e-2 (probabilities rounded to
the input dtype before the P.V dot, and the output rounding); the written K rows may differ by
one rounding of the RoPE result (its float32 products are summed in another order).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_cases import LAYER, LAYERS, POISON, TOLERANCE, forget_before_window
from pallas_kernels.fused_decode import (combine_partials, fused_decode_attention_pallas,
                                         fused_decode_reference)

ROPE_TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# The reference as one compiled program (op by op it compiles every op for every new shape).
reference = jax.jit(fused_decode_reference,
                    static_argnames=("num_heads", "scale", "sliding_window", "logit_softcap",
                                     "qk_norm_eps"))


def make_case(rng, *, context_lens, kv_heads, group, head_dim, block_size, max_blocks, dtype,
              skip_slot=False, parts=0, sliding_window=None):
    """QKV rows, RoPE tables, a shuffled poisoned pool holding each sequence's cached tokens,
    block tables and the new tokens' slots (row 0's slot is -1 when skip_slot). parts > 0: the
    QKV rows as that many float32 partial sums [parts, batch, width] (multiples of 1/256, so
    their total is exact in any order of addition). With a sliding window the blocks before
    it are forgotten (NaN, some entries the pad block)."""
    batch, heads = len(context_lens), kv_heads * group
    num_blocks = 1 + batch * max_blocks + 3
    shape = (LAYERS, num_blocks, block_size, kv_heads, head_dim)
    k_pool = np.full(shape, POISON, np.float32)
    v_pool = np.full(shape, POISON, np.float32)
    free = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((batch, max_blocks), np.int32)
    slots = np.zeros((batch,), np.int32)  # padding rows write the pad block, as the engine's
    for i, ctx in enumerate(context_lens):
        used = -(-ctx // block_size)
        tables[i, :used] = free[i * max_blocks:i * max_blocks + used]
        for t in range(ctx - 1):  # cached tokens; the new one (position ctx - 1) is written
            k_pool[:, tables[i, t // block_size], t % block_size] = rng.standard_normal(
                (LAYERS, kv_heads, head_dim))
            v_pool[:, tables[i, t // block_size], t % block_size] = rng.standard_normal(
                (LAYERS, kv_heads, head_dim))
        if ctx:
            slots[i] = tables[i, (ctx - 1) // block_size] * block_size + (ctx - 1) % block_size
    if sliding_window is not None:
        first_seen = np.maximum(np.asarray(context_lens) - sliding_window, 0)
        forget_before_window(k_pool, v_pool, tables, first_seen, block_size)
    true_slots = slots.copy()
    if skip_slot:
        slots[0] = -1
    qkv = rng.standard_normal((batch, (heads + 2 * kv_heads) * head_dim))
    if parts:
        qkv = (rng.integers(-256, 256, (parts, *qkv.shape)) / 256).astype(np.float32)
    positions = np.maximum(np.asarray(context_lens) - 1, 0)
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None] * inv_freq
    return dict(qkv=jnp.asarray(qkv, jnp.float32 if parts else dtype),
                cos=jnp.asarray(np.cos(angles), jnp.float32),
                sin=jnp.asarray(np.sin(angles), jnp.float32),
                k_pool=jnp.asarray(k_pool, dtype), v_pool=jnp.asarray(v_pool, dtype),
                slots=jnp.asarray(slots), true_slots=jnp.asarray(true_slots),
                block_tables=jnp.asarray(tables),
                context_lens=jnp.asarray(context_lens, jnp.int32))


def check(seed, *, context_lens, kv_heads, group, head_dim, block_size, num_splits, dtype,
          max_blocks=5, skip_slot=False, parts=0, sliding_window=None, logit_softcap=None,
          qk_norm=False, **kwargs):
    case = make_case(np.random.default_rng(seed), context_lens=context_lens, kv_heads=kv_heads,
                     group=group, head_dim=head_dim, block_size=block_size,
                     max_blocks=max_blocks, dtype=dtype, skip_slot=skip_slot, parts=parts,
                     sliding_window=sliding_window)
    heads, scale = kv_heads * group, head_dim ** -0.5
    opts = dict(num_heads=heads, scale=scale, sliding_window=sliding_window,
                logit_softcap=logit_softcap)
    if qk_norm:  # Qwen3's per-head q/k RMSNorm weights, near 1
        weights = 1 + 0.3 * np.random.default_rng(seed + 1).standard_normal((2, head_dim))
        opts.update(qk_norm=tuple(jnp.asarray(weights, dtype)), qk_norm_eps=1e-6)
    args = [case[name] for name in ("qkv", "cos", "sin", "k_pool", "v_pool")] + [LAYER] + [
        case[name] for name in ("slots", "block_tables", "context_lens")]
    out, k_pool, v_pool = fused_decode_attention_pallas(*args, num_splits=num_splits, **opts,
                                                        **kwargs)
    _, ref_k, ref_v = reference(*args, **opts)
    # The output as if every slot were written (a skipped slot's token is still attended).
    args[6] = case["true_slots"]
    ref_out = reference(*args, **opts)[0]
    batch = len(context_lens)
    assert out.shape == (batch, heads * head_dim) and out.dtype == dtype
    assert k_pool.shape == case["k_pool"].shape and k_pool.dtype == dtype

    f64 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)  # noqa: E731
    out, ref_out = f64(out), f64(ref_out)
    assert np.isfinite(out).all()
    live = np.asarray(context_lens) > 0
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(out[live], ref_out[live], atol=tol, rtol=tol)
    assert (out[~live] == 0).all()  # padding rows: exact zeros

    # The pools: the written slots within one RoPE rounding, everything else bit for bit.
    written = np.zeros(case["k_pool"].shape[:3], bool)
    block_size = case["k_pool"].shape[2]
    for slot in np.asarray(case["slots"]):
        if slot >= 0:
            written[LAYER, slot // block_size, slot % block_size] = True
    for got, want, before in ((k_pool, ref_k, case["k_pool"]), (v_pool, ref_v, case["v_pool"])):
        got, want, before = f64(got), f64(want), f64(before)
        np.testing.assert_array_equal(got[~written], before[~written])
        np.testing.assert_allclose(got[written], want[written], atol=ROPE_TOLERANCE[dtype],
                                   rtol=ROPE_TOLERANCE[dtype])
    np.testing.assert_array_equal(f64(v_pool)[written], f64(ref_v)[written])  # V: a plain copy
    return out


# (context_lens, kv_heads, group, head_dim, block_size, num_splits, dtype)
CPU_CASES = [
    ([1, 11, 40], 2, 4, 64, 8, 3, jnp.float32),        # a first token, a ragged, a full table
    ([33], 1, 4, 128, 16, 1, jnp.float32),
    ([17, 0, 48], 2, 1, 64, 16, None, jnp.bfloat16),   # a padding row, automatic plan
    ([5, 64], 2, 3, 32, 32, 2, jnp.float32),           # odd group (rows picked one by one)
    ([20, 9], 3, 3, 64, 8, 1, jnp.bfloat16),           # 3 KV heads (SmolLM2's 9 / 3)
    ([2, 30, 7], 1, 8, 32, 8, 4, jnp.float16),         # more splits than some contexts fill
]


@pytest.mark.parametrize("context_lens,kv_heads,group,head_dim,block_size,num_splits,dtype",
                         CPU_CASES)
def test_matches_reference(context_lens, kv_heads, group, head_dim, block_size, num_splits,
                           dtype):
    check(0, context_lens=context_lens, kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, num_splits=num_splits, dtype=dtype)


# (context_lens, window, softcap, block_size, num_splits, dtype): contexts of one token, equal
# to the window and longer (the window's first block mid-table, its blocks before NaN).
WINDOW_CASES = [
    ([1, 20, 40, 33], 20, 0.6, 8, 3, jnp.float32),  # three splits over the window, capped
    ([1, 9, 30], 1, None, 8, None, jnp.bfloat16),   # the new token alone
    ([5, 40], None, 0.5, 16, 2, jnp.float32),       # soft-capping alone
]


@pytest.mark.parametrize("context_lens,window,softcap,block_size,num_splits,dtype",
                         WINDOW_CASES)
def test_sliding_window_and_softcap(context_lens, window, softcap, block_size, num_splits,
                                    dtype):
    """The splits start at the window's first block (the blocks before it, NaN, are never
    read); outputs and pools as the reference's."""
    check(7, context_lens=context_lens, kv_heads=2, group=2, head_dim=32,
          block_size=block_size, num_splits=num_splits, dtype=dtype, sliding_window=window,
          logit_softcap=softcap)


@pytest.mark.parametrize("num_splits,dtype", [(1, jnp.bfloat16), (2, jnp.float32)])
def test_partial_sums_in(num_splits, dtype):
    """QKV given as float32 partial sums (the persistent layer kernel's output): the kernel
    adds them and works in the pool's dtype, as on their total rounded to it."""
    check(3, context_lens=[12, 0, 30], kv_heads=2, group=4, head_dim=64, block_size=16,
          num_splits=num_splits, dtype=dtype, parts=3)


@pytest.mark.parametrize("num_splits,parts", [(1, 0), (3, 0), (None, 4)])
def test_uncombined_partials_out(num_splits, parts, interpret=None):
    """partials=True: the splits' (acc, max, sum), merged by `combine_partials`, give the
    combined call's output; the pools are written the same."""
    case = make_case(np.random.default_rng(4), context_lens=[1, 40, 0, 23], kv_heads=2,
                     group=4, head_dim=64, block_size=16, max_blocks=4, dtype=jnp.bfloat16,
                     parts=parts)
    args = [case[n] for n in ("qkv", "cos", "sin", "k_pool", "v_pool")] + [LAYER] + [
        case[n] for n in ("slots", "block_tables", "context_lens")]
    kw = dict(num_heads=8, scale=0.125, num_splits=num_splits, interpret=interpret)
    want, want_k, want_v = fused_decode_attention_pallas(*args, **kw)
    (acc, row_max, row_sum), k_pool, v_pool = fused_decode_attention_pallas(*args, **kw,
                                                                           partials=True)
    assert acc.shape[1:] == want.shape and acc.dtype == jnp.float32
    got = combine_partials(acc, row_max, row_sum, want.dtype)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    # The same float32 states, merged in another order: at most one bf16 rounding apart.
    np.testing.assert_allclose(f32(got), f32(want), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_array_equal(f32(k_pool), f32(want_k))
    np.testing.assert_array_equal(f32(v_pool), f32(want_v))


def test_skipped_slot_writes_nothing():
    """A slot of -1 leaves the pool untouched; the token still attends (from registers)."""
    check(1, context_lens=[9, 14], kv_heads=2, group=2, head_dim=32, block_size=8,
          num_splits=2, dtype=jnp.float32, skip_slot=True)


def test_in_place_under_donation_and_traced_layer():
    """Under a jit that donates the pools and passes the layer traced, the kernel matches the
    static-layer call and XLA aliases the pools (no copy of them in the compiled step)."""
    case = make_case(np.random.default_rng(2), context_lens=[6, 13], kv_heads=2, group=2,
                     head_dim=32, block_size=8, max_blocks=2, dtype=jnp.float32)
    names = ("slots", "block_tables", "context_lens")

    def run(k_pool, v_pool, layer):
        return fused_decode_attention_pallas(
            case["qkv"], case["cos"], case["sin"], k_pool, v_pool, layer,
            *[case[n] for n in names], num_heads=4, scale=0.2, num_splits=2)

    static = run(case["k_pool"], case["v_pool"], LAYER)
    step = jax.jit(run, donate_argnums=(0, 1))
    compiled = step.lower(case["k_pool"], case["v_pool"], jnp.int32(LAYER)).compile()
    assert "may-alias" in compiled.as_text() or "must-alias" in compiled.as_text()
    traced = step(jnp.array(case["k_pool"]), jnp.array(case["v_pool"]), jnp.int32(LAYER))
    for got, want in zip(traced, static):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("num_splits,dtype,parts", [(1, jnp.float32, 0), (2, jnp.bfloat16, 0),
                                                   (None, jnp.bfloat16, 3)])
def test_qk_norm(num_splits, dtype, parts):
    """Qwen3's per-head q/k RMSNorm before RoPE, in the kernel: outputs and written K as the
    reference's (the norm then RoPE in jnp), also from float32 partial sums."""
    check(9, context_lens=[1, 14, 0, 35], kv_heads=2, group=4, head_dim=64, block_size=8,
          num_splits=num_splits, dtype=dtype, parts=parts, qk_norm=True)


def test_bad_input_raises_value_error():
    pool = jnp.zeros((1, 4, 8, 2, 32))
    qkv = jnp.zeros((2, (4 + 4) * 32))
    rope = jnp.zeros((2, 16))
    rows = jnp.zeros((2,), jnp.int32)
    tables = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="qkv must be"):
        fused_decode_attention_pallas(qkv[:, :-32], rope, rope, pool, pool, 0, rows, tables,
                                      rows, num_heads=4, scale=1.0)
    with pytest.raises(ValueError, match="multiple of"):
        fused_decode_attention_pallas(qkv, rope, rope, pool, pool, 0, rows, tables, rows,
                                      num_heads=3, scale=1.0)
    with pytest.raises(ValueError, match="cos must be"):
        fused_decode_attention_pallas(qkv, rope[:, :8], rope, pool, pool, 0, rows, tables,
                                      rows, num_heads=4, scale=1.0)
    with pytest.raises(ValueError, match="float32 partial sums"):
        fused_decode_attention_pallas(jnp.stack([qkv, qkv]).astype(jnp.bfloat16), rope, rope,
                                      pool, pool, 0, rows, tables, rows, num_heads=4, scale=1.0)
    with pytest.raises(ValueError, match="out of range"):
        fused_decode_attention_pallas(qkv, rope, rope, pool, pool, 1, rows, tables, rows,
                                      num_heads=4, scale=1.0)
    with pytest.raises(ValueError, match="qk_norm must be"):
        fused_decode_attention_pallas(qkv, rope, rope, pool, pool, 0, rows, tables, rows,
                                      num_heads=4, scale=1.0,
                                      qk_norm=(jnp.ones(32), jnp.ones(16)))


GPU_GRID = list(itertools.product(((1,), (1, 19, 40)), (1, 2), (1, 4), (64, 128), (8, 16, 32),
                                  (1, 3), (jnp.float32, jnp.bfloat16)))


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens,kv_heads,group,head_dim,block_size,num_splits,dtype",
                         GPU_GRID)
def test_gpu_grid(context_lens, kv_heads, group, head_dim, block_size, num_splits, dtype):
    lens = [max(1, n * block_size // 8) for n in context_lens]  # up to the whole table
    check(0, context_lens=lens, kv_heads=kv_heads, group=group, head_dim=head_dim,
          block_size=block_size, num_splits=num_splits, dtype=dtype, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,group,head_dim,num_splits,dtype", [
    (8, 4, 64, None, jnp.bfloat16),    # Llama-3.2-1B
    (8, 4, 128, None, jnp.bfloat16),   # Llama-3-8B
    (8, 4, 128, 1, jnp.float32),
    (3, 3, 64, None, jnp.bfloat16),    # SmolLM2-135M
])
def test_gpu_engine_shapes(kv_heads, group, head_dim, num_splits, dtype):
    """Engine-sized heads with long ragged contexts and a padding row."""
    check(5, context_lens=[1, 17, 2559, 1000, 0, 2560], kv_heads=kv_heads, group=group,
          head_dim=head_dim, block_size=16, num_splits=num_splits, dtype=dtype, max_blocks=160,
          interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("window,softcap", [(1, None), (100, 1.0), (4096, None), (None, 1.0)])
@pytest.mark.parametrize("head_dim,num_splits,dtype", [(64, None, jnp.bfloat16),
                                                       (128, 3, jnp.float32)])
def test_gpu_window_and_softcap(window, softcap, head_dim, num_splits, dtype):
    """Engine-sized heads over long contexts (the blocks before the window NaN): a window of
    the new token alone, shorter than the contexts, longer than most, soft-capping alone."""
    check(8, context_lens=[1, min(window or 100, 2560), 2560, 1283, 0], kv_heads=8, group=4,
          head_dim=head_dim, block_size=16, num_splits=num_splits, dtype=dtype, max_blocks=160,
          sliding_window=window, logit_softcap=softcap, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads,parts", [(4, 0), (8, 0), (4, 8)])  # Qwen3-30B-A3B, 8B
def test_gpu_qk_norm_qwen3(kv_heads, parts):
    """Qwen3's heads (32 of 128, q/k norms) over long ragged contexts, also from partials."""
    check(10, context_lens=[1, 17, 2559, 0, 1000], kv_heads=kv_heads, group=32 // kv_heads,
          head_dim=128, block_size=16, num_splits=None, dtype=jnp.bfloat16, max_blocks=160,
          parts=parts, qk_norm=True, interpret=False)


@pytest.mark.gpu
def test_gpu_uncombined_partials():
    for num_splits, parts in [(1, 0), (3, 0), (None, 4)]:
        test_uncombined_partials_out(num_splits, parts, interpret=False)


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[1], [383], [2560]])
def test_gpu_partial_sums_llama_1b(context_lens):
    """The layer kernel's QKV partials (8 of them) at batch 1 on Llama-3.2-1B's heads."""
    check(6, context_lens=context_lens, kv_heads=8, group=4, head_dim=64, block_size=16,
          num_splits=None, dtype=jnp.bfloat16, max_blocks=160, parts=8, interpret=False)


def test_triton_supports_the_engine_shapes_only():
    """The engine falls back to the unfused path where the Triton lowering cannot run."""
    from pallas_kernels.fused_decode import triton_supports
    assert triton_supports(16, 64) and triton_supports(8, 128) and triton_supports(32, 32)
    assert not triton_supports(16, 16)   # half a head under Triton's 16-wide dot
    assert not triton_supports(12, 64)   # block size not a power of two
    assert not triton_supports(16, 96)   # head_dim not a power of two
