"""pallas_kernels/decode_layer_plan.py: how the layer kernel splits each projection over its CTAs,
on the model shapes the engine runs, and the shapes it turns away (pure Python, no JAX)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jinfer.model.shapes import MODEL_SHAPES
from pallas_kernels.decode_layer_plan import TailShape, TailTiling, plan_phase, plan_tail

EPS = 1e-5
SMALL = TailTiling(block_n=64, block_k=64, stages=3, num_ctas=4)
ENGINE = TailTiling(stages=4)  # jinfer.config.KernelConfig().layer_tiling


def summary(plans):
    return [(p.splits, p.group, p.strips_per_cta, p.chunks, p.paired) for p in plans.values()]


def test_plan_of_llama_1b():
    plans = plan_tail(TailShape(2048, 2048, 8192, 3072, EPS), TailTiling())
    # wo and down: 4 K-ranges x 32 strips; gate/up: one strip pair per CTA over all of K;
    # QKV: 8 K-ranges x 16 CTAs x 3 strips. 58 chunks of 16 KB per CTA in all.
    assert summary(plans) == [(4, 32, 1, 4, False), (1, 128, 1, 16, True),
                              (4, 32, 1, 16, False), (8, 16, 3, 2, False)]
    assert sum(p.steps for p in plans.values()) == 58


def test_every_cta_covers_each_weight_once():
    """The plans' (K-range, strip) cells over all CTAs tile each [k, n] weight exactly once."""
    for k, n, paired in [(2048, 2048, False), (2048, 8192, True), (4096, 6144, False),
                         (14336, 4096, False)]:
        plan = plan_phase(k, n, ENGINE, paired=paired)
        cells = [(cta // plan.group, (cta % plan.group) * plan.strips_per_cta + s)
                 for cta in range(ENGINE.num_ctas) for s in range(plan.strips_per_cta)]
        assert sorted(cells) == [(r, s) for r in range(plan.splits)
                                 for s in range(n // ENGINE.block_n)]
        assert plan.k_range * plan.splits == k and plan.k_range % ENGINE.block_k == 0


def test_first_layer_qkv_alone_and_last_layer():
    assert list(plan_tail(TailShape(2048, 0, 0, 3072, EPS), ENGINE)) == [3]
    assert list(plan_tail(TailShape(2048, 2048, 8192, 0, EPS), ENGINE)) == [0, 1, 2]


def test_plan_rejects_shapes_that_do_not_split():
    with pytest.raises(ValueError, match="multiple of block_n"):
        plan_phase(256, 100, SMALL)
    with pytest.raises(ValueError, match="without splitting K"):
        plan_phase(256, 64 * 6, SMALL, paired=True)  # 6 strip pairs over 4 CTAs
    with pytest.raises(ValueError, match="does not split evenly"):
        plan_phase(96, 64 * 3, SMALL)  # 3 strips: 4 CTAs need K-ranges of 96 / 4 rows
    with pytest.raises(ValueError, match="multiple of 128"):
        plan_tail(TailShape(192, 192, 192, 0, EPS), TailTiling(block_k=64, num_ctas=1))


def test_llama_3_8b_gate_up_does_not_split():
    """Llama-3-8B's layers do not take the engine's tiling: wo, down and QKV plan, but gate/up
    (not split along K) has 14336 / 64 = 224 strip pairs for 128 CTAs."""
    c = MODEL_SHAPES["llama3-8b"]
    assert summary({0: plan_phase(c.q_size, c.hidden_size, ENGINE)}) == [(2, 64, 1, 16, False)]
    assert summary({2: plan_phase(c.intermediate_size, c.hidden_size, ENGINE)}) == [
        (2, 64, 1, 56, False)]
    assert summary({3: plan_phase(c.hidden_size, c.q_size + 2 * c.kv_size, ENGINE)}) == [
        (4, 32, 3, 8, False)]
    with pytest.raises(ValueError, match=r"\[4096, 14336\].*without splitting K"):
        plan_phase(c.hidden_size, c.intermediate_size, ENGINE, paired=True)


def test_imports_without_jax():
    """Configuration imports the planner: it stays pure Python."""
    code = ("import sys, pallas_kernels.decode_layer_plan; "
            "assert 'jax' not in sys.modules, 'the planner imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plan_of_qwen3_30b_a3b_experts():
    """Qwen3-30B-A3B's layer (128 experts of 768, 8 per token): the router's 2 strips on 32
    CTAs (16 K-ranges), the 8 experts' 96 gate/up strip pairs on 96 CTAs (32 idle), their down
    projection as 8 K-ranges of one expert each on all 128."""
    from pallas_kernels.decode_layer_plan import EXPERT_DOWN, EXPERT_GATE_UP, ROUTER
    plans = plan_tail(TailShape(2048, 4096, 768, 5120, EPS, 128, 8), ENGINE)
    assert list(plans) == [0, ROUTER, EXPERT_GATE_UP, EXPERT_DOWN, 3]
    got = {p: (plans[p].splits, plans[p].group, plans[p].strips_per_cta, plans[p].active)
           for p in plans}
    assert got[ROUTER] == (16, 2, 1, 32)
    assert got[EXPERT_GATE_UP] == (1, 96, 1, 96)
    assert got[EXPERT_DOWN] == (8, 16, 2, 128)
    # the two kernels' shapes: wo + router; the experts + the next QKV
    assert list(plan_tail(TailShape(2048, 4096, 0, 0, EPS, 128, 8), ENGINE)) == [0, ROUTER]
    assert list(plan_tail(TailShape(2048, 0, 768, 5120, EPS, 128, 8), ENGINE)) == [
        ROUTER, EXPERT_GATE_UP, EXPERT_DOWN, 3]


def test_expert_plans_cover_each_weight_once_inside_one_expert():
    """The working CTAs' (K-range, strip) cells tile the virtual weight exactly once, and no
    down-projection K-range or gate/up strip straddles two experts."""
    for k, n, paired, width in [(2048, 8 * 768, True, 768), (8 * 768, 2048, False, 768),
                                (256, 3 * 64, True, 64), (3 * 64, 256, False, 64),
                                (2048, 128, False, 0)]:
        plan = plan_phase(k, n, ENGINE if k >= 2048 or n >= 2048 else SMALL, paired=paired,
                          expert_width=width, idle_ok=True)
        cells = [(cta // plan.group, (cta % plan.group) * plan.strips_per_cta + s)
                 for cta in range(plan.active) for s in range(plan.strips_per_cta)]
        bn = plan.block_n
        assert sorted(cells) == [(r, s) for r in range(plan.splits) for s in range(n // bn)]
        if width and paired:
            assert width % bn == 0
        elif width:
            assert width % plan.k_range == 0


def test_mixtral_router_does_not_fit():
    """Mixtral's 8 router columns are less than a strip: its layers stay in XLA."""
    with pytest.raises(ValueError, match="multiple of block_n"):
        plan_tail(TailShape(4096, 4096, 14336, 6144, EPS, 8, 2), ENGINE)
