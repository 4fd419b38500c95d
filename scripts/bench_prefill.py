"""Ragged paged prefill attention on the GPU: jinfer's Pallas kernels against JAX's shipped
Pallas flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`, causal, contiguous
K/V with the KV heads repeated), with the bf16 matmul rate measured in the same run. "Ours" is
the kernel the engine runs on this device: on a Hopper GPU the Mosaic GPU kernel
(paged_prefill_mgpu.py, wgmma + TMA), with the Triton-lowered one (paged_prefill.py) timed beside
it as ours_triton; elsewhere the Triton-lowered one.

Method (shared/benchmarking.md): each kernel runs `iters` times inside one jitted
`lax.fori_loop`, cycling over `copies` different inputs (distinct queries, and distinct
pages of one pool / distinct K/V) that total >= 256 MB; per-call loop time = loop time /
iters, median and min/max over --reps repetitions; compile is timed apart; one more loop under
jax.profiler gives each kernel's own device time per call (bench_common.device_time). FLOPs
count the causal half only: 4 * sum over queries of (keys visible to it) * head_dim *
num_heads. Every output (last iteration) is checked against dense float32 attention on a
sample of query rows (max abs error).

A shape is SEQSxQ_LEN[+PREFIX]: SEQS sequences of Q_LEN new tokens each after PREFIX cached
tokens, packed back to back (mha runs them as a batch; it has no query offset, so it is not
run on shapes with a prefix).

  python scripts/bench_prefill.py --out bench_prefill.json             # issue's shapes, H100
  python scripts/bench_prefill.py --sweep --out sweep.json              # + tile variants
  python scripts/bench_prefill.py --cpu-smoke --out /tmp/smoke.json     # tiny, interpret mode
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import paged_prefill_mgpu  # noqa: E402
from pallas_kernels.paged_prefill import ragged_paged_attention_pallas  # noqa: E402
from bench_common import measure  # noqa: E402

SCOPE = "kernel_under_test"   # named scope of the timed call inside the loop (device time)

SHAPES = ("1x1024", "1x2048", "1x4096", "1x8192", "8x512", "8x512+1024")
SWEEP_SHAPES = ("1x8192", "8x512+1024")
SWEEP = "q32k64w4s2,q32k128w8s2,q32k64w8s2,q32k64w4s3,q32k128w8s3,q16k64w4s2,q64k64w8s2"


def parse_config(text: str) -> dict:
    """'q32k64w4s2' -> block_q 32, block_k 64, num_warps 4, num_stages 2."""
    names = {"q": "block_q", "k": "block_k", "w": "num_warps", "s": "num_stages"}
    parts = re.findall(r"([qkws])(\d+)", text)
    if "".join(f"{k}{v}" for k, v in parts) != text:
        raise argparse.ArgumentTypeError(f"bad config {text!r}, want e.g. q32k64w4s2")
    return {names[k]: int(v) for k, v in parts}
MIN_STACK_BYTES = 256 << 20   # inputs cycled per loop: beyond the 50 MB L2
LOOP_FLOPS = 2e14             # FLOPs per timed loop: ~0.3 s at the H100's rate
SAMPLE_ROWS = 64              # query rows per shape checked against dense attention
ERR_TOL = 2e-2                # bf16 outputs


def parse_shape(text: str) -> tuple[int, int, int]:
    """'8x512+1024' -> (8 sequences, 512 new tokens each, 1024-token prefix)."""
    seqs, rest = text.split("x")
    q_len, _, prefix = rest.partition("+")
    return int(seqs), int(q_len), int(prefix or 0)


def causal_flops(seqs: int, q_len: int, prefix: int, heads: int, head_dim: int) -> float:
    visible = seqs * (q_len * prefix + q_len * (q_len + 1) // 2)  # keys seen, over all queries
    return 4.0 * visible * head_dim * heads


def timed_loop(fn, iters: int, copies: int):
    """jit(loop): runs fn(*(stack[i % copies] for stack in stacks), *rest) iters times;
    returns (sum of outputs, last output) so no iteration can be dropped. The call sits in
    the named scope SCOPE (its device time; the barrier keeps its epilogue its own)."""
    def run(stacks, *rest):
        def body(i, carry):
            acc, _ = carry
            inputs = [s[i % copies] for s in stacks]
            with jax.named_scope(SCOPE):
                out = lax.optimization_barrier(fn(*inputs, *rest))
            return acc + out.astype(jnp.float32), out
        shape = jax.eval_shape(fn, *(s[0] for s in stacks), *rest)
        zero = jnp.zeros(shape.shape, shape.dtype)
        return lax.fori_loop(0, iters, body, (zero.astype(jnp.float32), zero))
    return jax.jit(run)


def matmul_rate(n: int, iters: int, reps: int) -> dict:
    """bf16 [n, n] @ [n, n] chained `iters` times in one jitted loop: TFLOP/s, median of reps.
    The right factor is scaled by 1/sqrt(n), so the chain stays finite."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / n ** 0.5).astype(jnp.bfloat16)
    loop = jax.jit(lambda a, b: lax.fori_loop(0, iters, lambda i, x: jnp.dot(x, b), a))
    jax.block_until_ready(loop(a, b))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(a, b))
        times.append((time.perf_counter() - t0) / iters)
    flops = 2.0 * n ** 3
    return {"n": n, "median_us": statistics.median(times) * 1e6,
            "TFLOPs": flops / statistics.median(times) / 1e12,
            "TFLOPs_best": flops / min(times) / 1e12}


def make_inputs(key, cfg, seqs: int, q_len: int, prefix: int, copies: int):
    """`copies` independent problems: contiguous K/V [copies, seqs, ctx, kv_heads, dim], q
    [copies, seqs, q_len, heads, dim], and the same K/V scattered into one pool of shuffled
    pages (block 0: pad) with tables [copies, seqs, pages]."""
    ctx = prefix + q_len
    pages = -(-ctx // cfg.block_size)
    kq, kk, kv, kt = jax.random.split(key, 4)
    kv_shape = (copies, seqs, pages * cfg.block_size, cfg.kv_heads, cfg.head_dim)
    k = jax.random.normal(kk, kv_shape, cfg.dtype)
    v = jax.random.normal(kv, kv_shape, cfg.dtype)
    q = jax.random.normal(kq, (copies, seqs, q_len, cfg.heads, cfg.head_dim), cfg.dtype)
    perm = jax.random.permutation(kt, copies * seqs * pages).astype(jnp.int32)
    tables = (1 + perm).reshape(copies, seqs, pages)
    pool_shape = (1, 1 + copies * seqs * pages, cfg.block_size, cfg.kv_heads, cfg.head_dim)
    paged = lambda x: jnp.zeros(pool_shape, cfg.dtype).at[0, 1 + perm].set(  # noqa: E731
        x.reshape(-1, cfg.block_size, cfg.kv_heads, cfg.head_dim))
    return q, k[:, :, :ctx], v[:, :, :ctx], paged(k), paged(v), tables


def sampled_reference(q, k, v, prefix: int, scale: float, rows):
    """Dense float32 causal attention of query rows `rows` of every sequence: q [seqs, q_len,
    heads, dim]; k, v [seqs, ctx, kv_heads, dim] -> [seqs, len(rows), heads, dim]."""
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    qs = q[:, rows].astype(jnp.float32)
    s = jnp.einsum("bqhd,bthd->bhqt", qs, k, precision="highest") * scale
    visible = jnp.arange(k.shape[1])[None, :] <= (prefix + rows)[:, None]
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqt,bthd->bqhd", p, v, precision="highest")


def load_mha():
    """JAX's Pallas flash attention, or (None, why) where this jax has none."""
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return None, f"{type(err).__name__}: {err}"
    return mha, None


def bench_shape(cfg, shape: str, matmul: dict, args) -> dict:
    seqs, q_len, prefix = parse_shape(shape)
    tokens, ctx = seqs * q_len, prefix + q_len
    itemsize = jnp.dtype(cfg.dtype).itemsize
    per_copy = itemsize * (tokens * cfg.heads + 2 * seqs * ctx * cfg.heads) * cfg.head_dim
    copies = 2 if args.cpu_smoke else max(1, -(-MIN_STACK_BYTES // per_copy))
    flops = causal_flops(seqs, q_len, prefix, cfg.heads, cfg.head_dim)
    iters = 2 if args.cpu_smoke else max(copies, int(-(-LOOP_FLOPS // flops)))
    q, k, v, k_pool, v_pool, tables = make_inputs(jax.random.PRNGKey(seqs * 7 + q_len),
                                                  cfg, seqs, q_len, prefix, copies)
    scale = cfg.head_dim ** -0.5
    last = (iters - 1) % copies
    rows = jnp.unique(jnp.linspace(0, q_len - 1, SAMPLE_ROWS).astype(jnp.int32))
    expected = sampled_reference(q[last], k[last], v[last], prefix, scale, rows)
    row = {"shape": shape, "seqs": seqs, "q_len": q_len, "prefix": prefix, "tokens": tokens,
           "causal_tflop": flops / 1e12, "copies": copies, "iters": iters}

    def error(out):  # out [seqs, q_len, heads, dim]
        return float(jnp.abs(out[:, rows].astype(jnp.float32) - expected).max())

    qsl = jnp.arange(seqs + 1, dtype=jnp.int32) * q_len
    lens = jnp.full((seqs,), ctx, jnp.int32)

    def ours_fn(q1, t1, kp, vp, kernel=ragged_paged_attention_pallas, **kw):
        out = kernel(q1.reshape(tokens, cfg.heads, cfg.head_dim), kp, vp, 0, t1, qsl, lens,
                     scale=scale, interpret=args.cpu_smoke, **kw)
        return out.reshape(q1.shape)

    # "ours" is the kernel the engine runs here: the Mosaic GPU one on a Hopper GPU where it
    # takes the shapes (then the Triton-lowered one is timed beside it), else the Triton one.
    mgpu = paged_prefill_mgpu.hopper_gpu() and paged_prefill_mgpu.supports(q[0].reshape(
        tokens, cfg.heads, cfg.head_dim), k_pool)
    row["kernel"] = "mosaic_gpu" if mgpu else "triton"
    configs = [("ours", {"kernel": paged_prefill_mgpu.ragged_paged_attention_mgpu}
                if mgpu else {})]
    if mgpu:
        configs.append(("ours_triton", {}))
    if args.sweep and (shape in SWEEP_SHAPES or args.cpu_smoke):
        configs += [(f"ours_{text}", parse_config(text)) for text in args.configs.split(",")]
    for name, kw in configs:
        res = measure(timed_loop(functools.partial(ours_fn, **kw), iters, copies),
                      ((q, tables), k_pool, v_pool), iters, args.reps, SCOPE)
        res["max_abs_err"] = error(res.pop("last"))
        row[name] = res
    del k_pool, v_pool

    mha, why = load_mha()
    if prefix:
        row["mha"] = {"skipped": "mha has no query offset (causal from position 0)"}
    elif mha is None:
        row["mha"] = {"skipped": f"not available: {why}"}
    else:
        group = cfg.heads // cfg.kv_heads
        k_rep = jnp.repeat(k, group, axis=3)  # [copies, seqs, ctx, heads, dim]
        v_rep = jnp.repeat(v, group, axis=3)
        del k, v
        mha_fn = lambda q1, k1, v1: mha(q1, k1, v1, None, sm_scale=scale,  # noqa: E731
                                        causal=True, interpret=args.cpu_smoke)
        res = measure(timed_loop(mha_fn, iters, copies), ((q, k_rep, v_rep),), iters,
                      args.reps, SCOPE)
        res["max_abs_err"] = error(res.pop("last"))
        row["mha"] = res
    for name in [n for n in row if isinstance(row[n], dict) and "median_us" in row[n]]:
        row[name]["TFLOPs"] = flops / (row[name]["median_us"] * 1e-6) / 1e12
        row[name]["pct_matmul"] = 100 * row[name]["TFLOPs"] / matmul["TFLOPs"]
        if row[name].get("device_us"):
            row[name]["device_TFLOPs"] = flops / (row[name]["device_us"] * 1e-6) / 1e12
            row[name]["device_pct_matmul"] = (100 * row[name]["device_TFLOPs"]
                                              / matmul["TFLOPs"])
    return row


def describe(cfg) -> str:
    return (f"{cfg.heads} q / {cfg.kv_heads} KV heads, dim {cfg.head_dim}, block "
            f"{cfg.block_size}, {jnp.dtype(cfg.dtype).name}")


def markdown(rows, matmul: dict, device: str, cfg) -> str:
    kernels = sorted({r["kernel"] for r in rows})
    lines = [f"Ragged paged prefill ({describe(cfg)}), {device}; bf16 matmul "
             f"({matmul['n']}^3, chained) {matmul['TFLOPs']:.0f} TFLOP/s median. TFLOP/s count "
             f"the causal half. Ours: the {' / '.join(kernels)} kernel (the engine's choice "
             "here); ours_triton below: the Triton-lowered kernel.",
             "", "| shape | tokens | causal TFLOP | ours us (min-max) | ours TFLOP/s | "
             "% matmul | mha us | mha TFLOP/s | mha / ours time | max err ours / mha |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, m = r["ours"], r["mha"]
        if "skipped" in m:
            mha_cols = f"n/a | n/a | n/a | {o['max_abs_err']:.1e} / n/a"
            worst = o["max_abs_err"]
        else:
            mha_cols = (f"{m['median_us']:.1f} | {m['TFLOPs']:.0f} | "
                        f"{m['median_us'] / o['median_us']:.2f}x | "
                        f"{o['max_abs_err']:.1e} / {m['max_abs_err']:.1e}")
            worst = max(o["max_abs_err"], m["max_abs_err"])
        flag = "" if worst < ERR_TOL else " **BAD**"
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['causal_tflop']:.3f} | {o['median_us']:.1f} "
            f"({o['min_us']:.1f}-{o['max_us']:.1f}) | {o['TFLOPs']:.0f} | "
            f"{o['pct_matmul']:.0f}% | {mha_cols}{flag} |")
    timed = [r for r in rows if r["ours"].get("device_us")]
    if timed:
        lines += ["", "Device time per call (profiler: the kernels of the call alone, no loop "
                  "bookkeeping or launch gaps):", "",
                  "| shape | ours us | ours TFLOP/s | % matmul | mha us | mha TFLOP/s | "
                  "mha / ours time |", "|---|---|---|---|---|---|---|"]
        for r in timed:
            o, m = r["ours"], r["mha"]
            mha_cols = (f"{m['device_us']:.1f} | {m['device_TFLOPs']:.0f} | "
                        f"{m['device_us'] / o['device_us']:.2f}x" if m.get("device_us")
                        else "n/a | n/a | n/a")
            lines.append(f"| {r['shape']} | {o['device_us']:.1f} | {o['device_TFLOPs']:.0f} | "
                         f"{o['device_pct_matmul']:.0f}% | {mha_cols} |")
    skipped = sorted({r["mha"]["skipped"] for r in rows if "skipped" in r["mha"]})
    lines += [f"\nmha n/a: {why}" for why in skipped]
    extra = [(r["shape"], n, v) for r in rows for n, v in r.items() if n.startswith("ours_")]
    if extra:
        lines += ["", "| shape | config | us (min-max) | TFLOP/s | % matmul | max err |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s} | {n} | {v['median_us']:.1f} ({v['min_us']:.1f}-{v['max_us']:.1f}) | "
                  f"{v['TFLOPs']:.0f} | {v['pct_matmul']:.0f}% | {v['max_abs_err']:.1e} |"
                  for s, n, v in extra]
    lines += ["", "Compile (s, loop incl.): " + "; ".join(
        f"{r['shape']} ours {r['ours']['compile_s']:.1f}"
        + (f" mha {r['mha']['compile_s']:.1f}" if "compile_s" in r["mha"] else "")
        for r in rows)]
    return "\n".join(lines)


class Config:
    """Issue shapes: 32 q heads / 8 KV heads, head dim 128, block 16, bf16."""
    heads, kv_heads, head_dim, block_size, dtype = 32, 8, 128, 16, jnp.bfloat16


class SmokeConfig(Config):
    heads, kv_heads, head_dim, block_size = 4, 2, 64, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results path "
                        "(the Markdown table goes next to it as .md and to stdout)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes in interpret mode on the CPU (checks the script runs)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated SEQSxQ_LEN[+PREFIX] list, default {SHAPES}")
    parser.add_argument("--sweep", action="store_true",
                        help=f"also time tile/warp/stage variants of ours on {SWEEP_SHAPES}")
    parser.add_argument("--configs", default=SWEEP,
                        help="the --sweep variants: comma-separated q<block_q>k<block_k>"
                        "w<num_warps>s<num_stages>, each letter optional")
    parser.add_argument("--kv-heads", type=int, default=None, help="override (32 q heads)")
    parser.add_argument("--block-size", type=int, default=None, help="override the pool's")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    if args.cpu_smoke:
        cfg, shapes, args.reps, mm = SmokeConfig, ["1x64", "2x16+24"], 2, (256, 2)
    else:
        cfg, shapes, mm = Config, list(SHAPES), (8192, 20)
    if args.shapes:
        shapes = args.shapes.split(",")
    if args.kv_heads or args.block_size:
        cfg = type("Custom", (cfg,), {"kv_heads": args.kv_heads or cfg.kv_heads,
                                      "block_size": args.block_size or cfg.block_size})
    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
    t_start = time.perf_counter()
    matmul = matmul_rate(*mm, reps=max(args.reps, 5))
    print(f"# {device}: bf16 matmul {matmul['TFLOPs']:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        rows.append(bench_shape(cfg, shape, matmul, args))
        r = rows[-1]
        mha = r["mha"].get("TFLOPs")
        print(f"{shape:>12}: ours {r['ours']['median_us']:9.1f} us {r['ours']['TFLOPs']:5.0f} "
              f"TFLOP/s ({r['ours']['pct_matmul']:.0f}% matmul) | mha "
              f"{'n/a' if mha is None else f'{mha:.0f} TFLOP/s'} | "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    table = markdown(rows, matmul, device, cfg)
    print(table)
    args.out.write_text(json.dumps({"device": device, "config": describe(cfg), "matmul": matmul,
                                    "rows": rows, "total_s": time.perf_counter() - t_start},
                                   indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
