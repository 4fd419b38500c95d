"""Times pallas_kernels/decode_layer_mgpu.py (a batch-1 decode layer's wo, MLP and next QKV
projection in one persistent Mosaic GPU kernel) against XLA running the same math as the model
does (the decode row padded to two, as the engine pads it on a GPU), on Llama-3.2-1B's layer
shape with random weights, in the same process.

Each timed call's output row feeds the next call's input (one jitted loop of `--iters` calls):
"device us" is the kernels' summed device time per call from a profiler trace, "wall us" the
loop's wall time per call (includes the gaps between kernels). The kernel's outputs are checked
against its jnp reference (float32 accumulation) on every variant.

  python scripts/bench_layer_mgpu.py --out layer_mgpu.json          # H100 (jax 0.11)

--moe times a mixture-of-experts layer instead, Qwen3-30B-A3B's (128 experts of 768, 8 per
token): the router kernel, the routing in XLA and the experts' kernel (decode_moe_*_mgpu)
against XLA's layer with the engine's expert kernels (jinfer.model.moe.moe_mlp, impl "auto":
by pair at one token), its output checked against decode_moe_experts_reference:

  python scripts/bench_layer_mgpu.py --moe --stages 4 8 --out layer_moe.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import device_events  # noqa: E402
from jinfer.model.layers import rms_norm  # noqa: E402
from jinfer.model.moe import moe_mlp, route  # noqa: E402
from pallas_kernels.decode_layer_mgpu import (decode_layer_tail_mgpu,  # noqa: E402
                                              decode_layer_tail_reference,
                                              decode_moe_experts_mgpu,
                                              decode_moe_experts_reference,
                                              decode_moe_router_mgpu, new_barrier_counter,
                                              random_moe_inputs, random_tail_inputs)
from pallas_kernels.decode_layer_plan import TailTiling  # noqa: E402

EPS = 1e-5
MOE_TOP_K = 8  # Qwen3-30B-A3B's experts per token


def xla_tail(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm, next_wqkv):
    """The model's _attention_block residual + _mlp_block + next layer's norm and QKV GEMM."""
    pad = lambda x: jnp.stack([x, jnp.zeros_like(x)])  # noqa: E731
    h1 = pad(h) + pad(attn) @ wo
    gate, up = jnp.split(rms_norm(h1, mlp_norm, EPS) @ w_gate_up, 2, axis=-1)
    h2 = h1 + (jax.nn.silu(gate) * up) @ w_down
    return h2[0], (rms_norm(h2, next_norm, EPS) @ next_wqkv)[0]


def device_us_per_call(step, args, iters: int, reps: int) -> tuple[float, dict[str, float]]:
    """(best wall us per call over reps, {kernel name: device us per call}) of `step` run
    `iters` times in one jitted fori_loop (each call's output feeds the next call's input)."""
    @jax.jit
    def loop(x, *state):
        def body(_, carry):
            x, *state = carry
            y, *state = step(x, *state)
            return (x + (y[: x.shape[0]] * 0).astype(x.dtype), *state)
        return lax.fori_loop(0, iters, body, (x, *state))

    jax.block_until_ready(loop(*args))
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        wall.append((time.perf_counter() - t0) / iters * 1e6)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(loop(*args))
        jax.profiler.stop_trace()
        events = device_events(trace_dir, "/device:GPU")
    per_kernel = collections.defaultdict(float)
    for name, _, duration_ns, _ in events:
        per_kernel[name] += duration_ns / iters / 1e3
    return min(wall), dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def stack_wall_us(tail, layers: list[dict], num_layers: int, calls: int, reps: int) -> float:
    """Best wall us per layer of a jitted stack of `num_layers` tails (cycling through the
    weight sets `layers`), `calls` steps dispatched back to back as an engine's decode steps
    are: shows the gaps between kernels that a per-kernel device time does not. Each layer's
    attention input is the previous layer's QKV row cut to q_size (the attention kernel's
    stand-in). `tail(h, attn, *weights, barrier)` returns (h, qkv, barrier): one barrier
    counter per step goes through the layers (kernels that take it)."""
    weights = [[layer[n] for n in list(layer)[2:]] for layer in layers]
    q_size = layers[0]["attn"].shape[0]

    @jax.jit
    def step(h, attn):
        barrier = new_barrier_counter()
        for i in range(num_layers):
            h, qkv, barrier = tail(h, attn, *weights[i % len(weights)], barrier)
            attn = qkv[:q_size].astype(attn.dtype)
        return h, attn

    h, attn = jax.block_until_ready(step(layers[0]["h"], layers[0]["attn"]))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            h, attn = step(h, attn)
        jax.block_until_ready((h, attn))
        best = min(best, (time.perf_counter() - t0) / calls / num_layers * 1e6)
    return best


def xla_moe_tail(h, attn, wo, mlp_norm, router_w, w_gate_up, w_down, next_norm, next_wqkv):
    """A mixture-of-experts layer's tail as the model's XLA path runs it at batch 1 (the row
    padded to two, the padding row routed to no expert of its own)."""
    pad = lambda x: jnp.stack([x, jnp.zeros_like(x)])  # noqa: E731
    h1 = pad(h) + pad(attn) @ wo
    x = rms_norm(h1, mlp_norm, EPS)
    h2 = h1 + moe_mlp(x, router_w, w_gate_up, w_down, MOE_TOP_K, True, impl="auto",
                      valid=jnp.array([True, False]))
    return h2[0], (rms_norm(h2, next_norm, EPS) @ next_wqkv)[0]


def mgpu_moe_tail(h, attn, wo, mlp_norm, router_w, w_gate_up, w_down, next_norm, next_wqkv,
                  barrier=None, *, tiling):
    """The same tail in the two kernels with the routing between them -> (h2, the next QKV
    row as partials, routing (weights, ids), barrier)."""
    first = decode_moe_router_mgpu(h, attn, wo, mlp_norm, router_w, eps=EPS, top_k=MOE_TOP_K,
                                   tiling=tiling, barrier=barrier)
    logits = first["part_logits"].sum(0)[None].astype(h.dtype)  # as the engine rounds them
    weights, ids = route(logits, MOE_TOP_K, True)
    out = decode_moe_experts_mgpu(first["h1"], mlp_norm, ids[0], weights[0], w_gate_up, w_down,
                                  next_norm, next_wqkv, eps=EPS, tiling=tiling,
                                  barrier=first.get("barrier"))
    return out["h2"], out["part_qkv"], (first["h1"], weights[0], ids[0]), out.get("barrier")


def moe_main(args) -> dict:
    """--moe: the mixture-of-experts layer's kernels against XLA's (module docstring)."""
    layer = random_moe_inputs(0, 2048, 4096, 128, 768, MOE_TOP_K, 5120)  # Qwen3-30B-A3B
    names = list(layer)
    weights = [layer[n] for n in names[2:]]
    moe_bytes = MOE_TOP_K * 3 * 2048 * 768 * 2
    weight_bytes = moe_bytes + sum(layer[n].size * 2 for n in ("wo", "router_w", "next_wqkv"))
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "weight_MB_per_token": weight_bytes / 1e6, "runs": []}
    print("| variant | device us | wall us | GB/s (device, the token's weights) | "
          "max rel err (partials vs reference) |\n|---|---|---|---|---|")

    def report(variant, wall, kernels, err=float("nan"), **extra):
        dev = sum(kernels.values())
        print(f"| {variant} ({len(kernels)} kernels) | {dev:.1f} | {wall:.1f} | "
              f"{weight_bytes / dev / 1e3:.0f} | {err:.3g} |", flush=True)
        results["runs"].append({"variant": variant, "device_us": dev, "wall_us": wall,
                                "kernels": kernels, "max_rel_err": err, **extra})

    wall, kernels = device_us_per_call(lambda h, q: xla_moe_tail(h, q[:4096], *weights),
                                       (layer["h"], jnp.zeros((5120,), jnp.bfloat16)),
                                       args.iters, args.reps)
    report("XLA, moe_impl auto", wall, kernels)
    for stages in args.stages:
        tiling = TailTiling(stages=stages)
        run = jax.jit(functools.partial(mgpu_moe_tail, tiling=tiling))
        errs = []
        for _ in range(args.checks):
            _, part_qkv, (h1, w, ids), _ = run(*layer.values())
            ref = decode_moe_experts_reference(h1, layer["mlp_norm"], ids, w,
                                               layer["w_gate_up"], layer["w_down"],
                                               layer["next_norm"], layer["next_wqkv"], eps=EPS)
            got, want = np.asarray(part_qkv, np.float32).sum(0), np.asarray(ref["part_qkv"][0])
            errs.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))

        def step(h, q, run=run):
            h2, part_qkv, *_ = run(h, q[:4096].astype(h.dtype), *weights)
            return h2, part_qkv.sum(0)
        wall, kernels = device_us_per_call(step, (layer["h"], jnp.zeros((5120,), jnp.float32)),
                                           args.iters, args.reps)
        report(f"Mosaic GPU, {stages} stages", wall, kernels, max(errs),
               tiling=dataclasses.asdict(tiling))
    if args.stack:
        layers = [layer, random_moe_inputs(1, 2048, 4096, 128, 768, MOE_TOP_K, 5120)]
        kernel_tail = functools.partial(mgpu_moe_tail, tiling=TailTiling(stages=args.stages[0]))
        for name, tail in (("xla", lambda h, a, *w: (*xla_moe_tail(h, a, *w[:-1]), w[-1])),
                           ("mgpu", lambda h, a, *w: (lambda o: (o[0], o[1].sum(0), o[3]))(
                               kernel_tail(h, a, *w)))):
            us = stack_wall_us(tail, layers, args.stack, args.iters, args.reps)
            print(f"stack of {args.stack} layers, {name}: {us:.1f} us per layer (wall)",
                  flush=True)
            results[f"stack_wall_us_per_layer_{name}"] = us
    return results


def profile_regions(trace_file: pathlib.Path, clock_ghz: float) -> dict:
    """The in-kernel profiler's trace of one call (decode_layer_tail_mgpu's `profile_dir`) ->
    per region: CTAs that ran it, mean and max duration (us), and its span over the grid (us
    from the first CTA's start to the last CTA's end); "kernel": the span of all regions.
    A trace's timestamps are (its warpgroup's start on the global timer, ns, + SM clock cycles
    since its first event) / 1e3: cycles are converted at `clock_ghz`, so spans across CTAs
    are as good as the clock estimate and the global timer's alignment."""
    events = json.loads(trace_file.read_text())["traceEvents"]
    first_ts: dict = {}
    for e in events:
        first_ts.setdefault(e["tid"], e["ts"])  # each trace's first event: cycle offset 0

    def to_us(e):  # the event's time on the global timer, us
        base = first_ts[e["tid"]]
        return base + (e["ts"] - base) / clock_ghz
    spans: dict = {}
    open_regions: dict = {}
    for e in sorted(events, key=lambda e: (e["tid"], e["ts"])):
        key = (e["tid"], e["name"])
        if e["ph"] == "B":
            open_regions[key] = to_us(e)
        else:
            spans.setdefault(e["name"], []).append((open_regions.pop(key), to_us(e)))
    regions = {}
    for name, pairs in sorted(spans.items()):
        durations = [end - begin for begin, end in pairs]
        regions[name] = {"ctas": len(pairs), "mean_us": float(np.mean(durations)),
                         "max_us": float(np.max(durations)),
                         "span_us": max(e for _, e in pairs) - min(b for b, _ in pairs)}
    first = min(b for pairs in spans.values() for b, _ in pairs)
    last = max(e for pairs in spans.values() for _, e in pairs)
    regions["kernel"] = {"span_us": last - first}
    return regions


def max_errors(out, ref) -> dict[str, float]:
    errs = {}
    for key, want in ref.items():
        got = np.asarray(out[key], np.float32)
        if key.startswith("part"):
            got = got.sum(0)[None]
        errs[key] = float(np.max(np.abs(got - np.asarray(want, np.float32))))
    return errs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--stages", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stack", type=int, default=16,
                        help="also time a jitted stack of this many layers (0: skip)")
    parser.add_argument("--checks", type=int, default=10, help="calls compared to the reference")
    parser.add_argument("--profile-dir", help="also profile one call in the kernel (regions per "
                        "CTA: loads, barriers, input builds, products) with traces written here")
    parser.add_argument("--sm-clock-ghz", type=float, default=1.98,
                        help="SM clock for the profile's cycle counts (H100 SXM: 1.98)")
    parser.add_argument("--moe", action="store_true",
                        help="time Qwen3-30B-A3B's mixture-of-experts layer (module docstring)")
    args = parser.parse_args(argv)
    if args.moe:
        results = moe_main(args)
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
        return 0

    layer = random_tail_inputs(0, 2048, 2048, 8192, 3072)  # Llama-3.2-1B
    names = list(layer)
    weight_bytes = sum(v.size * 2 for k, v in layer.items() if k.startswith("w") or
                       k == "next_wqkv")
    ref = jax.jit(lambda *a: decode_layer_tail_reference(*a, eps=EPS))(*layer.values())
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "weight_MB": weight_bytes / 1e6, "runs": []}
    print("| variant | device us | wall us | GB/s (device) | max abs err (h2, qkv) |")
    print("|---|---|---|---|---|")

    def xla_step(h, qkv):
        return xla_tail(h, *[layer[n] for n in names[1:]])
    wall, kernels = device_us_per_call(xla_step, (layer["h"], jnp.zeros((3072,), jnp.bfloat16)),
                                       args.iters, args.reps)
    dev = sum(kernels.values())
    h2, qkv = jax.jit(xla_tail)(*layer.values())
    err = (float(np.max(np.abs(np.asarray(h2, np.float32) - np.asarray(ref["h2"], np.float32)))),
           float(np.max(np.abs(np.asarray(qkv, np.float32) - np.asarray(ref["part_qkv"][0])))))
    print(f"| XLA ({len(kernels)} kernels) | {dev:.1f} | {wall:.1f} | "
          f"{weight_bytes / dev / 1e3:.0f} | {err[0]:.3g}, {err[1]:.3g} |", flush=True)
    results["runs"].append({"variant": "xla", "device_us": dev, "wall_us": wall,
                            "kernels": kernels, "max_abs_err_vs_reference": err})

    for stages in args.stages:
        tiling = TailTiling(stages=stages)
        run = jax.jit(lambda *a, tiling=tiling: decode_layer_tail_mgpu(
            *a, eps=EPS, tiling=tiling, interpret=False))
        errs = [max_errors(run(*layer.values()), ref) for _ in range(args.checks)]
        worst = {k: max(e[k] for e in errs) for k in errs[0]}

        def step(h, qkv, run=run):
            out = run(h, *[layer[n] for n in names[1:]])
            return out["h2"], out["part_qkv"]
        wall, kernels = device_us_per_call(
            step, (layer["h"], jnp.zeros_like(run(*layer.values())["part_qkv"])), args.iters,
            args.reps)
        dev = sum(kernels.values())
        print(f"| Mosaic GPU, {stages} stages | {dev:.1f} | {wall:.1f} | "
              f"{weight_bytes / dev / 1e3:.0f} | {worst['h2']:.3g}, {worst['part_qkv']:.3g} |",
              flush=True)
        results["runs"].append({"variant": "mgpu", "tiling": dataclasses.asdict(tiling),
                                "device_us": dev, "wall_us": wall, "kernels": kernels,
                                "max_abs_err_vs_reference": worst})
    if args.stack:
        def mgpu_tail(h, attn, *weights, own_counter=False):
            *weights, barrier = weights
            out = decode_layer_tail_mgpu(h, attn, *weights, eps=EPS, interpret=False,
                                         tiling=TailTiling(stages=args.stages[0]),
                                         barrier=None if own_counter else barrier)
            return out["h2"], out["part_qkv"].sum(0), out.get("barrier", barrier)
        # Two weight sets, alternating; mgpu_memset: the kernel's own barrier counter, which
        # Pallas zero-fills before every call.
        layers = [layer, random_tail_inputs(1, 2048, 2048, 8192, 3072)]
        for name, tail in (("xla", lambda h, a, *w: (*xla_tail(h, a, *w[:-1]), w[-1])),
                           ("mgpu", mgpu_tail),
                           ("mgpu_memset", functools.partial(mgpu_tail, own_counter=True))):
            us = stack_wall_us(tail, layers, args.stack, args.iters, args.reps)
            print(f"stack of {args.stack} layers, {name}: {us:.1f} us per layer (wall)",
                  flush=True)
            results[f"stack_wall_us_per_layer_{name}"] = us
    if args.profile_dir:
        results["profile"] = {}
        for stages in args.stages:
            trace_dir = pathlib.Path(args.profile_dir) / f"stages{stages}"
            trace_dir.mkdir(parents=True, exist_ok=True)
            run = jax.jit(lambda *a, stages=stages, trace_dir=trace_dir: decode_layer_tail_mgpu(
                *a, eps=EPS, tiling=TailTiling(stages=stages), interpret=False,
                barrier=new_barrier_counter(), profile_dir=str(trace_dir)))
            for _ in range(3):  # the last call's trace, after the compile and warm caches
                jax.block_until_ready(run(*layer.values()))
            trace = max(trace_dir.glob("*trace.json"), key=lambda f: f.stat().st_mtime)
            regions = profile_regions(trace, args.sm_clock_ghz)
            print(f"\nin-kernel profile, {stages} stages ({trace.name}; us at "
                  f"{args.sm_clock_ghz} GHz):\n"
                  "| region | CTAs | mean us | max us | span us |\n|---|---|---|---|---|")
            for name, r in regions.items():
                print(f"| {name} | {r.get('ctas', '')} | {r.get('mean_us', float('nan')):.2f} |"
                      f" {r.get('max_us', float('nan')):.2f} | {r['span_us']:.2f} |")
            results["profile"][stages] = regions
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
