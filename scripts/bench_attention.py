"""Paged decode attention on the GPU: jinfer's Pallas kernel, JAX's shipped Pallas kernel and an
XLA gather-then-attend reference, over the issue's shapes, with the copy-bandwidth ceiling
measured in the same run. Where jax_triton imports (`pip install "jinfer[triton]"`), jinfer's
Triton-language kernel is timed beside them too.

Method (shared/benchmarking.md): each kernel runs `iters` times inside one jitted
`lax.fori_loop`, cycling over `copies` different inputs (distinct pages of one pool, distinct
queries) that total >= 256 MB so L2 cannot serve them; per-call loop time = loop time /
iters, median and min/max over --reps repetitions; compile is timed apart. One more loop runs
under jax.profiler and gives each kernel's device time per call: the summed durations of the
kernels its own code launched (e.g. a split kernel and its combine), without the loop's
bookkeeping kernels or the gaps between launches (shared/benchmarking.md: "read device time
from a profiler trace"; at batch 1 the loop's ~5 us per iteration is most of the loop time).
Every kernel's output (last iteration) is checked against the XLA reference's (max abs error).

  python scripts/bench_attention.py --out bench_attention.json          # full grid, H100
  python scripts/bench_attention.py --quick --out quick.json             # 3 shapes
  python scripts/bench_attention.py --cpu-smoke --out /tmp/smoke.json    # tiny, interpret mode
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels.paged_decode import paged_decode_attention_pallas  # noqa: E402
from pallas_kernels.triton_decode import paged_decode_attention_triton  # noqa: E402
from bench_common import copy_bandwidth, measure  # noqa: E402

BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (512, 1024, 4096, 16384)
QUICK = ((1, 4096), (32, 1024), (128, 4096))
SWEEP_SHAPES = ((8, 4096), (64, 1024))
MIN_STACK_BYTES = 256 << 20   # inputs cycled per loop: beyond the 50 MB L2
MIN_LOOP_BYTES = 4 << 30      # KV bytes read per timed loop: dispatch is < 5% of it
ERR_TOL = 2e-2                # bf16 outputs
SCOPE = "kernel_under_test"   # named scope of the timed call inside the loop (device time)


def xla_reference(q, k_pool, v_pool, tables, lens, *, scale):
    """Gather-then-attend in plain XLA: q [b, h, d]; pools [1, blocks, bs, kvh, d]; tables
    [b, pages]; lens [b] -> [b, h, d]. float32 accumulation, masked by context length."""
    batch, heads, dim = q.shape
    kvh = k_pool.shape[3]
    k = k_pool[0, tables].reshape(batch, -1, kvh, dim)  # [b, ctx, kvh, d]
    v = v_pool[0, tables].reshape(batch, -1, kvh, dim)
    qg = q.reshape(batch, kvh, heads // kvh, dim)
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(k.shape[1])[None, :] < lens[:, None]  # [b, ctx]
    s = jnp.where(valid[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgt,btkd->bkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(batch, heads, dim).astype(q.dtype)


def timed_loop(fn, iters: int, copies: int):
    """jit(loop): runs fn(q_stack[i % copies], tables_stack[i % copies], *rest) iters times;
    returns (sum of outputs, last output) so no iteration can be dropped."""
    def run(q_stack, tables_stack, *rest):
        def body(i, carry):
            acc, _ = carry
            j = i % copies
            q1, t1 = q_stack[j], tables_stack[j]
            with jax.named_scope(SCOPE):
                # the barrier keeps the kernel's own epilogue (a split combine) from fusing
                # into the loop's accumulate, so the device time counts it
                out = lax.optimization_barrier(fn(q1, t1, *rest))
            return acc + out.astype(jnp.float32), out
        zero = jnp.zeros(q_stack.shape[1:], q_stack.dtype)
        return lax.fori_loop(0, iters, body, (zero.astype(jnp.float32), zero))
    return jax.jit(run)


def make_inputs(key, cfg, batch: int, ctx: int, copies: int):
    """A pool holding `copies` disjoint, shuffled sets of pages for the batch."""
    pages = ctx // cfg.block_size
    num_blocks = copies * batch * pages + 1  # block 0: pad
    shape = (1, num_blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim)
    kk, kv, kq, kt = jax.random.split(key, 4)
    k_pool = jax.random.normal(kk, shape, cfg.dtype)
    v_pool = jax.random.normal(kv, shape, cfg.dtype)
    q = jax.random.normal(kq, (copies, batch, cfg.heads, cfg.head_dim), cfg.dtype)
    tables = 1 + jax.random.permutation(kt, copies * batch * pages).astype(jnp.int32)
    tables = tables.reshape(copies, batch, pages)
    lens = jnp.full((batch,), ctx, jnp.int32)
    return q, k_pool, v_pool, tables, lens


def bench_shape(cfg, batch: int, ctx: int, args) -> dict:
    kv_bytes = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    copies = 2 if args.cpu_smoke else max(1, -(-MIN_STACK_BYTES // kv_bytes))
    iters = 2 if args.cpu_smoke else max(copies, -(-MIN_LOOP_BYTES // kv_bytes))
    q, k_pool, v_pool, tables, lens = make_inputs(jax.random.PRNGKey(batch * 7 + ctx), cfg,
                                                  batch, ctx, copies)
    scale = cfg.head_dim ** -0.5
    row = {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "copies": copies, "iters": iters}

    ref_fn = functools.partial(xla_reference, lens=lens, scale=scale)
    ref = measure(timed_loop(lambda q1, t1, kp, vp: ref_fn(q1, kp, vp, t1), iters, copies),
                  (q, tables, k_pool, v_pool), iters, args.reps, SCOPE)
    expected = ref.pop("last").astype(jnp.float32)
    row["xla"] = ref

    def ours_fn(q1, t1, kp, vp, **kw):
        return paged_decode_attention_pallas(q1, kp, vp, 0, t1, lens, scale=scale,
                                             interpret=args.cpu_smoke, **kw)

    configs = [("ours", {})]
    if args.sweep and ((batch, ctx) in SWEEP_SHAPES or args.sweep_all
                       or args.cpu_smoke and batch == 1):
        configs += [(f"ours_s{s}_pp{pp}_w{w}", {"num_splits": s, "pages_per_compute_block": pp,
                                                  "num_warps": w})
                    for s in (1, 4) for pp in (4, 8) for w in (4, 8)]
    for name, kw in configs:
        res = measure(timed_loop(functools.partial(ours_fn, **kw), iters, copies),
                      (q, tables, k_pool, v_pool), iters, args.reps, SCOPE)
        res["max_abs_err"] = float(jnp.abs(res.pop("last").astype(jnp.float32) - expected).max())
        row[name] = res

    if args.triton:  # same inputs and plan as ours, kernel written in Triton (jax-triton)
        tri_fn = lambda q1, t1, kp, vp: paged_decode_attention_triton(  # noqa: E731
            q1, kp, vp, 0, t1, lens, scale=scale)
        res = measure(timed_loop(tri_fn, iters, copies), (q, tables, k_pool, v_pool), iters,
                      args.reps, SCOPE)
        res["max_abs_err"] = float(jnp.abs(res.pop("last").astype(jnp.float32) - expected).max())
        row["triton"] = res

    # JAX's shipped kernel in its own layout [kv_heads, pages, page_size, head_dim].
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
    k_pages = jnp.transpose(k_pool[0], (2, 0, 1, 3))
    v_pages = jnp.transpose(v_pool[0], (2, 0, 1, 3))
    del k_pool, v_pool
    k_splits = math.gcd(16, ctx // cfg.block_size)
    q_scaled = (q * scale).astype(q.dtype)  # its kernel takes no scale argument
    jax_fn = lambda q1, t1, kp, vp: paged_attention(  # noqa: E731
        q1, kp, vp, t1, lens, k_splits=k_splits, interpret=args.cpu_smoke)
    res = measure(timed_loop(jax_fn, iters, copies), (q_scaled, tables, k_pages, v_pages),
                  iters, args.reps, SCOPE)
    res["max_abs_err"] = float(jnp.abs(res.pop("last").astype(jnp.float32) - expected).max())
    res["k_splits"] = k_splits
    row["jax_pallas"] = res
    for name in [k for k in row if isinstance(row[k], dict)]:
        row[name]["GBps"] = kv_bytes / (row[name]["median_us"] * 1e-6) / 1e9
        if row[name].get("device_us"):
            row[name]["device_GBps"] = kv_bytes / (row[name]["device_us"] * 1e-6) / 1e9
    return row


def fits(cfg, batch: int, ctx: int) -> bool:
    """Pool + JAX-layout copy + XLA gather must fit in 80% of device memory."""
    kv_bytes = 2 * batch * ctx * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    stack = max(kv_bytes, MIN_STACK_BYTES)
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 80 << 30)
    return 2 * stack + 2 * kv_bytes < 0.8 * limit


def markdown(rows, copy_bw, device: str) -> str:
    lines = [f"Paged decode, {device}; copy bandwidth (jnp.copy {copy_bw['bytes'] / 2**30:g} GiB, "
             f"read+write) "
             f"{copy_bw['GBps']:.0f} GB/s median.",
             "", "| batch | ctx | KV MB | ours us (min-max) | ours GB/s | % copy | "
             "JAX Pallas us | JAX GB/s | Triton us | Triton GB/s | XLA us | XLA GB/s | "
             "ours vs JAX | max err ours / JAX / Triton |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['batch']} | {r['ctx']} | skipped: {r['skipped']} |")
            continue
        o, j, x, t = r["ours"], r["jax_pallas"], r["xla"], r.get("triton")
        errs = [o["max_abs_err"], j["max_abs_err"]] + ([t["max_abs_err"]] if t else [])
        flag = "" if max(errs) < ERR_TOL else " **BAD**"
        triton = f"{t['median_us']:.1f} | {t['GBps']:.0f}" if t else "- | -"
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['kv_bytes'] / 1e6:.1f} | {o['median_us']:.1f} "
            f"({o['min_us']:.1f}-{o['max_us']:.1f}) | {o['GBps']:.0f} | "
            f"{100 * o['GBps'] / copy_bw['GBps']:.0f}% | {j['median_us']:.1f} | {j['GBps']:.0f} | "
            f"{triton} | {x['median_us']:.1f} | {x['GBps']:.0f} | "
            f"{j['median_us'] / o['median_us']:.2f}x | "
            f"{' / '.join(f'{e:.1e}' for e in errs)}{flag} |")
    lines += device_table(rows, copy_bw)
    extra = [(r["batch"], r["ctx"], k, v) for r in rows for k, v in r.items()
             if k.startswith("ours_")]
    if extra:
        lines += ["", "| batch | ctx | config | us (min-max) | GB/s | max err |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {b} | {c} | {k} | {v['median_us']:.1f} ({v['min_us']:.1f}-"
                  f"{v['max_us']:.1f}) | {v['GBps']:.0f} | {v['max_abs_err']:.1e} |"
                  for b, c, k, v in extra]
    comp = [r for r in rows if "ours" in r]
    if comp:
        kernels = [("ours", "ours"), ("JAX", "jax_pallas")]
        kernels += [("Triton", "triton")] if "triton" in comp[0] else []
        lines += ["", "Compile (s, loop incl.): " + "; ".join(
            f"{label} " + ", ".join(f"{r[key]['compile_s']:.1f}" for r in comp)
            for label, key in kernels)]
    return "\n".join(lines)


def device_table(rows, copy_bw) -> list[str]:
    """Markdown lines: each kernel's device time per call from the profiler (its own kernels
    only: no loop bookkeeping, no launch gaps), and ours vs JAX's on it."""
    comp = [r for r in rows if "ours" in r and r["ours"].get("device_us")]
    if not comp:
        return []
    keys = [("ours", "ours"), ("JAX Pallas", "jax_pallas"), ("XLA", "xla")]
    keys += [("Triton", "triton")] if comp[0].get("triton", {}).get("device_us") else []
    lines = ["", "Device time per call (profiler: the summed durations of the kernel's own "
             "kernels, e.g. a split kernel and its combine):", "",
             "| batch | ctx | " + " | ".join(f"{label} us | {label} GB/s" for label, _ in keys)
             + " | ours vs JAX | best of ours vs JAX |",
             "|---|---|" + "---|---|" * len(keys) + "---|---|"]
    ratios, best_ratios = [], []
    for r in comp:
        cells = [f"{r[k]['device_us']:.1f} | {r[k]['device_GBps']:.0f}" for _, k in keys]
        ours = [r[k]["device_us"] for k in ("ours", "triton") if r.get(k, {}).get("device_us")]
        ratio = r["jax_pallas"]["device_us"] / r["ours"]["device_us"]
        best = r["jax_pallas"]["device_us"] / min(ours)
        ratios.append(ratio)
        best_ratios.append(best)
        lines.append(f"| {r['batch']} | {r['ctx']} | " + " | ".join(cells)
                     + f" | {ratio:.2f}x | {best:.2f}x |")
    geo = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs))  # noqa: E731
    lines += ["", f"Device-time geometric mean vs JAX's kernel: ours {geo(ratios):.2f}x, best "
              f"of ours per shape {geo(best_ratios):.2f}x; copy bandwidth "
              f"{copy_bw['GBps']:.0f} GB/s."]
    return lines


def triton_available() -> bool:
    """Whether jinfer's Triton backend can run here (jax_triton imports; it needs a GPU JAX)."""
    try:
        import jax_triton  # noqa: F401
    except ImportError as err:
        print(f"# Triton kernel not timed: {err}", flush=True)
        return False
    return True


class Config:
    """Issue shapes: 32 q heads / 8 KV heads, head dim 128, block 16, bf16."""
    heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, jnp.bfloat16


class SmokeConfig(Config):
    heads, kv_heads, head_dim = 4, 2, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results path "
                        "(the Markdown table goes next to it as .md and to stdout)")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK}")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes in interpret mode on the CPU (checks the script runs)")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also time split/step/warp variants of ours on {SWEEP_SHAPES}")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BATCHxCONTEXT list, e.g. 8x4096,64x1024")
    parser.add_argument("--sweep-all", action="store_true",
                        help="time the --sweep variants on every shape run")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    args.triton = not args.cpu_smoke and triton_available()

    if args.cpu_smoke:
        cfg, shapes, copy_bytes, args.reps = SmokeConfig, [(1, 32), (2, 64)], 1 << 24, 2
    else:
        cfg, copy_bytes = Config, 2 << 30
        shapes = list(QUICK) if args.quick else [(b, c) for b in BATCHES for c in CONTEXTS]
        if args.shapes:
            shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
    t_start = time.perf_counter()
    copy_bw = copy_bandwidth(copy_bytes, max(args.reps, 5))
    print(f"# {device}: copy {copy_bw['GBps']:.0f} GB/s", flush=True)
    rows = []
    for batch, ctx in shapes:
        if not args.cpu_smoke and not fits(cfg, batch, ctx):
            rows.append({"batch": batch, "ctx": ctx, "skipped": "does not fit in memory"})
            continue
        t0 = time.perf_counter()
        rows.append(bench_shape(cfg, batch, ctx, args))
        r = rows[-1]
        tri = f"Triton {r['triton']['median_us']:9.1f} us | " if "triton" in r else ""
        dev = r["ours"].get("device_us")
        dev = f" (device {dev:7.1f} us)" if dev else ""
        if len(rows) == 1:  # which kernels the device time counted, once
            for key in [k for k in r if isinstance(r[k], dict) and "device_kernel_names" in r[k]]:
                print(f"# device time of {key}: {r[key]['device_kernels_per_call']:.1f} "
                      f"kernels per call: {r[key]['device_kernel_names']}; not counted: "
                      f"{r[key]['device_other_kernels']}", flush=True)
        print(f"batch {batch:4d} ctx {ctx:6d}: ours {r['ours']['median_us']:9.1f} us{dev} "
              f"{r['ours']['GBps']:6.0f} GB/s | JAX {r['jax_pallas']['median_us']:9.1f} us | "
              f"{tri}XLA {r['xla']['median_us']:9.1f} us | {time.perf_counter() - t0:.1f} s",
              flush=True)
    table = markdown(rows, copy_bw, device)
    print(table)
    args.out.write_text(json.dumps({"device": device, "copy": copy_bw, "rows": rows,
                                    "total_s": time.perf_counter() - t_start}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
