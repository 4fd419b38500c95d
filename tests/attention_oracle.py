"""The plain-reference attention backend, for tests: the "reference" backend with its decodes
through `paged_attention_reference` too (the general form every kernel is checked against)
instead of the decode-specialised jnp form the engine runs on CPU."""

from __future__ import annotations

from jinfer.model.attention import AttentionBackend, AttentionMetadata, get_attention_backend
from pallas_kernels.reference import paged_attention_reference


def _decode_oracle(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float):
    """q [rows, heads, dim] -> [rows, heads, dim]: each row as a one-token query."""
    out = paged_attention_reference(q[:, None], k_pool, v_pool, layer, meta.block_tables,
                                    meta.positions, meta.context_lens, scale=scale)
    return out[:, 0]


def oracle_backend() -> AttentionBackend:
    """The plain reference everywhere: decodes, prompt chunks, and an XLA scatter for the KV
    write."""
    return get_attention_backend("reference")._replace(decode=_decode_oracle)
