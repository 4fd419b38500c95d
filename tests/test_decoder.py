"""jinfer/model/decoder.py with Llama's layer against a dense NumPy Llama written from the
architecture (float64, whole sequence at once, no pool): a tiny random model's prompt logits
through the paged pool, prompt chunks after a cached prefix, and decode steps, on the CPU with
the reference backend."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.model.attention import (AttentionMetadata, PrefillMetadata, StepAttention,
                                    get_attention_backend)
from jinfer.model.config import ModelConfig, RopeScaling
from jinfer.model.decoder import compute_logits, forward_hidden, param_shapes, prepare_params
from jinfer.model.kv_cache import init_kv_cache
from jinfer.model.layers import rope_inv_freq

BLOCK = 4
TABLE = np.array([5, 2, 7, 1, 3, 6], np.int32)  # the sequence's blocks: not contiguous

# GQA (2 query heads per KV head), tied embeddings, plain RoPE
TIED = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
# untied LM head, Llama 3 RoPE scaling (short original context so every branch is taken)
UNTIED = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_layers=3,
                     num_heads=2, num_kv_heads=1, head_dim=16, rope_theta=500000.0,
                     rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0,
                                              original_max_position_embeddings=64))


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Loader-layout float32 weights scaled 1 / sqrt(fan-in) (each layer moves the residual
    stream and attention is far from uniform), norm weights near 1."""
    rng = np.random.default_rng(seed)

    def leaf(name, shape):
        if name.endswith("norm"):
            return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)
    shapes = param_shapes(config)
    params = {name: leaf(name, s) for name, s in shapes.items() if name != "layers"}
    params["embed"] = rng.standard_normal(shapes["embed"]).astype(np.float32)
    params["layers"] = {name: leaf(name, s) for name, s in shapes["layers"].items()}
    return params


def dense_llama_logits(params: dict, tokens: np.ndarray, config: ModelConfig) -> np.ndarray:
    """[T] tokens -> [T, vocab] logits, every position attending causally to the ones before."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    layers, eps, dim = p["layers"], config.rms_norm_eps, config.head_dim
    group = config.num_heads // config.num_kv_heads

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

    angles = np.arange(len(tokens))[:, None] * rope_inv_freq(config).astype(np.float64)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # [T, 1, dim / 2]

    def rope(x):  # [T, heads, dim], rotate-half
        a, b = x[..., :dim // 2], x[..., dim // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    causal = np.tril(np.ones((len(tokens), len(tokens)), bool))
    h = p["embed"][tokens]
    for i in range(config.num_layers):
        x = norm(h, layers["attn_norm"][i])
        q = rope((x @ layers["wq"][i]).reshape(len(tokens), -1, dim))
        k = np.repeat(rope((x @ layers["wk"][i]).reshape(len(tokens), -1, dim)), group, axis=1)
        v = np.repeat((x @ layers["wv"][i]).reshape(len(tokens), -1, dim), group, axis=1)
        scores = np.where(causal, np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dim), -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        h = h + np.einsum("hqk,khd->qhd", probs, v).reshape(len(tokens), -1) @ layers["wo"][i]
        x = norm(h, layers["mlp_norm"][i])
        gate, up = x @ layers["w_gate"][i], x @ layers["w_up"][i]
        h = h + (gate / (1 + np.exp(-gate)) * up) @ layers["w_down"][i]
    h = norm(h, p["final_norm"])
    return h @ (p["embed"].T if config.tie_word_embeddings else p["lm_head"])


def chunk_meta(start: int, n: int) -> StepAttention:
    """Prompt tokens [start, start + n) of one sequence (its first `start` already in the
    pool) as a step's packed row."""
    pos = np.arange(start, start + n, dtype=np.int32)
    slots = (TABLE[pos // BLOCK] * BLOCK + pos % BLOCK).astype(np.int32)
    idx = np.arange(n, dtype=np.int32)
    att = AttentionMetadata(positions=pos[None], block_tables=TABLE[None],
                            context_lens=np.array([start + n], np.int32))
    return StepAttention(positions=pos, slot_mapping=slots, prefill=PrefillMetadata(
        attention=att, query_start_loc=np.array([0, n], np.int32), to_rows=idx[None],
        to_tokens=idx))


def decode_meta(position: int) -> StepAttention:
    pos = np.array([position], np.int32)
    slots = (TABLE[pos // BLOCK] * BLOCK + pos % BLOCK).astype(np.int32)
    return StepAttention(positions=pos, slot_mapping=slots, decode=AttentionMetadata(
        positions=pos[:, None], block_tables=TABLE[None], context_lens=pos + 1))


@functools.partial(jax.jit, static_argnames="config")
def step_logits(params, kv, token_ids, meta, *, config):
    hidden, kv = forward_hidden(params, kv, token_ids, meta, config=config,
                                backend=get_attention_backend("reference"))
    return compute_logits(params, hidden, config), kv


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied_llama3_rope"])
def test_prompt_logits_match_dense(config):
    params = random_params(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, 13).astype(np.int32)
    want = dense_llama_logits(params, tokens, config)
    kv = init_kv_cache(config, 8, BLOCK, jnp.float32)
    got, _ = step_logits(prepare_params(params), kv, tokens, chunk_meta(0, len(tokens)),
                         config=config)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied", "untied_llama3_rope"])
def test_chunks_and_decode_steps_match_dense(config):
    """Two prompt chunks (the second after a cached prefix), then decode steps one token at a
    time: each step's logits are the dense model's at those positions."""
    params = random_params(config, seed=2)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, 12).astype(np.int32)
    want = dense_llama_logits(params, tokens, config)
    run = prepare_params(params)
    kv = init_kv_cache(config, 8, BLOCK, jnp.float32)
    got = []
    for start, end in [(0, 5), (5, 9)]:
        logits, kv = step_logits(run, kv, tokens[start:end], chunk_meta(start, end - start),
                                 config=config)
        got.append(np.asarray(logits))
    for position in range(9, 12):
        logits, kv = step_logits(run, kv, tokens[position:position + 1], decode_meta(position),
                                 config=config)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max())
