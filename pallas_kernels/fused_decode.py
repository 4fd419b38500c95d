"""One decode token per sequence, from the QKV projection to the attention output, in one
Pallas kernel: RoPE on the query and key, the new token's K/V written into the paged pool, and
grouped-query flash-decoding over the sequence's context.

Why fused: at batch 1 a decode step is memory-latency bound, and each separate small kernel
(split Q/K/V, RoPE of q, RoPE of k, pad the query group, write K/V, attention) costs ~1.3 us of
launch and drain on an H100, more than the work it does. This kernel takes the projection's
output row as it is and replaces six of them with one (plus the split combine when the context
is cut into several splits). Triton lowering on NVIDIA GPUs; `interpret=True` runs the same
kernel code on the CPU (CI).

Design (the plan, pool layout and online softmax of `paged_decode.py`):
- Grid (sequence, KV head, split). Each program loads its group's query heads and its KV head's
  new key from the QKV row and rotates them (rotate-half RoPE, float32, rounded to the input
  dtype as the unfused model does). The rotation pairs element i with i + head_dim / 2, so
  the rotated halves are kept apart and every dot over head_dim is the sum of two dots over
  half of it: no concatenation inside the kernel.
- The program of split 0 stores the new K/V row at the token's slot (the pools come out through
  `input_output_aliases`, in place under donation) and starts its softmax state with the new
  token, taken from registers; every split attends the pool's tokens before the new one. So no
  program reads a slot that another is writing.
- The query group is placed in a tile of at least 16 rows (Triton's smallest dot) row by row
  (a select per head, no padded copy in HBM), and the output goes back head by head: one split
  writes [batch, num_heads * head_dim] directly, several write float32 partials that a jnp
  combine merges.

Semantics (shared with `fused_decode_reference`): token t of sequence b is at position
context_lens[b] - 1 and slot slots[b] (block * block_size + offset; < 0 or past the pool: not
written); rows with context_len 0 give zeros (their K/V are still written to their slot, as
the unfused KV write does). A sliding window and logit soft-capping (static) work as in
`paged_decode.py`: the splits start at the window's first page, the pages before it are never
read; the new token is always inside its own window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.paged_decode import (MIN_DOT_ROWS, NEG_INF, DecodePlan, _combine,
                                         _triton_params, attended, log2_logits, make_plan,
                                         merge_splits, padded_table_width, window_pages)
from pallas_kernels.kv_write import write_kv_reference
from pallas_kernels.reference import apply_rope, paged_attention_reference, rms_norm


def _select_row(tile: jax.Array, row: int) -> jax.Array:
    """tile[row] of a [rows, n] register tile, as a select and a sum (Triton has no slicing)."""
    picked = lax.broadcasted_iota(jnp.int32, tile.shape, 0) == row
    return jnp.where(picked, tile, 0).sum(axis=0)


def _fused_kernel(layer_ref, lens_ref, slots_ref, tables_ref, qkv_ref, cos_ref, sin_ref,
                  k_ref, v_ref, *refs, plan: DecodePlan, block_size: int, num_heads: int,
                  scale: float, precision, dtype, partials: bool, sliding_window: int | None,
                  logit_softcap: float | None, qk_norm_eps: float | None):
    """One (sequence, KV head, split) program.

    layer_ref [1]; lens_ref, slots_ref [batch]; tables_ref [width] (this sequence's row);
    qkv_ref [batch, num_heads + 2 * kv_heads, head_dim], or [parts, batch, ...] float32 partial
    sums of it (summed here, then rounded to `dtype`, the activations' dtype); cos_ref,
    sin_ref [batch, head_dim / 2] float32; k_ref, v_ref: the whole pools (inputs, never read at
    the written slot).
    refs: with qk_norm_eps, first (q_norm, k_norm) [head_dim] (each query and key head
    RMS-normed over head_dim with these weights before RoPE, as Qwen3 does); then the outputs
    (k_out, v_out, out [batch, num_heads, head_dim]) with one split, else (k_out,
    v_out, acc [block_h, head_dim] f32, max [block_h], sum [block_h]) of this split (blocks over
    the group's `group` real rows: the rows past them are masked off); with `partials` (any
    split count) max and sum come as [block_h, head_dim] too, each row its head's value.
    """
    norms = refs[:2] if qk_norm_eps is not None else (None, None)
    k_out_ref, v_out_ref, *outs = refs[2:] if qk_norm_eps is not None else refs
    seq, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layers, num_blocks = k_ref.shape[:2]
    kv_heads, head_dim = k_ref.shape[3:]
    group, half = num_heads // kv_heads, head_dim // 2
    block_h = plan.block_h
    layer = layer_ref[0]
    context_len = lens_ref[seq]
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    cos, sin = cos_ref[seq, :], sin_ref[seq, :]  # [half] float32

    def row(head, part):  # float32 values of one head of the QKV row, in `dtype`'s rounding
        if len(qkv_ref.shape) == 3:
            return qkv_ref[seq, head, part].astype(jnp.float32)
        total = qkv_ref[0, seq, head, part]
        for i in range(1, qkv_ref.shape[0]):
            total = total + qkv_ref[i, seq, head, part]
        return total.astype(dtype).astype(jnp.float32)

    def rotate(head, norm_ref=None):  # (rotated first half, second half) of one head of the row
        x1, x2 = row(head, lo), row(head, hi)
        if norm_ref is not None:  # layers.rms_norm over the head: float32, rounded, * weight
            inv = lax.rsqrt((jnp.sum(x1 * x1) + jnp.sum(x2 * x2)) / head_dim + qk_norm_eps)
            x1, x2 = (((x * inv).astype(dtype).astype(jnp.float32)
                       * norm_ref[part].astype(jnp.float32)).astype(dtype).astype(jnp.float32)
                      for x, part in ((x1, lo), (x2, hi)))
        return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)

    # The group's query heads as rows 0..group-1 of [block_h, half] tiles (other rows 0).
    row_ids = lax.broadcasted_iota(jnp.int32, (block_h, half), 0)
    q1 = jnp.zeros((block_h, half), dtype)
    q2 = jnp.zeros((block_h, half), dtype)
    for g in range(group):
        h1, h2 = rotate(kv_head * group + g, norms[0])
        q1 = jnp.where(row_ids == g, h1[None, :], q1)
        q2 = jnp.where(row_ids == g, h2[None, :], q2)
    k1, k2 = rotate(num_heads + kv_head, norms[1])
    k1, k2 = k1.astype(k_ref.dtype), k2.astype(k_ref.dtype)
    v_new = row(num_heads + kv_heads + kv_head, pl.ds(0, head_dim)).astype(v_ref.dtype)

    slot = slots_ref[seq]
    writes = ((split == 0) & (slot >= 0) & (slot < num_blocks * block_size)
              & (layer >= 0) & (layer < layers))

    @pl.when(writes)
    def _store_new_token():
        block, offset = lax.div(slot, block_size), lax.rem(slot, block_size)
        k_out_ref[layer, block, offset, kv_head, lo] = k1
        k_out_ref[layer, block, offset, kv_head, hi] = k2
        v_out_ref[layer, block, offset, kv_head, :] = v_new

    # Softmax state (base 2): split 0 starts with the new token, other splits empty.
    new_logit = ((q1.astype(jnp.float32) * k1.astype(jnp.float32)[None, :]).sum(axis=1)
                 + (q2.astype(jnp.float32) * k2.astype(jnp.float32)[None, :]).sum(axis=1))
    # (Tensor-shaped flags: the Triton lowering mistypes selects on a scalar predicate.)
    has_new = (jnp.full((block_h,), context_len, jnp.int32) > 0) & (split == 0)  # [block_h]
    row_max = jnp.where(has_new, log2_logits(new_logit, scale, logit_softcap), NEG_INF)
    row_sum = jnp.where(has_new, jnp.ones((block_h,), jnp.float32),
                        jnp.zeros((block_h,), jnp.float32))
    acc = jnp.where(has_new[:, None],
                    jnp.broadcast_to(v_new.astype(jnp.float32)[None, :], (block_h, head_dim)),
                    jnp.zeros((block_h, head_dim), jnp.float32))

    # The pool's tokens 0 .. context_len - 2 (in the window) in this split's pages. (With a
    # window of 1 a step may see no token: only split 0, whose state holds the new token.)
    cached = jnp.maximum(context_len - 1, 0)
    step = plan.pages_per_compute_block
    block_k = step * block_size
    first_page = split * plan.pages_per_split
    if sliding_window is not None:  # the splits start at the window's first page
        first_page += jnp.maximum(context_len - sliding_window, 0) // block_size
    last_page = jnp.minimum(pl.cdiv(cached, block_size), first_page + plan.pages_per_split)
    num_steps = pl.cdiv(jnp.maximum(last_page - first_page, 0), step)
    token_in_step = jnp.arange(block_k, dtype=jnp.int32)
    dims = (((1,), (1,)), ((), ()))

    page_of_token, slot_of_token = token_in_step // block_size, token_in_step % block_size

    def body(i, carry):
        acc, row_max, row_sum = carry
        page0 = first_page + i * step
        blocks = tables_ref[page0 + page_of_token]  # [block_k]: each token's block (2-D tiles)
        kp1 = k_ref[layer, blocks, slot_of_token, kv_head, lo]  # [block_k, half]
        kp2 = k_ref[layer, blocks, slot_of_token, kv_head, hi]
        v = v_ref[layer, blocks, slot_of_token, kv_head, :]  # [block_k, head_dim]
        logits = (lax.dot_general(q1, kp1, dims, precision=precision,
                                  preferred_element_type=jnp.float32)
                  + lax.dot_general(q2, kp2, dims, precision=precision,
                                    preferred_element_type=jnp.float32))  # [block_h, block_k]
        logits = log2_logits(logits, scale, logit_softcap)
        valid = attended(page0 * block_size + token_in_step, cached, context_len,
                         sliding_window)
        logits = jnp.where(valid[None, :], logits, NEG_INF)
        new_max = jnp.maximum(row_max, logits.max(axis=1))
        rescale = jnp.exp2(row_max - new_max)
        probs = jnp.exp2(logits - new_max[:, None])
        row_sum = rescale * row_sum + probs.sum(axis=1)
        pv = lax.dot_general(probs.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return rescale[:, None] * acc + pv, new_max, row_sum

    acc, row_max, row_sum = lax.fori_loop(0, num_steps, body, (acc, row_max, row_sum))

    if plan.num_splits == 1 and not partials:
        (o_ref,) = outs
        safe_sum = jnp.where(row_sum > 0, row_sum, 1.0)  # empty context: acc is 0 -> out 0
        out = (acc / safe_sum[:, None]).astype(o_ref.dtype)
        for g in range(group):
            o_ref[seq, kv_head * group + g, :] = _select_row(out, g)
    else:  # partials of the group's real rows only (the blocks' rows past them: masked off)
        from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
        o_ref, max_ref, sum_ref = outs
        live = lax.broadcasted_iota(jnp.int32, (block_h,), 0) < group
        live2d = jnp.broadcast_to(live[:, None], (block_h, head_dim))
        plgpu.store(o_ref, acc, mask=live2d)
        if partials:  # each head's max and sum along its head_dim values
            plgpu.store(max_ref, jnp.broadcast_to(row_max[:, None], (block_h, head_dim)),
                        mask=live2d)
            plgpu.store(sum_ref, jnp.broadcast_to(row_sum[:, None], (block_h, head_dim)),
                        mask=live2d)
        else:
            plgpu.store(max_ref, row_max, mask=live)
            plgpu.store(sum_ref, row_sum, mask=live)


def triton_supports(block_size: int, head_dim: int) -> bool:
    """Whether the Triton lowering takes this pool geometry: power-of-two block_size and
    head_dim, and half a head of at least 16 (Triton's smallest dot). Interpret mode takes any."""
    return (block_size & (block_size - 1) == 0 and head_dim & (head_dim - 1) == 0
            and head_dim >= 2 * MIN_DOT_ROWS)


def _validate(qkv, cos, sin, k_pool, v_pool, slots, block_tables, context_lens, num_heads,
              interpret: bool) -> None:
    if qkv.ndim == 3 and qkv.dtype != jnp.float32:
        raise ValueError(f"a 3-D qkv holds float32 partial sums [parts, batch, width], got "
                         f"{qkv.dtype}")
    qkv = qkv[0] if qkv.ndim == 3 else qkv
    if k_pool.ndim != 5 or k_pool.shape != v_pool.shape:
        raise ValueError(
            f"k_pool and v_pool must both be [layers, num_blocks, block_size, kv_heads, "
            f"head_dim]; got {k_pool.shape} and {v_pool.shape}")
    _, _, block_size, kv_heads, head_dim = k_pool.shape
    if num_heads % kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of the pool's "
                         f"{kv_heads} KV heads")
    width = (num_heads + 2 * kv_heads) * head_dim
    if qkv.ndim != 2 or qkv.shape[1] != width:
        raise ValueError(f"qkv must be [batch, (num_heads + 2 * kv_heads) * head_dim = {width}] "
                         f"(the fused QKV projection's output) or [parts, batch, {width}] "
                         f"(its partial sums), got shape {qkv.shape}")
    batch = qkv.shape[0]
    for name, arr in (("cos", cos), ("sin", sin)):
        if arr.shape != (batch, head_dim // 2):
            raise ValueError(f"{name} must be [batch={batch}, head_dim / 2={head_dim // 2}], "
                             f"got {arr.shape}")
    for name, arr in (("slots", slots), ("context_lens", context_lens)):
        if arr.shape != (batch,):
            raise ValueError(f"{name} must be [batch={batch}], got {arr.shape}")
    if block_tables.ndim != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks], "
                         f"got {block_tables.shape}")
    if not interpret and not triton_supports(block_size, head_dim):
        raise ValueError(
            f"the Triton kernel needs a power-of-two block_size and head_dim >= 32, got "
            f"block_size={block_size}, head_dim={head_dim}; use the unfused path instead")


def fused_decode_attention_pallas(
    qkv: jax.Array,           # [batch, (num_heads + 2 * kv_heads) * head_dim]: q | k | v, or
                              # [parts, batch, ...] float32 partial sums of it
    cos: jax.Array,           # [batch, head_dim // 2] float32, RoPE at each token's position
    sin: jax.Array,           # [batch, head_dim // 2] float32
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                    # int or int32 scalar array: which layer of the pools
    slots: jax.Array,         # [batch] int32, pool slot of each new token (< 0: not written)
    block_tables: jax.Array,  # [batch, max_blocks] int32, padding entries a valid block (0)
    context_lens: jax.Array,  # [batch] int32, tokens including the new one (0: padding row)
    *,
    num_heads: int,
    scale: float,
    num_splits: int | None = None,
    pages_per_compute_block: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    partials: bool = False,
    sliding_window: int | None = None,
    logit_softcap: float | None = None,
    qk_norm: tuple[jax.Array, jax.Array] | None = None,
    qk_norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # (out [batch, num_heads * head_dim], k, v pools)
    """RoPE, KV write and paged decode attention of one new token per sequence (module
    docstring). The pools come back updated through `input_output_aliases`: call it inside a
    jit that donates them (or carries them through a loop) and they are updated in place.

    With qkv as split-K partial sums of the projection (a persistent kernel's output), the
    kernel adds them up and rounds the row to the pool's dtype, as the projection's own output
    would be: one XLA reduction less per layer.

    partials=True returns the attention output uncombined, as `out` = (acc, max, sum), each
    [splits, batch, num_heads * head_dim] float32 (max and sum repeated along each head's
    values; `combine_partials` merges them): for a consumer that merges the context splits
    itself (the persistent layer kernel), one XLA kernel less.

    sliding_window / logit_softcap: as `paged_decode_attention_pallas` (None: off).
    qk_norm: (q_norm, k_norm) [head_dim] weights: each query and key head RMS-normed over
    head_dim (epsilon qk_norm_eps) before RoPE, as Qwen3's layers do (None: off), so the row
    goes from the projection to the kernel with no XLA kernel between.
    num_splits / pages_per_compute_block override the automatic launch plan of
    `paged_decode.make_plan`; interpret defaults to True on a CPU backend; num_warps /
    num_stages tune the Triton compile.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _validate(qkv, cos, sin, k_pool, v_pool, slots, block_tables, context_lens, num_heads,
              interpret)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1 or None (automatic), got {num_splits}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if isinstance(layer, int) and not 0 <= layer < k_pool.shape[0]:
        raise ValueError(f"layer={layer} is out of range for a pool of {k_pool.shape[0]} layers")
    batch = qkv.shape[-2]
    _, _, block_size, kv_heads, head_dim = k_pool.shape
    plan = make_plan(batch, kv_heads, num_heads // kv_heads, block_size,
                     window_pages(block_size, block_tables.shape[1], sliding_window),
                     num_splits, pages_per_compute_block, head_dim=head_dim,
                     itemsize=jnp.dtype(k_pool.dtype).itemsize)
    if qk_norm is not None and any(w.shape != (head_dim,) for w in qk_norm):
        raise ValueError(f"qk_norm must be (q_norm, k_norm), each [head_dim={head_dim}], got "
                         f"{[tuple(w.shape) for w in qk_norm]}")
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return _fused_decode(qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), k_pool, v_pool,
                         layer, slots.astype(jnp.int32), block_tables.astype(jnp.int32),
                         context_lens.astype(jnp.int32), None if qk_norm is None else
                         tuple(qk_norm), num_heads=num_heads,
                         scale=float(scale), plan=plan, interpret=bool(interpret),
                         num_warps=num_warps, num_stages=num_stages, partials=partials,
                         sliding_window=sliding_window, logit_softcap=logit_softcap,
                         qk_norm_eps=None if qk_norm is None else float(qk_norm_eps))


@functools.partial(jax.jit, static_argnames=("num_heads", "scale", "plan", "interpret",
                                             "num_warps", "num_stages", "partials",
                                             "sliding_window", "logit_softcap",
                                             "qk_norm_eps"))
def _fused_decode(qkv, cos, sin, k_pool, v_pool, layer, slots, block_tables, context_lens,
                  qk_norm, *, num_heads: int, scale: float, plan: DecodePlan, interpret: bool,
                  num_warps, num_stages, partials: bool, sliding_window, logit_softcap,
                  qk_norm_eps):
    """Pads the table to the splits, launches the kernel, combines the splits."""
    batch = qkv.shape[-2]
    _, _, block_size, kv_heads, head_dim = k_pool.shape
    group, splits, block_h = num_heads // kv_heads, plan.num_splits, plan.block_h
    # The activations' dtype: the row's, or the pool's for float32 partial sums.
    dtype = qkv.dtype if qkv.ndim == 2 else k_pool.dtype
    qkv = qkv.reshape(*qkv.shape[:-1], num_heads + 2 * kv_heads, head_dim)  # free: a view
    width = padded_table_width(plan, block_tables.shape[1], sliding_window)
    tables = jnp.pad(block_tables, ((0, 0), (0, width - block_tables.shape[1])))  # pad: block 0
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda b, h, s: (0,) * arr.ndim)  # noqa: E731
    in_specs = [whole(layer), whole(context_lens), whole(slots),
                pl.BlockSpec((None, width), lambda b, h, s: (b, 0)),
                whole(qkv), whole(cos), whole(sin), whole(k_pool), whole(v_pool)]
    norms = () if qk_norm is None else tuple(qk_norm)
    in_specs += [whole(w) for w in norms]
    out_shape = [jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                 jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype)]
    out_specs = [whole(k_pool), whole(v_pool)]
    if partials:  # [splits, batch, kv_heads, group, head_dim]: [splits, batch, q_size] views
        part = (splits, batch, kv_heads, group, head_dim)
        out_shape += [jax.ShapeDtypeStruct(part, jnp.float32)] * 3
        out_specs += [pl.BlockSpec((None, None, None, block_h, head_dim),
                                   lambda b, h, s: (s, b, h, 0, 0))] * 3
    elif splits == 1:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype))
        out_specs.append(whole(out_shape[-1]))
    else:
        part = (batch, kv_heads, splits, group)  # blocks of block_h rows, masked past group
        out_shape += [jax.ShapeDtypeStruct(part + (head_dim,), jnp.float32),
                      jax.ShapeDtypeStruct(part, jnp.float32),
                      jax.ShapeDtypeStruct(part, jnp.float32)]
        out_specs += [
            pl.BlockSpec((None, None, None, block_h, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (b, h, s, 0))]
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None  # f32: no TF32
    kernel = functools.partial(_fused_kernel, plan=plan, block_size=block_size,
                               num_heads=num_heads, scale=scale, precision=precision,
                               dtype=dtype, partials=partials, sliding_window=sliding_window,
                               logit_softcap=logit_softcap, qk_norm_eps=qk_norm_eps)
    k_pool, v_pool, *outs = pl.pallas_call(
        kernel, grid=(batch, kv_heads, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases={7: 0, 8: 1}, interpret=interpret,
        compiler_params=_triton_params(num_warps, num_stages, head_dim,
                                       block_size * plan.pages_per_compute_block),
        name=f"fused_decode_bh{block_h}_pp{plan.pages_per_compute_block}_s{splits}",
    )(layer, context_lens, slots, tables, qkv, cos, sin, k_pool, v_pool, *norms)
    if partials:
        return tuple(x.reshape(splits, batch, num_heads * head_dim) for x in outs), k_pool, v_pool
    if splits == 1:
        out = outs[0]
    else:
        out = _combine(*outs).astype(dtype)  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, num_heads * head_dim), k_pool, v_pool


def combine_partials(acc, row_max, row_sum, dtype) -> jax.Array:
    """`partials=True` output (acc, max, sum) [splits, ..., n] -> the attention output [..., n]
    in `dtype`: the splits' softmax states merged (base-2 maxima; rows with no context: 0)."""
    return merge_splits(acc, row_max, row_sum, axis=0).astype(dtype)


def fused_decode_reference(qkv, cos, sin, k_pool, v_pool, layer, slots, block_tables,
                           context_lens, *, num_heads: int, scale: float,
                           sliding_window: int | None = None,
                           logit_softcap: float | None = None,
                           qk_norm: tuple[jax.Array, jax.Array] | None = None,
                           qk_norm_eps: float = 1e-6):
    """The unfused composition, in plain jnp: split the QKV row, (q/k head norms,) RoPE q and k,
    write K/V
    (`write_kv_reference`), attend (`paged_attention_reference`). Same signature and results
    as `fused_decode_attention_pallas` up to float32 rounding order."""
    if qkv.ndim == 3:  # float32 partial sums: their total in the pool's dtype
        qkv = qkv.sum(0).astype(k_pool.dtype)
    batch = qkv.shape[0]
    kv_heads, head_dim = k_pool.shape[3:]
    q, k, v = jnp.split(qkv.reshape(batch, num_heads + 2 * kv_heads, head_dim),
                        [num_heads, num_heads + kv_heads], axis=1)
    if qk_norm is not None:
        q, k = (rms_norm(x, w, qk_norm_eps) for x, w in zip((q, k), qk_norm))
    cos, sin = cos[:, None, :].astype(jnp.float32), sin[:, None, :].astype(jnp.float32)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_pool, v_pool = write_kv_reference(k_pool, v_pool, layer, slots, k, v)
    positions = jnp.maximum(context_lens - 1, 0)[:, None]
    out = paged_attention_reference(q[:, None], k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                                    block_tables, positions, context_lens, scale=scale,
                                    sliding_window=sliding_window, logit_softcap=logit_softcap)
    return out.reshape(batch, num_heads * head_dim), k_pool, v_pool
