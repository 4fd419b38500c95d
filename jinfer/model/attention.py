"""Attention metadata of a step and the backends that attention kernels plug into.

A step's tokens sit back to back in one packed row: first one token per decoding sequence (a
bucketed number of rows), then every prompt chunk (prefill) of the step, then padding. The
matmuls run over the whole row at once; attention runs per group, decodes and prompt chunks,
each through its backend function, inside the same jitted call. The metadata is an explicit
argument of the model's forward (never hidden global state).

A backend is three functions over layer `layer` of the stacked pool (passing the whole pool,
not a slice of it, keeps the pool's update in place), and optionally a fourth:
  write_kv(k_pool, v_pool, layer, slots [T], k [T, kv_heads, dim], v) -> (k_pool, v_pool)
  decode(q [rows, heads, dim], k_pool, v_pool, layer, meta: AttentionMetadata, scale, *,
         sliding_window, logit_softcap)
  prefill(q [tokens, heads, dim], k_pool, v_pool, layer, meta: PrefillMetadata, scale, *,
          sliding_window, logit_softcap)
  fused_decode(qkv [rows, ...], cos, sin, k_pool, v_pool, layer, slots, meta, num_heads,
               scale, *, sliding_window, logit_softcap[, qk_norm, qk_norm_eps, partials])
               -> (out [rows, heads * dim], k_pool, v_pool): RoPE, KV write and decode
               attention of the decode rows in one kernel (a batch-1 step is bound by kernel
               count, not bytes); qkv may also be float32 partial sums [parts, rows, ...] of
               the row, which the kernel adds up, and partials=True returns the output as
               its context splits' softmax states (see fused_decode_attention_pallas)

The keyword options are a layer's static attention variants, None for off (and then the
program is the one without them): `sliding_window` (int: a query at position p sees the keys
at positions p - window < k <= p, Hugging Face's and vLLM's convention) and `logit_softcap`
(float: Gemma 2's cap * tanh(logits / cap) on the scaled logits, before the mask); the exact
conventions are in pallas_kernels/reference.py. Every backend here implements both. The
persistent layer kernel (jinfer/model/layer_kernel.py) calls `attend` and `fused_decode`
without them, so windowed or soft-capped layers must not be routed there.

Backends (`get_attention_backend`): "reference" (jnp, with an XLA scatter for the KV write; the
decode-specialised form for decodes, which is several times faster on XLA CPU; the default on
CPU), "pallas" (the Pallas kernels: fused decode, KV write and ragged paged prefill; the default
on GPU) and "triton" (the Triton-language decode kernel through jax-triton, with the Pallas
KV-write and prefill kernels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jinfer.config import KernelConfig
from pallas_kernels import paged_prefill_mgpu
from pallas_kernels.fused_decode import fused_decode_attention_pallas, triton_supports
from pallas_kernels.kv_write import write_kv_pallas
from pallas_kernels.paged_decode import paged_decode_attention_pallas
from pallas_kernels.paged_prefill import ragged_paged_attention_pallas
from pallas_kernels.reference import (apply_rope, paged_attention_reference,
                                      paged_decode_attention, rms_norm)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """A group of sequences in the padded per-sequence layout [rows, q_len]."""

    positions: jax.Array     # [rows, q_len] int32, absolute position of each query token
    block_tables: jax.Array  # [rows, max_blocks] int32, padding entries are block 0
    context_lens: jax.Array  # [rows] int32, tokens in the pool after this step's writes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillMetadata:
    """The step's prompt chunks: packed tokens [num_tokens] and, for the jnp reference, the
    padded per-sequence layout [rows, q_len] with the maps between the two.

    Padding rows have q_len 0 and context 0; padding tokens (past the last real one) point at
    the last real token's query slot.
    """

    attention: AttentionMetadata  # [rows, q_len] layout
    query_start_loc: jax.Array    # [rows + 1] int32, row s owns packed tokens [qsl[s], qsl[s+1])
    to_rows: jax.Array            # [rows, q_len] int32, packed index of each query slot
    to_tokens: jax.Array          # [num_tokens] int32, flat query slot (row * q_len + i) per token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepAttention:
    """Everything attention and the KV write need for one step's packed row of T tokens."""

    positions: jax.Array     # [T] int32, absolute position of each token (RoPE)
    slot_mapping: jax.Array  # [T] int32, pool slot (block * block_size + offset) of each token
    decode: Optional[AttentionMetadata] = None  # [rows, 1]: tokens [0, rows) of the row
    prefill: Optional[PrefillMetadata] = None   # the tokens after the decode rows

    @property
    def num_decode_tokens(self) -> int:
        return 0 if self.decode is None else self.decode.context_lens.shape[0]


class AttentionBackend(NamedTuple):
    decode: Callable[..., jax.Array]
    prefill: Callable[..., jax.Array]
    write_kv: Callable[..., tuple[jax.Array, jax.Array]]
    # RoPE + KV write + decode attention in one kernel, from the QKV row (None: unfused), and
    # whether it takes a pool of this (block_size, head_dim) (else the unfused path runs).
    fused_decode: Optional[Callable[..., tuple[jax.Array, jax.Array, jax.Array]]] = None
    fused_supports: Callable[[int, int], bool] = lambda block_size, head_dim: True


def attend(backend: AttentionBackend, qkv, cos, sin, k_pool, v_pool, layer,
           meta: StepAttention, *, num_heads: int, scale: float,
           sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None,
           qk_norm: Optional[tuple[jax.Array, jax.Array, float]] = None):
    """The attention sublayer after the QKV projection, over the step's packed row.

    qkv [T, (num_heads + 2 * kv_heads) * head_dim]; cos, sin [T, 1, head_dim // 2] (RoPE at each
    token's position) -> (output [T, num_heads * head_dim], k_pool, v_pool): RoPE on q and k,
    the tokens' K/V written into the pool, attention of the decode rows and of the prompt
    chunks, each by its backend function. With a fused decode function the decode rows go
    through it whole (RoPE, write and attention in one kernel). sliding_window and
    logit_softcap (static, None: off) go to every attention function (module docstring).
    qk_norm (q_norm, k_norm [head_dim], eps): each query and key head RMS-normed before RoPE
    (Qwen3): by the fused decode kernel for its rows, in XLA for the rest.
    """
    opts = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    kv_heads, head_dim = k_pool.shape[3:]
    rows = meta.num_decode_tokens
    outputs = []
    first = 0  # first token of the unfused part
    if rows and backend.fused_decode is not None and backend.fused_supports(k_pool.shape[2],
                                                                            head_dim):
        norm_opts = {} if qk_norm is None else dict(qk_norm=qk_norm[:2], qk_norm_eps=qk_norm[2])
        out, k_pool, v_pool = backend.fused_decode(
            qkv[:rows], cos[:rows, 0], sin[:rows, 0], k_pool, v_pool, layer,
            meta.slot_mapping[:rows], meta.decode, num_heads, scale, **opts, **norm_opts)
        outputs.append(out)
        first = rows
    if first < qkv.shape[0]:
        tokens = qkv.shape[0] - first
        q, k, v = jnp.split(qkv[first:].reshape(tokens, num_heads + 2 * kv_heads, head_dim),
                            [num_heads, num_heads + kv_heads], axis=1)
        if qk_norm is not None:
            q, k = rms_norm(q, qk_norm[0], qk_norm[2]), rms_norm(k, qk_norm[1], qk_norm[2])
        q = apply_rope(q, cos[first:], sin[first:])
        k = apply_rope(k, cos[first:], sin[first:])
        k_pool, v_pool = backend.write_kv(k_pool, v_pool, layer, meta.slot_mapping[first:], k, v)
        if first < rows:
            outputs.append(backend.decode(q[:rows], k_pool, v_pool, layer, meta.decode, scale,
                                          **opts))
        if meta.prefill is not None:
            outputs.append(backend.prefill(q[rows - first:], k_pool, v_pool, layer,
                                           meta.prefill, scale, **opts))
    out = outputs[0] if len(outputs) == 1 else jnp.concatenate(
        [o.reshape(o.shape[0], -1) for o in outputs], axis=0)
    return out.reshape(qkv.shape[0], num_heads * head_dim), k_pool, v_pool


def _decode_reference(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float,
                      **opts):
    out = paged_decode_attention(q[:, None], k_pool, v_pool, layer, meta.block_tables,
                                 meta.positions, meta.context_lens, scale=scale, **opts)
    return out[:, 0]


def _decode_pallas(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float, **opts):
    return paged_decode_attention_pallas(q, k_pool, v_pool, layer, meta.block_tables,
                                         meta.context_lens, scale=scale, **opts)


def _decode_triton(q, k_pool, v_pool, layer, meta: AttentionMetadata, scale: float, **opts):
    from pallas_kernels.triton_decode import paged_decode_attention_triton  # optional extra
    return paged_decode_attention_triton(q, k_pool, v_pool, layer, meta.block_tables,
                                         meta.context_lens, scale=scale, **opts)


def _fused_decode_pallas(qkv, cos, sin, k_pool, v_pool, layer, slots,
                         meta: AttentionMetadata, num_heads: int, scale: float,
                         partials: bool = False, **opts):
    return fused_decode_attention_pallas(qkv, cos, sin, k_pool, v_pool, layer, slots,
                                         meta.block_tables, meta.context_lens,
                                         num_heads=num_heads, scale=scale, partials=partials,
                                         **opts)


def _fused_decode_supported(block_size: int, head_dim: int) -> bool:
    """The fused kernel where its Triton lowering takes the pool (always in interpret mode)."""
    return jax.default_backend() == "cpu" or triton_supports(block_size, head_dim)


def _write_kv_xla(k_pool, v_pool, layer: int, slots, k, v):
    """The new tokens' K/V rows into their slots: XLA scatters, in place under the step's
    donation. Indexes (layer, block, offset) directly: a reshape of the pool here would make
    XLA copy the whole pool at every layer."""
    block_size = k_pool.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    return (k_pool.at[layer, blocks, offsets].set(k.astype(k_pool.dtype)),
            v_pool.at[layer, blocks, offsets].set(v.astype(v_pool.dtype)))


def _prefill_reference(q, k_pool, v_pool, layer, meta: PrefillMetadata, scale: float, **opts):
    """Unpacks to [rows, q_len], runs the plain reference, packs the result again."""
    heads, dim = q.shape[1:]
    att = meta.attention
    out = paged_attention_reference(q[meta.to_rows], k_pool, v_pool, layer, att.block_tables,
                                    att.positions, att.context_lens, scale=scale, **opts)
    return out.reshape(-1, heads, dim)[meta.to_tokens]


def _prefill_pallas(q, k_pool, v_pool, layer, meta: PrefillMetadata, scale: float, *,
                    mosaic_min_tokens: int, **opts):
    """The Mosaic GPU kernel (wgmma, TMA) on a Hopper GPU for steps of at least
    `mosaic_min_tokens` prompt tokens (KernelConfig.mosaic_prefill_min_tokens) where it takes
    the shapes; the Triton-lowered kernel otherwise (shorter steps, other GPUs, interpret mode
    on the CPU)."""
    att = meta.attention
    args = (q, k_pool, v_pool, layer, att.block_tables, meta.query_start_loc, att.context_lens)
    if (q.shape[0] >= mosaic_min_tokens and paged_prefill_mgpu.hopper_gpu()
            and paged_prefill_mgpu.supports(q, k_pool)):
        return paged_prefill_mgpu.ragged_paged_attention_mgpu(*args, scale=scale, **opts)
    return ragged_paged_attention_pallas(*args, scale=scale, **opts)


BACKENDS = ("pallas", "reference", "triton")


def default_attention_backend() -> str:
    """The Pallas kernels on GPU; the jnp reference on CPU, where it is faster than the kernels'
    interpret mode."""
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def get_attention_backend(name: str, kernels: KernelConfig = KernelConfig()) -> AttentionBackend:
    """The backend called `name` (one of BACKENDS), with the kernel choices of `kernels`."""
    if name not in BACKENDS:
        raise ValueError(
            f"attention_backend={name!r} is not available; choose one of {', '.join(BACKENDS)}")
    if name == "reference":
        return AttentionBackend(_decode_reference, _prefill_reference, _write_kv_xla)
    prefill = functools.partial(_prefill_pallas,
                                mosaic_min_tokens=kernels.mosaic_prefill_min_tokens)
    if name == "pallas":
        return AttentionBackend(_decode_pallas, prefill, write_kv_pallas, _fused_decode_pallas,
                                _fused_decode_supported)
    from pallas_kernels.triton_decode import _kernels  # raises with the install command
    _kernels()
    return AttentionBackend(_decode_triton, prefill, write_kv_pallas)
