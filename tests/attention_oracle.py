"""The attention oracles of the tests: dense float64 NumPy attention (the brute-force truth) and
the plain-reference attention backend (the "reference" backend with its decodes through
`paged_attention_reference` too, the general form every kernel is checked against, instead of
the decode-specialised jnp form the engine runs on CPU)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from jinfer.model.attention import AttentionBackend, AttentionMetadata, get_attention_backend
from pallas_kernels.reference import paged_attention_reference


def dense_attention(q, k, v, positions, scale, *, sliding_window: Optional[int] = None,
                    logit_softcap: Optional[float] = None):
    """q [q_len, heads, dim]; k, v [ctx, kv_heads, dim]; positions [q_len] -> [q_len, heads, dim]
    float64. The query at position p sees key t when t <= p and, with a window, t > p - window;
    logits are soft-capped (cap * tanh(logits / cap)) before the mask."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1).astype(np.float64)
    v = np.repeat(v, group, axis=1).astype(np.float64)
    scores = np.einsum("qhd,thd->hqt", q.astype(np.float64), k) * scale
    if logit_softcap is not None:
        scores = logit_softcap * np.tanh(scores / logit_softcap)
    t = np.arange(k.shape[0])[None, :]
    visible = t <= positions[:, None]  # [q_len, ctx]
    if sliding_window is not None:
        visible &= t > positions[:, None] - sliding_window
    scores = np.where(visible[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqt,thd->qhd", probs, v)


def _decode_oracle(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float, **opts):
    """q [rows, heads, dim] -> [rows, heads, dim]: each row as a one-token query."""
    out = paged_attention_reference(q[:, None], k_pool, v_pool, layer, meta.block_tables,
                                    meta.positions, meta.context_lens, scale=scale, **opts)
    return out[:, 0]


def oracle_backend() -> AttentionBackend:
    """The plain reference everywhere: decodes, prompt chunks, and an XLA scatter for the KV
    write."""
    return get_attention_backend("reference")._replace(decode=_decode_oracle)
