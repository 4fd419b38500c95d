"""Paged decode attention (one query token per sequence) as a Pallas kernel.

Triton lowering on NVIDIA GPUs; `interpret=True` runs the same kernel code on the CPU (CI).

Design (flash-decoding over the engine's own pool layout):
- Grid (batch, kv_head, split). One program owns one KV head of one sequence and one contiguous
  range of its pages, and handles that KV head's whole group of query heads at once, so each
  K/V page is read from HBM once per KV head, not once per query head.
- K/V are read straight out of the stacked pool [layers, num_blocks, block_size, kv_heads,
  head_dim] (the whole pool goes in, the layer index is a kernel input, nothing is sliced or
  transposed outside the kernel). Each step covers `pages_per_compute_block` pages: every token
  of the step looks up its block in the table, and K/V load as one [tokens, head_dim] gather of
  one KV head (row stride kv_heads * head_dim, vectorised along head_dim). Gathering whole pages
  as [pages, block_size, head_dim] and reshaping cost the Triton lowering a layout conversion
  per tile: 1.56x vs 1.24x JAX's kernel on the H100 (BENCHMARKS.md).
- The query group is padded to at least 16 rows (Triton's smallest dot tile) inside the kernel:
  the rows past the group are masked off in the query load and the output stores, so they cost
  registers, not HBM traffic (no padded copy of q, no padded partials for the combine).
- Online softmax in float32 (base 2: the scale is folded with log2(e)). Each split writes its
  partial (unnormalised out, running max, running sum); a cheap jnp combine merges the splits.
  With one split the kernel normalises and writes the output itself.
- Sequences with context_len 0 (padding rows of a batch) give exact zeros.
- Sliding window (static; the query is the last token, at position context_len - 1): tokens
  t >= context_len - window are attended (pallas_kernels/reference.py states the convention).
  The splits cut the pages from the window's first one on, not the whole table, so a 32k
  context under a 4k window reads about 4k tokens; the pages before it are never read (the
  block manager may have freed them: garbage, or table entries pointing at the pad block).
  The tokens before the window in its first page are masked.
- Logit soft-capping (static): cap * tanh(logits * scale / cap), folded with log2(e).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

logger = logging.getLogger(__name__)

DEFAULT_NUM_SMS = 132          # H100 SXM; used when the device does not report its SM count
MIN_DOT_ROWS = 16              # Triton's smallest tile side for tl.dot
TOKENS_PER_STEP = 64           # default tokens gathered per inner iteration: 64 x 4 warps beat
                               # 128 on the H100 sweep (BENCHMARKS.md), 2-byte inputs
STEP_TILE_BYTES = 128 * 128 * 2  # K (or V) tile bytes per step: 2 of them x 2 pipeline stages
                                 # must fit in shared memory (227 KB on H100)
LATENCY_TOKENS_PER_STEP = 128  # ... when the launch is one under-filled wave (batch 1 and 2):
                               # each program's loop is latency-bound, fewer longer steps win
                               # (fused decode, Llama-3.2-1B heads, 257-2048 tokens: 0.6-1.2 us
                               # less per call than 64; scripts/bench_decode_steps.py)
MIN_TOKENS_PER_SPLIT = 128     # below this a split is all overhead
NEG_INF = -1e30                # finite "minus infinity": keeps empty splits NaN-free
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """Static launch parameters (all Python ints): how the context is cut into work."""

    num_splits: int               # programs per (sequence, KV head)
    pages_per_split: int          # table entries each split owns (multiple of the step)
    pages_per_compute_block: int  # pages gathered per inner iteration (power of two)
    block_h: int                  # query-group rows per program (group padded, power of 2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _num_sms() -> int:
    """SM count of the default GPU, or the H100's when unknown (CPU, interpret mode)."""
    device = jax.local_devices()[0]
    count = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return int(count) if count else DEFAULT_NUM_SMS


def choose_num_splits(batch: int, kv_heads: int, max_context: int,
                      num_sms: int = DEFAULT_NUM_SMS) -> int:
    """How many splits of the context fill the GPU: about two programs per SM, and a split per
    4,096 tokens for long contexts (up to 4; faster on the H100 sweep even when the batch alone
    fills the GPU), but no split shorter than MIN_TOKENS_PER_SPLIT tokens of the table's
    capacity `max_context`."""
    programs = max(1, batch * kv_heads)
    want = max(pl.cdiv(2 * num_sms, programs), min(4, max_context // 4096))
    cap = max(1, max_context // MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, cap))


def window_pages(block_size: int, max_blocks: int, sliding_window: int | None) -> int:
    """Table entries a decode reads: the whole table, or the most pages a window of
    `sliding_window` tokens can straddle."""
    if sliding_window is None:
        return max_blocks
    return min(max_blocks, (sliding_window - 1) // block_size + 2)


def attended(tokens, end, context_len, sliding_window: int | None):
    """[n] bool: which of the token positions `tokens` [n] before `end` the query at position
    context_len - 1 sees."""
    valid = tokens < end
    if sliding_window is not None:
        valid &= tokens >= context_len - sliding_window
    return valid


def log2_logits(logits, scale: float, logit_softcap: float | None):
    """q.k dot products -> the scaled (and soft-capped) logits in base 2, for exp2."""
    if logit_softcap is None:
        return logits * (scale * LOG2E)
    return jnp.tanh(logits * (scale / logit_softcap)) * (logit_softcap * LOG2E)


def padded_table_width(plan: DecodePlan, max_blocks: int, sliding_window: int | None) -> int:
    """Entries the table is padded to (with the pad block) so that no step of any split reads
    past it: the splits' pages, or with a window (the splits start at its first page) the
    table and one more step."""
    width = plan.num_splits * plan.pages_per_split
    if sliding_window is None:
        return width
    return max(width, max_blocks + plan.pages_per_compute_block)


def make_plan(batch: int, kv_heads: int, group: int, block_size: int, max_blocks: int,
              num_splits: int | None, pages_per_compute_block: int | None,
              head_dim: int = 128, itemsize: int = 2) -> DecodePlan:
    """Fixes the split and step sizes. An explicit num_splits is honoured as given (splits past
    the table are empty); the automatic one is trimmed so that no split is empty. Steps of
    TOKENS_PER_STEP tokens, or LATENCY_TOKENS_PER_STEP where all programs fit in one wave."""
    auto = num_splits is None
    num_sms = _num_sms()
    if auto:
        num_splits = choose_num_splits(batch, kv_heads, max_blocks * block_size, num_sms)
    min_pages = pl.cdiv(MIN_DOT_ROWS, block_size)
    if pages_per_compute_block is None:
        one_wave = batch * kv_heads * num_splits <= num_sms
        tokens = min(LATENCY_TOKENS_PER_STEP if one_wave else TOKENS_PER_STEP,
                     STEP_TILE_BYTES // (head_dim * itemsize))
        step = max(1, tokens // block_size)
        step = min(step, _next_pow2(pl.cdiv(max_blocks, num_splits)))
        pages_per_compute_block = max(step, _next_pow2(min_pages))
    pages_per_split = pl.cdiv(pl.cdiv(max_blocks, num_splits), pages_per_compute_block)
    pages_per_split *= pages_per_compute_block
    if auto:
        num_splits = pl.cdiv(max_blocks, pages_per_split)
    return DecodePlan(num_splits=num_splits, pages_per_split=pages_per_split,
                      pages_per_compute_block=pages_per_compute_block,
                      block_h=max(MIN_DOT_ROWS, _next_pow2(group)))


def _decode_kernel(layer_ref, lens_ref, tables_ref, q_ref, k_ref, v_ref, *out_refs,
                   plan: DecodePlan, block_size: int, group: int, scale: float, precision,
                   sliding_window: int | None, logit_softcap: float | None):
    """One (sequence, KV head, split) program.

    layer_ref [1] int32; lens_ref [batch] int32; tables_ref [padded_blocks] int32 (this
    sequence's row); q_ref [block_h, head_dim] over the group's `group` <= block_h query
    heads (the rows past them are outside the array: masked off in the load and the stores);
    k_ref, v_ref: the whole pool.
    out_refs: (out [block_h, head_dim],) when unsplit, else (out f32, max [block_h], sum
    [block_h]) partials of this split, each over `group` real rows.
    """
    from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    context_len = lens_ref[seq]
    step = plan.pages_per_compute_block
    block_k = step * block_size
    block_h, head_dim = q_ref.shape
    live = lax.broadcasted_iota(jnp.int32, (block_h,), 0) < group  # the real query heads
    live2d = jnp.broadcast_to(live[:, None], (block_h, head_dim))

    first_page = split * plan.pages_per_split
    if sliding_window is not None:  # the splits start at the window's first page
        first_page += jnp.maximum(context_len - sliding_window, 0) // block_size
    last_page = jnp.minimum(pl.cdiv(context_len, block_size), first_page + plan.pages_per_split)
    num_steps = pl.cdiv(jnp.maximum(last_page - first_page, 0), step)
    q = plgpu.load(q_ref, mask=live2d, other=0)  # [block_h, head_dim], 0 past the group
    token_in_step = jnp.arange(block_k, dtype=jnp.int32)  # [block_k]

    page_of_token, slot_of_token = token_in_step // block_size, token_in_step % block_size

    def body(i, carry):
        acc, row_max, row_sum = carry  # [block_h, head_dim], [block_h], [block_h]
        page0 = first_page + i * step
        # Each token's physical block, then a [block_k, head_dim] gather of its rows: indexing
        # token by token gives the tile's 2-D pointer layout directly (a [step, block_size,
        # head_dim] gather reshaped to 2-D costs the Triton lowering a layout conversion).
        blocks = tables_ref[page0 + page_of_token]  # [block_k]
        k = k_ref[layer, blocks, slot_of_token, kv_head, :]  # [block_k, head_dim]
        v = v_ref[layer, blocks, slot_of_token, kv_head, :]
        logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)  # [block_h, block_k]
        logits = log2_logits(logits, scale, logit_softcap)
        valid = attended(page0 * block_size + token_in_step, context_len, context_len,
                         sliding_window)
        logits = jnp.where(valid[None, :], logits, NEG_INF)
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        rescale = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(logits - new_max[:, None])  # masked tokens: exactly 0
        row_sum = rescale * row_sum + probs.sum(axis=1)
        pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return rescale[:, None] * acc + pv, new_max, row_sum

    init = (jnp.zeros((block_h, head_dim), jnp.float32),
            jnp.full((block_h,), NEG_INF, jnp.float32),
            jnp.zeros((block_h,), jnp.float32))
    acc, row_max, row_sum = lax.fori_loop(0, num_steps, body, init)

    if plan.num_splits == 1:
        (o_ref,) = out_refs
        safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # empty context: acc is 0 -> out 0
        plgpu.store(o_ref, (acc / safe_sum[:, None]).astype(o_ref.dtype), mask=live2d)
    else:
        o_ref, max_ref, sum_ref = out_refs
        plgpu.store(o_ref, acc, mask=live2d)
        plgpu.store(max_ref, row_max, mask=live)
        plgpu.store(sum_ref, row_sum, mask=live)


def merge_splits(acc, row_max, row_sum, axis: int):
    """Merges the context splits' softmax states along `axis`: acc, and row_max (base-2
    maxima) / row_sum broadcastable to it -> float32 output (rows with no context: 0)."""
    global_max = row_max.max(axis=axis, keepdims=True)
    weight = jnp.exp2(row_max - global_max)  # empty splits: 0 (or 1 with sum 0, acc 0)
    total = (row_sum * weight).sum(axis=axis)
    return (acc * weight).sum(axis=axis) / jnp.where(total > 0, total, 1.0)


def _combine(acc, row_max, row_sum):
    """Merges split partials: acc [b, kvh, splits, block_h, d], row_max/row_sum [b, kvh,
    splits, block_h] (base-2 maxima) -> [b, kvh, block_h, d] float32."""
    return merge_splits(acc, row_max[..., None], row_sum[..., None], axis=2)


def _validate(q, k_pool, v_pool, block_tables, context_lens, interpret: bool) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got shape {q.shape}; "
                         "squeeze the q_len axis of decode queries first")
    if k_pool.ndim != 5 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool and v_pool must both be [layers, num_blocks, block_size, kv_heads, "
            f"head_dim]; got {k_pool.shape} and {v_pool.shape}")
    batch, num_heads, head_dim = q.shape
    _, _, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim or num_heads % kv_heads:
        raise ValueError(
            f"q has {num_heads} heads of dim {head_dim} but the pool has {kv_heads} KV heads of "
            f"dim {pool_dim}; head dims must match and num_heads be a multiple of kv_heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks], "
                         f"got {block_tables.shape}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [batch={batch}], got {context_lens.shape}")
    if not interpret and (block_size & (block_size - 1) or head_dim & (head_dim - 1)
                          or head_dim < MIN_DOT_ROWS):
        raise ValueError(
            f"the Triton kernel needs power-of-two block_size and head_dim >= 16, got "
            f"block_size={block_size}, head_dim={head_dim}; use the jnp reference instead")


def paged_decode_attention_pallas(
    q: jax.Array,             # [batch, num_heads, head_dim]
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                    # int or int32 scalar array: which layer of the pools to read
    block_tables: jax.Array,  # [batch, max_blocks] int32, padding entries a valid block (0)
    context_lens: jax.Array,  # [batch] int32, tokens in the pool per sequence (0: padding row)
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    num_splits: int | None = None,
    pages_per_compute_block: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:               # [batch, num_heads, head_dim] in q's dtype
    """Grouped-query decode attention of one new token per sequence over its paged context.

    Token t of sequence b lives at k_pool[layer, block_tables[b, t // block_size],
    t % block_size]; tokens t < context_lens[b] are attended (with a sliding window, only
    t >= context_lens[b] - sliding_window; logits soft-capped by logit_softcap: module
    docstring). Rows with context_len 0 give zeros. Block-table entries past a sequence's
    context may be read (then masked out), so they must be valid block ids (the engine pads
    with block 0); entries wholly before the window are never read. Accumulates in float32.

    num_splits / pages_per_compute_block override the automatic launch plan; interpret
    defaults to True on a CPU backend; num_warps / num_stages tune the Triton compile.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _validate(q, k_pool, v_pool, block_tables, context_lens, interpret)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None (automatic), got {num_splits}")
    if pages_per_compute_block is not None and (
            pages_per_compute_block < 1 or pages_per_compute_block & (pages_per_compute_block - 1)):
        raise ValueError("pages_per_compute_block must be a power of two or None, "
                         f"got {pages_per_compute_block}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    batch, num_heads, _ = q.shape
    kv_heads, block_size = k_pool.shape[3], k_pool.shape[2]
    plan = make_plan(batch, kv_heads, num_heads // kv_heads, block_size,
                     window_pages(block_size, block_tables.shape[1], sliding_window),
                     num_splits, pages_per_compute_block, head_dim=q.shape[-1],
                     itemsize=jnp.dtype(k_pool.dtype).itemsize)
    if isinstance(layer, int) and not 0 <= layer < k_pool.shape[0]:
        raise ValueError(f"layer={layer} is out of range for a pool of {k_pool.shape[0]} layers")
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return _paged_decode(q, k_pool, v_pool, layer, block_tables.astype(jnp.int32),
                         context_lens.astype(jnp.int32), scale=float(scale),
                         sliding_window=sliding_window, logit_softcap=logit_softcap, plan=plan,
                         interpret=bool(interpret), num_warps=num_warps, num_stages=num_stages)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap", "plan",
                                             "interpret", "num_warps", "num_stages"))
def _paged_decode(q, k_pool, v_pool, layer, block_tables, context_lens, *, scale: float,
                  sliding_window, logit_softcap, plan: DecodePlan, interpret: bool, num_warps,
                  num_stages):
    """Pads the table, launches the kernel, combines the splits."""
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_pool.shape[3], k_pool.shape[2]
    group = num_heads // kv_heads
    splits, block_h = plan.num_splits, plan.block_h
    qg = q.reshape(batch, kv_heads, group, head_dim)  # block_h rows per block: masked past group
    width = padded_table_width(plan, block_tables.shape[1], sliding_window)
    assert width >= block_tables.shape[1]  # the splits cover the whole table (or window)
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))  # pad: block 0
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda b, h, s: (0,) * arr.ndim)  # noqa: E731
    in_specs = [
        whole(layer), whole(context_lens),
        pl.BlockSpec((None, width), lambda b, h, s: (b, 0)),
        pl.BlockSpec((None, None, block_h, head_dim), lambda b, h, s: (b, h, 0, 0)),
        whole(k_pool), whole(v_pool),
    ]
    if splits == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), q.dtype)]
        out_specs = [pl.BlockSpec((None, None, block_h, head_dim), lambda b, h, s: (b, h, 0, 0))]
    else:
        part = (batch, kv_heads, splits, group)
        out_shape = [jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs = [
            pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0))]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None  # f32: no TF32
    kernel = functools.partial(_decode_kernel, plan=plan, block_size=block_size, group=group,
                               scale=scale, precision=precision, sliding_window=sliding_window,
                               logit_softcap=logit_softcap)
    outs = pl.pallas_call(
        kernel, grid=(batch, kv_heads, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=interpret, compiler_params=_triton_params(
            num_warps, num_stages, head_dim, block_size * plan.pages_per_compute_block),
        name=f"paged_decode_bh{block_h}_pp{plan.pages_per_compute_block}_s{splits}",
    )(layer, context_lens, tables, qg, k_pool, v_pool)
    out = outs[0] if splits == 1 else _combine(*outs)  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def _triton_params(num_warps, num_stages, head_dim: int, block_k: int):
    """Triton compiler parameters (this also selects the Triton lowering over Mosaic GPU).
    Defaults: 4 warps for tiles up to 128 x 128, 8 above; 2 pipeline stages."""
    from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    if num_warps is None:
        num_warps = 4 if head_dim * block_k <= 128 * 128 else 8
    return params_cls(num_warps=num_warps, num_stages=2 if num_stages is None else num_stages)
