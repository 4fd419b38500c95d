"""Every attention path against dense NumPy attention on random paged data, and packed prefill
against the per-sequence layout through the whole model."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.attention import AttentionMetadata, get_attention_backend
from jinfer.config import EngineConfig, ModelConfig
from jinfer.model import forward_hidden, prepare_params
from jinfer.model_runner import ModelRunner
from pallas_kernels.reference import paged_attention_reference, paged_decode_attention

POISON = 1e4  # stale pool slots: finite (as in the engine) but large enough to show any leak
LAYERS, LAYER = 2, 1


def dense_attention(q, k, v, positions, scale):
    """q [q_len, heads, dim]; k, v [ctx, kv_heads, dim]; a query at position p sees k[:p + 1]."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1).astype(np.float64)
    v = np.repeat(v, group, axis=1).astype(np.float64)
    scores = np.einsum("qhd,thd->hqt", q.astype(np.float64), k) * scale
    visible = np.arange(k.shape[0])[None, :] <= positions[:, None]  # [q_len, ctx]
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqt,thd->qhd", probs, v)


def make_case(rng, block_size, heads, kv_heads, seqs, q_len, num_rows):
    """Random sequences (start, num_new) in a shuffled, poisoned pool; rows past `seqs` pad."""
    dim, width = 8, max(2, -(-(q_len + 12) // block_size))  # room for a prefix
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


def check(out, q, positions, contexts, scale):
    out = np.asarray(out)
    assert np.isfinite(out).all()  # padding rows and padding queries included
    for i, (k, v, num_new) in enumerate(contexts):
        expected = dense_attention(q[i, :num_new], k, v, positions[i, :num_new], scale)
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


@pytest.mark.parametrize("block_size, heads", GRID)
def test_decode_path_matches_dense_and_reference(block_size, heads):
    rng = np.random.default_rng(block_size + heads[0])
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, block_size, *heads, seqs=5, q_len=1, num_rows=8)
    args = (q, k_pool, v_pool, LAYER, tables, positions, lens)
    out = paged_decode_attention(*args, scale=0.3)
    check(out, q, positions, contexts, 0.3)
    np.testing.assert_allclose(out, paged_attention_reference(*args, scale=0.3), atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "oracle"])
@pytest.mark.parametrize("q_len", [1, 7])
def test_backends_match_dense(backend, q_len):
    rng = np.random.default_rng(q_len)
    q, k_pool, v_pool, tables, positions, lens, contexts = make_case(
        rng, 16, 6, 2, seqs=3, q_len=q_len, num_rows=4)
    meta = AttentionMetadata(positions=positions, slot_mapping=np.zeros_like(positions),
                             block_tables=tables, context_lens=lens)
    fn = jax.jit(get_attention_backend(backend), static_argnums=(3, 5))
    check(fn(q, k_pool, v_pool, LAYER, meta, 0.3), q, positions, contexts, 0.3)


def test_packed_prefill_matches_per_sequence_layout():
    """The model's packed prefill (one row of back-to-back chunks) == the padded layout."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    layers = dict(attn_norm=1 + w(2, 32), wq=w(2, 32, 32), wk=w(2, 32, 16), wv=w(2, 32, 16),
                  wo=w(2, 32, 32), mlp_norm=1 + w(2, 32), w_gate=w(2, 32, 48),
                  w_up=w(2, 32, 48), w_down=w(2, 48, 32))
    params = prepare_params({"embed": w(64, 32), "layers": layers, "final_norm": 1 + w(32)})
    runner = ModelRunner(config, EngineConfig(block_size=4, max_model_len=64), params, 40,
                         jnp.float32)
    prompts = [list(rng.integers(0, 64, n)) for n in (5, 11, 3)]
    tables = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    # Chunked prefill: the second sequence already has 4 tokens in the pool (a prefix).
    runner.prompt_logits(prompts[1][:4], tables[1])
    rows = [(t, c, len(p) - c) for p, t, c in zip(prompts, tables, (0, 4, 0))]
    meta = runner._attention_arrays(rows, 4, 16)
    chunks = [p[c:] for p, c in zip(prompts, (0, 4, 0))]
    ids, packed, last = runner._pack(chunks, meta, 4, 16)
    attn = get_attention_backend("reference")
    kv = runner.kv_cache
    hidden_packed, kv_packed = forward_hidden(params, kv, ids, meta, config=config, attn_fn=attn,
                                              packed=packed)
    padded = np.zeros((4, 16), np.int32)
    for i, chunk in enumerate(chunks):
        padded[i, :len(chunk)] = chunk
    hidden, kv_padded = forward_hidden(params, kv, padded, meta, config=config, attn_fn=attn)
    for i, chunk in enumerate(chunks):
        np.testing.assert_allclose(np.asarray(hidden_packed)[0, packed.to_rows[i, :len(chunk)]],
                                   np.asarray(hidden)[i, :len(chunk)], rtol=1e-5, atol=1e-5)
    used = [b for t in tables for b in t]  # the pad block (0) differs: only real blocks compare
    np.testing.assert_allclose(np.asarray(kv_packed.k)[:, used], np.asarray(kv_padded.k)[:, used],
                               rtol=1e-5, atol=1e-5)
    assert list(last[:3]) == list(np.cumsum([len(c) for c in chunks]) - 1)
