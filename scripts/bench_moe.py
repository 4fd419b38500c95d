"""The mixture-of-experts MLP on the GPU (jinfer.model.moe.moe_mlp): its expert implementations
against the bytes they must read and against a dense bound, per number of tokens.

For each model shape (Qwen3-30B-A3B: hidden 2048, 128 experts of 768, 8 per token; Mixtral
8x7B: hidden 4096, 8 experts of 14336, 2 per token) and each T (tokens in the step: the decode
and prefill buckets), random bf16 inputs and weights, times one layer's MoE MLP:

  pallas       moe_mlp(impl="pallas"): routing, sort, the grouped-matmul kernel
               (pallas_kernels/grouped_matmul.py: only the experts with rows are read), combine.
  pallas_mgpu  the same with the Mosaic GPU kernel (pallas_kernels/grouped_matmul_mgpu.py):
               the engine's path on Hopper ("auto").
  pallas_pairs, pallas_mgpu_pairs  the kernels by (token, expert) pair, unsorted (no sort,
               group sizes or gathers around them; an expert read once per pair that picks
               it): for decode sizes (as gather, run where T * k expert matrices are at
               most GATHER_MAX_BYTES).
  ragged_dot   moe_mlp(impl="ragged_dot"): the same around XLA's grouped matmul
               (jax.lax.ragged_dot).
  ragged_dot_triton  the same with JAX's opt-in Pallas Triton lowering of ragged_dot
               (jax_ragged_dot_use_gpu_pallas_triton_lowering; opt-in: jax 0.11.2 lacks
               its module).
  gather       moe_mlp(impl="gather"): every (token, expert) pair's weights gathered, a batched
               matvec; reads T * k expert matrices, so only small T.
  dense        the matmuls alone, x repeated over its k slots against expert 0's weights: what
               the layer would cost if grouping and routing were free (a bound for large T).

Touched bytes: the distinct experts the step's routing picks (counted on the host from the same
routing) x their three matrices; GB/s = touched bytes / time, next to the device copy bandwidth
of the same run. At decode sizes the layer is bound by those bytes; a grouped matmul that reads
each touched expert once is at the copy rate.

Method (shared/benchmarking.md): a jitted lax.fori_loop of `iters` calls over `copies`
separate weight sets (so consecutive calls do not find their experts in the 50 MB L2), compiled
apart, median / min over --reps; every implementation's output is checked against
moe_mlp_reference in float32 before it is timed (on the tokens whose top-k experts no bf16
rounding of the router logits can change: moe.clear_routes); one that fails to compile or
to match is reported (its error in the JSON) and the run goes on.

  python scripts/bench_moe.py --out bench_moe.json
  python scripts/bench_moe.py --kernels --tokens 1 8 256 --out k.json  # + the kernels alone

--kernels also times the layer's two grouped matmuls alone (the rows sorted by the routing, as
moe_mlp makes them) for each tile configuration of KERNEL_CONFIGS, checked against ragged_dot:
the kernels' share of the layer (the rest is routing, sort, gathers and combine) and the best
tile per shape and size.
  python scripts/bench_moe.py --cpu-smoke --out /tmp/moe.json      # tiny, checks the script

--routing times the routing alone, as the layer kernels' decode step runs it (float32 partial
sums of the router logits [splits, T, E] added, rounded to bf16, the top k and their softmax):
route() with lax.top_k (a sort) against by_rank=True (moe.top_k_by_rank: compares and sums),
device time of the routing's kernels per call, both checked to pick the same experts.
  python scripts/bench_moe.py --routing --tokens 1 2 8 --out r.json
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jinfer.model.moe import (clear_routes, group_pairs, moe_mlp, moe_mlp_reference,  # noqa: E402
                              route)
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference  # noqa: E402
from pallas_kernels.grouped_matmul_mgpu import grouped_matmul_mgpu  # noqa: E402
from bench_common import copy_bandwidth, measure  # noqa: E402

# name: (hidden, intermediate per expert, experts, experts per token, renormalise)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8, True), "mixtral-8x7b": (4096, 14336, 8, 2, True)}
TOKENS = (1, 2, 8, 64, 256, 2048)
SMOKE_SHAPES = {"smoke": (64, 32, 8, 2, True)}
SMOKE_TOKENS = (1, 8, 32)
GATHER_MAX_BYTES = 4 << 30  # gather / by-pair impls read T * k expert matrices: beyond, only slower
MIN_WEIGHT_BYTES = 2 << 30  # weight sets cycled per loop (>> L2) where memory allows
IMPLS = {"ragged_dot_triton": "ragged_dot"}  # bench name -> moe_mlp impl
ALL_IMPLS = ("pallas", "pallas_mgpu", "pallas_pairs", "pallas_mgpu_pairs", "ragged_dot",
             "ragged_dot_triton", "gather", "dense")
# jax 0.11.2 has the flag but not its module (jax._src.lax.pallas_lowerings): opt-in only
DEFAULT_IMPLS = tuple(i for i in ALL_IMPLS if i != "ragged_dot_triton")
# --kernels: the tile configurations tried per kernel ({} = the kernel's defaults: Triton
# block_n / block_k 128, 3 stages, 4-8 warps; Mosaic GPU block_n 128, block_k 64, 4 steps in
# flight)
KERNEL_CONFIGS = {
    "pallas": ({}, {"block_n": 64}, {"block_k": 64}, {"num_stages": 4}, {"num_stages": 5},
               {"num_warps": 4}, {"block_n": 64, "num_stages": 4}),
    "pallas_mgpu": ({}, {"block_n": 64}, {"block_k": 128}, {"max_concurrent_steps": 2},
                    {"max_concurrent_steps": 6}, {"block_n": 64, "max_concurrent_steps": 6}),
}
KERNELS = {"pallas": grouped_matmul, "pallas_mgpu": grouped_matmul_mgpu}
TRITON_FLAG = "jax_ragged_dot_use_gpu_pallas_triton_lowering"


def make_weights(key, hidden, inter, experts, dtype):
    k1, k2, k3 = jax.random.split(key, 3)
    router = jax.random.normal(k1, (hidden, experts), dtype) * hidden ** -0.5
    gate_up = jax.random.normal(k2, (experts, hidden, 2 * inter), dtype) * hidden ** -0.5
    down = jax.random.normal(k3, (experts, inter, hidden), dtype) * inter ** -0.5
    return router, gate_up, down


def dense_bound(x, router, gate_up, down, top_k, norm):
    """The matmuls alone: every token's k rows through expert 0."""
    del router, norm
    rows = jnp.repeat(x, top_k, axis=0)
    g, u = jnp.split(rows @ gate_up[0], 2, axis=-1)
    return ((jax.nn.silu(g) * u) @ down[0]).reshape(x.shape[0], top_k, -1).sum(1)


def loop(fn, iters: int):
    """iters calls of fn over the weight sets in turn (each set its own arrays, so no slicing
    runs in the loop); returns (a sum that depends on every call, the last output)."""
    @jax.jit
    def run(x, weight_sets):
        def body(i, carry):
            acc, _ = carry
            outs = [fn(x + acc.astype(x.dtype), *w) for w in weight_sets]
            return acc + sum(o[0, 0].astype(jnp.float32) for o in outs) * 0, outs[-1]
        init = (jnp.zeros((), jnp.float32), jnp.zeros_like(x))
        return lax.fori_loop(0, max(1, iters // len(weight_sets)), body, init)
    return run


def touched_experts(x, router, top_k, norm) -> int:
    _, ids = route(x @ router, top_k, norm)
    return len(np.unique(np.asarray(ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=ALL_IMPLS)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--kernels", action="store_true",
                        help="also time the two grouped matmuls alone per tile configuration")
    parser.add_argument("--routing", action="store_true",
                        help="time the routing alone (sort vs rank) and nothing else")
    parser.add_argument("--routing-splits", type=int, default=16,
                        help="--routing: partial sums of the router logits added per call")
    args = parser.parse_args()
    shapes = SMOKE_SHAPES if args.cpu_smoke else {s: SHAPES[s] for s in args.shapes}
    tokens = SMOKE_TOKENS if args.cpu_smoke else args.tokens
    iters, reps = (2, 1) if args.cpu_smoke else (args.iters, args.reps)
    dtype = jnp.float32 if args.cpu_smoke else jnp.bfloat16
    copy = copy_bandwidth((64 << 20) if args.cpu_smoke else (2 << 30), reps=max(reps, 3))
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "copy": copy, "runs": []}
    print(f"device {results['device']}, copy {copy['GBps']:.0f} GB/s (read + written)\n")
    if args.routing:
        results["routing"] = routing_runs(shapes, tokens, args.routing_splits, iters, reps)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
        return
    print("| shape | T | impl | us / call | touched experts | touched GB/s | vs copy |")
    print("|---|---|---|---|---|---|---|")
    for name, (hidden, inter, experts, top_k, norm) in shapes.items():
        expert_bytes = 3 * hidden * inter * jnp.dtype(dtype).itemsize
        layer_bytes = experts * expert_bytes
        copies = 1 if args.cpu_smoke else max(1, min(4, MIN_WEIGHT_BYTES // layer_bytes))
        keys = jax.random.split(jax.random.key(0), copies + 1)
        weight_sets = [make_weights(k, hidden, inter, experts, dtype) for k in keys[1:]]
        for t in tokens:
            x = jax.random.normal(jax.random.fold_in(keys[0], t), (t, hidden), dtype)
            want = np.asarray(moe_mlp_reference(x, *weight_sets[0], top_k, norm), np.float32)
            # a jitted step may round the bf16 router logits apart from the reference's op and
            # break a near-tie another way: check the tokens whose experts are clear
            clear = clear_routes(x.astype(jnp.float32) @ weight_sets[0][0].astype(jnp.float32),
                                 top_k)
            touched = touched_experts(x, weight_sets[0][0], top_k, norm)
            per_pair = ("gather", "pallas_pairs", "pallas_mgpu_pairs")  # read T * k experts
            impls = {impl: functools.partial(moe_mlp, impl=IMPLS.get(impl, impl))
                     for impl in args.impls if impl != "dense" and (
                         impl not in per_pair or t * top_k * expert_bytes <= GATHER_MAX_BYTES)}
            if "dense" in args.impls:
                impls["dense"] = dense_bound
            for impl, fn in impls.items():
                call = lambda x, r, g, d, fn=fn: fn(x, r, g, d, top_k, norm)  # noqa: E731
                calls = max(1, iters // copies) * copies
                jax.config.update(TRITON_FLAG, impl == "ragged_dot_triton")
                try:
                    if impl != "dense":
                        got = np.asarray(jax.jit(call)(x, *weight_sets[0]), np.float32)
                        err = float(np.abs(got - want)[clear].max(initial=0.0)
                                    / (np.abs(want).max() + 1e-30))
                        tol = 1e-5 if dtype == jnp.float32 else 3e-2
                        assert err < tol, f"{name} T={t} {impl}: relative error {err:.3g}"
                    timing = measure(loop(call, calls), (x, weight_sets), calls, reps)
                except Exception as e:  # noqa: BLE001 (reported, the others still run)
                    results["runs"].append({"shape": name, "tokens": t, "impl": impl,
                                            "error": f"{type(e).__name__}: {e}"[:2000]})
                    print(f"| {name} | {t} | {impl} | failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:150] if str(e) else ''} | | | |",
                          flush=True)
                    continue
                finally:
                    jax.config.update(TRITON_FLAG, False)
                us = timing["median_us"]
                gbps = touched * expert_bytes / (us * 1e-6) / 1e9
                run = {"shape": name, "tokens": t, "impl": impl, "us": us,
                       "min_us": timing["min_us"], "compile_s": timing["compile_s"],
                       "touched_experts": touched, "touched_GBps": gbps,
                       "checked_tokens": int(clear.sum()),
                       "copy_fraction": gbps / copy["GBps"]}
                results["runs"].append(run)
                print(f"| {name} | {t} | {impl} | {us:,.1f} | {touched} | {gbps:,.0f} | "
                      f"{100 * run['copy_fraction']:.0f}% |", flush=True)
    if args.kernels:
        results["kernels"] = kernel_sweep(shapes, tokens, iters, reps, dtype, copy, results)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=2))


def routing_runs(shapes, tokens, splits, iters, reps) -> list:
    """--routing: the layer kernels' routing per call, sorted vs ranked (see the docstring)."""
    print("| shape | T | top-k | us / call (device) | kernels / call | us / call (loop) |")
    print("|---|---|---|---|---|---|")
    runs = []
    for name, (_, _, experts, top_k, norm) in shapes.items():
        for t in tokens:
            partials = jax.random.normal(jax.random.key(t), (splits, t, experts), jnp.float32)
            picked = {}
            for by_rank in (False, True):
                def one(p, by_rank=by_rank):
                    with jax.named_scope("route"):
                        logits = p.sum(0).astype(jnp.bfloat16)
                        return route(logits, top_k, norm, by_rank=by_rank)

                @jax.jit
                def run(p):
                    def body(i, carry):
                        acc, _ = carry
                        weights, ids = one(p + acc)
                        return acc + (weights[0, 0] + ids[0, 0]) * 0, ids
                    init = (jnp.zeros((), jnp.float32), jnp.zeros((t, top_k), jnp.int32))
                    return lax.fori_loop(0, iters, body, init)
                picked[by_rank] = np.asarray(jax.jit(one)(partials)[1])
                timing = measure(run, (partials,), iters, reps, scope="route")
                timing.pop("last")
                run_ = {"shape": name, "tokens": t, "top_k": "rank" if by_rank else "sort",
                        "splits": splits, **timing}
                runs.append(run_)
                device = timing["device_us"]
                print(f"| {name} | {t} | {run_['top_k']} | "
                      f"{'-' if device is None else f'{device:.2f}'} | "
                      f"{timing['device_kernels_per_call']:.0f} | {timing['median_us']:.2f} |",
                      flush=True)
            assert (picked[False] == picked[True]).all(), f"{name} T={t}: the routings differ"
    return runs


def kernel_sweep(shapes, tokens, iters, reps, dtype, copy, results) -> list:
    """The layer's two grouped matmuls (gate/up, then down after SwiGLU) alone, per kernel and
    tile configuration; `rest_us`: the layer's moe_mlp time (same impl, this run) less the
    kernels' at their defaults."""
    layer_us = {(r["shape"], r["tokens"], r["impl"]): r["us"] for r in results["runs"]
                if "us" in r}
    runs = []
    print("\n| shape | T | kernel | config | us / layer (2 matmuls) | touched GB/s | vs copy | "
          "rest of the layer us |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (hidden, inter, experts, top_k, norm) in shapes.items():
        expert_bytes = 3 * hidden * inter * jnp.dtype(dtype).itemsize
        copies = max(1, min(4, MIN_WEIGHT_BYTES // (experts * expert_bytes)))
        keys = jax.random.split(jax.random.key(0), copies + 1)
        weight_sets = [make_weights(k, hidden, inter, experts, dtype) for k in keys[1:]]
        for t in tokens:
            x = jax.random.normal(jax.random.fold_in(keys[0], t), (t, hidden), dtype)
            _, ids = route(x @ weight_sets[0][0], top_k, norm)
            order, group_sizes, _ = group_pairs(ids, experts)
            rows = x[order // top_k]
            touched = int(np.count_nonzero(np.asarray(group_sizes)))
            want = np.asarray(swiglu(grouped_matmul_reference, rows, *weight_sets[0][1:],
                                     group_sizes), np.float32)
            for kernel, configs in KERNEL_CONFIGS.items():
                for config in configs:
                    matmul = functools.partial(KERNELS[kernel], **config)
                    call = lambda r, router, gu, d, mm=matmul: swiglu(  # noqa: E731
                        mm, r, gu, d, group_sizes)
                    calls = max(1, iters // copies) * copies
                    label = ", ".join(f"{k}={v}" for k, v in config.items()) or "default"
                    run = {"shape": name, "tokens": t, "kernel": kernel, "config": config}
                    try:
                        got = np.asarray(jax.jit(call)(rows, *weight_sets[0]), np.float32)
                        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
                        tol = 1e-5 if dtype == jnp.float32 else 3e-2
                        assert err < tol, f"relative error {err:.3g}"
                        timing = measure(loop(call, calls), (rows, weight_sets), calls, reps)
                    except Exception as e:  # noqa: BLE001 (reported, the others still run)
                        runs.append({**run, "error": f"{type(e).__name__}: {e}"[:2000]})
                        print(f"| {name} | {t} | {kernel} | {label} | failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |",
                              flush=True)
                        continue
                    us = timing["median_us"]
                    gbps = touched * expert_bytes / (us * 1e-6) / 1e9
                    layer = layer_us.get((name, t, kernel))
                    rest = layer - us if layer is not None and not config else None
                    runs.append({**run, "us": us, "min_us": timing["min_us"],
                                 "touched_experts": touched, "touched_GBps": gbps,
                                 "copy_fraction": gbps / copy["GBps"], "rest_us": rest})
                    print(f"| {name} | {t} | {kernel} | {label} | {us:,.1f} | {gbps:,.0f} | "
                          f"{100 * gbps / copy['GBps']:.0f}% | "
                          f"{'' if rest is None else f'{rest:,.1f}'} |", flush=True)
    return runs


def swiglu(matmul, rows, w_gate_up, w_down, group_sizes):
    """The experts' SwiGLU over rows sorted by expert, with `matmul` as the grouped matmul."""
    gate, up = jnp.split(matmul(rows, w_gate_up, group_sizes), 2, axis=-1)
    return matmul(jax.nn.silu(gate) * up, w_down, group_sizes)


if __name__ == "__main__":
    main()
