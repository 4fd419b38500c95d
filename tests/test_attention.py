"""Every attention path against dense NumPy attention on random paged data, and a mixed step
(decode rows and prompt chunks in one packed row) against separate steps through the model."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_oracle import dense_attention, oracle_backend
from kernel_cases import LAYER, LAYERS, forget_before_window
from jinfer.model.attention import (AttentionBackend, AttentionMetadata, PrefillMetadata,
                                    StepAttention, attend, get_attention_backend)
from jinfer.config import EngineConfig
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import init_kv_cache
from jinfer.model.decoder import forward_hidden, prepare_params
from jinfer.runner.model_runner import ModelRunner
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence
from pallas_kernels.fused_decode import fused_decode_attention_pallas
from pallas_kernels.reference import paged_attention_reference, paged_decode_attention

POISON = 1e4  # stale pool slots: finite (as in the engine) but large enough to show any leak


def make_case(rng, block_size, heads, kv_heads, seqs, q_len, num_rows, dim=8, prefix=12):
    """Random sequences (start, num_new) in a shuffled, poisoned pool; rows past `seqs` pad."""
    width = max(2, -(-(q_len + prefix) // block_size))  # room for a prefix
    num_blocks = 1 + seqs * width
    shape = (LAYERS, num_blocks, block_size, kv_heads, dim)
    k_pool = np.full(shape, POISON, np.float32)
    v_pool = np.full(shape, POISON, np.float32)
    blocks = rng.permutation(np.arange(1, num_blocks))
    tables = np.zeros((num_rows, width), np.int32)
    positions = np.zeros((num_rows, q_len), np.int32)
    context_lens = np.zeros((num_rows,), np.int32)
    contexts = []
    for i in range(seqs):
        num_new = int(rng.integers(1, q_len + 1))
        start = int(rng.integers(0, width * block_size - num_new + 1))
        ctx = start + num_new
        tables[i] = blocks[i * width:(i + 1) * width]
        k = rng.standard_normal((ctx, kv_heads, dim)).astype(np.float32)
        v = rng.standard_normal((ctx, kv_heads, dim)).astype(np.float32)
        for t in range(ctx):
            k_pool[LAYER, tables[i, t // block_size], t % block_size] = k[t]
            v_pool[LAYER, tables[i, t // block_size], t % block_size] = v[t]
        positions[i] = start + np.minimum(np.arange(q_len), num_new - 1)  # padding: last pos
        context_lens[i] = ctx
        contexts.append((k, v, num_new))
    q = rng.standard_normal((num_rows, q_len, heads, dim)).astype(np.float32)
    return q, k_pool, v_pool, tables, positions, context_lens, contexts


def forget_outside_window(k_pool, v_pool, tables, positions, window):
    """`forget_before_window` (tests/kernel_cases.py) before each sequence's earliest query's
    window; how many blocks were forgotten."""
    first_seen = np.maximum(positions[:, 0] - window + 1, 0)
    return forget_before_window(k_pool, v_pool, tables, first_seen, k_pool.shape[2])


def check(out, q, positions, contexts, scale, **opts):
    out = np.asarray(out)
    assert np.isfinite(out).all()  # padding rows and padding queries included
    for i, (k, v, num_new) in enumerate(contexts):
        expected = dense_attention(q[i, :num_new], k, v, positions[i, :num_new], scale, **opts)
        np.testing.assert_allclose(out[i, :num_new], expected, rtol=2e-5, atol=2e-5)


GRID = list(itertools.product([1, 16, 32], [(4, 4), (6, 2), (9, 3), (8, 1)]))


@pytest.mark.parametrize("block_size, heads", GRID)
@pytest.mark.parametrize("q_len", [1, 5, 16])
def test_reference_matches_dense(block_size, heads, q_len):
    """Prefill, chunked prefill after a prefix (random start) and decode, with padding rows."""
    rng = np.random.default_rng(block_size * 100 + heads[0] * 10 + q_len)
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, block_size, *heads, seqs=3, q_len=q_len, num_rows=4)
    out = paged_attention_reference(q, k_pool, v_pool, LAYER, tables, positions, lens, scale=0.3)
    check(out, q, positions, contexts, 0.3)


@pytest.mark.parametrize("window", [1, 5, 13, "context", 64, None])
@pytest.mark.parametrize("softcap", [None, 0.5])
@pytest.mark.parametrize("q_len", [1, 7])
def test_window_and_softcap_match_dense(window, softcap, q_len):
    """Sliding windows of one token, shorter than the contexts (up to 47 tokens), equal to the
    first sequence's context and longer than any, with and without soft-capping (a cap below
    the logits' size, so it bends them), through the general reference (prefill, chunked
    prefill after a prefix, decode) and the decode form; blocks before the windows hold NaN."""
    rng = np.random.default_rng(q_len)
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, 4, 6, 2, seqs=3, q_len=q_len, num_rows=4, prefix=40)
    window = int(lens[0]) if window == "context" else window
    if window is not None:
        forgotten = forget_outside_window(k_pool, v_pool, tables, positions, window)
        assert forgotten or window > 5
        # The references read every table entry, the pad block included: NaN there too.
        k_pool[:, 0] = v_pool[:, 0] = np.nan
    opts = dict(sliding_window=window, logit_softcap=softcap)
    args = (q, k_pool, v_pool, LAYER, tables, positions, lens)
    check(paged_attention_reference(*args, scale=0.3, **opts), q, positions, contexts, 0.3,
          **opts)
    if q_len == 1:
        check(paged_decode_attention(*args, scale=0.3, **opts), q, positions, contexts, 0.3,
              **opts)


@pytest.mark.parametrize("block_size, heads", GRID)
def test_decode_path_matches_dense_and_reference(block_size, heads):
    rng = np.random.default_rng(block_size + heads[0])
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, block_size, *heads, seqs=5, q_len=1, num_rows=8)
    args = (q, k_pool, v_pool, LAYER, tables, positions, lens)
    out = paged_decode_attention(*args, scale=0.3)
    check(out, q, positions, contexts, 0.3)
    np.testing.assert_allclose(out, paged_attention_reference(*args, scale=0.3), atol=1e-5)


def pack_prefill(q, tables, positions, lens, contexts):
    """The make_case rows as a packed prompt-chunk group: (q [tokens, heads, dim],
    PrefillMetadata) with the per-sequence layout the jnp reference reads."""
    num_rows, q_len = positions.shape
    lengths = [num_new for _, _, num_new in contexts] + [0] * (num_rows - len(contexts))
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)  # [rows + 1]
    total = int(starts[-1])
    to_rows = np.full((num_rows, q_len), total - 1, np.int32)
    to_tokens = np.zeros((total + 3,), np.int32)  # 3 padding tokens at the end
    for i, n in enumerate(lengths):
        to_rows[i, :n] = starts[i] + np.arange(n)
        to_tokens[starts[i]:starts[i] + n] = i * q_len + np.arange(n)
    to_tokens[total:] = to_tokens[total - 1]
    meta = PrefillMetadata(
        attention=AttentionMetadata(positions=positions, block_tables=tables,
                                    context_lens=lens),
        query_start_loc=starts, to_rows=to_rows, to_tokens=to_tokens)
    return q.reshape(-1, *q.shape[2:])[to_tokens], meta


@pytest.mark.parametrize("backend", ["reference", "oracle", "pallas"])
@pytest.mark.parametrize("q_len", [1, 7])
@pytest.mark.parametrize("window, softcap", [(None, None), (6, 0.5)])
def test_backends_match_dense(backend, q_len, window, softcap):
    """Each backend's decode (q_len 1) and prompt-chunk paths against dense attention (and the
    tests' plain-reference backend, tests/attention_oracle.py), plain and with a sliding
    window (blocks before it hold NaN) and soft-capping."""
    rng = np.random.default_rng(q_len)
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, 4, 6, 2, seqs=3, q_len=q_len, num_rows=4, dim=16, prefix=20)
    if window is not None:
        assert forget_outside_window(k_pool, v_pool, tables, positions, window)
    opts = dict(sliding_window=window, logit_softcap=softcap)
    impl = oracle_backend() if backend == "oracle" else get_attention_backend(backend)
    if q_len == 1:
        meta = AttentionMetadata(positions=positions, block_tables=tables, context_lens=lens)
        out = jax.jit(functools.partial(impl.decode, **opts), static_argnums=(3, 5))(
            q[:, 0], k_pool, v_pool, LAYER, meta, 0.3)
        check(np.asarray(out)[:, None], q, positions, contexts, 0.3, **opts)
        return
    packed_q, meta = pack_prefill(q, tables, positions, lens, contexts)
    out = np.asarray(jax.jit(functools.partial(impl.prefill, **opts), static_argnums=(3, 5))(
        packed_q, k_pool, v_pool, LAYER, meta, 0.3))
    assert np.isfinite(out).all()
    for i, (k, v, num_new) in enumerate(contexts):
        start = meta.query_start_loc[i]
        expected = dense_attention(q[i, :num_new], k, v, positions[i, :num_new], 0.3, **opts)
        np.testing.assert_allclose(out[start:start + num_new], expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_attend_passes_the_options_to_every_attention_function(fused):
    """attend hands sliding_window and logit_softcap to the fused decode (or the decode) and
    the prefill functions of the backend, as keywords."""
    heads, kv_heads, dim, rows, tokens = 4, 2, 8, 2, 5
    seen = []

    def attention(name):
        def run(q, *args, **opts):
            seen.append((name, opts))
            return jnp.zeros((q.shape[0], heads, dim))
        return run

    def fused_decode(qkv, cos, sin, k_pool, v_pool, *args, **opts):
        seen.append(("fused_decode", opts))
        return jnp.zeros((qkv.shape[0], heads * dim)), k_pool, v_pool

    backend = AttentionBackend(attention("decode"), attention("prefill"),
                               lambda k_pool, v_pool, *args: (k_pool, v_pool),
                               fused_decode if fused else None)
    table = np.zeros((rows, 1), np.int32)
    decode = AttentionMetadata(positions=np.zeros((rows, 1), np.int32), block_tables=table,
                               context_lens=np.ones((rows,), np.int32))
    prefill = PrefillMetadata(attention=decode, query_start_loc=np.zeros((rows + 1,), np.int32),
                              to_rows=np.zeros((rows, 1), np.int32),
                              to_tokens=np.zeros((tokens - rows,), np.int32))
    meta = StepAttention(positions=np.zeros((tokens,), np.int32),
                         slot_mapping=np.zeros((tokens,), np.int32), decode=decode,
                         prefill=prefill)
    pool = jnp.zeros((1, 2, 4, kv_heads, dim))
    rope = jnp.ones((tokens, 1, dim // 2))
    qkv = jnp.zeros((tokens, (heads + 2 * kv_heads) * dim))
    out, _, _ = attend(backend, qkv, rope, rope, pool, pool, 0, meta, num_heads=heads, scale=1.0,
                       sliding_window=5, logit_softcap=2.0)
    assert out.shape == (tokens, heads * dim)
    opts = dict(sliding_window=5, logit_softcap=2.0)
    assert seen == [("fused_decode" if fused else "decode", opts), ("prefill", opts)]


def tiny_runner(num_blocks=40):
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    layers = dict(attn_norm=1 + w(2, 32), wq=w(2, 32, 32), wk=w(2, 32, 16), wv=w(2, 32, 16),
                  wo=w(2, 32, 32), mlp_norm=1 + w(2, 32), w_gate=w(2, 32, 48),
                  w_up=w(2, 32, 48), w_down=w(2, 48, 32))
    params = prepare_params({"embed": w(64, 32), "layers": layers, "final_norm": 1 + w(32)})
    return ModelRunner(config, EngineConfig(block_size=4, max_model_len=64), params,
                       init_kv_cache(config, num_blocks, 4, jnp.float32))


def make_seq(seq_id, tokens, table, computed):
    seq = Sequence(seq_id, str(seq_id), 0, tokens, SamplingParams(), seed=0, detokenizer=None)
    seq.block_table, seq.num_computed_tokens = table, computed
    return seq


def interpreted_fused_decode(qkv, cos, sin, k_pool, v_pool, layer, slots, meta, num_heads,
                             scale, **opts):
    """The fused decode kernel in interpret mode (the tiny model's head_dim 8 is below what
    its Triton lowering takes), as a backend's fused_decode."""
    return fused_decode_attention_pallas(qkv, cos, sin, k_pool, v_pool, layer, slots,
                                         meta.block_tables, meta.context_lens,
                                         num_heads=num_heads, scale=scale, interpret=True,
                                         **opts)


def run(runner, decode, prefill, backend="reference"):
    step_input, _ = runner.prepare(decode, prefill, [], 0)
    impl = get_attention_backend("reference")
    if backend == "fused":  # the Pallas fused decode kernel for the decode rows (interpret)
        impl = impl._replace(fused_decode=interpreted_fused_decode)
    hidden, runner.kv_cache = jax.jit(functools.partial(
        forward_hidden, config=runner.model_config, backend=impl))(
        runner.params, runner.kv_cache, step_input.token_ids, step_input.attention)
    return np.asarray(hidden)[step_input.logits_indices[:len(decode) + len(prefill)]]


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_mixed_step_matches_separate_steps(backend):
    """Decode rows and prompt chunks (one with a cached prefix) in one packed step give the
    same last hidden states and pool contents as a decode-only and a prefill-only step of the
    reference backend; "fused" runs the mixed step's decode rows through the fused decode
    kernel (RoPE, KV write and attention in one Pallas kernel)."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 64, n)) for n in (9, 6, 5, 11, 3)]
    tables = [[1, 2, 3], [4, 5], [6, 7], [8, 9, 10], [11]]
    results = []
    for mixed in (True, False):
        runner = tiny_runner()
        # Sequences 0 and 1 have all but their last token in the pool; 3 has a 4-token prefix.
        for i, computed in ((0, 8), (1, 5), (3, 4)):
            runner.prompt_logits(make_seq(i, prompts[i][:computed], tables[i], 0))
        seqs = [make_seq(i, p, t, c) for i, (p, t, c) in
                enumerate(zip(prompts, tables, (8, 5, 0, 4, 0)))]
        decode = [ScheduledSequence(s, 1) for s in seqs[:2]]
        prefill = [ScheduledSequence(s, s.num_tokens - s.num_computed_tokens) for s in seqs[2:]]
        if mixed:
            hidden = run(runner, decode, prefill, backend)
        else:
            hidden = np.concatenate([run(runner, decode, []), run(runner, [], prefill)])
        used = [b for t in tables for b in t]  # the pad block (0) differs: only real blocks
        results.append((hidden, np.asarray(runner.kv_cache.k)[:, used],
                        np.asarray(runner.kv_cache.v)[:, used]))
    for mixed, separate in zip(*results):
        np.testing.assert_allclose(mixed, separate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens, kernel", [(16, "triton"), (1023, "triton"), (1024, "mosaic"),
                                            (8192, "mosaic")])
def test_hopper_prefill_kernel_by_step_tokens(monkeypatch, tokens, kernel):
    """On a Hopper GPU the Mosaic GPU prefill kernel runs for steps of at least
    MOSAIC_PREFILL_MIN_TOKENS prompt tokens, the Triton-lowered kernel for shorter ones (each
    Mosaic kernel shape costs a compile at every process start)."""
    import types

    import jinfer.model.attention as attention
    from pallas_kernels import paged_prefill_mgpu

    from jinfer.config import KernelConfig
    assert KernelConfig().mosaic_prefill_min_tokens == 1024
    monkeypatch.setattr(paged_prefill_mgpu, "hopper_gpu", lambda: True)
    monkeypatch.setattr(paged_prefill_mgpu, "supports", lambda q, k_pool: True)
    monkeypatch.setattr(paged_prefill_mgpu, "ragged_paged_attention_mgpu",
                        lambda *args, **kwargs: "mosaic")
    monkeypatch.setattr(attention, "ragged_paged_attention_pallas",
                        lambda *args, **kwargs: "triton")
    att = types.SimpleNamespace(block_tables=None, context_lens=None)
    meta = types.SimpleNamespace(attention=att, query_start_loc=None)
    q = jax.ShapeDtypeStruct((tokens, 32, 128), jnp.bfloat16)
    backend = attention.get_attention_backend("pallas", KernelConfig())
    assert backend.prefill(q, None, None, 0, meta, 1.0) == kernel
