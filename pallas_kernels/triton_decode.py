"""Paged decode attention written in the Triton language and called through jax-triton.

A second backend beside the Pallas kernel of `paged_decode.py`: the same arguments and results,
the same launch plan (`make_plan`: grid (batch, kv_head, split), pages per step and per split)
and the same jnp combine of the split partials (`_combine`). What differs is only how the
kernel is written: pointers computed by hand through the block table instead of BlockSpecs.

- One program owns one KV head of one sequence and one range of its pages, and handles the KV
  head's whole query group at once (GROUP rows of q, padded with masked rows to BLOCK_H >= 16,
  Triton's smallest dot tile). q is read and the output written unpadded, through a row mask,
  so nothing is padded or sliced around the call.
- Each step gathers PAGES_PER_STEP pages: token t of the step reads the table entry of its page
  and its row k_pool[layer, block, slot, kv_head, :] (stride kv_heads * head_dim). Loads past
  the context are masked, so table padding and stale slots are never read, not even from HBM.
- Pool offsets are int64: a 32-layer pool passes 2**31 elements at modest sizes.
- Online softmax in float32, base 2 (scale folded with log2(e)); float32 inputs use exact
  ("ieee") dots, 16-bit inputs tensor-core dots with float32 accumulation.
- Sliding window and logit soft-capping as the Pallas kernel (constexpr WINDOW and SOFTCAP, 0
  for off: the compiled kernel has no trace of them then): the splits start at the window's
  first page, the tokens before the window are masked out of every load (never read), and
  soft-capping runs in base 2 (cap * log2(e) * tanh on the base-2 logits, tanh as
  1 - 2 / (exp(2x) + 1), which saturates to +-1 without inf / inf).

triton and jax_triton are imported on first use, so this module imports everywhere; install
the optional extra with `pip install "jinfer[triton]"` (jax-triton 0.3.1, for Triton 3.6).
"""

from __future__ import annotations

import functools
import logging
import types

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import (LOG2E, NEG_INF, DecodePlan, _combine, _triton_params,
                                         _validate, make_plan, window_pages)

logger = logging.getLogger(__name__)

INSTALL_HINT = ('the Triton decode backend needs the optional extra: pip install "jinfer[triton]" '
                "(jax-triton 0.3.1 and Triton 3.6, on a JAX with CUDA support)")


@functools.cache
def _kernels() -> types.SimpleNamespace:
    """Imports triton and jax_triton and defines the kernels (once); ImportError with the install
    command where either is missing (jax_triton also refuses a JAX without GPU support).

    The kernels are defined here, not at module level, so that importing this module never
    needs triton; Triton's compiler resolves `tl`, `attend`, `tanh` and the constants from the
    closure.
    """
    try:
        import jax_triton
        import triton
        import triton.language as tl
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT}; import failed with: {err}") from err
    logger.info("Triton decode backend: triton %s, jax-triton %s", triton.__version__,
                jax_triton.__version__)
    neg_inf = tl.constexpr(NEG_INF)
    two_log2e = tl.constexpr(2 * LOG2E)

    @triton.jit
    def tanh(x):
        return 1.0 - 2.0 / (tl.exp2(x * two_log2e) + 1.0)

    @triton.jit
    def attend(layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr,
               GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
               KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_BLOCKS: tl.constexpr,
               MAX_BLOCKS: tl.constexpr, PAGES_PER_STEP: tl.constexpr,
               PAGES_PER_SPLIT: tl.constexpr, QK_SCALE: tl.constexpr,
               DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        """This program's (acc [BLOCK_H, HEAD_DIM], row_max, row_sum [BLOCK_H]) over its pages.
        WINDOW: tokens the query sees (0: all); SOFTCAP: cap * log2(e) (0: off)."""
        seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # Never past the table, whatever context_lens says.
        context_len = tl.minimum(tl.load(lens_ptr + seq), MAX_BLOCKS * BLOCK_SIZE)
        rows = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        head = seq * (KV_HEADS * GROUP) + kv_head * GROUP + rows  # [BLOCK_H] rows of q
        q = tl.load(q_ptr + head[:, None] * HEAD_DIM + dims[None, :],
                    mask=(rows < GROUP)[:, None], other=0.0)  # [BLOCK_H, HEAD_DIM]

        token_stride = KV_HEADS * HEAD_DIM
        block_stride = BLOCK_SIZE * token_stride
        layer = tl.load(layer_ptr).to(tl.int64)
        k_base = k_ptr + layer * (NUM_BLOCKS * block_stride) + kv_head * HEAD_DIM
        v_base = v_ptr + layer * (NUM_BLOCKS * block_stride) + kv_head * HEAD_DIM
        token = tl.arange(0, PAGES_PER_STEP * BLOCK_SIZE)  # [BLOCK_K] token within the step
        page_in_step = token // BLOCK_SIZE
        slot = token % BLOCK_SIZE

        first_page = split * PAGES_PER_SPLIT
        if WINDOW > 0:  # the splits start at the window's first page
            window_start = tl.maximum(context_len - WINDOW, 0)
            first_page += window_start // BLOCK_SIZE
        last_page = tl.minimum(tl.cdiv(context_len, BLOCK_SIZE), first_page + PAGES_PER_SPLIT)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
        row_max = tl.full([BLOCK_H], neg_inf, dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
        for page0 in range(first_page, last_page, PAGES_PER_STEP):
            page = page0 + page_in_step  # [BLOCK_K] logical page of each token
            valid = page * BLOCK_SIZE + slot < context_len
            if WINDOW > 0:
                valid &= page * BLOCK_SIZE + slot >= window_start
            block = tl.load(tables_ptr + seq * MAX_BLOCKS + page, mask=valid, other=0)
            row = block.to(tl.int64) * block_stride + slot * token_stride  # [BLOCK_K]
            k = tl.load(k_base + row[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(v_base + row[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
            logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * QK_SCALE
            if SOFTCAP > 0:  # base 2: cap * log2(e) * tanh(logits * scale / cap)
                logits = SOFTCAP * tanh(logits / SOFTCAP)
            logits = tl.where(valid[None, :], logits, neg_inf)  # [BLOCK_H, BLOCK_K]
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))
            rescale = tl.exp2(row_max - new_max)
            probs = tl.exp2(logits - new_max[:, None])  # masked tokens: exactly 0
            row_sum = rescale * row_sum + tl.sum(probs, axis=1)
            pv = tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            acc = acc * rescale[:, None] + pv
            row_max = new_max
        return acc, row_max, row_sum

    @triton.jit
    def decode_unsplit(layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr, out_ptr,
                       GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                       KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       NUM_BLOCKS: tl.constexpr, MAX_BLOCKS: tl.constexpr,
                       PAGES_PER_STEP: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr,
                       NUM_SPLITS: tl.constexpr, QK_SCALE: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr,
                       SOFTCAP: tl.constexpr):
        """One split: normalises and writes out [batch, num_heads, head_dim] itself."""
        acc, row_max, row_sum = attend(
            layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr, GROUP, BLOCK_H, HEAD_DIM,
            KV_HEADS, BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS, PAGES_PER_STEP, PAGES_PER_SPLIT,
            QK_SCALE, DOT_PRECISION, WINDOW, SOFTCAP)
        rows = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        head = tl.program_id(0) * (KV_HEADS * GROUP) + tl.program_id(1) * GROUP + rows
        out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]  # empty context: 0
        tl.store(out_ptr + head[:, None] * HEAD_DIM + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])

    @triton.jit
    def decode_split(layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr, acc_ptr, max_ptr,
                     sum_ptr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                     HEAD_DIM: tl.constexpr, KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     NUM_BLOCKS: tl.constexpr, MAX_BLOCKS: tl.constexpr,
                     PAGES_PER_STEP: tl.constexpr, PAGES_PER_SPLIT: tl.constexpr,
                     NUM_SPLITS: tl.constexpr, QK_SCALE: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
        """Several splits: writes this split's partials [batch, kv_heads, splits, GROUP(, D)]."""
        acc, row_max, row_sum = attend(
            layer_ptr, lens_ptr, tables_ptr, q_ptr, k_ptr, v_ptr, GROUP, BLOCK_H, HEAD_DIM,
            KV_HEADS, BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS, PAGES_PER_STEP, PAGES_PER_SPLIT,
            QK_SCALE, DOT_PRECISION, WINDOW, SOFTCAP)
        rows = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, HEAD_DIM)
        program = (tl.program_id(0) * KV_HEADS + tl.program_id(1)) * NUM_SPLITS + tl.program_id(2)
        part = program * GROUP + rows  # [BLOCK_H]
        live = rows < GROUP
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=live[:, None])
        tl.store(max_ptr + part, row_max, mask=live)
        tl.store(sum_ptr + part, row_sum, mask=live)

    return types.SimpleNamespace(triton_call=jax_triton.triton_call, unsplit=decode_unsplit,
                                 split=decode_split)


def kernel_constants(q_shape, pool_shape, max_blocks: int, plan: DecodePlan, scale: float,
                     dtype, sliding_window: int | None = None,
                     logit_softcap: float | None = None) -> dict:
    """The kernels' constexpr arguments (static shapes, plan, scale, window and soft-cap, 0 for
    off) as keyword arguments."""
    _, num_heads, head_dim = q_shape
    _, num_blocks, block_size, kv_heads, _ = pool_shape
    return dict(
        GROUP=num_heads // kv_heads, BLOCK_H=plan.block_h, HEAD_DIM=head_dim, KV_HEADS=kv_heads,
        BLOCK_SIZE=block_size, NUM_BLOCKS=num_blocks, MAX_BLOCKS=max_blocks,
        PAGES_PER_STEP=plan.pages_per_compute_block, PAGES_PER_SPLIT=plan.pages_per_split,
        NUM_SPLITS=plan.num_splits, QK_SCALE=float(scale) * LOG2E,
        DOT_PRECISION="ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32",  # f32: no TF32
        WINDOW=sliding_window or 0,
        SOFTCAP=0.0 if logit_softcap is None else float(logit_softcap) * LOG2E)


def paged_decode_attention_triton(
    q: jax.Array,             # [batch, num_heads, head_dim]
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                    # int or int32 scalar array: which layer of the pools to read
    block_tables: jax.Array,  # [batch, max_blocks] int32
    context_lens: jax.Array,  # [batch] int32, tokens in the pool per sequence (0: padding row)
    *,
    scale: float,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    num_splits: int | None = None,
    pages_per_compute_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:               # [batch, num_heads, head_dim] in q's dtype
    """Grouped-query decode attention of one new token per sequence over its paged context,
    as `paged_decode_attention_pallas` (same arguments, same launch plan), on NVIDIA GPUs.

    Token t of sequence b lives at k_pool[layer, block_tables[b, t // block_size],
    t % block_size]; tokens t < context_lens[b] are attended (with a sliding window only
    t >= context_lens[b] - sliding_window; logits soft-capped by logit_softcap), rows with
    context_len 0 give zeros. Table entries past a sequence's context or before its window
    are never read. Accumulates in float32.

    num_splits / pages_per_compute_block override the automatic plan; num_warps / num_stages
    the Triton compile (defaults as the Pallas kernel's). Raises ImportError with the install
    command where triton or jax_triton is missing.
    """
    _validate(q, k_pool, v_pool, block_tables, context_lens, interpret=False)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None (automatic), got {num_splits}")
    if pages_per_compute_block is not None and (
            pages_per_compute_block < 1 or pages_per_compute_block & (pages_per_compute_block - 1)):
        raise ValueError("pages_per_compute_block must be a power of two or None, "
                         f"got {pages_per_compute_block}")
    if isinstance(layer, int) and not 0 <= layer < k_pool.shape[0]:
        raise ValueError(f"layer={layer} is out of range for a pool of {k_pool.shape[0]} layers")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    batch, num_heads, head_dim = q.shape
    kv_heads, block_size = k_pool.shape[3], k_pool.shape[2]
    plan = make_plan(batch, kv_heads, num_heads // kv_heads, block_size,
                     window_pages(block_size, block_tables.shape[1], sliding_window),
                     num_splits, pages_per_compute_block, head_dim=head_dim,
                     itemsize=jnp.dtype(k_pool.dtype).itemsize)
    params = _triton_params(num_warps, num_stages, head_dim,
                            block_size * plan.pages_per_compute_block)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return _paged_decode_triton(q, k_pool, v_pool, layer, block_tables.astype(jnp.int32),
                                context_lens.astype(jnp.int32), scale=float(scale),
                                sliding_window=sliding_window, logit_softcap=logit_softcap,
                                plan=plan, num_warps=params.num_warps,
                                num_stages=params.num_stages)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "logit_softcap", "plan",
                                             "num_warps", "num_stages"))
def _paged_decode_triton(q, k_pool, v_pool, layer, block_tables, context_lens, *, scale: float,
                         sliding_window, logit_softcap, plan: DecodePlan, num_warps: int,
                         num_stages: int):
    """Launches the kernel over (batch, kv_head, split) and combines the splits."""
    kernels = _kernels()
    batch, num_heads, head_dim = q.shape
    kv_heads, splits = k_pool.shape[3], plan.num_splits
    group = num_heads // kv_heads
    constants = kernel_constants(q.shape, k_pool.shape, block_tables.shape[1], plan, scale,
                                 q.dtype, sliding_window, logit_softcap)
    if splits == 1:
        kernel, out_shape = kernels.unsplit, jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        part = (batch, kv_heads, splits, group)
        kernel = kernels.split
        out_shape = [jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32),
                     jax.ShapeDtypeStruct(part, jnp.float32)]
    outs = kernels.triton_call(
        layer, context_lens, block_tables, q, k_pool, v_pool, kernel=kernel,
        out_shape=out_shape, grid=(batch, kv_heads, splits), num_warps=num_warps,
        num_stages=num_stages,
        name=f"paged_decode_triton_g{group}_pp{plan.pages_per_compute_block}_s{splits}",
        **constants)
    if splits == 1:
        return outs
    out = _combine(*outs)  # [batch, kv_heads, group, head_dim] float32
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
