"""Could one persistent Pallas kernel per decoder layer beat XLA's kernel boundaries at batch 1?

At one decode row a Llama layer is four weight-streaming projections (QKV, output, gate/up,
down) and ~9 small kernels around them; each kernel boundary idles the memory system for a
launch, a ramp-up and a tail. The remedy published for Llama-3.2-1B on an H100 (Hazy Research's
"No Bubbles" megakernel, CUDA) is one resident grid that streams every weight, with the phases
of the layer separated by on-GPU synchronisation. This script measures the two quantities that
decide whether the same design pays off in Pallas (Triton lowering): how fast a resident grid of
Pallas programs streams the four projections' weights, and what a grid-wide barrier costs.
bench_persistent_mgpu.py asks the same of a warp-specialised Mosaic GPU kernel.

Variants, each one `pallas_call` with grid = programs-per-SM x SMs (all resident at once, which
a grid barrier needs), timed by device time per call (bench_common.device_events):
- `stream`: the four projections back to back with no synchronisation, every phase reading its
  input vector from the kernel's input (the streaming ceiling: no dependency is honoured);
- `barriers`: the same with a grid-wide barrier between phases;
- `barriers_prefetch`: each phase's first weight tile is loaded before its barrier (weights do
  not depend on the previous phase, so their load can overlap the wait);
- `chain`: the real dependency: phase i+1 reads phase i's split-K partial sums (summed and
  rounded to bf16 as the model rounds each projection), one barrier between phases; its result
  is checked against `xla`;
- `barrier_only`: eight barriers and no work (their cost alone);
- `xla`: the four `jnp.dot` projections as the model chains them (XLA's own GEMM kernels).

A phase computes split-K partial sums: tile (split s, strip j) = x[rows of s] @ w[rows of s,
columns of j] as a float32 [block_n] vector; tiles are dealt round-robin to the programs, and
each program streams its tiles' [block_k, block_n] weight chunks in one flat loop (the next
chunk loaded while the current one is multiplied). The barrier is sense-reversing: an atomic
arrival count and a generation word that the last arrival bumps, which waiting programs poll
with acquire read-modify-writes (`--poll atomic`) or with volatile loads followed by one acquire
read-modify-write (`--poll volatile`). A volatile-polled barrier whose closing acquire was an
atomic with an unused result measured 2.4 us, but the chain came out wrong (max error up to
1.18 against 0.0156); the likely cause, not checked in the PTX: Triton may lower such an
atomic to a `red`, which has no acquire semantics. Every acquire in this script is an atomic
whose result is used.

The loop runs each variant `--iters` times in one jitted `lax.fori_loop` over the same weights:
121.6 MB per call, beyond the 50 MB L2.

  python scripts/bench_persistent.py --out persistent.json     # H100: Llama-3.2-1B shapes
  python scripts/bench_persistent.py --check-interpret         # CPU: the chain in interpret mode
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import device_events  # noqa: E402

KERNEL_NAME = "persistent_layer"
CHAIN_CHECKS = 10  # calls of the chain checked against XLA per configuration
VARIANTS = ("stream", "barriers", "barriers_prefetch", "chain", "barrier_only")


@dataclasses.dataclass(frozen=True)
class Layer:
    """The four projections of a decoder layer, (K, N) each: QKV, output, gate/up, down."""
    hidden: int = 2048
    qkv: int = 3072
    ffn: int = 8192

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(self.hidden, self.qkv), (self.hidden, self.hidden),
                (self.hidden, 2 * self.ffn), (self.ffn, self.hidden)]


@dataclasses.dataclass(frozen=True)
class Tiling:
    splits: tuple[int, int, int, int] = (8, 16, 1, 16)  # split-K factor per projection
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4


def grid_barrier(sync_ref, num_programs: int, interpret: bool, poll: str = "atomic"):
    """All programs wait here until every program has arrived. sync_ref: int32 [2] in global
    memory, [arrivals, generation], arrivals 0 on entry and on exit (the last arrival resets
    it before it bumps the generation, so the kernel can be called again on the same buffer).
    poll: how a waiting program reads the generation: "atomic" (an acquire read-modify-write
    per poll) or "volatile" (volatile loads, then one acquire read-modify-write)."""
    from jax.experimental.pallas import triton as plgpu
    zero, one = jnp.int32(0), jnp.int32(1)
    if not interpret:
        plgpu.debug_barrier()  # this program's stores are issued before it arrives
    generation = plgpu.atomic_add(sync_ref, one, zero)
    arrived = plgpu.atomic_add(sync_ref, zero, one)

    @pl.when(arrived == num_programs - 1)
    def _last():
        plgpu.atomic_add(sync_ref, zero, jnp.int32(-num_programs))
        plgpu.atomic_add(sync_ref, one, one)

    if interpret:  # programs run one after another: nobody else could bump the generation
        return
    if poll == "atomic":
        lax.while_loop(lambda g: g == generation,
                       lambda g: plgpu.atomic_add(sync_ref, one, zero), generation)
    else:
        seen = lax.while_loop(
            lambda g: g == generation,
            lambda g: plgpu.load(sync_ref.at[pl.ds(1, 1)], volatile=True)[0], generation)
        # Acquire: one read-modify-write whose result is used (Triton may lower an atomic with
        # an unused result to a `red`, which has no acquire semantics); it returns at once.
        lax.while_loop(lambda g: g == generation,
                       lambda g: plgpu.atomic_add(sync_ref, one, zero),
                       plgpu.atomic_add(sync_ref, one, zero) + 0 * seen)
    plgpu.debug_barrier()


def gemv_phase(load_x, w_ref, part_ref, *, k_total: int, n_total: int, splits: int,
               block_n: int, block_k: int, program: int, num_programs: int, before=None):
    """part_ref[s, cols] = x[rows of split s] @ w[rows of s, cols], float32, every tile of the
    projection; this program takes tiles program, program + num_programs, ... `load_x(row0,
    n)` gives x[row0:row0+n] as float32. `before` runs after the first weight chunk is loaded
    and before the first x is read (where a barrier can wait while the weights stream)."""
    from jax.experimental.pallas import triton as plgpu
    strips = n_total // block_n
    tiles = splits * strips
    rows = k_total // splits
    chunks = rows // block_k
    steps = -(-tiles // num_programs) * chunks

    def coords(i):
        tile = program + lax.div(i, chunks) * num_programs
        split, strip = lax.div(tile, strips), lax.rem(tile, strips)
        row0 = split * rows + lax.rem(i, chunks) * block_k
        return tile < tiles, split, strip, row0

    def load_w(i):
        valid, _, strip, row0 = coords(jnp.minimum(i, steps - 1))
        return plgpu.load(w_ref.at[pl.ds(row0, block_k), pl.ds(strip * block_n, block_n)],
                          mask=jnp.full((block_k, block_n), valid), other=0)

    def body(i, carry):
        acc, w, x = carry
        w_next, x_next = load_w(i + 1), load_x(coords(jnp.minimum(i + 1, steps - 1))[3], block_k)
        valid, split, strip, _ = coords(i)
        acc = acc + x[:, None] * w.astype(jnp.float32)

        def flush(acc):
            plgpu.store(part_ref.at[split, pl.ds(strip * block_n, block_n)], acc.sum(axis=0),
                        mask=jnp.full((block_n,), valid))
            return jnp.zeros_like(acc)

        acc = lax.cond(lax.rem(i, chunks) == chunks - 1, flush, lambda a: a, acc)
        return acc, w_next, x_next

    w0 = load_w(0)
    if before is not None:
        before()
    init = (jnp.zeros((block_k, block_n), jnp.float32), w0, load_x(coords(0)[3], block_k))
    lax.fori_loop(0, steps, body, init)


def persistent_layer(variant: str, layer: Layer, tiling: Tiling, num_programs: int,
                     interpret: bool = False, poll: str = "atomic"):
    """A function (x [hidden] bf16, weights [(K, N)] bf16, sync int32 [2]) -> (y [hidden] bf16,
    sync) running the variant as one pallas_call. y is the chain's result for `chain` (the down
    projection of the whole chain), else the last phase's output (not a layer's result)."""
    from jax.experimental.pallas import triton as plgpu
    shapes = layer.shapes

    def kernel(x_ref, w0, w1, w2, w3, sync_in, p0, p1, p2, p3, sync_ref):
        del sync_in  # aliased to sync_ref
        weights, parts = (w0, w1, w2, w3), (p0, p1, p2, p3)
        program = pl.program_id(0)
        barrier = lambda: grid_barrier(sync_ref, num_programs, interpret, poll)  # noqa: E731
        if variant == "barrier_only":
            for _ in range(8):
                barrier()
            return

        def from_input(row0, n):
            return x_ref[pl.ds(lax.rem(row0, layer.hidden), n)].astype(jnp.float32)

        def from_partials(p_ref, splits):
            def load(row0, n):
                total = jnp.zeros((n,), jnp.float32)
                for s in range(splits):
                    total += plgpu.load(p_ref.at[jnp.int32(s), pl.ds(row0, n)])
                return total.astype(jnp.bfloat16).astype(jnp.float32)  # the model's rounding
            return load

        for phase, ((k_total, n_total), splits) in enumerate(zip(shapes, tiling.splits)):
            if variant == "chain" and phase:
                load_x = from_partials(parts[phase - 1], tiling.splits[phase - 1])
            else:
                load_x = from_input
            wait_first = variant == "barriers_prefetch" and phase > 0
            if variant in ("barriers", "chain") and phase > 0:
                barrier()
            gemv_phase(load_x, weights[phase], parts[phase], k_total=k_total, n_total=n_total,
                       splits=splits, block_n=tiling.block_n, block_k=tiling.block_k,
                       program=program, num_programs=num_programs,
                       before=barrier if wait_first else None)

    def run(x, weights, sync):
        out_shape = [jax.ShapeDtypeStruct((s, n), jnp.float32)
                     for s, (_, n) in zip(tiling.splits, shapes)]
        out_shape.append(jax.ShapeDtypeStruct(sync.shape, sync.dtype))
        *parts, sync = pl.pallas_call(
            kernel, out_shape=out_shape, grid=(num_programs,), input_output_aliases={5: 4},
            compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=1),
            interpret=interpret, name=KERNEL_NAME)(x, *weights, sync)
        return parts[-1].sum(axis=0).astype(jnp.bfloat16), sync
    return run


def xla_chain(x, weights):
    """The four projections as the model computes them for one decode row: each output in
    bf16, the next projection reading its first K entries. The row is padded to two, as the
    model pads its decode batch on a GPU (XLA rewrites a one-row dot with a weight under ~10M
    elements into a multiply + reduce, slower than its GEMM kernel)."""
    y = jnp.stack([x, jnp.zeros_like(x)])
    for w in weights:
        y = jnp.dot(y[:, : w.shape[0]], w, preferred_element_type=jnp.float32).astype(x.dtype)
    return y[0]


def make_inputs(layer: Layer, seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(keys[0], (layer.hidden,), jnp.bfloat16)
    weights = [(jax.random.normal(k, s, jnp.float32) / np.sqrt(s[0])).astype(jnp.bfloat16)
               for k, s in zip(keys[1:], layer.shapes)]
    return x, weights


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


def check_interpret(layer: Layer, tiling: Tiling) -> tuple[float, float, list[int]]:
    """The chain in interpret mode with one program (the barriers pass at once): (max abs
    error against xla_chain, max abs of xla_chain, the barrier state [arrivals, generation]
    after the call)."""
    x, weights = make_inputs(layer)
    run = persistent_layer("chain", layer, tiling, num_programs=1, interpret=True)
    y, sync = jax.jit(run)(x, weights, jnp.zeros((2,), jnp.int32))
    reference = xla_chain(x, weights).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - reference)))
    return err, float(jnp.max(jnp.abs(reference))), sync.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--programs-per-sm", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--poll", nargs="+", default=["atomic", "volatile"],
                        choices=["atomic", "volatile"], help="barrier polling (grid_barrier)")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-interpret", action="store_true",
                        help="CPU: run the chain in interpret mode on small shapes and check it")
    args = parser.parse_args(argv)
    if args.check_interpret:
        err, scale, sync = check_interpret(Layer(256, 384, 512), Tiling((2, 2, 1, 4), 32, 32))
        print(f"chain vs xla, interpret mode: max abs error {err:.3g} (outputs up to "
              f"{scale:.3g}); barrier state {sync}")
        return 0

    layer, tiling = Layer(), Tiling()
    x, weights = make_inputs(layer)
    weight_bytes = sum(w.size * w.dtype.itemsize for w in weights)
    device = jax.devices()[0]
    results = {"device": device.device_kind, "jax": jax.__version__, "layer": vars(layer),
               "tiling": dataclasses.asdict(tiling), "weight_MB": weight_bytes / 1e6, "runs": []}
    reference = xla_chain(x, weights)
    wall, kernels = device_us_per_call(lambda x: (xla_chain(x, weights),), (x,), args.iters,
                                       args.reps)
    gemm_us = sum(us for name, us in kernels.items() if "gemm" in name or "dot" in name)
    results["xla"] = {"wall_us": wall, "kernels_us": kernels}
    print("| variant | poll | programs | device us | GB/s | chain max abs err (10 calls) |\n"
          "|---|---|---|---|---|---|")
    all_us = sum(kernels.values())
    print(f"| xla: GEMM kernels / all kernels of the loop | | | {gemm_us:.1f} / {all_us:.1f} | "
          f"{weight_bytes / gemm_us / 1e3:.0f} | |")
    for per_sm, poll, variant in itertools.product(args.programs_per_sm, args.poll, VARIANTS):
        if variant == "stream" and poll != args.poll[0]:
            continue  # no barrier in it
        num_programs = per_sm * device.core_count
        run = persistent_layer(variant, layer, tiling, num_programs, poll=poll)
        sync = jnp.zeros((2,), jnp.int32)
        err = None
        if variant == "chain":
            err, after, chain = 0.0, sync, jax.jit(run)
            for _ in range(CHAIN_CHECKS):  # a race need not show on every call
                y, after = chain(x, weights, after)
                err = max(err, float(jnp.max(jnp.abs(y.astype(jnp.float32)
                                                     - reference.astype(jnp.float32)))))
            if after.tolist() != [0, 3 * CHAIN_CHECKS]:
                print(f"barrier state after {CHAIN_CHECKS} chains: {after.tolist()}, want "
                      f"[0, {3 * CHAIN_CHECKS}]")
        wall, kernels = device_us_per_call(lambda x, s: run(x, weights, s), (x, sync),
                                           args.iters, args.reps)
        us = kernels.get(KERNEL_NAME, float("nan"))
        rate = "" if variant == "barrier_only" else f"{weight_bytes / us / 1e3:.0f}"
        print(f"| {variant} | {'' if variant == 'stream' else poll} | {num_programs} | "
              f"{us:.1f} | {rate} | {'' if err is None else f'{err:.3g}'} |", flush=True)
        results["runs"].append({"variant": variant, "poll": poll, "programs": num_programs,
                                "device_us": us, "wall_us": wall, "max_abs_err": err})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
