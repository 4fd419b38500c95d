"""bench_persistent.py's question on Pallas's Mosaic GPU backend (Hopper): can a persistent kernel
stream a decoder layer's weights faster than XLA, and hide its grid barriers?

What the Triton-lowered kernel of bench_persistent.py cannot do, and a warp-specialised one can:
keep loading weights while the grid waits at a barrier (the weights do not depend on the
previous phase). Here each CTA runs two warpgroups over the four projections of a Llama layer at
one decode row (QKV, output, gate/up, down; split-K tiles of [block_k, block_n] dealt
round-robin, every CTA the same number of tiles per phase):
- the memory warpgroup TMA-copies each step's weight chunk (and the input rows' chunk) into a
  ring of `stages` shared-memory slots, across the phases without ever waiting on a barrier;
- the compute warpgroup multiplies each chunk with wgmma (the one input row padded to wgmma's 64
  rows by zero rows), accumulates a tile in registers, and (variant `barriers`) waits at a grid
  barrier between phases.
Every phase reads its input from the kernel's input (no data flows between phases: this measures
streaming and synchronisation, as bench_persistent.py's `stream` and `barriers` variants); each
CTA writes the sum of its tiles, checked against a NumPy reference.

The grid barrier: an arrival semaphore that every CTA signals, which CTA 0 takes back to zero
once all have arrived before it bumps a generation semaphore; the others poll the generation
with plain acquire loads (Mosaic GPU's `semaphore_wait(..., decrement=False)`). The first design
tried, every CTA taking one token of a semaphore that CTA 0 filled (compare-and-swap
decrements, all CTAs on one word), cost ~32 us per barrier.

Needs jax 0.11 on the GPU (`pl.get_global` semaphores); `--check-interpret` runs the stream
variant in Mosaic GPU's interpreter on the CPU.

  python scripts/bench_persistent_mgpu.py --out persistent_mgpu.json     # H100
  python scripts/bench_persistent_mgpu.py --check-interpret              # CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import call_seconds, copy_bandwidth  # noqa: E402
from bench_persistent import Layer, device_us_per_call, make_inputs  # noqa: E402

KERNEL_NAME = "persistent_stream_mgpu"
ROWS = 64  # wgmma's M: the input row padded with zero rows
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))  # 64 bf16 = 128 B rows


@dataclasses.dataclass(frozen=True)
class MgpuTiling:
    splits: tuple[int, int, int, int] = (8, 16, 1, 16)  # split-K factor per projection
    block_n: int = 64
    block_k: int = 128
    stages: int = 4
    num_ctas: int = 128   # every projection's tile count must be a multiple of it


def fewest_splits(layer: Layer, block_k: int, block_n: int, num_ctas: int = 128) -> tuple:
    """Per projection, the smallest split-K factor that deals its tiles evenly to the CTAs."""
    splits = []
    for k_total, n_total in layer.shapes:
        strips = n_total // block_n
        splits.append(next(s for s in range(1, k_total // block_k + 1)
                           if (s * strips) % num_ctas == 0 and (k_total // s) % block_k == 0
                           and k_total % s == 0))
    return tuple(splits)


def phase_plan(layer: Layer, tiling: MgpuTiling) -> list[tuple[int, int, int, int]]:
    """Per projection: (tiles per CTA, chunks per tile, rows per tile, column strips)."""
    plan = []
    for (k_total, n_total), splits in zip(layer.shapes, tiling.splits):
        strips = n_total // tiling.block_n
        tiles, rows = splits * strips, k_total // splits
        if tiles % tiling.num_ctas or rows % tiling.block_k:
            raise ValueError(f"projection {k_total}x{n_total}: {tiles} tiles of {rows} rows do "
                             f"not split evenly over {tiling.num_ctas} CTAs in chunks of "
                             f"{tiling.block_k} rows")
        plan.append((tiles // tiling.num_ctas, rows // tiling.block_k, rows, strips))
    return plan


def chunk_major(weights, layer: Layer, tiling: MgpuTiling) -> list[jax.Array]:
    """The weights re-laid out so that each CTA's chunks lie in its step order, each chunk
    contiguous: per projection [num_ctas, steps, block_k, block_n] (layout "chunks")."""
    out = []
    bk, bn, ctas = tiling.block_k, tiling.block_n, tiling.num_ctas
    for w, (per, chunks, _, strips) in zip(weights, phase_plan(layer, tiling)):
        k_total, n_total = w.shape
        splits = k_total // (chunks * bk)
        t = w.reshape(splits, chunks, bk, strips, bn).transpose(0, 3, 1, 2, 4)
        t = t.reshape(per, ctas, chunks, bk, bn).transpose(1, 0, 2, 3, 4)  # tile = cta + j*ctas
        out.append(t.reshape(ctas, per * chunks, bk, bn))
    return out


def persistent_stream(layer: Layer, tiling: MgpuTiling, *, barriers: bool,
                      interpret: bool = False, layout: str = "rows"):
    """A function (x_pad [64, hidden] bf16 (row 0 the input, the rest zeros), weights [(K, N)]
    bf16, or with layout "chunks" as `chunk_major` lays them out) -> [num_ctas, 64, block_n]
    float32: per CTA, the sum of its tiles' products."""
    plan = phase_plan(layer, tiling)
    bn, bk, stages, num_ctas = tiling.block_n, tiling.block_k, tiling.stages, tiling.num_ctas
    steps = [per * chunks for per, chunks, _, _ in plan]
    total_steps = sum(steps)

    def chunk_origin(phase, i, cta):
        """(first weight row, first column) of this CTA's step i of a phase."""
        _, chunks, rows, strips = plan[phase]
        tile = cta + lax.div(i, chunks) * num_ctas
        split, strip = lax.div(tile, strips), lax.rem(tile, strips)
        return (pl.multiple_of(split * rows + lax.rem(i, chunks) * bk, bk),
                pl.multiple_of(strip * bn, bn))

    def producer(x_ref, weights, x_smem, w_smem, ready, free, cta):
        first = 0
        for phase in range(4):
            def fill(i, carry, phase=phase, first=first):
                step = first + i
                slot = lax.rem(step, stages)
                pl.when(step >= stages)(lambda: plgpu.barrier_wait(free.at[slot]))
                row, col = chunk_origin(phase, i, cta)
                x_row = pl.multiple_of(lax.rem(row, layer.hidden), bk)
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(x_row, bk)], x_smem.at[slot],
                                        ready.at[slot])
                src = (weights[phase].at[cta, i] if layout == "chunks" else
                       weights[phase].at[pl.ds(row, bk), pl.ds(col, bn)])
                plgpu.copy_gmem_to_smem(src, w_smem.at[slot], ready.at[slot])
                return carry
            lax.fori_loop(0, steps[phase], fill, None)
            first += steps[phase]

    def grid_barrier(arrive, generation, cta):
        seen = pl.semaphore_read(generation)
        plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")

        @pl.when(cta == 0)
        def _last():
            plgpu.semaphore_wait(arrive, num_ctas, memory_scope="gpu")  # back to 0
            plgpu.semaphore_signal(generation, 1, memory_scope="gpu")
        plgpu.semaphore_wait(generation, seen + 1, decrement=False, memory_scope="gpu")

    def consumer(out_ref, x_smem, w_smem, o_smem, ready, free, cta):
        total = jnp.zeros((ROWS, bn), jnp.float32)
        if not interpret:
            total = plgpu.layout_cast(total, plgpu.Layout.WGMMA)
        if barriers:
            arrive = pl.get_global(plgpu.SemaphoreType.REGULAR)
            generation = pl.get_global(plgpu.SemaphoreType.REGULAR)
        first = 0
        for phase, (per, chunks, _, _) in enumerate(plan):
            def tile(j, total, first=first, chunks=chunks):
                def accumulate(acc_ref):
                    def chunk(c, carry):
                        step = first + j * chunks + c
                        slot = lax.rem(step, stages)
                        plgpu.barrier_wait(ready.at[slot])
                        plgpu.wgmma(acc_ref, x_smem.at[slot], w_smem.at[slot])
                        plgpu.wgmma_wait(0)
                        # Free the slot only if the producer will refill it (every barrier
                        # phase completed must be waited for).
                        pl.when(step + stages < total_steps)(
                            lambda: plgpu.barrier_arrive(free.at[slot]))
                        return carry
                    lax.fori_loop(0, chunks, chunk, None)
                    return acc_ref[...]
                return total + pl.run_scoped(accumulate, plgpu.ACC((ROWS, bn), jnp.float32))
            total = lax.fori_loop(0, per, tile, total)
            first += steps[phase]
            if barriers and phase < 3:
                grid_barrier(arrive, generation, cta)
        o_smem[...] = total
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_ref.at[cta])
        plgpu.wait_smem_to_gmem(0)

    def persistent_stream_mgpu(x_ref, w0, w1, w2, w3, out_ref, x_smem, w_smem, o_smem, ready,
                               free):
        cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
        pl.when(wg == 1)(lambda: producer(x_ref, (w0, w1, w2, w3), x_smem, w_smem, ready, free,
                                          cta))
        pl.when(wg == 0)(lambda: consumer(out_ref, x_smem, w_smem, o_smem, ready, free, cta))

    scratch = dict(
        x_smem=plgpu.SMEM((stages, ROWS, bk), jnp.bfloat16, transforms=TILED),
        w_smem=plgpu.SMEM((stages, bk, bn), jnp.bfloat16, transforms=TILED),
        o_smem=plgpu.SMEM((ROWS, bn), jnp.float32),
        ready=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # the x and w copies
        free=plgpu.Barrier(num_arrivals=1, num_barriers=stages),
    )
    options = {}
    if interpret:
        try:
            from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
        except ImportError:  # jax 0.10.x
            from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        options["interpret"] = InterpretGPUParams()

    def run(x_pad, weights):
        return plgpu.kernel(
            persistent_stream_mgpu,
            out_type=jax.ShapeDtypeStruct((num_ctas, ROWS, bn), jnp.float32),
            scratch_types=scratch, grid=(num_ctas,), grid_names=("cta",), num_threads=2,
            thread_name="wg", **options)(x_pad, *weights)
    return run


def reference(x, weights, layer: Layer, tiling: MgpuTiling) -> np.ndarray:
    """What persistent_stream returns (row 0 of each CTA's sum; the padding rows are 0)."""
    out = np.zeros((tiling.num_ctas, ROWS, tiling.block_n), np.float32)
    x = np.asarray(x, np.float32)
    for w, (per, _, rows, strips) in zip(weights, phase_plan(layer, tiling)):
        w = np.asarray(w, np.float32)
        for cta in range(tiling.num_ctas):
            for j in range(per):
                split, strip = divmod(cta + j * tiling.num_ctas, strips)
                r = np.arange(split * rows, (split + 1) * rows)
                cols = slice(strip * tiling.block_n, (strip + 1) * tiling.block_n)
                out[cta, 0] += x[r % layer.hidden] @ w[r][:, cols]
    return out


def read_bandwidth(nbytes: int, reps: int) -> dict:
    """GB/s of XLA reading an nbytes bf16 array once (a max reduction: reads only, median over
    reps), beside bench_common.copy_bandwidth's read + write rate of the same size."""
    times = call_seconds(jnp.max, jnp.ones((nbytes // 2,), jnp.bfloat16), reps)
    return {"read_GBps": round(nbytes / statistics.median(times) / 1e9),
            "copy_GBps": round(copy_bandwidth(nbytes, reps)["GBps"])}


def pad_input(x):
    return jnp.zeros((ROWS, x.shape[0]), x.dtype).at[0].set(x)


def check_interpret(layer: Layer, tiling: MgpuTiling, layout: str = "rows"
                    ) -> tuple[float, float]:
    """The stream variant in Mosaic GPU's interpreter: (max abs error, max abs of the
    reference)."""
    x, weights = make_inputs(layer)
    run = persistent_stream(layer, tiling, barriers=False, interpret=True, layout=layout)
    laid = chunk_major(weights, layer, tiling) if layout == "chunks" else weights
    out = np.asarray(jax.jit(run)(pad_input(x), laid))
    ref = reference(x, weights, layer, tiling)
    return float(np.max(np.abs(out - ref))), float(np.max(np.abs(ref)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--chunks", nargs="+", default=["128x64"],
                        help="weight chunk shapes BLOCK_KxBLOCK_N (rows x columns; a chunk's "
                        "row is BLOCK_N x 2 contiguous bytes of the weight)")
    parser.add_argument("--variants", nargs="+", default=["stream", "barriers"],
                        choices=["stream", "barriers"])
    parser.add_argument("--layouts", nargs="+", default=["rows"], choices=["rows", "chunks"],
                        help="weights as [K, N] (rows) or each CTA's chunks contiguous in its "
                        "step order (chunks)")
    parser.add_argument("--read-bandwidth", action="store_true",
                        help="also time XLA reading 1 GiB (a reduction) and copying it")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-interpret", action="store_true",
                        help="CPU: the stream variant in the interpreter on small shapes")
    args = parser.parse_args(argv)
    if args.check_interpret:
        for layout in args.layouts:
            err, scale = check_interpret(Layer(256, 384, 512),
                                         MgpuTiling((2, 4, 1, 4), 64, 64, 2, num_ctas=4),
                                         layout)
            print(f"stream ({layout}) vs NumPy, interpret mode: max abs error {err:.3g} "
                  f"(outputs up to {scale:.3g})")
        return 0

    layer = Layer()
    x, weights = make_inputs(layer)
    x_pad = pad_input(x)
    weight_bytes = sum(w.size * w.dtype.itemsize for w in weights)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "layer": vars(layer), "weight_MB": weight_bytes / 1e6, "runs": []}
    if args.read_bandwidth:
        results["read_bandwidth"] = read_bandwidth(1 << 30, 10)
        print(f"XLA, 1 GiB: {results['read_bandwidth']}")
    print("| variant | layout | chunk | stages | device us | GB/s | max abs err |\n"
          "|---|---|---|---|---|---|---|")
    for variant, layout, chunk, stages in [(v, lo, c, s) for v in args.variants
                                           for lo in args.layouts for c in args.chunks
                                           for s in args.stages]:
        barriers = variant == "barriers"
        bk, bn = map(int, chunk.split("x"))
        tiling = MgpuTiling(fewest_splits(layer, bk, bn), bn, bk, stages)
        run = persistent_stream(layer, tiling, barriers=barriers, layout=layout)
        laid = chunk_major(weights, layer, tiling) if layout == "chunks" else weights
        try:
            out = np.asarray(jax.jit(run)(x_pad, laid))
        except Exception as e:  # e.g. a ring that does not fit in shared memory
            reason = str(e).splitlines()[0][:80]
            print(f"| {variant} | {layout} | {chunk} | {stages} | failed: {reason} |")
            continue
        err = float(np.max(np.abs(out - reference(x, weights, layer, tiling))))

        def step(xp, run=run, laid=laid):  # the kernel's output feeds the next call's input
            return (xp + (run(xp, laid).sum() * 0).astype(xp.dtype),)
        _, kernels = device_us_per_call(step, (x_pad,), args.iters, args.reps)
        us = kernels.get(KERNEL_NAME + "_mosaic_gpu_kernel", float("nan"))
        print(f"| {variant} | {layout} | {chunk} | {stages} | {us:.1f} | "
              f"{weight_bytes / us / 1e3:.0f} | {err:.3g} |", flush=True)
        results["runs"].append({"variant": variant, "layout": layout, "stages": stages,
                                "device_us": us,
                                "max_abs_err": err, "tiling": dataclasses.asdict(tiling)})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
