"""jinfer/model/moe.py: routing against transformers' routers, the grouped-matmul experts against
the dense reference over a grid of shapes (with experts that get no token), the whole layer
against transformers' MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock with the weights converted
as the loader will (the oracle), and one compiled program for every routing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.model.moe import (clear_routes, expert_impl, moe_mlp, moe_mlp_reference, route,
                              stack_experts, top_k_by_rank)

STARVED = (1, -1)  # experts the router never picks in the grid (one inside, the last)
# Compiling (a program per shape) is most of this file's time: on the CPU, without the fusion
# emitters and at LLVM optimization level 0, these small programs compile 2-3x faster. Other
# backends reject these options.
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def fast_jit(fun, **kwargs):
    if jax.default_backend() == "cpu":
        kwargs["compiler_options"] = CPU_FAST_COMPILE
    return jax.jit(fun, **kwargs)


def hf_modules():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


def hf_block(family: str, hidden: int, inter: int, experts: int, top_k: int, norm: bool):
    """A transformers sparse MoE block with random weights (float32, eager experts)."""
    torch, transformers = hf_modules()
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    if family == "mixtral":
        config = transformers.MixtralConfig(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
            num_experts_per_tok=top_k, experts_implementation="eager")
        block = MixtralSparseMoeBlock(config)
    else:
        config = transformers.Qwen3MoeConfig(
            hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
            num_experts_per_tok=top_k, norm_topk_prob=norm, experts_implementation="eager")
        block = Qwen3MoeSparseMoeBlock(config)
    torch.manual_seed(0)
    with torch.no_grad():
        block.gate.weight.normal_(0.0, 1.0)
        block.experts.gate_up_proj.normal_(0.0, 0.2)
        block.experts.down_proj.normal_(0.0, 0.2)
    return block.eval()


def converted_weights(block):
    """The block's weights as a checkpoint stores them (per-expert Linear weights: transformers'
    conversion_mapping merges w1/w3 or gate_proj/up_proj along dim 1 into gate_up_proj), then
    through stack_experts, as the loader will."""
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2 * I, hidden]
    down = block.experts.down_proj.detach().numpy()  # [E, hidden, I]
    inter = gate_up.shape[1] // 2
    w_gate_up, w_down = stack_experts(
        gate=[g[:inter] for g in gate_up], up=[g[inter:] for g in gate_up], down=list(down))
    return block.gate.weight.detach().numpy().T, w_gate_up, w_down


@pytest.mark.parametrize("family, norm, top_k", [
    ("mixtral", True, 1), ("mixtral", True, 2), ("qwen3_moe", True, 2),
    ("qwen3_moe", False, 2), ("qwen3_moe", False, 4)])
def test_route_matches_transformers(family, norm, top_k):
    """Through transformers' own router: with hidden = E and an identity router weight, its
    logits are the given ones exactly."""
    torch, _ = hf_modules()
    num_experts = 8
    block = hf_block(family, num_experts, 4, num_experts, top_k, norm)
    logits = np.random.default_rng(1).standard_normal((64, num_experts)).astype(np.float32) * 2
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(num_experts))
        _, hf_weights, hf_ids = block.gate(torch.from_numpy(logits))
    weights, expert_ids = route(jnp.asarray(logits), top_k, norm)
    assert weights.dtype == jnp.float32 and expert_ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(expert_ids), hf_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights), hf_weights.numpy(), rtol=1e-6, atol=1e-7)
    if norm:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)


def grid_inputs(num_tokens, num_experts, top_k, hidden=16, inter=32, seed=0):
    """Random float32 layer inputs whose router never picks the STARVED experts: x's first
    feature is 1 and their router column has -100 there."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    x[:, 0] = 1.0
    router_w = rng.standard_normal((hidden, num_experts)).astype(np.float32)
    router_w[0, list(STARVED)] = -100.0
    w_gate_up = (rng.standard_normal((num_experts, hidden, 2 * inter)) * 0.3).astype(np.float32)
    w_down = (rng.standard_normal((num_experts, inter, hidden)) * 0.3).astype(np.float32)
    return tuple(map(jnp.asarray, (x, router_w, w_gate_up, w_down)))


def top_experts(args, top_k: int) -> np.ndarray:
    """[T, top_k] the experts the router picks for the layer inputs `args`, in NumPy."""
    x, router_w = np.asarray(args[0]), np.asarray(args[1])
    return np.sort(np.argsort(-(x @ router_w), axis=-1)[:, :top_k], axis=-1)


@functools.partial(fast_jit, static_argnums=4)
def grid_outputs(x, router_w, w_gate_up, w_down, top_k):
    """{(impl, norm_topk_prob): moe_mlp} and {norm_topk_prob: moe_mlp_reference}, in one
    compiled program per grid point (op by op, each op of each shape compiles on its own).
    impl "pallas" is the grouped-matmul kernel (interpret mode on the CPU), "pallas_pairs" the
    same by (token, expert) pair, unsorted."""
    args = (x, router_w, w_gate_up, w_down, top_k)
    got = {(impl, norm): moe_mlp(*args, norm, impl=impl)
           for impl, norm in [("ragged_dot", True), ("ragged_dot", False), ("gather", True),
                              ("pallas", True), ("pallas_pairs", True)]}
    return got, {norm: moe_mlp_reference(*args, norm) for norm in (True, False)}


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
def test_moe_mlp_matches_reference(num_tokens, num_experts, top_k):
    args = grid_inputs(num_tokens, num_experts, top_k)
    got, want = grid_outputs(*args, top_k)
    counts = np.bincount(top_experts(args, top_k).ravel(), minlength=num_experts)
    assert counts[list(STARVED)].sum() == 0
    for (impl, norm), out in got.items():
        assert out.shape == args[0].shape and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(want[norm]), rtol=1e-5,
                                   atol=1e-5, err_msg=f"impl={impl}, norm_topk_prob={norm}")


def test_moe_mlp_bfloat16():
    """bfloat16 weights and activations (matmuls rounded to bfloat16, the combine in float32)
    against the float32 reference over the same bfloat16 inputs."""
    args = tuple(a.astype(jnp.bfloat16) for a in grid_inputs(33, 8, 2))
    got = fast_jit(moe_mlp, static_argnums=(4, 5))(*args, 2, True)
    want = fast_jit(moe_mlp_reference, static_argnums=(4, 5))(
        *(a.astype(jnp.float32) for a in args), 2, True)
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2 * scale)


@pytest.mark.parametrize("family, norm", [
    ("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])
def test_moe_mlp_matches_transformers_block(family, norm):
    torch, _ = hf_modules()
    hidden, inter, num_experts, top_k = 32, 48, 8, 2
    block = hf_block(family, hidden, inter, num_experts, top_k, norm)
    x = np.random.default_rng(2).standard_normal((3, 7, hidden)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)).numpy().reshape(-1, hidden)
    weights = tuple(map(jnp.asarray, converted_weights(block)))
    got = fast_jit(moe_mlp, static_argnums=(4, 5))(
        jnp.asarray(x.reshape(-1, hidden)), *weights, top_k, norm)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,experts,top_k", [(1, 128, 8), (2, 128, 8), (5, 8, 2),
                                                 (3, 64, 64), (9, 16, 4)])
def test_top_k_by_rank_is_lax_top_k(rows, experts, top_k):
    """The rank-based top-k gives lax.top_k's values and indices, ties included: values on a
    coarse grid (many ties, broken to the lower index), -0.0 beside +0.0 (+0.0 first, as in
    lax.top_k's total order), -inf and +inf; and route(by_rank=True) routes the same."""
    rng = np.random.default_rng(rows * experts + top_k)
    x = np.round(rng.standard_normal((rows, experts)) * 3) / 4
    x[0, :4] = [-0.0, 0.0, -np.inf, np.inf]
    x = jnp.asarray(x, jnp.float32)
    want, got = jax.lax.top_k(x, top_k), top_k_by_rank(x, top_k)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    assert (np.signbit(np.asarray(got[0])) == np.signbit(np.asarray(want[0]))).all()
    for norm in (True, False):
        (w_sort, i_sort), (w_rank, i_rank) = route(x, top_k, norm), route(x, top_k, norm,
                                                                          by_rank=True)
        np.testing.assert_array_equal(np.asarray(i_rank), np.asarray(i_sort))
        np.testing.assert_allclose(np.asarray(w_rank), np.asarray(w_sort), rtol=1e-6)


@pytest.mark.parametrize("impl", ["ragged_dot", "pallas_pairs"])
def test_padding_rows_add_no_experts(impl):
    """Rows marked not valid (a step's padding) take row 0's experts with zero weight (by
    pair: no tile at all): the valid rows' outputs are unchanged, the padding rows' are zero,
    and the step touches only the valid rows' experts."""
    num_tokens, num_experts, top_k = 6, 8, 2
    args = grid_inputs(num_tokens, num_experts, top_k, seed=4)
    valid = jnp.asarray([True, True, False, False, False, False])
    logits = args[0] @ args[1]
    weights, ids = route(logits, top_k, True, valid)
    all_weights, all_ids = route(logits, top_k, True)
    np.testing.assert_array_equal(np.asarray(ids[2:]), np.repeat(np.asarray(ids[:1]), 4, 0))
    np.testing.assert_array_equal(np.asarray(weights[2:]), 0)
    np.testing.assert_array_equal(np.asarray(ids[:2]), np.asarray(all_ids[:2]))
    assert set(np.asarray(ids).ravel()) == set(np.asarray(all_ids[:2]).ravel())
    assert set(np.asarray(all_ids).ravel()) - set(np.asarray(all_ids[:2]).ravel()), \
        "the padding rows' own routing should pick other experts (else this proves nothing)"
    got = fast_jit(lambda *a: moe_mlp(*a, top_k, True, impl=impl, valid=valid))(*args)
    want = fast_jit(moe_mlp_reference, static_argnums=(4, 5))(*args, top_k, True)
    np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(want[:2]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[2:]), 0)


def test_one_program_for_every_routing():
    """Same shapes, different routings (so different group sizes): one compiled program."""
    step = fast_jit(lambda *args: moe_mlp(*args, 2, True))  # a fresh function: its own cache
    reference = fast_jit(moe_mlp_reference, static_argnums=(4, 5))
    routings = set()
    for seed in range(3):
        args = grid_inputs(17, 8, 2, seed=seed)
        routings.add(top_experts(args, 2).tobytes())
        np.testing.assert_allclose(np.asarray(step(*args)),
                                   np.asarray(reference(*args, 2, True)), rtol=1e-5, atol=1e-5)
    assert len(routings) == 3
    assert step._cache_size() == 1


def test_stack_experts_layout():
    rng = np.random.default_rng(3)
    gate, up = rng.standard_normal((2, 4, 6, 5))  # E=4 experts of [I=6, hidden=5]
    down = rng.standard_normal((4, 5, 6))
    w_gate_up, w_down = stack_experts(list(gate), list(up), list(down))
    assert w_gate_up.shape == (4, 5, 12) and w_down.shape == (4, 6, 5)
    x = rng.standard_normal(5)
    np.testing.assert_allclose(x @ w_gate_up[2], np.concatenate([gate[2] @ x, up[2] @ x]))
    np.testing.assert_allclose(w_down[2].T, down[2])
    with pytest.raises(ValueError, match="per expert"):
        stack_experts(list(gate), list(up), list(down[:3]))


def test_clear_routes_flags_near_ties():
    """A token whose k-th and (k+1)-th logits are within bf16 rounding is not clear; one with a
    wide gap is; top_k = every expert is always clear."""
    logits = np.array([[3.0, 2.0, 1.0, 0.0],      # gap 1 between 2nd and 3rd: clear
                       [3.0, 2.0, 1.99, 0.0],     # gap 0.01 < 2 ** -6 * 2: a near-tie
                       [-5.0, -1.0, -1.0, 9.0]])  # an exact tie for 2nd
    np.testing.assert_array_equal(clear_routes(logits, 2), [True, False, False])
    np.testing.assert_array_equal(clear_routes(logits, 4), [True, True, True])


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 2, 9, 64, 333])
@pytest.mark.parametrize("impl", ["auto", "pallas", "pallas_mgpu", "pallas_pairs",
                                  "pallas_mgpu_pairs", "ragged_dot", "gather"])
def test_gpu_moe_mlp_bfloat16_engine_shapes(impl, num_tokens):
    """Each implementation compiled on the GPU, bf16, 64 experts of 256 (8 per token, hidden
    512: Qwen3-MoE's proportions), against the float32 reference of the same inputs."""
    if impl == "gather" and num_tokens > 64:
        pytest.skip("gather reads T * k expert matrices: a decode-size path")
    args = grid_inputs(num_tokens, 64, 8, hidden=512, inter=256, seed=num_tokens)
    args = tuple(a.astype(jnp.bfloat16) for a in args)
    got = jax.jit(moe_mlp, static_argnums=(4, 5, 6))(*args, 8, True, impl)
    args32 = tuple(a.astype(jnp.float32) for a in args)
    want = jax.jit(moe_mlp_reference, static_argnums=(4, 5))(*args32, 8, True)
    # bf16 router logits may break a near-tie another way than the float32 reference does:
    # compare the tokens whose 8 experts are clear (most of them; checked)
    clear = clear_routes(args32[0] @ args32[1], 8)
    assert clear.sum() >= 0.5 * num_tokens
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(np.asarray(got, np.float32)[clear], np.asarray(want)[clear],
                               atol=2e-2 * scale)


@pytest.mark.parametrize("impl", ["ragged_dot", "gather", "pallas", "pallas_pairs"])
def test_expert_slices_add_up_to_the_layer(impl):
    """Expert parallelism's contract: moe_mlp over a slice of the experts (expert_offset, the
    slice's weights) gives that slice's part; the parts of the 4 two-expert slices sum to the
    whole layer. A traced offset (as under shard_map) compiles one program for every slice."""
    args = grid_inputs(19, 8, 2, seed=5)
    x, router_w, w_gate_up, w_down = args
    want = moe_mlp_reference(*args, 2, True)
    part = fast_jit(lambda gu, d, offset: moe_mlp(x, router_w, gu, d, 2, True, impl=impl,
                                                  expert_offset=offset))
    parts = [part(w_gate_up[e:e + 2], w_down[e:e + 2], jnp.int32(e)) for e in range(0, 8, 2)]
    np.testing.assert_allclose(np.asarray(sum(parts)), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(parts[0]), np.asarray(want), atol=1e-3)
    assert part._cache_size() == 1


def test_auto_gathers_for_few_pairs_else_ragged_dot():
    """impl="auto" on the CPU: a step of few (token, expert) pairs (at most a quarter of
    the experts) gathers its experts' weights, a larger one runs ragged_dot; both match the
    reference."""
    for tokens, grouped in ((1, False), (17, True)):
        args = grid_inputs(tokens, 8, 2, seed=tokens)
        fn = lambda *a: moe_mlp(*a, 2, True, impl="auto")  # noqa: E731
        assert ("ragged_dot" in str(jax.make_jaxpr(fn)(*args))) == grouped
        np.testing.assert_allclose(np.asarray(fast_jit(fn)(*args)),
                                   np.asarray(moe_mlp_reference(*args, 2, True)),
                                   rtol=1e-5, atol=1e-5)


def test_auto_on_a_gpu_runs_the_kernels_by_pair_for_batch_1_steps(monkeypatch):
    """impl="auto" on a GPU (its choice, with the backend faked): the Mosaic GPU kernel on
    Hopper, else the Triton one; by pair for steps of at most PAIRS_MAX_TOKENS tokens."""
    from jinfer.model import moe
    monkeypatch.setattr(moe.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(moe, "hopper_gpu", lambda: True)
    assert [moe.auto_impl(t, 8, 128) for t in (1, moe.PAIRS_MAX_TOKENS, 4, 2048)] == [
        "pallas_mgpu_pairs", "pallas_mgpu_pairs", "pallas_mgpu", "pallas_mgpu"]
    monkeypatch.setattr(moe, "hopper_gpu", lambda: False)
    assert [moe.auto_impl(t, 2, 8) for t in (1, 64)] == ["pallas_pairs", "pallas"]


def test_expert_impl_choice():
    assert expert_impl(None) == "auto"
    assert expert_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="moe_impl='dense' is not available.*ragged_dot"):
        expert_impl("dense")


@pytest.mark.parametrize("impl", ["pallas", "pallas_mgpu", "pallas_pairs", "pallas_mgpu_pairs"])
def test_kernels_in_bfloat16(impl):
    """The grouped-matmul kernels in bf16 (the Mosaic GPU one takes bf16 / f16 only; in its
    interpreter on the CPU) against the float32 reference, with starved experts and a decode
    step's shape."""
    pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
    for tokens in (1, 33):
        args = grid_inputs(tokens, 8, 2, hidden=128, inter=64, seed=tokens)
        args = tuple(a.astype(jnp.bfloat16) for a in args)
        got = jax.jit(moe_mlp, static_argnums=(4, 5, 6))(*args, 2, True, impl)
        want = moe_mlp_reference(*(a.astype(jnp.float32) for a in args), 2, True)
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                                   atol=2e-2 * scale)
