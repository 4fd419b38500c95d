"""Ragged paged prefill attention for Hopper: Pallas's Mosaic GPU backend (wgmma, TMA, mbarriers).

The same contract as `paged_prefill.ragged_paged_attention_pallas` (the Triton-lowered kernel; its
docstring has the layout and semantics, `reference.ragged_paged_attention_reference` is the jnp
oracle): packed new tokens of many sequences attend causally to their sequences' paged context.
Narrower in what it takes (bf16/f16, head_dim 64/128, block_size >= 8, <= 16 query heads per KV
head); anything else raises ValueError and the caller falls back to the Triton kernel.

Design (FlashAttention-3 style, warp specialised, over the engine's own pool layout):
- Work as in paged_prefill: query tiles of `block_q` tokens of ONE sequence, heaviest tiles
  first, grid (tile, kv_head) with the tile fastest, so consecutive CTAs read the same KV head's
  pages out of L2. Unlike paged_prefill's `tile_map`, a tile's window of q rows starts at a
  multiple of 8 (`_tile_map`: a sequence's windows start at its first row rounded down to 8), so
  every Q slab is whole (8, 64) tiles of q; see the TMA note below. The few rows of the previous
  sequence in a first window are loaded but never stored. This costs at most one extra tile per
  sequence, none for a sequence that starts at a multiple of 8.
- A CTA owns one tile and one KV head: 128 rows = block_q tokens x group_rows query heads (the
  group padded to a power of two, block_q = 128 / group_rows), so each K/V page is brought into
  shared memory once for the whole query group. Rows are head-major (row r is head r // block_q,
  token r % block_q): the Q tile is then group_rows TMA copies of [block_q, head_dim] slabs
  straight out of q [tokens, heads, head_dim], with no transpose of q in HBM. Why not one CTA per
  query head (as attention_mgpu.py): the shared-memory traffic per FLOP is the same (M = 128 per
  CTA either way), but per-head CTAs read each page from L2 `group` times, issue `group` times the
  TMA copies per FLOP, and a 128-token tile crosses the causal diagonal over two or three key
  steps where a 32-token tile crosses it in one.
- Three warpgroups. Two compute warpgroups own 64 rows each (wgmma's M). The memory warpgroup
  fills a ring of `stages` K and V slots of `block_k` keys: one TMA copy per page,
  pool[page, :, kv_head, :] -> a block_size-row slab of the slot (slots are (8, 64)-tiled with
  the 128-byte swizzle, so a 16-row slab is two whole tiles and needs no special layout); each
  slot's barrier expects one arrival per page copy. Page ids come from the block table (scalar
  loads from global memory, one per page per step, issued `stages` steps ahead of their use).
- Compute warpgroup step: S = Q K^T (wgmma, both operands in shared memory, K transposed by the
  swizzled view), causal mask only on the steps that cross the diagonal, online softmax in f32
  base 2 (scale folded with log2(e) into one FMA per logit), O = alpha O + P V (wgmma, P straight
  from registers, O accumulated in place). The two compute warpgroups ping-pong through a
  rendezvous barrier so one's softmax overlaps the other's matmuls. Both own the same tokens, so
  they run the same number of steps (every barrier phase is seen by all its waiters).
- Epilogue: O / l -> unswizzled shared memory -> TMA stores of the tile's own rows only. A tile
  may hold rows of a neighbouring sequence (shifted back at the end of the packed rows, or a
  sequence ending inside it), so each slab's own rows are stored by a ladder of power-of-two
  copies (TMA shapes are static; one copy for a full slab).
- Finite -1e30 as the running max's start and -inf for masked logits: rows that see no key in a
  step get probability 0 (never NaN), rows that see none at all give exact zeros (padding tail).
- Sliding window and logit soft-capping (static, in the plan), as paged_prefill: the steps run
  from the one holding the first key the tile's first own row sees, masked across the window's
  lower edge, unmasked where every own row sees the whole step, masked across the diagonal.
  The memory warpgroup copies, for a page wholly before that first key, the first key's page
  instead (same rows within it; masked, finite): pages before the window are never read (the
  block manager may have freed them). The window's step bounds come from the tile's fields
  in the kernel (`_window_steps`), so the tile info is the same with and without a window.
- A TMA copy into a tiled shared-memory slab tiles the global array the same way (its
  coordinates are row // 8 and row % 8 of the (8, 64)-tiled view), so the first row must be a
  multiple of 8 (else rows past the 8-row tile are filled with zeros instead of read) and so
  must the array's row count: other token counts (and fewer than block_q) pay one padded copy of
  q; the output, stored from unswizzled shared memory, never does. Mosaic GPU's layout inference
  (jax >= 0.11) checks this statically, so the kernel states it with `pl.multiple_of` on the
  tile's first row (Q) and on each page copy's first pool row (K/V).

Interpret mode (`interpret=True`, the default on a CPU backend) runs this kernel in Mosaic GPU's
interpreter, which (jax 0.10.2) models TMA, barriers, warpgroups and wgmma with shared-memory
operands but not `transpose_ref`, register wgmma operands, `run_state` or `layout_cast`. Under
interpret the kernel therefore copies K^T and P into shared-memory scratch for the two wgmmas,
adds P V from a fresh accumulator, and skips layout casts (`_k_operand`, `_accumulate_pv`,
`_layout`); the rest (pipeline, barriers, masks, softmax, ragged stores) is the same code. The
K^T copy reads the K slot through the generic proxy (the compiled kernel reads it only with
wgmma), so it fences with `commit_smem` before the slot's release lets a TMA refill it: jax
0.11's race detector flags the refill otherwise. The interpreter does not model the tiled view
of global memory that TMA uses (see above): the tests check tile alignment separately.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu_cache import stable_kernel_hashes
from pallas_kernels.paged_decode import LOG2E, NEG_INF, _next_pow2, log2_logits
from pallas_kernels.paged_prefill import _validate

WG_ROWS = 64                 # query rows per compute warpgroup: wgmma's M
COMPUTE_WGS = 2              # compute warpgroups per CTA; one more issues the TMA copies
TILE_ROWS = WG_ROWS * COMPUTE_WGS
KEYS_PER_STEP = 128          # default keys per pipeline step (attention_mgpu's H100 choice)
STAGES = 2                   # default K/V slots in shared memory
SMEM_LIMIT = 227 * 1024      # H100 shared memory per CTA
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
TILE_M = 8                   # rows of the (8, 64) shared-memory tiles (Q, K, V)
MAX_GROUP_ROWS = TILE_ROWS // TILE_M  # block_q >= 8: one row of (8, 64) tiles per slab
_TILED = (plgpu.TilingTransform((TILE_M, 64)), plgpu.SwizzleTransform(128))  # 64 x 2 B = 128 B


@dataclasses.dataclass(frozen=True)
class MgpuPlan:
    """Static launch parameters (Python ints and the interpreter's parameters)."""

    block_q: int          # query tokens per tile
    block_k: int          # keys per pipeline step
    stages: int           # K/V slots in shared memory
    group: int            # query heads per KV head
    group_rows: int       # group padded to a power of two
    block_size: int       # pool tokens per page
    num_tiles: int        # length of the tile map: cdiv(tokens, block_q) + 2 num_seqs + 1
    interpret: Any        # False, or the interpreter's InterpretGPUParams (run on the CPU)
    sliding_window: int | None = None  # a query at p sees keys p - window < k <= p
    logit_softcap: float | None = None  # cap * tanh(logits / cap) before the mask

    @property
    def slab(self) -> int:  # rows of one Q / O slab: one head, consecutive tokens
        return min(self.block_q, WG_ROWS)

    @property
    def slabs_per_wg(self) -> int:
        return WG_ROWS // self.slab

    @property
    def chunk(self) -> int:  # keys per TMA copy: a page, or part of one
        return min(self.block_size, self.block_k)

    @property
    def copies_per_step(self) -> int:
        return self.block_k // self.chunk


def smem_bytes(plan: MgpuPlan, head_dim: int, itemsize: int) -> int:
    """Shared memory of the compiled kernel: Q and O tiles, the K/V slots (barriers aside)."""
    return (2 * TILE_ROWS + 2 * plan.stages * plan.block_k) * head_dim * itemsize


def num_tiles_bound(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Tiles `_tile_map` may need: the num_seqs sequences and the padding tail each take
    cdiv(rows + offset, block_q) tiles, offset (their first row mod 8) < 8 <= block_q, so the sum
    is below rows / block_q + 2 (num_seqs + 1)."""
    return pl.cdiv(max(num_tokens, block_q), block_q) + 2 * num_seqs + 1


def make_plan(num_tokens: int, num_seqs: int, group: int, block_size: int, *,
              block_k: int | None = None, stages: int | None = None,
              interpret: Any = False, sliding_window: int | None = None,
              logit_softcap: float | None = None) -> MgpuPlan:
    group_rows = _next_pow2(group)
    block_q = TILE_ROWS // group_rows
    return MgpuPlan(block_q=block_q, block_k=block_k or KEYS_PER_STEP,
                    stages=stages or STAGES, group=group, group_rows=group_rows,
                    block_size=block_size,
                    num_tiles=num_tiles_bound(num_tokens, num_seqs, block_q),
                    interpret=interpret, sliding_window=sliding_window,
                    logit_softcap=logit_softcap)


# --- Interpret-mode stand-ins (see the module docstring) -------------------------------------

def _layout(x, layout, interpret):
    """x cast to a register layout (compiled); the interpreter has no layouts."""
    return x if interpret else plgpu.layout_cast(x, layout)


def _iota(shape, dimension: int, interpret):
    return _layout(lax.broadcasted_iota(jnp.int32, shape, dimension), plgpu.Layout.WGMMA,
                   interpret)


def _k_operand(k_slot, kt_scratch):
    """K^T [head_dim, block_k] for the S = Q K^T wgmma: a transposed view of the slot, or (in
    interpret mode) a transposed copy in scratch."""
    if kt_scratch is None:
        return k_slot.transpose((1, 0))  # plgpu.transpose_ref, deprecated in jax 0.11
    kt_scratch[...] = k_slot[...].T
    # The slot was read through the generic proxy: fence it before its release lets a TMA
    # (async proxy) refill it (jax 0.11's race detector checks this ordering).
    plgpu.commit_smem()
    return kt_scratch


def _accumulate_pv(o, p, v_slot, p_scratch, after_issue):
    """o + p @ v_slot with wgmma; calls after_issue() while the wgmma runs."""
    if p_scratch is None:  # compiled: P from registers, accumulated into O in place
        def body(acc_ref):
            plgpu.wgmma(acc_ref, p, v_slot)
            after_issue()
        return pl.run_state(body)(plgpu.ACC.init(o))
    p_scratch[...] = p  # interpret: shared-memory operands, a fresh accumulator

    def scoped(acc_ref):
        plgpu.wgmma(acc_ref, p_scratch, v_slot)
        after_issue()
        return acc_ref[...]
    return o + pl.run_scoped(scoped, plgpu.ACC(o.shape, jnp.float32))


# --- The kernel -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tile:
    """Per-tile scalars, read from the tile info (see `_tile_info`)."""

    seq: jax.Array        # sequence (num_seqs: the padding tail)
    row0: jax.Array       # first packed row of the tile
    own_lo: jax.Array     # own rows of the tile: row0 + own_lo .. row0 + own_hi - 1
    own_hi: jax.Array
    pos0: jax.Array       # position of row0's token in its sequence
    num_full: jax.Array   # key steps every own row sees whole
    num_steps: jax.Array  # key steps up to the causal limit of the last own row

    @classmethod
    def read(cls, info_ref, tile):
        return cls(*(info_ref[tile, i] for i in range(len(dataclasses.fields(cls)))))


def _window_steps(tile: _Tile, plan: MgpuPlan):
    """Under a sliding window: (first_key, first_step, first_full), the first key the tile's
    first own row sees, its step, and the first step every own row sees whole (steps from
    first_step to first_full are masked, then unmasked up to num_full)."""
    window, block_k = plan.sliding_window, plan.block_k
    first_key = jnp.maximum(tile.pos0 + tile.own_lo - window + 1, 0)
    first_step = lax.div(first_key, block_k)
    last_row_first_key = jnp.maximum(tile.pos0 + tile.own_hi - window, 0)
    first_full = jnp.clip(lax.div(last_row_first_key + block_k - 1, block_k), first_step,
                          tile.num_full)
    return first_key, first_step, first_full


def _slabs(plan: MgpuPlan, wg):
    """(first row among the warpgroup's 64, head in the group, first token in the tile) of each
    slab of a compute warpgroup's rows."""
    for j in range(plan.slabs_per_wg):
        row = wg * WG_ROWS + j * plan.slab  # first row in the CTA's 128
        yield j * plan.slab, lax.div(row, plan.block_q), lax.rem(row, plan.block_q)


def _rendezvous(barrier):
    plgpu.barrier_arrive(barrier)
    plgpu.barrier_wait(barrier)


def _release(barrier, step, tile: _Tile, plan: MgpuPlan):
    """Frees a K or V slot, but only if the memory warpgroup will refill it (so every barrier
    phase completed is also waited for)."""
    pl.when(step + plan.stages < tile.num_steps)(lambda: plgpu.barrier_arrive(barrier))


def _producer(tables_ref, k_ref, v_ref, smem, tile: _Tile, kv_head, plan: MgpuPlan):
    """Memory warpgroup: TMA copies of each step's pages into the K and V slot rings (from
    the window's first step, pages before it replaced by its first page)."""
    plgpu.set_max_registers(40, action="decrease")
    first_step = 0
    if plan.sliding_window is not None:
        first_key, first_step, _ = _window_steps(tile, plan)

    def fill(step, wait_free: bool):
        slot = lax.rem(step, plan.stages)
        rows = []  # first pool row of each chunk of the step's keys
        for c in range(plan.copies_per_step):
            key = step * plan.block_k + c * plan.chunk
            page_key = key if plan.sliding_window is None else jnp.maximum(key, first_key)
            page = tables_ref[tile.seq, lax.div(page_key, plan.block_size)]
            # A multiple of the chunk (>= 8): block_k and the chunk are powers of two.
            rows.append(pl.multiple_of(page * plan.block_size + lax.rem(key, plan.block_size),
                                       plan.chunk))
        for pool, slots, ready, free in ((k_ref, smem["k_smem"], smem["k_ready"], smem["k_free"]),
                                         (v_ref, smem["v_smem"], smem["v_ready"], smem["v_free"])):
            if wait_free:
                plgpu.barrier_wait(free.at[slot])
            for c, row in enumerate(rows):
                plgpu.copy_gmem_to_smem(pool.at[pl.ds(row, plan.chunk), kv_head],
                                        slots.at[slot, pl.ds(c * plan.chunk, plan.chunk)],
                                        ready.at[slot])

    for i in range(plan.stages):  # the ring starts empty
        step = first_step + jnp.int32(i)
        pl.when(step < tile.num_steps)(functools.partial(fill, step, False))

    def refill(step, carry):
        fill(step, True)
        return carry
    lax.fori_loop(first_step + plan.stages, tile.num_steps, refill, None)


def _visible(step, tile: _Tile, wg, plan: MgpuPlan):
    """[64, block_k] bool: key position <= query position (and, with a window, > query
    position - window), for a warpgroup's rows."""
    shape = (WG_ROWS, plan.block_k)
    token = _iota(shape, 0, plan.interpret)  # row in the warpgroup -> token in the tile
    if plan.block_q < WG_ROWS:
        token = token % plan.block_q
    # token + first_token + pos0 >= step * block_k + key, rearranged to one compare per logit
    first_token = lax.rem(wg * WG_ROWS, plan.block_q)
    distance = token - _iota(shape, 1, plan.interpret)  # query position - key position - bound
    bound = step * plan.block_k - tile.pos0 - first_token
    visible = distance >= bound
    if plan.sliding_window is not None:
        visible &= distance < bound + plan.sliding_window
    return visible


def _step(step, carry, *, masked: bool, refs, tile: _Tile, wg, plan: MgpuPlan, scale: float):
    """One key step of a compute warpgroup: carry (o [64, dim], m [64], l [64]) -> next."""
    o, row_max, row_sum = carry
    q_tile, smem, kt_scratch, p_scratch = refs
    slot = lax.rem(step, plan.stages)

    def logits(acc_ref):
        plgpu.wgmma(acc_ref, q_tile, _k_operand(smem["k_smem"].at[slot], kt_scratch))
        _rendezvous(smem["sched"])  # the other warpgroup's P V runs meanwhile
        return acc_ref[...]
    s = pl.run_scoped(logits, plgpu.ACC((WG_ROWS, plan.block_k), jnp.float32))
    _release(smem["k_free"].at[slot], step, tile, plan)
    # The exponent's scale: log2(e) * scale, one FMA per logit (scale > 0, so it commutes with
    # the max), or 1 for soft-capped logits, which are in base 2 already.
    log2_scale = scale * LOG2E
    exponent = (lambda x: x * log2_scale) if plan.logit_softcap is None else (lambda x: x)
    if plan.logit_softcap is not None:
        s = log2_logits(s, scale, plan.logit_softcap)
    if masked:
        s = jnp.where(_visible(step, tile, wg, plan), s, -jnp.inf)
    new_max = jnp.maximum(row_max, exponent(s.max(axis=1)))
    alpha = jnp.exp2(row_max - new_max)
    p = jnp.exp2(exponent(s) - lax.broadcast_in_dim(new_max, s.shape, [0]))
    row_sum = row_sum * alpha + p.sum(axis=1)
    o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
    p = p.astype(q_tile.dtype)
    o, new_max, row_sum, p = lax.optimization_barrier((o, new_max, row_sum, p))
    plgpu.barrier_arrive(smem["sched"])  # softmax done: let the other warpgroup's S run
    plgpu.barrier_wait(smem["v_ready"].at[slot])
    plgpu.barrier_wait(smem["sched"])

    def wait_next_k():  # overlaps the P V wgmma
        nxt = step + 1
        pl.when(nxt < tile.num_steps)(
            lambda: plgpu.barrier_wait(smem["k_ready"].at[lax.rem(nxt, plan.stages)]))
    o = _accumulate_pv(o, p, smem["v_smem"].at[slot], p_scratch, wait_next_k)
    _release(smem["v_free"].at[slot], step, tile, plan)
    return o, new_max, row_sum


def _load_q(q_ref, q_tile, ready, tile: _Tile, kv_head, wg, plan: MgpuPlan):
    for row, g, token in _slabs(plan, wg):
        head = kv_head * plan.group + jnp.minimum(g, plan.group - 1)  # pad heads: never stored
        first = pl.multiple_of(tile.row0 + token, TILE_M)  # row0 by `_tile_map`; token by slab
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first, plan.slab), head],
                                q_tile.at[pl.ds(row, plan.slab)], ready)
    plgpu.barrier_wait(ready)


def _store_rows(o_slab, out_ref, smem_row, out_row, head, count, size: int):
    """TMA-stores rows [0, count) of a slab (count <= size, dynamic) as a ladder of power-of-two
    copies, largest first: TMA shapes are static."""
    done = jnp.int32(0)
    while size >= 1:
        take = lax.bitwise_and(count, size)

        @pl.when(take != 0)
        def _(size=size, done=done):
            plgpu.copy_smem_to_gmem(o_slab.at[pl.ds(smem_row + done, size)],
                                    out_ref.at[pl.ds(out_row + done, size), head])
        done = done + take
        size //= 2


def _store_out(out, o_tile, out_ref, tile: _Tile, kv_head, wg, plan: MgpuPlan):
    """Writes a warpgroup's normalised rows [64, dim]; only the tile's own rows reach HBM."""
    o_tile[...] = out
    plgpu.commit_smem()
    for row, g, token in _slabs(plan, wg):
        lo = jnp.clip(tile.own_lo - token, 0, plan.slab)
        count = jnp.clip(tile.own_hi - token, 0, plan.slab) - lo

        @pl.when(g < plan.group)  # padding heads of the group are dropped
        def _(row=row, g=g, token=token, lo=lo, count=count):
            _store_rows(o_tile, out_ref, row + lo, tile.row0 + token + lo,
                        kv_head * plan.group + g, count, plan.slab)
    plgpu.wait_smem_to_gmem(0)


def _consumer(q_ref, out_ref, smem, tile: _Tile, kv_head, wg, plan: MgpuPlan, scale: float):
    """Compute warpgroup: 64 rows of the tile over all their key steps."""
    plgpu.set_max_registers(232, action="increase")
    head_dim = q_ref.shape[-1]
    q_tile = smem["q_smem"].at[wg]
    _load_q(q_ref, q_tile, smem["q_ready"].at[wg], tile, kv_head, wg, plan)
    scratch = [smem[name].at[wg] if plan.interpret else None for name in ("kt_smem", "p_smem")]
    rows = plgpu.Layout.WGMMA.reduce(1)
    interpret = plan.interpret
    carry = (_layout(jnp.zeros((WG_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA,
                     interpret),
             _layout(jnp.full((WG_ROWS,), NEG_INF, jnp.float32), rows, interpret),
             _layout(jnp.zeros((WG_ROWS,), jnp.float32), rows, interpret))
    masked, unmasked = (functools.partial(_step, masked=m, refs=(q_tile, smem, *scratch),
                                          tile=tile, wg=wg, plan=plan, scale=scale)
                        for m in (True, False))
    if plan.sliding_window is None:
        pl.when(tile.num_steps > 0)(lambda: plgpu.barrier_wait(smem["k_ready"].at[0]))
        pl.when(wg == 1)(lambda: _rendezvous(smem["sched"]))  # warpgroup 0 goes first
        carry = lax.fori_loop(0, tile.num_full, unmasked, carry)
    else:  # from the window's first step: across its lower edge, then whole steps
        _, first_step, first_full = _window_steps(tile, plan)
        pl.when(first_step < tile.num_steps)(
            lambda: plgpu.barrier_wait(smem["k_ready"].at[lax.rem(first_step, plan.stages)]))
        pl.when(wg == 1)(lambda: _rendezvous(smem["sched"]))
        carry = lax.fori_loop(first_step, first_full, masked, carry)
        carry = lax.fori_loop(first_full, tile.num_full, unmasked, carry)
    o, _, row_sum = lax.fori_loop(tile.num_full, tile.num_steps, masked, carry)
    pl.when(wg == 0)(lambda: _rendezvous(smem["sched"]))  # balances warpgroup 1's first one
    # Rows that saw no key have o == 0 and row_sum == 0: exact zeros.
    out = o / lax.broadcast_in_dim(jnp.maximum(row_sum, 1e-30), o.shape, [0])
    _store_out(out.astype(q_ref.dtype), smem["o_smem"].at[wg], out_ref, tile, kv_head, wg, plan)


def _kernel(info_ref, tables_ref, q_ref, k_ref, v_ref, out_ref, *, plan: MgpuPlan,
            scale: float, **smem):
    """One (tile, KV head) CTA. info_ref [num_tiles, 8] (see `_tile_info`); tables_ref
    [seqs + 1, width] pool pages; q_ref [rows, heads, dim] (rows >= tokens, a multiple of 8);
    out_ref [tokens, heads, dim]; k_ref, v_ref
    [layers * blocks * block_size, kv_heads, dim]."""
    tile = _Tile.read(info_ref, lax.axis_index("tile"))
    kv_head, wg = lax.axis_index("kv_head"), lax.axis_index("wg")

    @pl.when(tile.own_hi > tile.own_lo)  # map entries past the needed tiles do nothing
    def _():
        pl.when(wg == COMPUTE_WGS)(
            lambda: _producer(tables_ref, k_ref, v_ref, smem, tile, kv_head, plan))
        pl.when(wg < COMPUTE_WGS)(
            lambda: _consumer(q_ref, out_ref, smem, tile, kv_head, wg, plan, scale))


def _scratch(plan: MgpuPlan, head_dim: int, dtype) -> dict:
    tiled = lambda *shape: plgpu.SMEM(shape, dtype, transforms=_TILED)  # noqa: E731
    scratch = dict(
        q_smem=tiled(COMPUTE_WGS, WG_ROWS, head_dim),
        o_smem=plgpu.SMEM((COMPUTE_WGS, WG_ROWS, head_dim), dtype),  # plain rows: ragged stores
        k_smem=tiled(plan.stages, plan.block_k, head_dim),
        v_smem=tiled(plan.stages, plan.block_k, head_dim),
        q_ready=plgpu.Barrier(num_arrivals=plan.slabs_per_wg, num_barriers=COMPUTE_WGS),
        k_ready=plgpu.Barrier(num_arrivals=plan.copies_per_step, num_barriers=plan.stages),
        v_ready=plgpu.Barrier(num_arrivals=plan.copies_per_step, num_barriers=plan.stages),
        k_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=plan.stages),
        v_free=plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=plan.stages),
        sched=plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    if plan.interpret:
        scratch.update(kt_smem=plgpu.SMEM((COMPUTE_WGS, head_dim, plan.block_k), dtype),
                       p_smem=plgpu.SMEM((COMPUTE_WGS, WG_ROWS, plan.block_k), dtype))
    return scratch


# --- Wrapper --------------------------------------------------------------------------------

def _tile_map(query_start_loc, num_rows: int, plan: MgpuPlan):
    """The query tiles, heaviest first: (seq, start, end, window, bounds), the first four
    [num_tiles] int32. Tile i holds packed rows start[i] .. end[i] - 1 of segment seq[i] (segment
    num_seqs, bounds[num_seqs] .. num_rows, is the padding tail) inside its window of block_q rows
    from window[i], a multiple of 8: a segment's windows tile it from its first row rounded down
    to 8. Entries past the tiles needed are empty (start == end)."""
    num_seqs, block_q = query_start_loc.shape[0] - 1, plan.block_q
    bounds = jnp.concatenate([query_start_loc, jnp.array([num_rows], jnp.int32)])
    origin = bounds[:-1] // TILE_M * TILE_M  # [seqs + 1] first window of each segment
    counts = jnp.where(bounds[1:] > bounds[:-1], pl.cdiv(bounds[1:] - origin, block_q), 0)
    ends = jnp.cumsum(counts)                # tile ranges per segment
    index = jnp.arange(plan.num_tiles - 1, -1, -1, dtype=jnp.int32)  # backwards: longest first
    # One fused compare-and-count (the default binary search is a loop of small kernels).
    seq = jnp.searchsorted(ends, index, side="right", method="compare_all")
    seq = jnp.minimum(seq, num_seqs).astype(jnp.int32)
    window = origin[seq] + (index - (ends - counts)[seq]) * block_q
    used = index < ends[-1]
    start = jnp.where(used, jnp.maximum(window, bounds[seq]), bounds[seq + 1])
    end = jnp.where(used, jnp.minimum(window + block_q, bounds[seq + 1]), bounds[seq + 1])
    return seq, start, end, window, bounds


def _tile_info(query_start_loc, context_lens, num_tokens: int, num_rows: int,
               plan: MgpuPlan) -> jax.Array:
    """[num_tiles, 8] int32, the `_Tile` fields of every tile (then a zero column). Tiles cover
    the num_rows rows of the padded q (a multiple of 8); own rows stop at num_tokens (the
    output's rows)."""
    seq, start, end, window, bounds = _tile_map(query_start_loc, num_rows, plan)
    lens = jnp.concatenate([context_lens, jnp.zeros((1,), jnp.int32)])  # padding tail: none
    end = jnp.minimum(end, num_tokens)
    offset = lens[seq] - bounds[seq + 1]  # position of packed row t is t + offset
    row0 = jnp.minimum(window, num_rows - plan.block_q)  # shifted back: reads stay in bounds
    num_steps = jnp.where(end > start, pl.cdiv(jnp.maximum(end + offset, 0), plan.block_k), 0)
    num_full = jnp.minimum(jnp.maximum(start + offset + 1, 0) // plan.block_k, num_steps)
    fields = [seq, row0, start - row0, end - row0, row0 + offset, num_full, num_steps]
    return jnp.stack(fields + [jnp.zeros_like(seq)], axis=1).astype(jnp.int32)


def _page_tables(block_tables, layer, num_blocks: int, plan: MgpuPlan) -> jax.Array:
    """[seqs + 1, width] int32 pool pages (layer * num_blocks + block, pages of the stacked
    pool): a zero row for the padding tail, width padded to whole steps with block 0."""
    per_step = max(plan.block_k // plan.block_size, 1)
    width = pl.cdiv(block_tables.shape[1], per_step) * per_step
    tables = jnp.pad(block_tables, ((0, 1), (0, width - block_tables.shape[1])))
    return tables + layer * num_blocks


def interpret_params(**kwargs):
    """Mosaic GPU interpreter parameters (e.g. detect_races=True) for `interpret=`."""
    try:  # newer jax may export it
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:  # jax 0.10.x
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(**kwargs)


@functools.partial(jax.jit, static_argnames=("scale", "plan"))
def _ragged_prefill_mgpu(q, k_pool, v_pool, layer, block_tables, query_start_loc, context_lens,
                         *, scale: float, plan: MgpuPlan):
    num_tokens, _, head_dim = q.shape
    num_blocks, kv_heads = k_pool.shape[1], k_pool.shape[3]
    # TMA into the tiled Q slab needs whole 8-row tiles of q; a tile never reaches past q.
    num_rows = max(pl.cdiv(num_tokens, TILE_M) * TILE_M, plan.block_q)
    if num_rows > num_tokens:  # a copy of q: only for short or odd-sized batches
        q = jnp.pad(q, ((0, num_rows - num_tokens), (0, 0), (0, 0)))
    info = _tile_info(query_start_loc, context_lens, num_tokens, num_rows, plan)
    tables = _page_tables(block_tables, layer, num_blocks, plan)
    pool_rows = lambda pool: pool.reshape(-1, kv_heads, head_dim)  # noqa: E731 (free)

    def ragged_prefill_mgpu(*refs, **smem):  # the profiler shows this name
        _kernel(*refs, plan=plan, scale=scale, **smem)

    out_type = jax.ShapeDtypeStruct((num_tokens, *q.shape[1:]), q.dtype)
    return plgpu.kernel(
        ragged_prefill_mgpu, out_type=out_type,
        scratch_types=_scratch(plan, head_dim, q.dtype),
        grid=(plan.num_tiles, kv_heads), grid_names=("tile", "kv_head"),
        num_threads=COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plan.interpret or None,
    )(info, tables, q, pool_rows(k_pool), pool_rows(v_pool))


def _validate_mgpu(q, k_pool, plan: MgpuPlan) -> None:
    """What this kernel adds to paged_prefill's checks; the fix is the Triton kernel."""
    head_dim, itemsize = q.shape[-1], jnp.dtype(q.dtype).itemsize
    fallback = "; use ragged_paged_attention_pallas (the Triton kernel) instead"
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"the Mosaic GPU kernel takes bfloat16 or float16, got {q.dtype}"
                         + fallback)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Mosaic GPU kernel takes head_dim 64 or 128, got {head_dim}"
                         + fallback)
    if plan.block_size < 8:
        raise ValueError(f"the Mosaic GPU kernel needs block_size >= 8, got {plan.block_size}"
                         + fallback)
    if plan.group_rows > MAX_GROUP_ROWS:
        raise ValueError(f"the Mosaic GPU kernel takes at most {MAX_GROUP_ROWS} query heads "
                         f"per KV head, got {plan.group}" + fallback)
    if plan.block_k not in (64, 128) or plan.stages < 2:
        raise ValueError(f"block_k must be 64 or 128 and stages >= 2, got block_k="
                         f"{plan.block_k}, stages={plan.stages}")
    if smem_bytes(plan, head_dim, itemsize) > SMEM_LIMIT:
        raise ValueError(f"block_k={plan.block_k} x stages={plan.stages} needs "
                         f"{smem_bytes(plan, head_dim, itemsize)} bytes of shared memory, over "
                         f"{SMEM_LIMIT}; use fewer stages or block_k=64")


def hopper_gpu() -> bool:
    """The default device is a Hopper GPU (compute capability 9.x), where wgmma and TMA run."""
    device = jax.local_devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability",
                                                    "")).startswith("9.")


def supports(q, k_pool) -> bool:
    """Whether this kernel takes these operands (dtype, head_dim, block size, group) at its
    default pipeline; callers fall back to the Triton kernel when it does not."""
    if q.ndim != 3 or k_pool.ndim != 5 or q.shape[1] % k_pool.shape[3]:
        return False
    plan = make_plan(q.shape[0], 1, q.shape[1] // k_pool.shape[3], k_pool.shape[2])
    try:
        _validate_mgpu(q, k_pool, plan)
    except ValueError:
        return False
    return True


def ragged_paged_attention_mgpu(
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
    interpret: Any = None,
    block_k: int | None = None,
    stages: int | None = None,
) -> jax.Array:                  # [num_tokens, num_heads, head_dim] in q's dtype
    """Causal grouped-query attention of packed new tokens over their sequences' paged context,
    as `paged_prefill.ragged_paged_attention_pallas` (same arguments, same output, the same
    sliding window and soft-capping), on Hopper.

    Raises ValueError for inputs the kernel does not take (see the module docstring), so the
    caller can fall back to the Triton kernel. interpret: run in Mosaic GPU's interpreter (True,
    or `interpret_params(...)` for its options, e.g. race detection); defaults to True on a CPU
    backend. block_k (64 or 128 keys per step) and stages (K/V slots) tune the pipeline.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True:
        interpret = interpret_params()
    _validate(q, k_pool, v_pool, block_tables, query_start_loc, context_lens, None, None)
    if isinstance(layer, int) and not 0 <= layer < k_pool.shape[0]:
        raise ValueError(f"layer={layer} is out of range for a pool of {k_pool.shape[0]} layers")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (usually head_dim ** -0.5), got {scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    num_tokens, num_heads, _ = q.shape
    plan = make_plan(num_tokens, block_tables.shape[0], num_heads // k_pool.shape[3],
                     k_pool.shape[2], block_k=block_k, stages=stages, interpret=interpret,
                     sliding_window=sliding_window, logit_softcap=logit_softcap)
    _validate_mgpu(q, k_pool, plan)
    if not interpret:
        stable_kernel_hashes()  # one compile of the kernel per process, not per step program
    return _ragged_prefill_mgpu(q, k_pool, v_pool, jnp.asarray(layer, jnp.int32),
                                block_tables.astype(jnp.int32),
                                query_start_loc.astype(jnp.int32),
                                context_lens.astype(jnp.int32), scale=float(scale), plan=plan)
