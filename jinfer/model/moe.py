"""The sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE) as pure functions: routing, the experts
as one grouped matmul, and a dense reference for tests.

Per layer, over the step's packed row x [T, hidden]:
  1. route     logits = x @ router_w [T, E]; the top k experts of each token and their
               softmax weights in float32 (renormalised over the k, or not: `norm_topk_prob`).
  2. group     the T * k (token, expert) pairs sorted by expert (a stable argsort), the token
               rows gathered in that order, and each expert's row count (`group_sizes` [E]).
  3. experts   SwiGLU through each pair's expert: two grouped matmuls over the sorted rows
               (rows of group e meet expert e's weights), by `impl`: "pallas" (the kernel of
               pallas_kernels/grouped_matmul.py, Triton-lowered), "pallas_mgpu" (its Mosaic
               GPU twin, grouped_matmul_mgpu.py: bf16 / f16; else "pallas"), "ragged_dot"
               (`jax.lax.ragged_dot`), "gather" (each pair's expert weights gathered, a
               batched matvec), or "auto" (the device's choice: `auto_impl`).
               "pallas_pairs" / "pallas_mgpu_pairs" skip steps 2 and 4's sorting: each pair is
               its own row and tile, in token order (the kernels' row_groups), for steps of
               few tokens, where the sort, the group sizes and the gathers around the kernels
               are a launch each and an expert picked by two tokens is read twice.
  4. combine   each pair's output gathered back to (token, slot) order, times its routing
               weight, summed over the k slots in float32.

Every shape is static (T * k rows whatever the routing); only `group_sizes` depends on the data,
so a new routing never recompiles. The combine gathers through the inverse permutation and sums
the k slots in a fixed order instead of scatter-adding into [T, hidden]: the same sum, but
deterministic (a GPU scatter-add with repeated indices runs in atomics, in no fixed order) and
with no scatter.

Weight layout (per layer, the dense MLP's layout with an expert axis in front):
  router_w   [hidden, E]            Hugging Face's `gate.weight` [E, hidden], transposed
  w_gate_up  [E, hidden, 2 * I]     expert e's [gate | up] columns: w1 | w3 (Mixtral),
                                    gate_proj | up_proj (Qwen3-MoE), each [I, hidden] there,
                                    transposed; `stack_experts` builds it from those
  w_down     [E, I, hidden]         w2 (Mixtral) / down_proj (Qwen3-MoE) [hidden, I], transposed
transformers >= 5 holds the same weights stacked in memory (`experts.gate_up_proj`
[E, 2 * I, hidden], `experts.down_proj` [E, hidden, I]): ours are those with the last two axes
swapped.

`jax.lax.ragged_dot` (the same code in JAX 0.10.2 and 0.11):
  - CPU: lowered by expanding the rows to [E, T * k, hidden] (masked by group) and contracting
    over experts too, so it costs E dense matmuls over all T * k rows: measured on this CPU
    (float32, m rows x 1024 x 1024), 7.4x a single matmul of the same rows at E = 8 and 77x at
    E = 64; "auto" gathers instead at decode sizes (GATHER_MAX_PAIRS_PER_EXPERT).
  - GPU (XLA's chlo.ragged_dot), measured on an H100 with scripts/bench_moe.py (BENCHMARKS.md,
    2026-12-07): it costs about what every expert costs, whatever the routing. Qwen3-30B-A3B's
    layer (128 experts of 768, 8 per token): 439 us for one token (the 8 touched experts are
    75 MB: 27 us at the copy rate; "gather" took 77 us), 27.5 ms for 2048 tokens (one dense
    matmul of the same rows: 0.3 ms). Mixtral-8x7B's: 0.94 ms for one token (2 experts), 14.3 ms
    for 2048 tokens (dense: 2.3 ms). So the GPU wants a grouped matmul that reads only the
    experts with rows, tile by tile: the two kernels. Measured the same way (2026-12-07, session
    18; 1 / 8 / 64 / 256 / 2048 tokens): Qwen3-30B-A3B "pallas_mgpu" 143 / 267 / 482 / 539 /
    925 us, "pallas" 202 / 272 / 509 / 608 / 1,318 us, ragged_dot 439 / 510 / 959 / 3,548 /
    27,585 us; Mixtral-8x7B "pallas_mgpu" 320 / 873 / 1,098 / 1,648 / 7,275 us, "pallas" 314 /
    879 / 1,128 / 1,283 / 5,063 us, ragged_dot 930 / 949 / 996 / 1,881 / 14,420 us. "auto" on a
    GPU is therefore the Mosaic GPU kernel on Hopper (the Triton one elsewhere): best for the
    many small experts of Qwen3-MoE at every size and level at decode sizes for Mixtral,
    whose prefill of 256+ tokens runs 1.3-1.4x faster with "pallas". Session 19, after the
    tile map lost its hidden while loop: Qwen3-30B-A3B at 1 / 8 / 256 tokens "pallas_mgpu" 77 /
    231 / 504 us, by pair ("pallas_mgpu_pairs") 65 / 242 us; so "auto" runs the kernels by pair
    for batch-1 steps (PAIRS_MAX_TOKENS). In a batch-1 decode step (scripts/profile_decode.py)
    the two kernels took 19.2 + 11.1 us a layer (the 75 MB of 8 experts at 2.5 TB/s) and the
    routing, sort, tile maps, gathers and combine around them 19 small kernels of 1-3.4 us.

Padding rows of a bucket take row 0's experts (moe_mlp's `valid`, from the pad-block slots), so
they touch no extra experts; the bucket's extra rows still cost their matmul rows.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.grouped_matmul import grouped_matmul, supported
from pallas_kernels.grouped_matmul_mgpu import grouped_matmul_mgpu
from pallas_kernels.grouped_matmul_mgpu import supported as mgpu_supported
from pallas_kernels.paged_prefill_mgpu import hopper_gpu

ExpertImpl = Literal["auto", "pallas", "pallas_mgpu", "pallas_pairs", "pallas_mgpu_pairs",
                     "ragged_dot", "gather"]
EXPERT_IMPLS = ("auto", "pallas", "pallas_mgpu", "pallas_pairs", "pallas_mgpu_pairs",
                "ragged_dot", "gather")
# the kernels run by (token, expert) pair, unsorted (moe_mlp): impl -> the kernel's impl
PAIR_IMPLS = {"pallas_pairs": "pallas", "pallas_mgpu_pairs": "pallas_mgpu"}
# "auto" on the CPU gathers where the step's (token, expert) pairs are at most this fraction of
# the experts, else runs ragged_dot (on a GPU it runs the grouped-matmul kernel: see above). On
# the 2-core CPU (float32, hidden 1024, 64 experts of 512, 8 per token), gather vs ragged_dot:
# 21.5 vs 202 ms at 1 token, 51.6 vs 212 at 2 (E / 4), 157 vs 255 at 8 (E), 593 vs 504 at 32
# (4 E).
GATHER_MAX_PAIRS_PER_EXPERT = 0.25
# "auto" on a GPU runs the kernels by pair for steps of at most this many tokens: one layer of
# Qwen3-30B-A3B on an H100 (BENCHMARKS.md, session 19), 1 token: "pallas_mgpu_pairs" 65.4 us,
# sorted "pallas_mgpu" 77.2 ("pallas_pairs" 67.6, "pallas" 82.0); 8 tokens: 242.3 vs 230.8
# (221.8 vs 234.4). Batch-1 decode steps have 2 rows on the GPU (StepBuckets.min_decode_rows).
PAIRS_MAX_TOKENS = 2


def expert_impl(name: Optional[str] = None) -> str:
    """KernelConfig.moe_impl resolved: the name given (one of EXPERT_IMPLS), or for None
    "auto" (the device's choice, made when the step is traced: `auto_impl`)."""
    if name is None:
        return "auto"
    if name not in EXPERT_IMPLS:
        raise ValueError(f"moe_impl={name!r} is not available; choose one of "
                         f"{', '.join(EXPERT_IMPLS)} (or None for the device's default)")
    return name


def auto_impl(num_tokens: int, top_k: int, num_experts: int) -> str:
    """What "auto" runs for a step of num_tokens tokens, top_k experts each, over num_experts
    experts (static: the bucket's shape): on a Hopper GPU the Mosaic GPU kernel, on another
    GPU the Triton-lowered one, by (token, expert) pair for steps of at most PAIRS_MAX_TOKENS
    tokens (batch-1 decode) and sorted by expert above; on the CPU gather at decode sizes,
    else ragged_dot. Measured: the module docstring."""
    if jax.default_backend() == "gpu":
        kernel = "pallas_mgpu" if hopper_gpu() else "pallas"
        return kernel + "_pairs" if num_tokens <= PAIRS_MAX_TOKENS else kernel
    pairs = num_tokens * top_k
    return "gather" if pairs <= GATHER_MAX_PAIRS_PER_EXPERT * num_experts else "ragged_dot"


def top_k_by_rank(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)` over the last axis of a float32 x, as compares and sums instead of
    a sort: each element's rank is the count of elements that beat it (greater in the total
    order lax.top_k uses, with -0.0 below +0.0 and ties to the lower index), then the k values
    and indices of ranks 0..k-1. Same values and indices as lax.top_k; O(E^2) compares a row.

    For the layer kernels' one-token routing on a GPU (128 experts: 16k compares): elementwise
    work and reductions, which XLA fuses, in place of the sort that took 3.2 us of the
    routing's 6.4 us a layer in an H100 profile (BENCHMARKS.md, session 21). Whether it is
    faster there is not yet measured (`scripts/bench_moe.py --routing` times the two). On the
    CPU the sort is faster at every size measured (1-256 rows of 128 experts: 10.9 vs 32.6 us
    at one row), so `route` sorts unless asked."""
    num = x.shape[-1]
    index = jnp.arange(num, dtype=jnp.int32)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    key = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # float order as int order
    mine, other = key[..., :, None], key[..., None, :]
    beaten_by = (other > mine) | ((other == mine) & (index[None, :] < index[:, None]))
    rank = beaten_by.sum(-1, dtype=jnp.int32)  # [..., E]
    slot = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, E]
    values = jnp.max(jnp.where(slot, x[..., None, :], -jnp.inf), -1)  # keeps -0.0's sign
    return values, jnp.sum(jnp.where(slot, index, 0), -1)


def route(
    router_logits: jax.Array,  # [T, E]
    top_k: int,
    norm_topk_prob: bool,
    valid: Optional[jax.Array] = None,  # [T] bool, see moe_mlp
    by_rank: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """-> (weights [T, top_k] float32, expert_ids [T, top_k] int32), best first; rows not
    `valid` get row 0's experts and zero weights.

    transformers' routing (MixtralTopKRouter, Qwen3MoeTopKRouter: softmax over all experts in
    float32, the top k probabilities, divided by their sum when `norm_topk_prob`: always for
    Mixtral, the config's flag for Qwen3-MoE; `moe_mlp_reference` writes it so) in fewer ops:
    the top k of the float32 logits (the softmax keeps their order), then the softmax of those
    k alone (= the k probabilities over their sum), or without norm_topk_prob each exp(logit -
    logsumexp over all experts). Qwen3-MoE then rounds the weights to the logits' dtype; they
    stay float32 here (the combine runs in float32). `by_rank`: the top k by `top_k_by_rank`
    (the same experts), not a sort.
    """
    logits = router_logits.astype(jnp.float32)
    top_logits, expert_ids = (top_k_by_rank if by_rank else jax.lax.top_k)(logits, top_k)
    if norm_topk_prob:
        weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        weights = jnp.exp(top_logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
    expert_ids = expert_ids.astype(jnp.int32)
    if valid is not None:
        expert_ids = jnp.where(valid[:, None], expert_ids, expert_ids[:1])
        weights = jnp.where(valid[:, None], weights, 0.0)
    return weights, expert_ids


def moe_mlp(
    x: jax.Array,  # [T, hidden]
    router_w: jax.Array,  # [hidden, E]
    w_gate_up: jax.Array,  # [E, hidden, 2 * I]
    w_down: jax.Array,  # [E, I, hidden]
    top_k: int,
    norm_topk_prob: bool,
    impl: ExpertImpl = "ragged_dot",
    valid: Optional[jax.Array] = None,  # [T] bool: False for the step's padding rows
    expert_offset=0,  # int or int32 scalar: the first of the experts w_* hold (see below)
) -> jax.Array:
    """The sparse MoE MLP (no residual): each token through its top_k experts' SwiGLU, weighted
    by the routing weights -> [T, hidden] in x's dtype. top_k, norm_topk_prob and impl are
    static under jit; see the module docstring for the steps and `impl`.

    `valid`: padding rows (False) take row 0's experts with zero weight (their output is 0), so
    they add no expert of their own to the step's weight reads: a batch-1 decode step padded
    to two rows reads top_k experts per layer, not up to 2 * top_k. Row 0 must be valid.

    Expert parallelism: w_gate_up / w_down may hold a slice of the router's experts, experts
    expert_offset .. expert_offset + w_gate_up.shape[0] - 1 (a device's share); every token is
    routed over all of them, and only the pairs of this slice's experts contribute (the others'
    rows sort last, past the groups, and come out zero): the output is this slice's part of
    the sum, and the slices' outputs add up to the whole layer's."""
    num_tokens, hidden = x.shape
    num_local = w_gate_up.shape[0]
    if impl == "auto":  # static: the bucket's shape
        impl = auto_impl(num_tokens, top_k, num_local)
    with jax.named_scope("route"):
        weights, expert_ids = route(x @ router_w, top_k, norm_topk_prob, valid)
    if impl in PAIR_IMPLS and _grouped_matmul(PAIR_IMPLS[impl], x, w_gate_up,
                                              w_down) is not jax.lax.ragged_dot:
        return _moe_by_pairs(x, weights, expert_ids, w_gate_up, w_down, PAIR_IMPLS[impl],
                             valid, expert_offset)
    impl = "ragged_dot" if impl in PAIR_IMPLS else impl  # shapes no kernel takes
    with jax.named_scope("route"):
        order, group_sizes, pair_experts = group_pairs(expert_ids, num_local, expert_offset,
                                                       all_experts=router_w.shape[1])
    rows = x[order // top_k]  # [T * k, hidden]
    with jax.named_scope("experts"):
        row_experts = jnp.minimum(pair_experts[order], num_local - 1)  # gather: in range
        out = _expert_swiglu(rows, w_gate_up, w_down, group_sizes, row_experts, impl)
    with jax.named_scope("combine"):
        inverse = jnp.zeros_like(order).at[order].set(  # [T * k] sorted position of each pair
            jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)
        per_slot = out[inverse].reshape(num_tokens, top_k, hidden).astype(jnp.float32)
        combined = jnp.einsum("tkh,tk->th", per_slot, weights)
    return combined.astype(x.dtype)


def _moe_by_pairs(x, weights, expert_ids, w_gate_up, w_down, kernel_impl, valid,
                  expert_offset):
    """moe_mlp's experts and combine with each (token, slot) pair as its own row and tile, in
    token order (the kernels' row_groups): no sort, no group sizes, no gathers to and from
    the sorted order, at the price of reading an expert once per pair that picks it (the
    impls "pallas_pairs" / "pallas_mgpu_pairs", for steps of few tokens). Pairs of padding
    rows and of other slices' experts have no tile and give zeros."""
    num_tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    with jax.named_scope("experts"):
        pair_experts = expert_ids.reshape(-1) - expert_offset  # out of range: another slice's
        if valid is not None:
            pair_experts = jnp.where(jnp.repeat(valid, top_k), pair_experts, -1)
        rows = jnp.repeat(x, top_k, axis=0)  # [T * k, hidden]: pair p is token p // k
        matmul = functools.partial(_grouped_matmul(kernel_impl, rows, w_gate_up, w_down),
                                   row_groups=pair_experts)
        gate, up = jnp.split(matmul(rows, w_gate_up), 2, axis=-1)
        out = matmul(jax.nn.silu(gate) * up, w_down)
    with jax.named_scope("combine"):
        per_slot = out.reshape(num_tokens, top_k, hidden).astype(jnp.float32)
        return jnp.einsum("tkh,tk->th", per_slot, weights).astype(x.dtype)


def group_pairs(expert_ids: jax.Array, num_local: int, expert_offset=0,
                all_experts: Optional[int] = None):
    """expert_ids [T, k] -> (order [T * k]: the (token, slot) pairs sorted by expert, stably;
    pair p is token p // k, slot p % k; group_sizes [num_local] int32: pairs per expert;
    pair_experts [T * k]: each pair's expert among the num_local from expert_offset, or
    num_local for another slice's expert, so those pairs sort last, past the groups)."""
    pair_experts = expert_ids.reshape(-1)
    if num_local < (all_experts or num_local):  # a slice: other experts' pairs sort last
        pair_experts = pair_experts - expert_offset
        pair_experts = jnp.where((pair_experts >= 0) & (pair_experts < num_local),
                                 pair_experts, num_local)
    order = jnp.argsort(pair_experts, stable=True)
    group_sizes = jnp.bincount(pair_experts, length=num_local).astype(jnp.int32)
    return order, group_sizes, pair_experts


def _expert_swiglu(rows, w_gate_up, w_down, group_sizes, row_experts, impl: ExpertImpl):
    """rows [R, hidden] sorted by expert (group_sizes [E] rows each; row_experts [R] the same
    as ids) -> silu(gate) * up -> down, each row through its expert: [R, hidden]."""
    if impl == "gather":
        gate_up = jnp.einsum("rh,rhi->ri", rows, w_gate_up[row_experts])  # [R, 2 * I]
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out = jnp.einsum("ri,rih->rh", jax.nn.silu(gate) * up, w_down[row_experts])
        grouped = jnp.arange(rows.shape[0]) < jnp.sum(group_sizes)  # others: other devices'
        return jnp.where(grouped[:, None], out, jnp.zeros((), out.dtype))
    matmul = _grouped_matmul(impl, rows, w_gate_up, w_down)
    gate, up = jnp.split(matmul(rows, w_gate_up, group_sizes), 2, axis=-1)  # [R, I] each
    return matmul(jax.nn.silu(gate) * up, w_down, group_sizes)


def _grouped_matmul(impl: ExpertImpl, rows, w_gate_up, w_down):
    """The grouped matmul (x [R, K], w [G, K, N], group_sizes [G]) -> [R, N] that `impl` names,
    where it takes both of the layer's matmuls; else jax.lax.ragged_dot."""
    layer = [(rows.shape, w_gate_up.shape), ((rows.shape[0], w_down.shape[1]), w_down.shape)]
    if impl == "pallas_mgpu" and all(mgpu_supported(x, w, rows.dtype) for x, w in layer):
        return grouped_matmul_mgpu
    if impl in ("pallas", "pallas_mgpu") and all(supported(x, w) for x, w in layer):
        return grouped_matmul
    if impl in ("pallas", "pallas_mgpu", "ragged_dot"):
        return jax.lax.ragged_dot
    raise ValueError(f"impl must be one of {', '.join(EXPERT_IMPLS)}, got {impl!r}")


def moe_mlp_reference(
    x: jax.Array,  # [T, hidden]
    router_w: jax.Array,  # [hidden, E]
    w_gate_up: jax.Array,  # [E, hidden, 2 * I]
    w_down: jax.Array,  # [E, I, hidden]
    top_k: int,
    norm_topk_prob: bool,
) -> jax.Array:
    """moe_mlp written the plain way, for tests: every token through every expert, in float32,
    summed with a dense [T, E] weight matrix that is zero outside each token's top k."""
    num_experts = w_gate_up.shape[0]
    probs = jax.nn.softmax((x @ router_w).astype(jnp.float32), axis=-1)  # transformers' order
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    dense_weights = jnp.einsum("tk,tke->te", weights,
                               jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32))
    x32 = x.astype(jnp.float32)
    gate, up = jnp.split(jnp.einsum("th,ehi->eti", x32, w_gate_up.astype(jnp.float32)), 2, -1)
    out = jnp.einsum("eti,eih->eth", jax.nn.silu(gate) * up, w_down.astype(jnp.float32))
    return jnp.einsum("te,eth->th", dense_weights, out).astype(x.dtype)


def clear_routes(router_logits, top_k: int, rel: float = 2.0 ** -6) -> np.ndarray:
    """[T] bool, for checks against moe_mlp_reference in bf16: the tokens whose top_k experts
    cannot change when their router logits are rounded differently (the k-th and (k+1)-th
    float32 logits further apart than `rel` of the k-th, a few bf16 ulps). A jitted step may
    round x @ router_w apart from the reference's op (a fused dot's float32 output, say), and
    a near-tie then picks another expert: a different token output, not an error of the
    experts' matmuls."""
    logits = np.sort(np.asarray(router_logits, np.float32), axis=-1)[:, ::-1]
    if top_k >= logits.shape[-1]:  # every expert picked: nothing to flip
        return np.ones(logits.shape[0], bool)
    kth, next_ = logits[:, top_k - 1], logits[:, top_k]
    return kth - next_ > rel * np.maximum(np.abs(kth), 1.0)


def stack_experts(
    gate: Sequence[np.ndarray],  # E x [I, hidden]: w1 (Mixtral), gate_proj (Qwen3-MoE)
    up: Sequence[np.ndarray],  # E x [I, hidden]: w3, up_proj
    down: Sequence[np.ndarray],  # E x [hidden, I]: w2, down_proj
) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's per-expert Linear weights (torch's [out, in]) -> (w_gate_up
    [E, hidden, 2 * I], w_down [E, I, hidden]), the layout moe_mlp takes."""
    if not len(gate) == len(up) == len(down):
        raise ValueError(f"one gate, up and down weight per expert, got {len(gate)}, "
                         f"{len(up)} and {len(down)}")
    w_gate_up = np.stack([np.concatenate([g.T, u.T], axis=1) for g, u in zip(gate, up)])
    w_down = np.stack([d.T for d in down])
    return w_gate_up, w_down
