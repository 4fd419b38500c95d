"""How the batch-1 layer kernel (decode_layer_mgpu.py) splits a layer's projections over its
CTAs: pure Python, so configuration and model code can ask whether a model's shapes fit without
importing JAX's kernel machinery.

A phase's [K, N] weight is cut into `splits` K-ranges x N / block_n column strips; CTA c owns
K-range c // group and a run of `strips_per_cta` strips, and streams them as [block_k, block_n]
chunks. Splits are as few as the CTA count allows, so each CTA's input is one K-range; each
tile's output row goes to a float32 partial buffer [splits, N] that the next phase sums. The
MLP's gate and up projections (P1) are not split along K: CTA c owns gate strip j and up strip j
and writes silu(gate) * up directly. A shape that does not split evenly raises ValueError (the
caller runs the layer in XLA instead).

Mixture-of-experts layers (TailShape.num_experts) replace the MLP's phases with three: the
router (logits as split-K partials), the top-k experts' gate/up and their down projections.
The experts' phases are planned over a virtual weight: their top_k matrices side by side
(gate/up: top_k * I columns, expert slot s owning columns s * I ..) or stacked (down: top_k * I
rows, each K-range inside one expert's rows); which expert each slot reads is data, read by the
kernel. Their shapes rarely divide the grid, so these phases may leave CTAs idle (`active`
< num_ctas): the plan with the most CTAs at work, then the fewest K-splits.
"""

from __future__ import annotations

import dataclasses

MAX_HIDDEN = 16384  # the widest residual row the row ops take (each CTA builds all of it)


@dataclasses.dataclass(frozen=True)
class TailShape:
    """A layer's sizes: hidden, attention output width (num_heads * head_dim; 0: no layer, the
    first layer's QKV row alone), MLP width (per expert with experts; 0: none) and the next
    layer's QKV width (0: no next layer); with experts their count and top_k."""

    hidden: int
    q_size: int
    intermediate: int
    qkv_size: int
    eps: float
    num_experts: int = 0  # > 0: a mixture-of-experts MLP, `intermediate` wide per expert
    top_k: int = 0        # experts per token


@dataclasses.dataclass(frozen=True)
class TailTiling:
    """The kernel's weight chunks ([block_k, block_n] bf16), its ring of `stages` shared-memory
    slots, and its grid (one CTA per SM)."""

    block_n: int = 64
    block_k: int = 128
    stages: int = 8
    num_ctas: int = 128


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
    active: int = 0        # CTAs at work (splits * group; CTAs from here on idle this phase)
    expert_width: int = 0  # expert phases: columns (gate/up) or rows (down) of one expert

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


def plan_phase(k: int, n: int, tiling: TailTiling, *, paired: bool = False,
               expert_width: int = 0, idle_ok: bool = False) -> PhasePlan:
    """The fewest K-splits that give every CTA the same whole number of strips; with idle_ok,
    the most CTAs at work (then the fewest K-splits), each with the same whole number of
    strips, and for an expert phase (expert_width > 0: see the module docstring) a strip or
    K-range inside one expert."""
    bn, bk, ctas = tiling.block_n, tiling.block_k, tiling.num_ctas
    if n % bn:
        raise ValueError(f"{n} columns are not a multiple of block_n={bn}")
    strips = n // bn
    best = None
    for splits in range(1, 2 if paired else ctas + 1):
        if k % splits or (k // splits) % bk:
            continue
        if not idle_ok:
            group = ctas // splits
            if ctas % splits or strips % group:
                continue
            return PhasePlan(k, n, splits, group, strips // group, paired, bk, bn, ctas)
        if expert_width and (expert_width % bn if paired else expert_width % (k // splits)):
            continue  # a strip / K-range across two experts
        group = max(g for g in range(1, ctas // splits + 1) if strips % g == 0)
        if best is None or splits * group > best.active:
            best = PhasePlan(k, n, splits, group, strips // group, paired, bk, bn,
                             splits * group, expert_width)
    if best is not None:
        return best
    raise ValueError(f"a [{k}, {n}] projection does not split evenly over {ctas} CTAs in "
                     f"[{bk}, {bn}] chunks" + (" without splitting K" if paired else "")
                     + (f" with no tile across experts of {expert_width}" if expert_width
                        else ""))


# Phases of a mixture-of-experts layer (decode_layer_body.py numbers the others 0-4).
ROUTER, EXPERT_GATE_UP, EXPERT_DOWN = 5, 6, 7


def plan_tail(shape: TailShape, tiling: TailTiling) -> dict[int, PhasePlan]:
    """Plans of the phases with weights, by phase: P0 (wo) where q_size is set, P1 (gate/up)
    and P2 (down) where q_size is set too; with experts instead ROUTER, and EXPERT_GATE_UP and
    EXPERT_DOWN where intermediate is set; P3 (the next QKV) where qkv_size is. ValueError if
    the shape does not fit."""
    plans = {}
    if shape.q_size:
        plans[0] = plan_phase(shape.q_size, shape.hidden, tiling)
    if shape.num_experts:  # the router; the experts where intermediate is set
        if not 0 < shape.top_k <= shape.num_experts:
            raise ValueError(f"top_k={shape.top_k} must be in 1..{shape.num_experts}")
        plans[ROUTER] = plan_phase(shape.hidden, shape.num_experts, tiling, idle_ok=True)
        if shape.intermediate:
            width = shape.top_k * shape.intermediate  # the top_k experts side by side
            plans[EXPERT_GATE_UP] = plan_phase(shape.hidden, width, tiling, paired=True,
                                               expert_width=shape.intermediate, idle_ok=True)
            plans[EXPERT_DOWN] = plan_phase(width, shape.hidden, tiling,
                                            expert_width=shape.intermediate, idle_ok=True)
    elif shape.q_size:
        plans[1] = plan_phase(shape.hidden, shape.intermediate, tiling, paired=True)
        plans[2] = plan_phase(shape.intermediate, shape.hidden, tiling)
    if shape.qkv_size:
        plans[3] = plan_phase(shape.hidden, shape.qkv_size, tiling)
    if shape.hidden % 128 or shape.hidden > MAX_HIDDEN:
        raise ValueError(f"hidden={shape.hidden}: the row ops need a multiple of 128 up to "
                         f"{MAX_HIDDEN}")
    return plans
