"""Batch-1 decode: a decoder layer's projections after attention in one persistent Mosaic GPU
kernel (Hopper), from the attention output to the next layer's QKV projection.

At batch 1 a decode step streams every weight once and does almost no arithmetic, so what decides
its speed is how close the weight stream runs to HBM bandwidth and how much time is lost between
kernels. XLA runs a layer as ~13 kernels (GEMMs with split-K reductions, norms, residual adds),
each with its own launch, ramp and tail. This kernel runs, as one grid of `num_ctas` resident
CTAs (one per SM), the four phases

  P0  o   = attn @ wo                                    (split-K partials)
  P1  h1  = h + sum(o);  x = rms_norm(h1) * mlp_norm;  act = silu(x @ w_gate) * (x @ w_up)
  P2  d   = act @ w_down                                 (split-K partials)
  P3  h2  = h1 + sum(d); x = rms_norm(h2) * next_norm; qkv = x @ next_wqkv   (split-K partials)

with a grid-wide barrier between phases (each phase reads what the previous one wrote). P3 is
the next layer's first projection, so per layer the step is: attention kernel, this kernel.
Without a next layer (the last one) it stops after P2, or, given the model's final norm, ends
with the phase FINAL_NORM (CTA 0 writes rms_norm(h1 + sum(d)) * final_norm, the LM head's
input). The first layer's QKV row is P3 alone on the token's embedding
(`decode_row_qkv_mgpu`). The attention output may come as its context splits' softmax states
(fused_decode's partials=True), which P0 merges as it reads its K-range (the engine's path:
jinfer.model.llama._one_row_decode), and P3's QKV partials go to the attention kernel as they are.

Optionally (`attn` as a `RowAttention`: the QKV partials, RoPE's rows, the paged pools, the
block table) the kernel also computes the layer's attention, as a phase ATTENTION before P0, so
that per layer the step is one kernel from the QKV partials to the next layer's: CTA c takes KV
head c // splits and context split c % splits (splits = num_ctas / kv_heads); it sums its
heads' QKV partials, applies RoPE (x * cos + swap_halves(x) * sin, the swap a wgmma with a
permutation matrix, exact in bf16), writes the new token's K/V row into the pools (Ref operands,
updated in place; split 0), attends its split's keys (64-key steps of TMA page copies through
the block table, double-buffered; S = Q K^T and P V on wgmma with the query group as rows of a
64-row tile) and the new token (from registers, split 0), and stores its softmax state; P0
merges the splits after a grid barrier. The memory warpgroup starts the weight stream once the
phase's loads are issued (they would queue behind the weights in the SM's TMA unit otherwise).
Measured end to end it is slower than the fused attention kernel between layer kernels (H100,
Llama-3.2-1B, 256-token context: 919.9 vs 941.5 tok/s, scripts/bench_latency.py --layer-attention
on / off): the phase's dependent loads, the extra grid barrier and its stores cost more than the
kernel boundary they remove. The engine keeps it off (jinfer.runner.model_runner.LAYER_TILING).

Design (warp specialised; measured by scripts/bench_layer_mgpu.py):
- Two warpgroups per CTA. The memory warpgroup TMA-copies every weight chunk ([block_k,
  block_n] bf16) this CTA multiplies, phase after phase, into a ring of `stages` shared-memory
  slots. Weights do not depend on the data, so it never waits for a grid barrier: while the
  grid synchronises it keeps loading the next phase's weights (up to `stages` chunks ahead).
- The compute warpgroup, per phase: waits at the grid barrier, builds the phase's input row
  (sums the previous phase's partials, adds the residual, RMS-normalises: each CTA recomputes
  the whole row, a few KB from L2) into a shared-memory vector, then per chunk broadcasts the
  row's slice to wgmma's 64 rows in registers (every row is the same, the product's row 0 is
  taken) and multiplies it with the weight slot.
- Work split: a phase's [K, N] weight is cut into `splits` K-ranges x N / block_n column strips;
  CTA c owns split c // group and a run of strips (`PhasePlan`). Splits are as few as the CTA
  count allows, so each CTA's input is one K-range. Each tile's row goes to GMEM by TMA (a
  partial [splits, N] float32 buffer the next phase sums). Gate/up (P1) are not split along K:
  CTA c owns gate strip j and up strip j and writes silu(gate) * up directly.
- Grid barrier (`_grid_barrier`): every CTA adds one to an arrival counter and polls it
  until all have arrived (one round trip through L2). The counter only grows: a CTA reads it
  before its first arrival (every earlier call's arrivals are in, this call's first barrier is
  not complete without this CTA) and rounds down to a multiple of the grid to get its call's
  base, so no barrier ever resets it. The counter is the caller's `barrier` buffer
  (`new_barrier_counter()`, threaded through a step's layers: one zero-fill per step) or, without
  one, a `pl.get_global` semaphore, which Pallas zero-fills before every call: a memset kernel
  per call, 1.1 us per layer more in a 16-layer stack (51.0 vs 49.9 us, H100).
- Rounding follows the XLA model where it matters: h1, h2 and the normalised rows are rounded
  to bf16 as `rms_norm` rounds them; products are accumulated in float32 over the full K (XLA
  rounds each GEMM's output to bf16 first), so outputs differ from the model's by bf16 rounding.

Measured (H100, jax 0.11.2, scripts/bench_layer_mgpu.py, Llama-3.2-1B's layer: 121.6 MB of
weights per call): 48.4 us of kernel time; XLA's eleven kernels for the same math 54.3 us. In a
jitted stack of 16 layers dispatched back to back: 50.2 us per layer against XLA's 57.5 (wall).
Without barriers and input builds the kernel streams in 42.2 us: each costs ~3 us in all, latency
that neither more ring slots (4 to 12) nor software-pipelined wgmma waits hid.

Interpret mode (CPU, CI): Mosaic GPU's interpreter (jax 0.10.2) has no global semaphores and no
register wgmma operands, so each phase runs as its own kernel launch (the launch boundary is the
grid barrier) and the broadcast row goes through shared-memory scratch into wgmma. The rest is
the same code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic_gpu_cache import stable_kernel_hashes
from pallas_kernels.paged_decode import LOG2E, NEG_INF
from pallas_kernels.kv_write import write_kv_reference
from pallas_kernels.paged_prefill_mgpu import (_accumulate_pv, _iota, _k_operand, _layout,
                                               interpret_params)

ROWS = 64  # wgmma's M: the one input row broadcast to 64
_TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 = 128 B rows


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """The layer's attention, when the kernel computes it (phase ATTENTION): heads, the paged
    pool's geometry and the softmax scale."""

    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int   # pool blocks per layer
    scale: float

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def chunk(self) -> int:  # keys per TMA copy: a page, or the part of one in a key step
        return min(self.block_size, KEYS)


@dataclasses.dataclass(frozen=True)
class TailShape:
    """The layer's sizes: hidden, attention output width (num_heads * head_dim), MLP width and
    the next layer's QKV width (0: no next layer); `attention`: the kernel's own attention
    phase (None: the attention output comes in)."""

    hidden: int
    q_size: int
    intermediate: int
    qkv_size: int
    eps: float
    attention: Optional[AttentionShape] = None


class RowAttention(NamedTuple):
    """The layer's attention inputs, for the kernel to compute it itself (phase ATTENTION)
    instead of taking its output (see `decode_layer_tail_mgpu`)."""

    qkv_parts: jax.Array  # [splits, (num_heads + 2 kv_heads) * head_dim] float32: QKV partials
    rope: jax.Array       # [2, head_dim] float32: `rope_rows` at the token's position
    k_pool: jax.Array     # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array
    pages: jax.Array      # [width] int32: the sequence's block table (entries past it: 0)
    meta: jax.Array       # [2] int32: (context tokens before the new one, its slot (< 0: none))
    layer: jax.Array      # [1] int32: the layer of the pools


def rope_rows(cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE's cos / sin [head_dim / 2] at one position -> [2, head_dim] float32 rows
    (cos | cos) and (-sin | sin): rotate-half is x * row0 + swap_halves(x) * row1."""
    cos, sin = cos.astype(jnp.float32).reshape(-1), sin.astype(jnp.float32).reshape(-1)
    return jnp.stack([jnp.concatenate([cos, cos]), jnp.concatenate([-sin, sin])])


def _swap_halves_matrix(head_dim: int) -> np.ndarray:
    """[head_dim, head_dim] permutation P (0 / 1, exact in bf16): x @ P swaps x's halves."""
    half = head_dim // 2
    perm = np.zeros((head_dim, head_dim), np.float32)
    perm[np.arange(head_dim), (np.arange(head_dim) + half) % head_dim] = 1
    return perm


@dataclasses.dataclass(frozen=True)
class TailTiling:
    block_n: int = 64
    block_k: int = 128
    stages: int = 8
    num_ctas: int = 128
    attention: bool = True  # for callers: each layer's attention as the kernel's first phase


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """A [k, n] projection over num_ctas CTAs: CTA c takes K-range c // group (of `splits`) and
    strips [(c % group) * strips_per_cta, ...) of block_n columns; `paired`: n columns of gate
    then n of up, each CTA taking the same strips of both."""

    k: int
    n: int
    splits: int
    group: int
    strips_per_cta: int
    paired: bool
    block_k: int
    block_n: int

    @property
    def k_range(self) -> int:
        return self.k // self.splits

    @property
    def chunks(self) -> int:  # weight chunks per tile
        return self.k_range // self.block_k

    @property
    def tiles(self) -> int:   # tiles per CTA
        return self.strips_per_cta * (2 if self.paired else 1)

    @property
    def steps(self) -> int:   # weight chunks per CTA
        return self.tiles * self.chunks

    def column(self, cta, tile):
        """First weight column of a CTA's tile (tile may be traced)."""
        member = lax.rem(cta, self.group)
        if not self.paired:
            return pl.multiple_of((member * self.strips_per_cta + tile) * self.block_n,
                                  self.block_n)
        strip = member * self.strips_per_cta + lax.div(tile, 2)
        return pl.multiple_of(strip * self.block_n + lax.rem(tile, 2) * self.n, self.block_n)

    def k_start(self, cta):
        """First weight row of the CTA's K-range."""
        return pl.multiple_of(lax.div(cta, self.group) * self.k_range, self.block_k)

    def chunk(self, cta, i):
        """(first row, first column) of the CTA's i-th weight chunk (i may be traced)."""
        tile, chunk = lax.div(i, self.chunks), lax.rem(i, self.chunks)
        return (pl.multiple_of(self.k_start(cta) + chunk * self.block_k, self.block_k),
                self.column(cta, tile))


def plan_phase(k: int, n: int, tiling: TailTiling, *, paired: bool = False) -> PhasePlan:
    """The fewest K-splits that give every CTA the same whole number of strips."""
    bn, bk, ctas = tiling.block_n, tiling.block_k, tiling.num_ctas
    if n % bn:
        raise ValueError(f"{n} columns are not a multiple of block_n={bn}")
    strips = n // bn
    for splits in range(1, 2 if paired else ctas + 1):
        group = ctas // splits
        if (ctas % splits or strips % group or k % splits or (k // splits) % bk):
            continue
        return PhasePlan(k, n, splits, group, strips // group, paired, bk, bn)
    raise ValueError(f"a [{k}, {n}] projection does not split evenly over {ctas} CTAs in "
                     f"[{bk}, {bn}] chunks" + (" without splitting K" if paired else ""))


KEYS = 64  # keys per attention step: S = Q K^T's N, P V's K


def attention_splits(a: AttentionShape, tiling: TailTiling) -> int:
    """Context splits of the attention phase (one CTA per KV head and split); ValueError if
    the kernel does not take this attention."""
    if tiling.num_ctas % a.kv_heads or a.num_heads % a.kv_heads:
        raise ValueError(f"{a.kv_heads} KV heads do not divide {tiling.num_ctas} CTAs "
                         f"(or {a.num_heads} query heads)")
    if a.head_dim != 64 or a.group > ROWS - 1:
        raise ValueError(f"the attention phase takes head_dim 64 and up to {ROWS - 1} query "
                         f"heads per KV head, got head_dim={a.head_dim}, group={a.group}")
    if a.block_size < 8 or a.block_size & (a.block_size - 1):
        raise ValueError(f"the attention phase needs a power-of-two block_size >= 8, got "
                         f"{a.block_size}")
    return tiling.num_ctas // a.kv_heads


def plan_tail(shape: TailShape, tiling: TailTiling) -> dict[int, PhasePlan]:
    """Plans of the phases with weights, by phase: P0..P2 (with q_size), P3 (with qkv_size);
    ValueError if the shape does not fit."""
    if shape.attention is not None:
        attention_splits(shape.attention, tiling)
    plans = {}
    if shape.q_size:
        plans[0] = plan_phase(shape.q_size, shape.hidden, tiling)
        plans[1] = plan_phase(shape.hidden, shape.intermediate, tiling, paired=True)
        plans[2] = plan_phase(shape.intermediate, shape.hidden, tiling)
    if shape.qkv_size:
        plans[3] = plan_phase(shape.hidden, shape.qkv_size, tiling)
    if shape.hidden % 128 or shape.hidden > 16384:
        raise ValueError(f"hidden={shape.hidden}: the row ops need a multiple of 128")
    return plans


PROFILE_EVENTS = 64  # profiler entries per warpgroup (2 per region, 3 for a header)
FINAL_NORM = 4  # the phase without weights: the last layer's output row, final-normed
ATTENTION = 5   # the phase before P0, without weights: the layer's attention (RowAttention)


def _phase_outputs(shape: TailShape, plans: dict, phases: tuple, tiling: TailTiling,
                   interpret: bool) -> dict[int, list[tuple]]:
    """Buffers each phase writes (name, shape, dtype), in the kernel's output order."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    outs = {0: [("part_o", (plans[0].splits, shape.hidden), f32)],
            1: [("act", (1, shape.intermediate), f32), ("h1", (shape.hidden,), bf16)],
            2: [("part_d", (plans[2].splits, shape.hidden), f32)],
            FINAL_NORM: [("x", (shape.hidden,), bf16)]} if 0 in plans else {}
    if 3 in plans:  # h2 only after a layer (alone, P3 takes its row as it is)
        outs[3] = [("part_qkv", (plans[3].splits, shape.qkv_size), f32)] + (
            [("h2", (shape.hidden,), bf16)] if 0 in plans else [])
    if shape.attention is not None:  # the context splits' softmax states, as P0 merges them
        a = shape.attention
        state = (attention_splits(a, tiling), shape.q_size)
        outs[ATTENTION] = [("attn_acc", state, f32), ("attn_max", state, f32),
                           ("attn_sum", state, f32)] + (
            # without Ref operands: the new token's rotated K and V row, for the caller to
            # write into the pools
            [("kv_new", (2, a.kv_heads, a.head_dim), bf16)] if interpret else [])
    return {p: outs[p] for p in phases}


_INPUTS = ("h", "h1", "attn", "attn_acc", "attn_max", "attn_sum", "qkv_parts", "rope",
           "rope_perm", "pages", "meta", "layer", "k_pool", "v_pool", "wo", "mlp_norm",
           "w_gate_up", "w_down", "next_norm", "next_wqkv", "final_norm", "barrier")

# The caller-held barrier counter: int16 words (Pallas accepts 16-bit refs as semaphores; the
# counter is the 32-bit word at word 0) and, 16 bytes in, an 8-word slot that only declares the
# buffer written (see `_declare_written`). Refs as kernel operands need jax >= 0.11.
BARRIER_WORDS = 16
BARRIER_OPERAND = jax.__version_info__ >= (0, 11, 0)


def new_barrier_counter() -> jax.Array:
    """A zeroed grid-barrier counter for `decode_layer_tail_mgpu(..., barrier=)`: pass each
    call's returned "barrier" to the next call (any number of calls, any phase counts)."""
    return jnp.zeros((BARRIER_WORDS,), jnp.int16)


def _load(ref, layout, interpret):
    if interpret:
        return ref[...]
    try:
        return plgpu.load(ref, layout=layout)
    except TypeError:  # jax 0.10: the index is a positional argument
        return plgpu.load(ref, (), layout=layout)


def _wgmma_rows(r, a, b_ref, n: int, scratch: str, interpret):
    """a [64, k] bf16 (registers) @ b_ref [k, n] (shared memory) -> float32 [64, n]; in
    interpret mode `a` goes through shared-memory scratch (no register operands there)."""
    if interpret:
        r[scratch][...] = a
        a = r[scratch]

    def product(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        return acc_ref[...]
    return pl.run_scoped(product, plgpu.ACC((ROWS, n), jnp.float32))


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


MIN_STEPS_PER_SPLIT = 2  # key steps (of KEYS) per attention split before more splits are used


def _attention_steps(n, splits: int):
    """The attention phase's work for n context keys: (key steps, steps per split, splits
    holding keys); short contexts use fewer splits (fewer states for P0 to merge)."""
    total = (n + KEYS - 1) // KEYS
    per = jnp.maximum((total + splits - 1) // splits, MIN_STEPS_PER_SPLIT)
    return total, per, jnp.maximum((total + per - 1) // per, 1)


def _merge_splits(r, cols, active=None):
    """Columns `cols` of the attention output from its context splits' softmax states
    (fused_decode's partials=True: acc, base-2 max and sum per split, max and sum repeated
    along each head's values), as fused_decode's combine computes them, rounded to bf16.
    `active` (traced): only the first `active` splits hold keys (the attention phase's), merged
    one by one with a running maximum; split 0 always holds the new token."""
    if active is not None:
        top, num, den = (r[name].at[0][cols] for name in ("attn_max", "attn_acc", "attn_sum"))

        def merge(s, carry):
            top, num, den = carry
            m = r["attn_max"].at[s][cols]
            new_top = jnp.maximum(top, m)
            old, weight = jnp.exp2(top - new_top), jnp.exp2(m - new_top)
            return (new_top, num * old + weight * r["attn_acc"].at[s][cols],
                    den * old + weight * r["attn_sum"].at[s][cols])
        _, num, den = lax.fori_loop(1, active, merge, (top, num, den))
        return (num / jnp.where(den > 0, den, 1.0)).astype(jnp.bfloat16)
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


def _make_body(shape: TailShape, tiling: TailTiling, plans: dict, phases: tuple,
               names: list[str], interpret: bool, diagnostic=frozenset()):
    """The kernel body running `phases` (with grid barriers between them), refs by `names`."""
    bn, bk, stages, num_ctas = tiling.block_n, tiling.block_k, tiling.stages, tiling.num_ctas
    hidden = shape.hidden
    steps = [plans[p].steps if p in plans else 0 for p in phases]
    total_steps = sum(steps)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    weight_of = {0: "wo", 1: "w_gate_up", 2: "w_down", 3: "next_wqkv"}

    def producer(r, cta):
        if ATTENTION in phases and not interpret:
            # The attention phase's loads go first: they are on the critical path, and this
            # SM's TMA unit would otherwise queue them behind `stages` weight chunks.
            plgpu.barrier_wait(r["pa_issued"])
        first = 0
        for p, count in zip(phases, steps):
            if p not in plans:  # no weights
                continue
            plan, weight = plans[p], r[weight_of[p]]

            def fill(i, carry, plan=plan, weight=weight, first=first):
                step = first + i
                slot = lax.rem(step, stages)
                pl.when(step >= stages)(lambda: plgpu.barrier_wait(r["free"].at[slot]))
                row, col = plan.chunk(cta, i)
                if "l2" in diagnostic:
                    row, col = 0, 0
                plgpu.copy_gmem_to_smem(
                    weight.at[pl.ds(row, bk), pl.ds(col, bn)],
                    r["w_smem"].at[slot], r["ready"].at[slot])
                return carry
            with jax.named_scope(f"load_p{p}"):  # (regions: see `profile_dir`)
                lax.fori_loop(0, count, fill, None)
            first += count

    def build_input(p, r, cta, plan):
        """The phase's input row into x_vec; returns the offset of this CTA's K-range in it."""
        x_vec = r["x_vec"]
        k0 = plan.k_start(cta)
        if p == 0 and "attn_acc" in r:  # the attention's context splits, merged here
            active = None
            if "meta" in r:  # the attention phase's splits: only those holding keys
                active = _attention_steps(r["meta"][0], attention_splits(shape.attention,
                                                                         tiling))[2]
            x_vec[pl.ds(0, plan.k_range)] = _merge_splits(r, pl.ds(k0, plan.k_range), active)
            return 0
        if p in (0, 2):  # a K-range of the attention output / the activation
            src = r["attn"].at[0] if p == 0 else r["act"].at[0]
            x = src[pl.ds(k0, plan.k_range)]
            x_vec[pl.ds(0, plan.k_range)] = x.astype(jnp.bfloat16)
            return 0
        # P1 / P3: residual + sum of partials (none: P3 alone), whole row (the norm needs all
        # of it)
        base, parts, norm, out = (("h", "part_o", "mlp_norm", "h1") if p == 1 else
                                  ("h1", "part_d", "next_norm", "h2"))
        x_vec[pl.ds(0, hidden)] = _residual_norm(r, cta, base, parts, norm, out, shape)
        return k0

    def attention(r, cta):
        """ATTENTION: CTA c takes KV head c // splits and context split c % splits. It sums its
        heads' QKV partials, rotates q and k (RoPE: x * cos + (x @ swap) * sin, the halves'
        swap a wgmma with a permutation), writes the new K/V row (split 0), attends its
        split's pool keys (TMA pages through the block table, double-buffered; S and P V on
        wgmma, the group's query heads as rows of a 64-row tile) and the new token (split 0:
        a key block of 64 copies of it, one visible), and stores its softmax state (acc, base-2
        max, sum; max and sum repeated along each head's values) for P0 to merge."""
        a = shape.attention
        dim, group, bs, chunk = a.head_dim, a.group, a.block_size, a.chunk
        splits = attention_splits(a, tiling)
        head, split = lax.div(cta, splits), lax.rem(cta, splits)
        f32, bf16 = jnp.float32, jnp.bfloat16
        layer = r["layer"][0]
        n = r["meta"][0]            # context tokens in the pool (before the new one)
        slot = r["meta"][1]         # the new token's slot in this layer's pool (< 0: none)
        total, per, active = _attention_steps(n, splits)
        lo = split * per
        hi = jnp.minimum(lo + per, total)
        pool_row0 = layer * (a.num_blocks * bs)

        def issue(step, buf):  # this step's pages of K and V into buffer `buf`
            for c in range(KEYS // chunk):
                key = step * KEYS + c * chunk
                page = r["pages"][lax.div(key, bs)]
                row = pl.multiple_of(pool_row0 + page * bs + lax.rem(key, bs), chunk)
                for pool, dst in (("k_pool", "k_buf"), ("v_pool", "v_buf")):
                    plgpu.copy_gmem_to_smem(r[pool].at[pl.ds(row, chunk), head],
                                            r[dst].at[buf, pl.ds(c * chunk, chunk)],
                                            r["kv_ready"].at[buf])
        # This CTA's columns of the QKV partials (its query heads, its K and V head) and the
        # RoPE rows into shared memory (register layouts load from there), the swap matrix.
        columns = [(head * group + g) * dim for g in range(group)] + [
            (a.num_heads + head) * dim, (a.num_heads + a.kv_heads + head) * dim]
        for j, col in enumerate(columns):
            plgpu.copy_gmem_to_smem(r["qkv_parts"].at[:, pl.ds(pl.multiple_of(col, dim), dim)],
                                    r["qkv_stage"].at[j], r["stage_ready"])
        plgpu.copy_gmem_to_smem(r["rope"], r["rope_smem"], r["stage_ready"])
        plgpu.copy_gmem_to_smem(r["rope_perm"], r["perm_smem"], r["perm_ready"])
        pl.when(lo < hi)(lambda: issue(lo, 0))
        if not interpret:
            plgpu.barrier_arrive(r["pa_issued"])  # the weight stream may start
        plgpu.barrier_wait(r["stage_ready"])

        def head_row(j):  # row j of the CTA's QKV heads: the partials' sum, rounded to bf16
            total_ = None
            for i in range(r["qkv_parts"].shape[0]):
                x = _load(r["qkv_stage"].at[j, i], col_layout, interpret)
                total_ = x if total_ is None else total_ + x
            return total_.astype(bf16)
        rows_iota = _iota((ROWS, dim), 0, interpret)
        q_rows = jnp.zeros((ROWS, dim), bf16)
        for g in range(group):
            row = lax.broadcast_in_dim(head_row(g), (ROWS, dim), [1])
            q_rows = jnp.where(rows_iota == g, row, q_rows)
        k_rows = lax.broadcast_in_dim(head_row(group), (ROWS, dim), [1])
        v_rows = lax.broadcast_in_dim(head_row(group + 1), (ROWS, dim), [1])
        cos = lax.broadcast_in_dim(_load(r["rope_smem"].at[0], col_layout, interpret),
                                   (ROWS, dim), [1])
        sin = lax.broadcast_in_dim(_load(r["rope_smem"].at[1], col_layout, interpret),
                                   (ROWS, dim), [1])
        plgpu.barrier_wait(r["perm_ready"])

        def rotate(x):  # RoPE of bf16 rows, in float32, rounded to bf16 as the model does
            swapped = _wgmma_rows(r, x, r["perm_smem"], dim, "a_pa", interpret)
            return (x.astype(f32) * cos + swapped * sin).astype(bf16)
        q = rotate(q_rows)
        k_new = rotate(k_rows)
        if interpret:
            r["a_pa"][...] = q
            q = r["a_pa"]
        # The new token as a key block: 64 copies of its K and V (only the first is visible).
        r["kn_smem"][...] = k_new
        r["vn_smem"][...] = v_rows
        r["kv_row"].at[0][...] = k_new
        r["kv_row"].at[1][...] = v_rows
        plgpu.commit_smem()

        @pl.when((split == 0) & (slot >= 0))
        def _write_new_token():
            for i, pool in enumerate(("k_pool", "v_pool")):
                if "kv_new" in r:  # interpret: the caller writes it
                    dst = r["kv_new"].at[pl.ds(i, 1), head]
                else:
                    dst = r[pool].at[pl.ds(pool_row0 + slot, 1), head]
                plgpu.copy_smem_to_gmem(r["kv_row"].at[i, pl.ds(0, 1)], dst)

        log2_scale = a.scale * LOG2E
        keys_iota = _iota((ROWS, KEYS), 1, interpret)

        def attend(carry, k_ref, v_ref, visible):
            o, row_max, row_sum = carry

            def logits(acc_ref):
                plgpu.wgmma(acc_ref, q, _k_operand(k_ref, r.get("kt_pa")))
                return acc_ref[...]
            s = pl.run_scoped(logits, plgpu.ACC((ROWS, KEYS), f32))
            s = jnp.where(keys_iota < visible, s, -jnp.inf)
            new_max = jnp.maximum(row_max, s.max(axis=1) * log2_scale)
            alpha = jnp.exp2(row_max - new_max)
            p = jnp.exp2(s * log2_scale - lax.broadcast_in_dim(new_max, s.shape, [0]))
            row_sum = row_sum * alpha + p.sum(axis=1)
            o = o * lax.broadcast_in_dim(alpha, o.shape, [0])
            o = _accumulate_pv(o, p.astype(bf16), v_ref, r.get("p_pa"), lambda: None)
            return o, new_max, row_sum

        reduced = plgpu.Layout.WGMMA.reduce(1)
        carry = (_layout(jnp.zeros((ROWS, dim), f32), plgpu.Layout.WGMMA, interpret),
                 _layout(jnp.full((ROWS,), NEG_INF, f32), reduced, interpret),
                 _layout(jnp.zeros((ROWS,), f32), reduced, interpret))
        # Every split runs the new token's block; only split 0 sees it.
        carry = attend(carry, r["kn_smem"], r["vn_smem"], jnp.where(split == 0, 1, 0))

        def step(i, carry):
            buf = lax.rem(i - lo, 2)
            pl.when(i + 1 < hi)(lambda: issue(i + 1, 1 - buf))
            plgpu.barrier_wait(r["kv_ready"].at[buf])
            return attend(carry, r["k_buf"].at[buf], r["v_buf"].at[buf], n - i * KEYS)
        o, row_max, row_sum = lax.fori_loop(lo, hi, step, carry)

        # The group's rows of each state to GMEM, a TMA row copy per query head (splits past
        # the active ones hold no keys: P0 does not read them).
        stage = r["o_smem"]
        for value, name in ((o, "attn_acc"), (lax.broadcast_in_dim(row_max, o.shape, [0]),
                                              "attn_max"),
                            (lax.broadcast_in_dim(row_sum, o.shape, [0]), "attn_sum")):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            stage[...] = value
            plgpu.commit_smem()

            @pl.when(split < active)
            def _store(name=name):
                for g in range(group):
                    col = pl.multiple_of((head * group + g) * dim, dim)
                    plgpu.copy_smem_to_gmem(stage.at[pl.ds(g, 1)],
                                            r[name].at[pl.ds(split, 1), pl.ds(col, dim)])
        plgpu.wait_smem_to_gmem(0)

    def final_norm(r, cta):
        """FINAL_NORM: CTA 0 writes the layer's output row, final-normed, to x."""
        @pl.when(cta == 0)
        def _final():
            r["x"][...] = _residual_norm(r, cta, "h1", "part_d", "final_norm", None, shape)

    def matmul_tile(r, plan, x_off, first):
        """One tile's [ROWS, bn] product from the ring's next plan.chunks slots."""
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
        for i, p in enumerate(phases):
            if i and "barrier" not in diagnostic:
                with jax.named_scope(f"barrier{i - 1}"):
                    _grid_barrier(counter, i - 1, base, num_ctas)
            if p == FINAL_NORM:
                with jax.named_scope("final_norm"):
                    final_norm(r, cta)
                continue
            if p == ATTENTION:
                with jax.named_scope("attention"):
                    attention(r, cta)
                continue
            plan = plans[p]
            with jax.named_scope(f"build_p{p}"):
                x_off = build_input(p, r, cta, plan) if "build" not in diagnostic else 0
                plgpu.commit_smem()  # x_vec written by all threads, read by all below
            with jax.named_scope(f"matmul_p{p}"):
                matmul_phase(r, cta, p, plan, x_off, first)
            first += steps[i]

    def matmul_phase(r, cta, p, plan, x_off, first):
        """The CTA's tiles of phase p, their rows stored to GMEM (complete on return)."""
        split = lax.div(cta, plan.group)
        for t in range(plan.strips_per_cta):
            if plan.paired:
                col = plan.column(cta, 2 * t)  # the gate strip: act's columns
                gate = matmul_tile(r, plan, x_off, first + 2 * t * plan.chunks)
                up = matmul_tile(r, plan, x_off, first + (2 * t + 1) * plan.chunks)
                act = gate * jax.nn.sigmoid(gate) * up
                store_row(r, act, r["act"].at[pl.ds(0, 1), pl.ds(col, bn)])
            else:
                col = plan.column(cta, t)
                out = matmul_tile(r, plan, x_off, first + t * plan.chunks)
                dst = r[{0: "part_o", 2: "part_d", 3: "part_qkv"}[p]]
                store_row(r, out, dst.at[pl.ds(split, 1), pl.ds(col, bn)])
        plgpu.wait_smem_to_gmem(0)  # this phase's rows are in GMEM before the barrier

    def body(*refs):
        r = dict(zip(names, refs))
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        pl.when(wg == 1)(lambda: producer(r, cta))
        pl.when(wg == 0)(lambda: consumer(r, cta))
    return body


def _scratch(shape: TailShape, tiling: TailTiling, plans, interpret: bool, barrier: bool,
             qkv_parts: int = 0) -> dict:
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
    if shape.attention is not None:
        dim, bf16 = shape.attention.head_dim, jnp.bfloat16
        copies = KEYS // shape.attention.chunk
        tiled = lambda *s: plgpu.SMEM(s, bf16, transforms=_TILED)  # noqa: E731
        scratch.update(
            perm_smem=tiled(dim, dim), k_buf=tiled(2, KEYS, dim), v_buf=tiled(2, KEYS, dim),
            kn_smem=tiled(KEYS, dim), vn_smem=tiled(KEYS, dim),
            kv_row=plgpu.SMEM((2, ROWS, dim), bf16),
            qkv_stage=plgpu.SMEM((shape.attention.group + 2, qkv_parts, dim), jnp.float32),
            rope_smem=plgpu.SMEM((2, dim), jnp.float32),
            stage_ready=plgpu.Barrier(num_arrivals=shape.attention.group + 3),
            perm_ready=plgpu.Barrier(num_arrivals=1),
            pa_issued=plgpu.Barrier(num_arrivals=1),
            kv_ready=plgpu.Barrier(num_arrivals=2 * copies, num_barriers=2))
        if interpret:
            scratch.update(a_pa=tiled(ROWS, dim), kt_pa=plgpu.SMEM((dim, KEYS), bf16),
                           p_pa=plgpu.SMEM((ROWS, KEYS), bf16))
    return scratch


def decode_layer_tail_mgpu(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm=None,
                           next_wqkv=None, *, final_norm=None, eps: float,
                           tiling: TailTiling = TailTiling(), barrier: Optional[jax.Array] = None,
                           attn_scale: Optional[float] = None,
                           interpret: Any = None, diagnostic: frozenset = frozenset(),
                           profile_dir: Optional[str] = None) -> dict:
    """One batch-1 decode row through wo, the MLP and (given) the next layer's QKV projection.

    h [hidden] bf16 (the residual stream entering the layer), attn [q_size] bf16 (the attention
    output) or its context splits before the merge, (acc, max, sum) each float32 [splits,
    q_size] (fused_decode's partials=True: the kernel merges them as it reads them, one XLA
    kernel less); weights in the model's [in, out] layout (w_gate_up: gate then up columns).
    Returns a dict of float32/bf16 buffers: "h1" [hidden] (after attention's residual add),
    "part_d" [splits, hidden] (the MLP output's split-K partials: h2 = h1 + sum), and with a
    next layer "h2" [hidden] and "part_qkv" [splits, qkv_size] (the next QKV row's partials).
    The last layer may take the model's `final_norm` instead: "x" [hidden] is then its output
    row final-normed (rms_norm(bf16(h1 + sum)) * final_norm, the LM head's input).
    ValueError for shapes the tiling does not divide (callers fall back to XLA).

    `barrier` (`new_barrier_counter()`, or the previous call's returned "barrier"): the grid
    barrier's counter, returned updated as "barrier"; without it the kernel allocates one that
    Pallas zero-fills before every call (one small memset kernel more per call). Interpret mode
    and jax < 0.11 (no Ref operands) return it unchanged.

    `diagnostic` (timing experiments only; the results are then wrong): "barrier" skips the
    grid barriers, "build" the input rows, "l2" streams one weight chunk over and over (from
    L2), to see what each costs. `profile_dir`: Mosaic GPU's in-kernel profiler writes a
    Chrome trace of every call there, per CTA and warpgroup: the regions load_pN (the memory
    warpgroup's loads of phase N), barrierN, build_pN and matmul_pN (the compute warpgroup's).
    """
    row_attention = isinstance(attn, RowAttention)
    split = isinstance(attn, (tuple, list)) and not row_attention
    if split:
        attn = tuple(attn)
        if len(attn) != 3 or any(a.ndim != 2 or a.shape != attn[0].shape
                                 or a.dtype != jnp.float32 for a in attn):
            raise ValueError("attn as context splits is (acc, max, sum), each float32 "
                             f"[splits, q_size]; got {[(a.dtype, a.shape) for a in attn]}")
    attention = _attention_shape(attn, attn_scale) if row_attention else None
    hidden = h.shape[-1]
    q_size = (attention.num_heads * attention.head_dim if row_attention else
              (attn[0] if split else attn).shape[-1])
    has_next = next_wqkv is not None
    if has_next and final_norm is not None:
        raise ValueError("final_norm is the last layer's: pass it without next_wqkv")
    shape = TailShape(hidden, q_size, w_down.shape[0],
                      next_wqkv.shape[1] if has_next else 0, eps, attention)
    _check(shape, h, None if split or row_attention else attn, wo=wo, mlp_norm=mlp_norm,
           w_gate_up=w_gate_up, w_down=w_down, next_norm=next_norm, next_wqkv=next_wqkv,
           final_norm=final_norm)
    inputs = dict(h=h.reshape(hidden), wo=wo, mlp_norm=mlp_norm, w_gate_up=w_gate_up,
                  w_down=w_down)
    if row_attention:
        attention_splits(attention, tiling)  # ValueError before any tracing
        if tiling.block_n != attention.head_dim:
            raise ValueError(f"the attention phase needs block_n == head_dim, got block_n="
                             f"{tiling.block_n}, head_dim={attention.head_dim}")
        rows = lambda pool: pool.reshape(-1, *pool.shape[3:])  # noqa: E731 (free)
        inputs.update(qkv_parts=attn.qkv_parts, rope=attn.rope.astype(jnp.float32),
                      rope_perm=jnp.asarray(_swap_halves_matrix(attention.head_dim),
                                            jnp.bfloat16),
                      pages=attn.pages.astype(jnp.int32), meta=attn.meta.astype(jnp.int32),
                      layer=attn.layer.astype(jnp.int32).reshape(1),
                      k_pool=rows(attn.k_pool), v_pool=rows(attn.v_pool))
    elif split:
        inputs.update(attn_acc=attn[0], attn_max=attn[1], attn_sum=attn[2])
    else:
        inputs.update(attn=attn.reshape(1, q_size))
    if has_next:
        inputs.update(next_norm=next_norm, next_wqkv=next_wqkv)
    if final_norm is not None:
        inputs.update(final_norm=final_norm)
    phases = ((ATTENTION,) if row_attention else ()) + (0, 1, 2) + (
        (3,) if has_next else ()) + ((FINAL_NORM,) if final_norm is not None else ())
    out = _run(shape, phases, inputs, tiling, barrier, interpret, diagnostic, profile_dir)
    if row_attention:
        out.update(_new_pools(out, attn))
    return {k: v for k, v in out.items() if k in ("h1", "part_d", "h2", "part_qkv", "x",
                                                  "barrier", "k_pool", "v_pool")}


def _attention_shape(attn: RowAttention, scale: Optional[float]) -> AttentionShape:
    if attn.k_pool.ndim != 5 or attn.v_pool.shape != attn.k_pool.shape:
        raise ValueError("k_pool and v_pool must be [layers, num_blocks, block_size, kv_heads, "
                         f"head_dim], got {attn.k_pool.shape} and {attn.v_pool.shape}")
    _, num_blocks, block_size, kv_heads, head_dim = attn.k_pool.shape
    width = attn.qkv_parts.shape[-1]
    if (attn.qkv_parts.ndim != 2 or attn.qkv_parts.dtype != jnp.float32
            or width % head_dim or width // head_dim <= 2 * kv_heads):
        raise ValueError(f"qkv_parts must be float32 [splits, (num_heads + 2 * {kv_heads}) * "
                         f"{head_dim}], got {attn.qkv_parts.dtype}{list(attn.qkv_parts.shape)}")
    if attn.k_pool.dtype != jnp.bfloat16:
        raise ValueError(f"the attention phase takes bf16 pools, got {attn.k_pool.dtype}")
    if attn.rope.shape != (2, head_dim) or attn.meta.shape != (2,) or attn.pages.ndim != 1:
        raise ValueError(f"rope must be [2, {head_dim}] (rope_rows), meta [2] and pages 1-D, "
                         f"got {attn.rope.shape}, {attn.meta.shape}, {attn.pages.shape}")
    num_heads = width // head_dim - 2 * kv_heads
    return AttentionShape(num_heads, kv_heads, head_dim, block_size, num_blocks,
                          float(head_dim ** -0.5 if scale is None else scale))


def _new_pools(out: dict, attn: RowAttention) -> dict:
    """The pools after the call: the kernel's own (Ref operands, written in place), or (where it
    cannot write them: interpret mode, jax < 0.11) with its new K/V row written here."""
    if "k_pool" in out:
        return {name: out[name].reshape(attn.k_pool.shape) for name in ("k_pool", "v_pool")}
    k_pool, v_pool = write_kv_reference(attn.k_pool, attn.v_pool, attn.layer.reshape(()),
                                        attn.meta[1:], out["kv_new"][:1], out["kv_new"][1:])
    return {"k_pool": k_pool, "v_pool": v_pool}


def decode_row_qkv_mgpu(h, norm, wqkv, *, eps: float, tiling: TailTiling = TailTiling(),
                        barrier: Optional[jax.Array] = None, interpret: Any = None) -> dict:
    """The first layer's QKV row of a batch-1 decode step: rms_norm(h) * norm @ wqkv as the
    kernel's P3 alone (one launch, no grid barrier), h [hidden] bf16 (the token's embedding).
    Returns {"part_qkv": float32 [splits, qkv_size]} (split-K partial sums, as the fused
    attention kernel takes them) and, given `barrier` (see decode_layer_tail_mgpu), "barrier"."""
    hidden = h.shape[-1]
    shape = TailShape(hidden, 0, 0, wqkv.shape[1], eps)
    _check(shape, h, None, next_norm=norm, next_wqkv=wqkv)
    inputs = dict(h1=h.reshape(hidden), next_norm=norm, next_wqkv=wqkv)
    out = _run(shape, (3,), inputs, tiling, barrier, interpret, frozenset())
    return {k: v for k, v in out.items() if k in ("part_qkv", "barrier")}


def _run(shape: TailShape, phases: tuple, inputs: dict, tiling: TailTiling, barrier,
         interpret, diagnostic, profile_dir=None) -> dict:
    """Launches `phases` over `inputs` (one kernel; in interpret mode one per phase, the launch
    boundary the grid barrier); returns every buffer the phases wrote, and "barrier"."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True:
        interpret = interpret_params()
    plans = plan_tail(shape, tiling)
    ref_operands = not interpret and BARRIER_OPERAND
    outs = _phase_outputs(shape, plans, phases, tiling, not ref_operands)
    if barrier is not None and (barrier.shape != (BARRIER_WORDS,) or barrier.dtype != jnp.int16):
        raise ValueError(f"barrier must come from new_barrier_counter(), got "
                         f"{barrier.dtype}{list(barrier.shape)}")
    use_barrier = barrier is not None and ref_operands
    inputs = dict(inputs)
    if use_barrier:
        inputs["barrier"] = jax.new_ref(barrier)  # updated in place, aliased in and out
    pool_refs = ref_operands and "k_pool" in inputs
    if pool_refs:  # the attention phase writes the new token's K/V row in place
        inputs.update(k_pool=jax.new_ref(inputs["k_pool"]), v_pool=jax.new_ref(inputs["v_pool"]))
    scratch = _scratch(shape, tiling, plans, bool(interpret), use_barrier,
                       inputs["qkv_parts"].shape[0] if "qkv_parts" in inputs else 0)
    if not interpret:
        stable_kernel_hashes()  # one compile of the kernel per process, not per step program
    launches = [phases] if not interpret else [(p,) for p in phases]
    produced: dict = {}
    for launch in launches:
        in_names = [n for n in _INPUTS if n in inputs] + list(produced)
        out_specs = [o for p in launch for o in outs[p]]
        names = in_names + [o[0] for o in out_specs] + list(scratch)
        body = _make_body(shape, tiling, plans, launch, names, bool(interpret), diagnostic)
        results = plgpu.kernel(
            body,
            out_type=tuple(jax.ShapeDtypeStruct(s, d) for _, s, d in out_specs),
            scratch_types=tuple(scratch.values()), grid=(tiling.num_ctas,),
            grid_names=("cta",), num_threads=2, thread_name="wg",
            **({"interpret": interpret} if interpret else {}),
            **({"compiler_params": plgpu.CompilerParams(profile_space=PROFILE_EVENTS,
                                                        profile_dir=profile_dir)}
               if profile_dir else {}),
        )(*[inputs[n] if n in inputs else produced[n] for n in in_names])
        produced.update({o[0]: v for o, v in zip(out_specs, results)})
    if barrier is not None:
        produced["barrier"] = jax.ref.freeze(inputs["barrier"]) if use_barrier else barrier
    if pool_refs:
        produced.update(k_pool=jax.ref.freeze(inputs["k_pool"]),
                        v_pool=jax.ref.freeze(inputs["v_pool"]))
    return produced


def _check(shape: TailShape, h, attn, **weights):
    hid, q, inter = shape.hidden, shape.q_size, shape.intermediate
    want = {"wo": (q, hid), "mlp_norm": (hid,), "w_gate_up": (hid, 2 * inter),
            "w_down": (inter, hid), "next_norm": (hid,), "next_wqkv": (hid, shape.qkv_size),
            "final_norm": (hid,)}
    for name, x in weights.items():
        if x is not None and (x.shape != want[name] or x.dtype != jnp.bfloat16):
            raise ValueError(f"{name} must be bf16 of shape {want[name]}, got "
                             f"{x.dtype}{list(x.shape)}")
    if h.size != hid or h.dtype != jnp.bfloat16:
        raise ValueError(f"h must be one bf16 row of {hid} values, got {h.dtype}{list(h.shape)}")
    if attn is not None and (attn.size != q or attn.dtype != jnp.bfloat16):  # None: splits
        raise ValueError(f"attn must be one bf16 row of {q} values (or its context splits), "
                         f"got {attn.dtype}{list(attn.shape)}")


def decode_layer_tail_reference(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm=None,
                                next_wqkv=None, *, final_norm=None, eps: float) -> dict:
    """The kernel's arithmetic in jnp (float32 accumulation, the same bf16 roundings); partials
    are returned summed in slot 0 of a [1, n] array (their split is an implementation detail:
    compare sums)."""
    f32 = jnp.float32
    hidden = h.shape[-1]
    norm = functools.partial(_reference_norm, eps=eps)
    mm = _reference_matmul
    h = h.reshape(hidden)
    h1 = (h.astype(f32) + mm(attn.reshape(-1), wo)).astype(jnp.bfloat16)
    gu = mm(norm(h1, mlp_norm), w_gate_up)
    gate, up = jnp.split(gu, 2)
    act = (gate * jax.nn.sigmoid(gate) * up).astype(jnp.bfloat16)
    d = mm(act, w_down)
    out = {"h1": h1, "part_d": d[None]}
    h2 = (h1.astype(f32) + d).astype(jnp.bfloat16)
    if next_wqkv is not None:
        out.update(h2=h2, part_qkv=mm(norm(h2, next_norm), next_wqkv)[None])
    if final_norm is not None:
        out.update(x=norm(h2, final_norm))
    return out


def decode_row_qkv_reference(h, norm, wqkv, *, eps: float) -> dict:
    """decode_row_qkv_mgpu's arithmetic in jnp; the partials summed in slot 0 of [1, n]."""
    return {"part_qkv": _reference_matmul(_reference_norm(h.reshape(-1), norm, eps), wqkv)[None]}


def _reference_norm(row_bf16, weight, eps: float):
    """_rms_scaled in jnp."""
    x = row_bf16.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(x * x) / x.shape[0] + eps)
    normed = (x * inv).astype(jnp.bfloat16).astype(jnp.float32)
    return (normed * weight.astype(jnp.float32)).astype(jnp.bfloat16)


def _reference_matmul(x, w):
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)


def random_tail_inputs(seed: int, hidden: int, q_size: int, intermediate: int,
                       qkv_size: int = 0) -> dict:
    """Keyword arguments of `decode_layer_tail_mgpu` with random bf16 values (weights scaled by
    1 / sqrt(fan-in), norm weights near 1), for tests and benchmarks; qkv_size 0: no next
    layer."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16

    def weight(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) / shape[0] ** 0.5).astype(bf)

    def norm(k):
        return (1 + 0.1 * jax.random.normal(k, (hidden,), jnp.float32)).astype(bf)
    inputs = dict(h=jax.random.normal(keys[0], (hidden,), bf),
                  attn=jax.random.normal(keys[1], (q_size,), bf),
                  wo=weight(keys[2], (q_size, hidden)), mlp_norm=norm(keys[3]),
                  w_gate_up=weight(keys[4], (hidden, 2 * intermediate)),
                  w_down=weight(keys[5], (intermediate, hidden)))
    if qkv_size:
        inputs.update(next_norm=norm(keys[6]), next_wqkv=weight(keys[7], (hidden, qkv_size)))
    return inputs
