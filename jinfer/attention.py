"""Attention metadata and the backend interface that attention kernels plug into.

The metadata is an explicit argument of the model's forward (never hidden global state). A backend
is a function `(q, k_pool, v_pool, layer, metadata, scale) -> out`; it reads layer `layer` of
the stacked pool (passing the whole pool, not a slice of it, keeps the pool's update in place).

Backends: "reference" (jnp; decode steps use the decode-specialised form, which is several times
faster on XLA CPU) and "oracle" (the plain reference for every step, for checking).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from pallas_kernels.paged_decode import paged_decode_attention_pallas
from pallas_kernels.reference import paged_attention_reference, paged_decode_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each query token sits and which blocks each sequence reads."""

    positions: jax.Array     # [batch, q_len] int32, absolute position of each query token
    slot_mapping: jax.Array  # [batch, q_len] int32, pool slot (block * block_size + offset)
    block_tables: jax.Array  # [batch, max_blocks] int32, padding entries are block 0
    context_lens: jax.Array  # [batch] int32, tokens in the pool after this step's writes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedTokens:
    """Maps a packed prefill (every sequence's new tokens back to back in one row, so the
    matmuls do no padding work) to the attention's per-sequence layout [seqs, q_len] and back.

    Padding tokens (past the last real one) sit at the last position of the last sequence and
    write their K/V to the pad block.
    """

    positions: jax.Array     # [1, num_tokens] int32, absolute position of each packed token
    slot_mapping: jax.Array  # [1, num_tokens] int32, pool slot of each packed token
    to_rows: jax.Array       # [seqs, q_len] int32, packed index of each attention query slot
    to_tokens: jax.Array     # [num_tokens] int32, flat attention slot (seq * q_len + i) per token


AttentionFn = Callable[..., jax.Array]


def _oracle(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float) -> jax.Array:
    """The plain reference for every step shape (slow on CPU for decode; for checking)."""
    return paged_attention_reference(
        q, k_pool, v_pool, layer, meta.block_tables, meta.positions, meta.context_lens, scale=scale)


def _reference(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float) -> jax.Array:
    """jnp attention: the decode-specialised form for q_len == 1 (decided at trace time), the
    plain reference otherwise. Both are checked against dense attention in test_attention.py."""
    if q.shape[1] == 1:
        return paged_decode_attention(q, k_pool, v_pool, layer, meta.block_tables,
                                      meta.positions, meta.context_lens, scale=scale)
    return _oracle(q, k_pool, v_pool, layer, meta, scale)


def _pallas(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float) -> jax.Array:
    """The Pallas kernels: paged decode (Triton on GPU, interpret mode on CPU); prompt chunks
    use the plain reference until the ragged prefill kernel lands."""
    if q.shape[1] != 1:
        return _oracle(q, k_pool, v_pool, layer, meta, scale)
    out = paged_decode_attention_pallas(q[:, 0], k_pool, v_pool, layer, meta.block_tables,
                                        meta.context_lens, scale=scale)
    return out[:, None]


_BACKENDS: dict[str, AttentionFn] = {"reference": _reference, "oracle": _oracle,
                                     "pallas": _pallas}


def default_attention_backend() -> str:
    """The Pallas kernels on GPU; the jnp reference on CPU, where it is faster than the kernels'
    interpret mode."""
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def get_attention_backend(name: str) -> AttentionFn:
    if name not in _BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is not available; choose one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]
