"""The batch-1 layer kernel's body (decode_layer_mgpu.py launches it): two warpgroups per CTA,
phases with grid barriers between them, and the kernel's operands by name.

Design (warp specialised; measured by scripts/bench_layer_mgpu.py):
- The memory warpgroup (`producer`) TMA-copies every weight chunk ([block_k, block_n] bf16) this
  CTA multiplies, phase after phase, into a ring of `stages` shared-memory slots. Weights do not
  depend on the data, so it never waits for a grid barrier: while the grid synchronises it keeps
  loading the next phase's weights (up to `stages` chunks ahead).
- The compute warpgroup (`consumer`), per phase: waits at the grid barrier, builds the phase's
  input row (sums the previous phase's partials, adds the residual, RMS-normalises: each CTA
  recomputes the whole row, a few KB from L2) into a shared-memory vector, then per chunk
  broadcasts the row's slice to wgmma's 64 rows in registers (every row is the same, the
  product's row 0 is taken) and multiplies it with the weight slot. Each tile's row goes to
  GMEM by TMA. The work split is decode_layer_plan.py's.
- Grid barrier (`_grid_barrier`): every CTA adds one to an arrival counter and polls it until
  all have arrived (one round trip through L2). The counter only grows: a CTA reads it before
  its first arrival (every earlier call's arrivals are in, this call's first barrier is not
  complete without this CTA) and rounds down to a multiple of the grid to get its call's base,
  so no barrier ever resets it. The counter is the caller's `barrier` buffer (threaded through
  a step's layers: one zero-fill per step) or, without one, a `pl.get_global` semaphore, which
  Pallas zero-fills before every call: a memset kernel per call, 1.1 us per layer more in a
  16-layer stack (51.0 vs 49.9 us, H100).
- Rounding follows the XLA model where it matters: h1, h2 and the normalised rows are rounded
  to bf16 as `rms_norm` rounds them; products are accumulated in float32 over the full K (XLA
  rounds each GEMM's output to bf16 first), so outputs differ from the model's by bf16 rounding.

Interpret mode (CPU, CI): Mosaic GPU's interpreter (jax 0.10.2) has no global semaphores and no
register wgmma operands, so each phase runs as its own kernel launch (the launch boundary is the
grid barrier) and the broadcast row goes through shared-memory scratch into wgmma. The rest is
the same code.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_layer_plan import (EXPERT_DOWN, EXPERT_GATE_UP, ROUTER, PhasePlan,
                                              TailShape, TailTiling)

ROWS = 64  # wgmma's M: the one input row broadcast to 64
_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 = 128 B rows
FINAL_NORM = 4  # the phase without weights: the last layer's output row, final-normed
_WEIGHT_OF = {0: "wo", 1: "w_gate_up", 2: "w_down", 3: "next_wqkv", ROUTER: "router_w",
              EXPERT_GATE_UP: "w_gate_up", EXPERT_DOWN: "w_down"}

# The kernel's inputs, in operand order (those a call passes).
INPUTS = ("h", "h1", "attn", "attn_acc", "attn_max", "attn_sum", "wo", "mlp_norm", "router_w",
          "expert_ids", "expert_weights", "w_gate_up", "w_down", "next_norm", "next_wqkv",
          "final_norm", "barrier")

# The caller-held barrier counter: int16 words (Pallas accepts 16-bit refs as semaphores; the
# counter is the 32-bit word at word 0) and, 16 bytes in, an 8-word slot that only declares the
# buffer written (see `_declare_written`).
BARRIER_WORDS = 16


def phase_outputs(shape: TailShape, plans: dict, phases: tuple) -> dict[int, list[tuple]]:
    """Buffers each phase writes (name, shape, dtype), in the kernel's output order."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    layer = 0 in plans or EXPERT_DOWN in plans  # a layer's MLP output (else P3 alone)
    outs = {FINAL_NORM: [("x", (shape.hidden,), bf16)]} if layer else {}
    if 0 in plans:
        outs[0] = [("part_o", (plans[0].splits, shape.hidden), f32)]
    if 1 in plans:
        outs.update({1: [("act", (1, shape.intermediate), f32), ("h1", (shape.hidden,), bf16)],
                     2: [("part_d", (plans[2].splits, shape.hidden), f32)]})
    if ROUTER in plans:
        outs.update({
            ROUTER: [("part_logits", (plans[ROUTER].splits, shape.num_experts), f32),
                     ("h1", (shape.hidden,), bf16)]})
    if EXPERT_DOWN in plans:
        outs.update({
            EXPERT_GATE_UP: [("act", (1, shape.top_k * shape.intermediate), f32)],
            EXPERT_DOWN: [("part_d", (plans[EXPERT_DOWN].splits, shape.hidden), f32)]})
    if 3 in plans:  # h2 only after a layer (alone, P3 takes its row as it is)
        outs[3] = [("part_qkv", (plans[3].splits, shape.qkv_size), f32)] + (
            [("h2", (shape.hidden,), bf16)] if layer else [])
    return {p: outs[p] for p in phases}


def scratch_types(shape: TailShape, tiling: TailTiling, plans: dict, interpret: bool,
                  barrier: bool) -> dict:
    """The kernel's shared-memory buffers and barriers by name."""
    x_len = max([shape.hidden] + [p.k_range for p in plans.values()])
    scratch = dict(
        x_vec=plgpu.SMEM((x_len,), jnp.bfloat16),
        w_smem=plgpu.SMEM((tiling.stages, tiling.block_k, tiling.block_n), jnp.bfloat16,
                          transforms=_TILED),
        o_smem=plgpu.SMEM((ROWS, tiling.block_n), jnp.float32),
        ready=plgpu.Barrier(num_arrivals=1, num_barriers=tiling.stages),
        free=plgpu.Barrier(num_arrivals=1, num_barriers=tiling.stages),
    )
    if interpret:
        scratch["a_smem"] = plgpu.SMEM((ROWS, tiling.block_k), jnp.bfloat16,
                                       transforms=_TILED)
    if barrier:
        scratch["barrier_slot"] = plgpu.SMEM((8,), jnp.int16)
    return scratch


def _column(plan: PhasePlan, cta, tile):
    """First weight column of a CTA's tile (tile may be traced)."""
    member = lax.rem(cta, plan.group)
    if not plan.paired:
        return pl.multiple_of((member * plan.strips_per_cta + tile) * plan.block_n,
                              plan.block_n)
    strip = member * plan.strips_per_cta + lax.div(tile, 2)
    return pl.multiple_of(strip * plan.block_n + lax.rem(tile, 2) * plan.n, plan.block_n)


def _k_start(plan: PhasePlan, cta):
    """First weight row of the CTA's K-range."""
    return pl.multiple_of(lax.div(cta, plan.group) * plan.k_range, plan.block_k)


def _chunk(plan: PhasePlan, cta, i):
    """(first row, first column) of the CTA's i-th weight chunk (i may be traced)."""
    tile, chunk = lax.div(i, plan.chunks), lax.rem(i, plan.chunks)
    return (pl.multiple_of(_k_start(plan, cta) + chunk * plan.block_k, plan.block_k),
            _column(plan, cta, tile))


def _weight_chunk(r, p: int, plan: PhasePlan, cta, i):
    """The GMEM view of the CTA's i-th [block_k, block_n] weight chunk of phase p. An expert
    phase's virtual weight (decode_layer_plan's module docstring) maps to the chunk of expert
    expert_ids[slot]'s own matrix."""
    bk, bn = plan.block_k, plan.block_n
    row, col = _chunk(plan, cta, i)
    weight = r[_WEIGHT_OF[p]]
    if p == EXPERT_GATE_UP:  # virtual gate columns, then up columns, slot by slot
        width = plan.expert_width
        up = lax.rem(lax.div(i, plan.chunks), 2)  # the tile's up strip (else its gate strip)
        gate_col = col - up * plan.n
        slot = _expert_slot(plan, gate_col)
        weight = weight.at[r["expert_ids"][slot]]  # [hidden, 2 * I]: gate | up
        col = pl.multiple_of(gate_col - slot * width + up * width, bn)
    elif p == EXPERT_DOWN:  # row `row` of the experts' rows stacked, slot by slot
        slot = lax.div(row, plan.expert_width)
        weight = weight.at[r["expert_ids"][slot]]
        row = pl.multiple_of(row - slot * plan.expert_width, bk)
    return weight.at[pl.ds(row, bk), pl.ds(col, bn)]


def _expert_slot(plan: PhasePlan, col):
    """The expert slot of an EXPERT_GATE_UP strip starting at virtual column col."""
    return lax.div(col, plan.expert_width)


def _load(ref, layout, interpret):
    if interpret:
        return ref[...]
    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:  # jax 0.10: the index is a positional argument
        return plgpu.load(ref, (), layout=layout)


def _grid_barrier(counter, index: int, base, num_ctas):
    """Grid barrier `index` of a call whose counter stood at `base` (a multiple of num_ctas)
    when it began: arrive, then wait until every CTA has arrived at this barrier."""
    plgpu.semaphore_signal(counter, 1, memory_scope="gpu")
    plgpu.semaphore_wait(counter, base + (index + 1) * num_ctas, decrement=False,
                         memory_scope="gpu")


def _declare_written(r, cta, num_ctas):
    """A TMA store into the barrier buffer's spare slot that never runs: Pallas aliases a Ref
    operand to the kernel's output only if the kernel writes it, and semaphore updates do not
    count as writes. Without the alias XLA would take the counter for a read-only input."""
    @pl.when(cta == num_ctas)
    def _never():
        plgpu.copy_smem_to_gmem(r["barrier_slot"], r["barrier"].at[pl.ds(8, 8)])
        plgpu.wait_smem_to_gmem(0)


def _merge_splits(r, cols):
    """Columns `cols` of the attention output from its context splits' softmax states
    (fused_decode's partials=True: acc, base-2 max and sum per split, max and sum repeated
    along each head's values), as fused_decode's combine computes them, rounded to bf16."""
    splits = r["attn_acc"].shape[0]
    maxima = [r["attn_max"].at[s][cols] for s in range(splits)]
    top = maxima[0]
    for m in maxima[1:]:
        top = jnp.maximum(top, m)
    num = den = None
    for s, m in enumerate(maxima):
        weight = jnp.exp2(m - top)
        a, l = weight * r["attn_acc"].at[s][cols], weight * r["attn_sum"].at[s][cols]
        num, den = (a, l) if num is None else (num + a, den + l)
    return (num / jnp.where(den > 0, den, 1.0)).astype(jnp.bfloat16)


def _residual_norm(r, cta, base: str, parts: str, norm: str, out: Optional[str],
                   shape: TailShape):
    """rms_norm(bf16(r[base] + the sum of r[parts]' rows)) * r[norm] (the row alone without
    r[parts]), storing the bf16 sum to r[out] from CTA 0 (where out is one of the refs)."""
    row = r[base][...].astype(jnp.float32)
    if parts in r:
        for s in range(r[parts].shape[0]):
            row = row + r[parts][s]
    row_bf16 = row.astype(jnp.bfloat16)
    if out in r:
        @pl.when(cta == 0)
        def _store():
            r[out][...] = row_bf16
    return _rms_scaled(row_bf16.astype(jnp.float32), r[norm], shape.hidden, shape.eps)


def _rms_scaled(row_f32, weight_ref, hidden: int, eps: float):
    """rms_norm as the model computes it, on a bf16-rounded row: bf16(row * rsqrt(mean(row^2)
    + eps)) * weight (a bf16 product)."""
    inv = lax.rsqrt(jnp.sum(row_f32 * row_f32) / hidden + eps)
    normed = (row_f32 * inv).astype(jnp.bfloat16).astype(jnp.float32)
    return (normed * weight_ref[...].astype(jnp.float32)).astype(jnp.bfloat16)


def make_body(shape: TailShape, tiling: TailTiling, plans: dict, phases: tuple,
              names: list[str], interpret: bool):
    """The kernel body running `phases` (with grid barriers between them), refs by `names`.
    Named scopes mark the regions of the in-kernel profile (decode_layer_tail_mgpu's
    `profile_dir`)."""
    bn, bk, stages, num_ctas = tiling.block_n, tiling.block_k, tiling.stages, tiling.num_ctas
    hidden = shape.hidden
    steps = [plans[p].steps if p in plans else 0 for p in phases]

    def at_work(p, cta):
        """Whether the CTA works in phase p (None: every CTA does)."""
        if p not in plans or plans[p].active == num_ctas:
            return None
        return cta < plans[p].active

    def ring_steps(p, count, cta):
        """The weight chunks the CTA streams in phase p (traced where some CTAs idle)."""
        work = at_work(p, cta)
        return count if work is None else jnp.where(work, count, 0)

    def when_at_work(p, cta, fn):
        work = at_work(p, cta)
        return fn() if work is None else pl.when(work)(fn)

    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def producer(r, cta):
        first = 0
        for p, count in zip(phases, steps):
            if p not in plans:  # no weights
                continue
            plan = plans[p]

            def fill(i, carry, p=p, plan=plan, first=first):
                step = first + i
                slot = lax.rem(step, stages)
                pl.when(step >= stages)(lambda: plgpu.barrier_wait(r["free"].at[slot]))
                plgpu.copy_gmem_to_smem(_weight_chunk(r, p, plan, cta, i),
                                        r["w_smem"].at[slot], r["ready"].at[slot])
                return carry
            with jax.named_scope(f"load_p{p}"):
                when_at_work(p, cta, lambda fill=fill, count=count:
                             lax.fori_loop(0, count, fill, None))
            first = first + ring_steps(p, count, cta)

    def build_input(p, r, cta, plan):
        """The phase's input row into x_vec; returns the offset of this CTA's K-range in it."""
        x_vec = r["x_vec"]
        k0 = _k_start(plan, cta)
        if p == 0 and "attn_acc" in r:  # the attention's context splits, merged here
            x_vec[pl.ds(0, plan.k_range)] = _merge_splits(r, pl.ds(k0, plan.k_range))
            return 0
        if p in (0, 2, EXPERT_DOWN):  # a K-range of the attention output / the activation
            src = r["attn"].at[0] if p == 0 else r["act"].at[0]
            x = src[pl.ds(k0, plan.k_range)]
            x_vec[pl.ds(0, plan.k_range)] = x.astype(jnp.bfloat16)
            return 0
        # P1, ROUTER / EXPERT_GATE_UP / P3: residual + sum of partials (none: P3 alone; the
        # experts' row is h1 as ROUTER stored it), whole row (the norm needs all of it)
        base, parts, norm, out = {1: ("h", "part_o", "mlp_norm", "h1"),
                                  ROUTER: ("h", "part_o", "mlp_norm", "h1"),
                                  EXPERT_GATE_UP: ("h1", "", "mlp_norm", None),
                                  3: ("h1", "part_d", "next_norm", "h2")}[p]
        x_vec[pl.ds(0, hidden)] = _residual_norm(r, cta, base, parts, norm, out, shape)
        return k0

    def final_norm(r, cta):
        """FINAL_NORM: CTA 0 writes the layer's output row, final-normed, to x."""
        @pl.when(cta == 0)
        def _final():
            r["x"][...] = _residual_norm(r, cta, "h1", "part_d", "final_norm", None, shape)

    def matmul_tile(r, plan, x_off, first, total_steps):
        """One tile's [ROWS, bn] product from the ring's next plan.chunks slots (of the
        CTA's total_steps)."""
        def accumulate(acc_ref):
            def chunk(c, carry):
                step = first + c
                slot = lax.rem(step, stages)
                xc = _load(r["x_vec"].at[pl.ds(pl.multiple_of(x_off + c * bk, bk), bk)],
                           col_layout, interpret)
                a = lax.broadcast_in_dim(xc, (ROWS, bk), [1])
                if interpret:  # no register operands in the interpreter
                    r["a_smem"][...] = a
                    a = r["a_smem"]
                plgpu.barrier_wait(r["ready"].at[slot])
                plgpu.wgmma(acc_ref, a, r["w_smem"].at[slot])
                plgpu.wgmma_wait(0)
                # Free the slot only if the producer refills it (each barrier phase that
                # completes must be waited for).
                pl.when(step + stages < total_steps)(
                    lambda: plgpu.barrier_arrive(r["free"].at[slot]))
                return carry
            lax.fori_loop(0, plan.chunks, chunk, None)
            return acc_ref[...]
        return pl.run_scoped(accumulate, plgpu.ACC((ROWS, bn), jnp.float32))

    def store_row(r, value, dst):
        """Row 0 of a [ROWS, bn] float32 tile value -> dst ([1, bn] GMEM view), by TMA."""
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store read o_smem
        r["o_smem"][...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(r["o_smem"].at[pl.ds(0, 1)], dst)

    def consumer(r, cta):
        if not interpret:
            if "barrier" in r:
                counter = r["barrier"].at[0]
                _declare_written(r, cta, num_ctas)
            else:
                counter = pl.get_global(plgpu.SemaphoreType.REGULAR)
            base = pl.semaphore_read(counter)  # before this CTA's first arrival
            base = base - lax.rem(base, num_ctas)
        first = 0
        total_steps = sum(ring_steps(p, count, cta) for p, count in zip(phases, steps))
        for i, p in enumerate(phases):
            if i:
                with jax.named_scope(f"barrier{i - 1}"):
                    _grid_barrier(counter, i - 1, base, num_ctas)
            if p == FINAL_NORM:
                with jax.named_scope("final_norm"):
                    final_norm(r, cta)
                continue
            plan = plans[p]

            def work(p=p, plan=plan, first=first):
                with jax.named_scope(f"build_p{p}"):
                    x_off = build_input(p, r, cta, plan)
                    plgpu.commit_smem()  # x_vec written by all threads, read by all below
                with jax.named_scope(f"matmul_p{p}"):
                    matmul_phase(r, cta, p, plan, x_off, first, total_steps)
            when_at_work(p, cta, work)
            first = first + ring_steps(p, steps[i], cta)

    def matmul_phase(r, cta, p, plan, x_off, first, total_steps):
        """The CTA's tiles of phase p, their rows stored to GMEM (complete on return)."""
        split = lax.div(cta, plan.group)
        for t in range(plan.strips_per_cta):
            if plan.paired:
                col = _column(plan, cta, 2 * t)  # the gate strip: act's columns
                gate = matmul_tile(r, plan, x_off, first + 2 * t * plan.chunks, total_steps)
                up = matmul_tile(r, plan, x_off, first + (2 * t + 1) * plan.chunks,
                                 total_steps)
                act = gate * jax.nn.sigmoid(gate) * up
                if p == EXPERT_GATE_UP:  # weighted by its expert's routing weight
                    act = act * r["expert_weights"][_expert_slot(plan, col)]
                store_row(r, act, r["act"].at[pl.ds(0, 1), pl.ds(col, bn)])
            else:
                col = _column(plan, cta, t)
                out = matmul_tile(r, plan, x_off, first + t * plan.chunks, total_steps)
                dst = r[{0: "part_o", 2: "part_d", 3: "part_qkv", ROUTER: "part_logits",
                         EXPERT_DOWN: "part_d"}[p]]
                store_row(r, out, dst.at[pl.ds(split, 1), pl.ds(col, bn)])
        plgpu.wait_smem_to_gmem(0)  # this phase's rows are in GMEM before the barrier

    def body(*refs):
        r = dict(zip(names, refs))
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        pl.when(wg == 1)(lambda: producer(r, cta))
        pl.when(wg == 0)(lambda: consumer(r, cta))
    return body
