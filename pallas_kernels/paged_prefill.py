"""Ragged paged prefill attention (many sequences' new tokens, packed) as a Pallas kernel.

Triton lowering on NVIDIA GPUs; `interpret=True` runs the same kernel code on the CPU (CI).
Covers prefill, chunked prefill, prefix-cache hits and decode rows in one launch: query i of
sequence s sits at position context_lens[s] - q_len_s + i and attends causally to its
sequence's pool tokens (cached prefix, earlier chunks, and the new tokens, already written).

Design (flash attention over the engine's own pool layout, as paged_decode.py):
- Work is cut into query tiles of `block_q` tokens of ONE sequence. A tile map, computed with
  jnp in the wrapper (no host sync), lists each tile's (sequence, first token); its static
  length cdiv(num_tokens, block_q) + num_seqs bounds the tiles any query_start_loc can need.
  Unused entries are empty tiles that do nothing. The map is a few fused XLA ops per call
  (its search is a compare-and-count: jnp's default binary search, a loop of small kernels,
  cost ~20 us a call on the H100). The tokens past query_start_loc[-1]
  (padding at the end of the packed row) form one more, context-free "sequence" whose tiles
  write exact zeros.
- Grid (tile, kv_head), tile fastest, heaviest tiles first (the map runs backwards, so a
  sequence's last, longest-context tiles start first and the cheap ones fill in the tail);
  consecutive programs share a sequence and KV head, so its pages are hot in L2.
- One program handles its KV head's whole query group: the tile's rows are block_q tokens x
  the group's heads (group padded to a power of two), the M of both dots, so each K/V page
  is read once per KV head and tile. Default: 128 rows, 64 keys per step, 4 warps, 2
  stages (the best of a sweep on the H100 for 32/8 heads, dim 128, bf16; 128 keys with 8
  warps and 3 stages is as fast on one 8,192-token prompt but slower on shorter ones).
- K/V come straight out of the stacked pool [layers, num_blocks, block_size, kv_heads,
  head_dim], viewed (for free) as [layers, num_blocks * block_size, kv_heads, head_dim]: each
  step looks up the pool slot of each of its `block_k` keys through the block table
  (slot = table[key // block_size] * block_size + key % block_size) and gathers [block_k,
  head_dim] rows of one KV head, a 2-D load that feeds the dot directly (no reshape between
  load and dot; rows of head_dim contiguous elements, vectorised). The loop over key steps
  runs from 0 to the causal limit of the tile's last query, in two parts: steps every row of
  the tile sees in full (no mask), then the few steps across the diagonal (masked by key
  position <= query position).
- Tiles start anywhere in the packed rows; a tile that would run past the end of q is
  shifted back to end at the last row (reads stay in bounds, no masked loads), and the store
  is masked to the tile's own rows, so neighbouring tiles never overwrite each other.
- Online softmax in float32, base 2 (the scale is folded with log2(e) and applied inside the
  exponent, one fused multiply-add per logit, as Triton's flash attention does); finite NEG_INF, so
  rows that see nothing stay NaN-free and give exact zeros. The pool must hold finite values
  (stale slots are read and masked, and 0 * inf would be NaN).
- Sliding window (static): a query at position p sees keys p - window < k <= p
  (pallas_kernels/reference.py). The loop starts at the step of the first key the tile's
  first row sees, and runs in three parts: masked steps across the window's lower edge,
  unmasked steps every row sees whole, masked steps across the diagonal. In masked steps the
  keys before the tile's first window read the window's first key instead (then masked):
  blocks wholly before it are never read (the block manager may have freed them: garbage,
  or table entries pointing at the pad block). A row that sees nothing in its first steps
  accumulates finite values that its first visible key's rescale (exp2 of about -1e30)
  zeroes.
- Logit soft-capping (static): cap * tanh(logits * scale / cap) in base 2, before the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_decode import (LOG2E, MIN_DOT_ROWS, NEG_INF, STEP_TILE_BYTES,
                                         _next_pow2, _triton_params, log2_logits)

logger = logging.getLogger(__name__)

TILE_ROWS = 128        # default query rows (tokens x group heads) per program; 256 (64 tokens
                       # x 4 heads) was 30% slower on the H100 sweep (registers)
KEYS_PER_STEP = 64     # default keys per inner iteration (2-byte inputs), with 4 warps: the
                       # H100 sweep's best over 1 x 8192 and 8 x 512 after a 1024 prefix


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Static launch parameters (all Python ints)."""

    block_q: int          # query tokens per tile (power of two)
    block_k: int          # keys per inner step: whole pages (power of two)
    group_rows: int       # query heads per KV head, padded to a power of two
    num_tiles: int        # length of the tile map: cdiv(tokens, block_q) + num_seqs

    @property
    def rows(self) -> int:  # the dots' M
        return self.block_q * self.group_rows


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def make_plan(num_tokens: int, num_seqs: int, group: int, block_size: int, head_dim: int,
              itemsize: int, block_q: int | None, block_k: int | None) -> PrefillPlan:
    """Fixes the tile sizes; explicit block_q / block_k are honoured (validated by the caller).

    Default tile: TILE_ROWS rows, but no more tokens than the (power-of-two rounded) packed
    row holds, and at least MIN_DOT_ROWS rows. Default step: KEYS_PER_STEP keys (fewer for
    4-byte inputs so that K and V tiles of 2 pipeline stages fit in shared memory), at least
    one page.
    """
    group_rows = _next_pow2(group)
    min_block_q = pl.cdiv(MIN_DOT_ROWS, group_rows)
    if block_q is None:
        block_q = max(1, TILE_ROWS // group_rows)
        block_q = max(min(block_q, _next_pow2(num_tokens)), min_block_q)
    if block_k is None:
        block_k = min(KEYS_PER_STEP, STEP_TILE_BYTES // (head_dim * itemsize))
        block_k = max(block_k, block_size, MIN_DOT_ROWS)
    num_tiles = pl.cdiv(max(num_tokens, block_q), block_q) + num_seqs
    return PrefillPlan(block_q=block_q, block_k=block_k, group_rows=group_rows,
                       num_tiles=num_tiles)


def _prefill_kernel(layer_ref, tile_seq_ref, tile_start_ref, bounds_ref, lens_ref, tables_ref,
                    q_ref, k_ref, v_ref, o_ref, *, plan: PrefillPlan, block_size: int,
                    scale: float, precision, sliding_window: int | None,
                    logit_softcap: float | None):
    """One (query tile, KV head) program.

    layer_ref [1]; tile_seq_ref, tile_start_ref [num_tiles]; bounds_ref [seqs + 2] (the
    query_start_loc of the sequences and of the padding tail); lens_ref [seqs + 1];
    tables_ref [seqs + 1, width]; q_ref, o_ref [tokens, kv_heads, group_rows, head_dim];
    k_ref, v_ref: the whole pool as [layers, num_blocks * block_size, kv_heads, head_dim].
    """
    tile, kv_head = pl.program_id(0), pl.program_id(1)
    block_q, block_k, rows = plan.block_q, plan.block_k, plan.rows
    head_dim = q_ref.shape[-1]
    layer = layer_ref[0]
    seq = tile_seq_ref[tile]
    start = tile_start_ref[tile]           # the tile's first own token (packed index)
    end = jnp.minimum(start + block_q, bounds_ref[seq + 1])  # past its last own token
    offset = lens_ref[seq] - bounds_ref[seq + 1]  # position of token t is t + offset
    row0 = jnp.minimum(start, q_ref.shape[0] - block_q)  # first row loaded: stays in bounds

    token = row0 + lax.broadcasted_iota(jnp.int32, (rows,), 0) // plan.group_rows  # [rows]
    row_pos = token + offset
    # Keys 0 .. end - 1 + offset; the first `num_full` steps are seen whole by every own row.
    num_steps = jnp.where(end > start, pl.cdiv(jnp.maximum(end + offset, 0), block_k), 0)
    num_full = jnp.minimum(jnp.maximum(start + offset + 1, 0) // block_k, num_steps)
    q = q_ref[pl.ds(row0, block_q), kv_head].reshape(rows, head_dim)
    key_in_step = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    log2_scale = scale * LOG2E
    # Scaled (base-2) maxima; scale > 0, so max(logits) * c == max(logits * c), and the
    # exponent is one fused multiply-add per logit (soft-capped logits are in base 2 already).
    exponent = (lambda x: x * log2_scale) if logit_softcap is None else (lambda x: x)
    if sliding_window is not None:
        first_key = jnp.maximum(start + offset - sliding_window + 1, 0)  # the first row's
        first_step = first_key // block_k
        # Steps from `first_full` on are inside the window of the tile's last own row too.
        last_row_first_key = jnp.maximum(end - 1 + offset - sliding_window + 1, 0)
        first_full = jnp.clip(pl.cdiv(last_row_first_key, block_k), first_step, num_full)

    def body(i, carry, *, masked: bool):
        acc, row_max, row_sum = carry  # [rows, head_dim], [rows], [rows]
        key = i * block_k + key_in_step  # [block_k] key positions of this step
        read = key if sliding_window is None or not masked else jnp.maximum(key, first_key)
        slots = tables_ref[seq, read // block_size] * block_size + read % block_size
        k = k_ref[layer, slots, kv_head, :]  # [block_k, head_dim]
        v = v_ref[layer, slots, kv_head, :]
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)  # [rows, block_k]
        if logit_softcap is not None:  # base 2 from here: the exponent's scale is 1
            logits = log2_logits(logits, scale, logit_softcap)
        if masked:
            visible = key[None, :] <= row_pos[:, None]
            if sliding_window is not None:
                visible &= key[None, :] > row_pos[:, None] - sliding_window
            logits = jnp.where(visible, logits, NEG_INF)
        new_max = jnp.maximum(row_max, exponent(logits.max(axis=1)))
        rescale = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(exponent(logits) - new_max[:, None])
        row_sum = rescale * row_sum + probs.sum(axis=1)
        pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return rescale[:, None] * acc + pv, new_max, row_sum

    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), NEG_INF, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    masked, unmasked = (functools.partial(body, masked=m) for m in (True, False))
    if sliding_window is None:
        carry = lax.fori_loop(0, num_full, unmasked, carry)
    else:  # across the window's lower edge, then the steps every own row sees whole
        carry = lax.fori_loop(first_step, first_full, masked, carry)
        carry = lax.fori_loop(first_full, num_full, unmasked, carry)
    acc, _, row_sum = lax.fori_loop(num_full, num_steps, masked, carry)
    safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # rows that saw nothing: acc 0 -> out 0
    out = (acc / safe_sum[:, None]).astype(o_ref.dtype).reshape(block_q, plan.group_rows,
                                                                head_dim)
    own = (token >= start) & (token < end)  # [rows]
    own = jnp.broadcast_to(own.reshape(block_q, plan.group_rows, 1), out.shape)
    from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
    plgpu.store(o_ref.at[pl.ds(row0, block_q), kv_head], out, mask=own)


def tile_map(query_start_loc: jax.Array, num_tokens: int, block_q: int, num_tiles: int):
    """(sequence, first token) of every query tile, heaviest first.

    query_start_loc [seqs + 1] -> (tile_seq [num_tiles], tile_start [num_tiles], bounds
    [seqs + 2]). Segment `seqs` (bounds[seqs] .. num_tokens) is the padding tail. Entries
    past the tiles needed are empty tiles (start == their segment's end).
    """
    num_seqs = query_start_loc.shape[0] - 1
    bounds = jnp.concatenate([query_start_loc, jnp.array([num_tokens], jnp.int32)])
    q_lens = jnp.maximum(bounds[1:] - bounds[:-1], 0)  # [seqs + 1]
    ends = jnp.cumsum(pl.cdiv(q_lens, block_q))       # tile ranges per segment
    begins = ends - pl.cdiv(q_lens, block_q)
    index = jnp.arange(num_tiles - 1, -1, -1, dtype=jnp.int32)  # backwards: longest first
    # One fused compare-and-count (the default binary search is a loop of small kernels).
    seq = jnp.searchsorted(ends, index, side="right", method="compare_all")
    seq = jnp.minimum(seq, num_seqs).astype(jnp.int32)
    start = bounds[seq] + (index - begins[seq]) * block_q
    start = jnp.where(index < ends[-1], start, bounds[seq + 1])
    return seq, start.astype(jnp.int32), bounds


def _validate(q, k_pool, v_pool, block_tables, query_start_loc, context_lens,
              block_q, block_k) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
    if k_pool.ndim != 5 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool and v_pool must both be [layers, num_blocks, block_size, kv_heads, "
            f"head_dim]; got {k_pool.shape} and {v_pool.shape}")
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim or num_heads % kv_heads:
        raise ValueError(
            f"q has {num_heads} heads of dim {head_dim} but the pool has {kv_heads} KV heads of "
            f"dim {pool_dim}; head dims must match and num_heads be a multiple of kv_heads")
    if q.dtype != k_pool.dtype or q.dtype != v_pool.dtype:
        raise ValueError(f"q ({q.dtype}) and the pools ({k_pool.dtype}, {v_pool.dtype}) must "
                         "share one dtype; cast q to the pool's dtype")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [num_seqs, max_blocks], got {block_tables.shape}")
    num_seqs = block_tables.shape[0]
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {num_seqs + 1}] (cumulative, "
                         f"starting at 0), got {query_start_loc.shape}")
    if context_lens.shape != (num_seqs,):
        raise ValueError(f"context_lens must be [num_seqs={num_seqs}], got {context_lens.shape}")
    if not _is_pow2(block_size) or not _is_pow2(head_dim) or head_dim < MIN_DOT_ROWS:
        raise ValueError(
            f"the kernel needs a power-of-two block_size and head_dim >= 16, got "
            f"block_size={block_size}, head_dim={head_dim}; use the jnp reference instead")
    group_rows = _next_pow2(num_heads // kv_heads)
    if block_q is not None and (not _is_pow2(block_q) or block_q * group_rows < MIN_DOT_ROWS):
        raise ValueError(f"block_q must be a power of two with block_q x {group_rows} (query "
                         f"heads per KV head, padded) >= {MIN_DOT_ROWS}, got {block_q}")
    if block_k is not None and (not _is_pow2(block_k) or block_k < max(block_size,
                                                                       MIN_DOT_ROWS)):
        raise ValueError(f"block_k must be a power of two >= block_size ({block_size}) and >= "
                         f"{MIN_DOT_ROWS}, got {block_k}")


def ragged_paged_attention_pallas(
    q: jax.Array,                # [num_tokens, num_heads, head_dim], sequences back to back
    k_pool: jax.Array,           # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,           # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                       # int or int32 scalar array: which layer of the pools to read
    block_tables: jax.Array,     # [num_seqs, max_blocks] int32, padding entries a valid block
    query_start_loc: jax.Array,  # [num_seqs + 1] int32: seq s owns q[qsl[s]:qsl[s + 1]]
    context_lens: jax.Array,     # [num_seqs] int32: pool tokens of seq s, incl. its new ones
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:                  # [num_tokens, num_heads, head_dim] in q's dtype
    """Causal grouped-query attention of packed new tokens over their sequences' paged context.

    Query i of sequence s (0 <= i < q_len_s = qsl[s + 1] - qsl[s]) is at position
    context_lens[s] - q_len_s + i and attends to pool tokens 0 .. that position of its
    sequence (token t at k_pool[layer, block_tables[s, t // block_size], t % block_size]).
    query_start_loc starts at 0 and does not decrease; padding sequences have q_len 0 and
    context 0; rows past query_start_loc[-1] give exact zeros. Block-table entries up to a
    tile's causal limit may be read (then masked), so they must be valid block ids (the
    engine pads with block 0). With a sliding window a query at position p sees only keys
    p - sliding_window < k <= p, and entries wholly before its tile's first window are never
    read; logit_softcap soft-caps the logits (module docstring). Accumulates in float32;
    float32 inputs use exact dots.

    block_q (query tokens per tile) / block_k (keys per step, whole pages) override the
    defaults; interpret defaults to True on a CPU backend; num_warps / num_stages tune the
    Triton compile.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _validate(q, k_pool, v_pool, block_tables, query_start_loc, context_lens, block_q, block_k)
    if isinstance(layer, int) and not 0 <= layer < k_pool.shape[0]:
        raise ValueError(f"layer={layer} is out of range for a pool of {k_pool.shape[0]} layers")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (usually head_dim ** -0.5), got {scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_pool.shape[2], k_pool.shape[3]
    plan = make_plan(num_tokens, block_tables.shape[0], num_heads // kv_heads, block_size,
                     head_dim, jnp.dtype(q.dtype).itemsize, block_q, block_k)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return _ragged_prefill(q, k_pool, v_pool, layer, block_tables.astype(jnp.int32),
                           query_start_loc.astype(jnp.int32), context_lens.astype(jnp.int32),
                           scale=float(scale), sliding_window=sliding_window,
                           logit_softcap=logit_softcap, plan=plan, interpret=bool(interpret),
                           num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap", "plan",
                                             "interpret", "num_warps", "num_stages"))
def _ragged_prefill(q, k_pool, v_pool, layer, block_tables, query_start_loc, context_lens, *,
                    scale: float, sliding_window, logit_softcap, plan: PrefillPlan,
                    interpret: bool, num_warps, num_stages):
    """Pads the group / short rows / table, builds the tile map, launches the kernel."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, kv_heads = k_pool.shape[2], k_pool.shape[3]
    group = num_heads // kv_heads
    rows_in = max(num_tokens, plan.block_q)  # a tile never reaches past the rows
    qg = q.reshape(num_tokens, kv_heads, group, head_dim)
    if rows_in > num_tokens or plan.group_rows > group:  # no copy in the usual case
        qg = jnp.pad(qg, ((0, rows_in - num_tokens), (0, 0), (0, plan.group_rows - group),
                          (0, 0)))
    tile_seq, tile_start, bounds = tile_map(query_start_loc, rows_in, plan.block_q,
                                            plan.num_tiles)
    lens = jnp.concatenate([context_lens, jnp.zeros((1,), jnp.int32)])  # padding tail: none
    pages_per_step = plan.block_k // block_size
    width = pl.cdiv(block_tables.shape[1], pages_per_step) * pages_per_step
    tables = jnp.pad(block_tables, ((0, 1), (0, width - block_tables.shape[1])))  # pad: block 0

    whole = lambda arr: pl.BlockSpec(arr.shape, lambda t, h: (0,) * arr.ndim)  # noqa: E731
    out_shape = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # f32: no TF32
    kernel = functools.partial(_prefill_kernel, plan=plan, block_size=block_size, scale=scale,
                               precision=precision, sliding_window=sliding_window,
                               logit_softcap=logit_softcap)
    if num_warps is None:  # 4 warps (one warpgroup) beat 8 for 128 x 128 tiles on the H100
        num_warps = 8 if plan.rows * head_dim > 128 * 128 else 4
    slots = lambda pool: pool.reshape(pool.shape[0], -1, *pool.shape[3:])  # noqa: E731 (free)
    operands = (layer, tile_seq, tile_start, bounds, lens, tables, qg, slots(k_pool),
                slots(v_pool))
    out = pl.pallas_call(
        kernel, grid=(plan.num_tiles, kv_heads), in_specs=[whole(a) for a in operands],
        out_specs=whole(out_shape), out_shape=out_shape, interpret=interpret,
        compiler_params=_triton_params(num_warps, num_stages, head_dim, plan.block_k),
        name=f"ragged_prefill_bq{plan.block_q}_g{plan.group_rows}_bk{plan.block_k}",
    )(*operands)
    return out[:num_tokens, :, :group].reshape(num_tokens, num_heads, head_dim)
