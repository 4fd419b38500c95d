"""KV write on the GPU: jinfer's Pallas kernel (in place through input_output_aliases) against
the XLA scatter `pool.at[layer, slots // bs, slots % bs].set(...)` of the "reference" attention
backend (jinfer.model.attention), both on a real-size pool that the jitted loop carries and
donates.

Method (shared/benchmarking.md): one jitted `lax.fori_loop` carries (k_pool, v_pool), donated;
its body writes every layer once with a static layer index, as the model's unrolled layer loop
does, layer l taking input set l % copies (slots + K/V rows, each set its own buffers, so no
slicing op runs in the loop; the sets total >= 256 MB where the layer count allows). Per-call
device time = loop time / (iters * layers), median and min/max over --reps; compile timed apart.
Small batches' new rows stay in L2 across iterations (as they would right after the RoPE that
produced them); the pool rows written go to HBM. GB/s counts the new rows read plus the pool
rows written. Correctness in the same run: every method starts from the same pools and applies
the same writes, so the final pools must be bitwise equal; each compiled loop is also searched
for pool-sized copies (there must be none: the whole point is writing in place).

Slot patterns: "scattered" (decode: each token in a random distinct slot of the pool) and
"blocks" (prefill: tokens fill runs of random whole blocks).

  python scripts/bench_kv_write.py --out bench_kv_write.json                # H100, 30 layers
  python scripts/bench_kv_write.py --tokens 64,2048,8192 --patterns scattered --sweep \\
      --out kv_write_sweep.json                                             # launch variants
  python scripts/bench_kv_write.py --cpu-smoke --out /tmp/smoke.json        # tiny, interpret
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels.kv_write import write_kv_pallas, write_kv_reference  # noqa: E402
from bench_common import copy_bandwidth  # noqa: E402

TOKENS = (1, 16, 64, 256, 2048, 8192)
PATTERNS = ("scattered", "blocks")
MIN_STACK_BYTES = 256 << 20   # new rows cycled per loop, beyond the 50 MB L2 when layers allow
MIN_LOOP_BYTES = 4 << 30      # bytes moved per timed loop: dispatch is noise next to it
MIN_ITERS, MAX_ITERS = 10, 200
SWEEP = [(tpp, warps) for tpp in (1, 2, 4, 8) for warps in (1, 2, 4, 8)]


@dataclasses.dataclass(frozen=True)
class PoolConfig:
    """Pool [layers, num_blocks, block_size, kv_heads, head_dim]: 30 layers x 4096 blocks of
    16 tokens, 8 KV heads of 128, bf16 = 3.75 GiB per pool, 7.5 GiB for K and V."""
    layers: int = 30
    num_blocks: int = 4096
    block_size: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.layers, self.num_blocks, self.block_size, self.kv_heads, self.head_dim)

    @property
    def row_bytes(self) -> int:  # one token's K (or V) row
        return self.kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize


SMOKE = PoolConfig(layers=2, num_blocks=16, block_size=8, kv_heads=2, head_dim=64)


def xla_scatter(k_pool, v_pool, layer, slots, k_new, v_new):
    """jinfer.model.attention._write_kv_xla's scatter (no skip handling), for K and V."""
    bs = k_pool.shape[2]
    return tuple(pool.at[layer, slots // bs, slots % bs].set(new.astype(pool.dtype))
                 for pool, new in ((k_pool, k_new), (v_pool, v_new)))


def make_slots(rng, cfg: PoolConfig, num_tokens: int, pattern: str) -> np.ndarray:
    """[num_tokens] distinct int32 slots of one layer."""
    if pattern == "scattered":
        return rng.permutation(cfg.num_blocks * cfg.block_size)[:num_tokens].astype(np.int32)
    blocks = rng.permutation(cfg.num_blocks)[:-(-num_tokens // cfg.block_size)]
    slots = blocks[:, None] * cfg.block_size + np.arange(cfg.block_size)
    return slots.reshape(-1)[:num_tokens].astype(np.int32)


def make_inputs(cfg: PoolConfig, num_tokens: int, pattern: str, copies: int, seed: int):
    """`copies` separate (slots [n], k_new [n, kvh, d], v_new [n, kvh, d]) sets."""
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(seed)
    sets = []
    for c in range(copies):
        kk, kv = jax.random.split(jax.random.fold_in(key, c))
        rows = (num_tokens, cfg.kv_heads, cfg.head_dim)
        sets.append((jnp.asarray(make_slots(rng, cfg, num_tokens, pattern)),
                     jax.random.normal(kk, rows, cfg.dtype),
                     jax.random.normal(kv, rows, cfg.dtype)))
    return sets


def fresh_pools(cfg: PoolConfig):
    """The same starting pools for every method: K all -1, V all -2."""
    make = jax.jit(lambda: (jnp.full(cfg.shape, -1, cfg.dtype),
                            jnp.full(cfg.shape, -2, cfg.dtype)))
    return jax.block_until_ready(make())


def write_loop(write, layers: int, iters: int):
    """jit(loop): iters times, write every layer once (static index) from input set
    layer % copies; the pools are carried and donated."""
    def run(k_pool, v_pool, sets):
        def body(_, pools):
            for layer in range(layers):
                pools = write(*pools, layer, *sets[layer % len(sets)])
            return pools
        return lax.fori_loop(0, iters, body, (k_pool, v_pool))
    return jax.jit(run, donate_argnums=(0, 1))


def pool_copies(compiled_text: str, shape) -> int:
    """Copy instructions of a pool-shaped array in compiled HLO."""
    dims = "[" + ",".join(map(str, shape)) + "]"
    return sum(1 for line in compiled_text.splitlines()
               if re.search(r"\bcopy(-start)?\(", line) and dims in line)


def measure(write, cfg: PoolConfig, sets, iters: int, reps: int) -> tuple[dict, tuple]:
    """Compiles apart, warms up once, times `reps` loops, each on the previous loop's pools.
    Returns (times in us per write call, final pools)."""
    fn = write_loop(write, cfg.layers, iters)
    pools = fresh_pools(cfg)
    t0 = time.perf_counter()
    compiled = fn.lower(*pools, sets).compile()
    compile_s = time.perf_counter() - t0
    copies = pool_copies(compiled.as_text(), cfg.shape)
    pools = jax.block_until_ready(compiled(*pools, sets))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pools = jax.block_until_ready(compiled(*pools, sets))
        times.append((time.perf_counter() - t0) / (iters * cfg.layers) * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times), "max_us": max(times),
            "compile_s": compile_s, "pool_copies": copies}, pools


@jax.jit
def bitwise_equal(a, b):
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    return jnp.all(lax.bitcast_convert_type(a, bits) == lax.bitcast_convert_type(b, bits))


def bench_row(cfg: PoolConfig, num_tokens: int, pattern: str, args) -> dict:
    new_bytes = 2 * num_tokens * cfg.row_bytes  # K and V rows of one call
    copies = max(1, min(cfg.layers, -(-MIN_STACK_BYTES // new_bytes)))
    iters = 2 if args.cpu_smoke else min(MAX_ITERS, max(
        MIN_ITERS, -(-MIN_LOOP_BYTES // (2 * new_bytes * cfg.layers))))
    sets = make_inputs(cfg, num_tokens, pattern, copies, seed=num_tokens)
    row = {"tokens": num_tokens, "pattern": pattern, "new_bytes": new_bytes, "copies": copies,
           "iters": iters}
    row["xla"], expected = measure(xla_scatter, cfg, sets, iters, args.reps)
    methods = [("ours", {}), ("xla_reference", None)]
    if args.sweep:
        methods += [(f"ours_t{t}_w{w}", {"tokens_per_program": t, "num_warps": w})
                    for t, w in SWEEP]
    for name, kwargs in methods:
        write = (write_kv_reference if kwargs is None else
                 functools.partial(write_kv_pallas, interpret=args.cpu_smoke, **kwargs))
        row[name], pools = measure(write, cfg, sets, iters, args.reps)
        row[name]["equal"] = all(bool(bitwise_equal(a, b)) for a, b in zip(pools, expected))
        del pools
    row["xla"]["equal"] = True
    for res in (v for v in row.values() if isinstance(v, dict)):
        res["GBps"] = 2 * new_bytes / (res["median_us"] * 1e-6) / 1e9
    return row


def fits(cfg: PoolConfig) -> bool:
    """Two sets of pools (the XLA result kept for comparison + the method's) in 80% of memory."""
    stats = jax.devices()[0].memory_stats() or {}
    pools = 2 * math.prod(cfg.shape) * jnp.dtype(cfg.dtype).itemsize
    return 2 * pools + MIN_STACK_BYTES < 0.8 * stats.get("bytes_limit", 80 << 30)


def markdown(rows, cfg: PoolConfig, copy_bw: dict, device: str) -> str:
    gib = 2 * math.prod(cfg.shape) * jnp.dtype(cfg.dtype).itemsize / 2**30
    lines = [f"KV write, {device}; pools {list(cfg.shape)} {cfg.dtype} ({gib:.2f} GiB K+V); "
             f"copy bandwidth {copy_bw['GBps']:.0f} GB/s (jnp.copy, read+write).", "",
             "| tokens | pattern | ours us (min-max) | ours GB/s | % copy | XLA scatter us | "
             "XLA GB/s | XLA skip-aware ref us | XLA / ours | bitwise equal | pool copies |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['tokens']} | {r['pattern']} | skipped: {r['skipped']} |")
            continue
        o, x, ref = r["ours"], r["xla"], r["xla_reference"]
        equal = o["equal"] and ref["equal"]
        copies = f"{o['pool_copies']} / {x['pool_copies']} / {ref['pool_copies']}"
        lines.append(
            f"| {r['tokens']} | {r['pattern']} | {o['median_us']:.2f} ({o['min_us']:.2f}-"
            f"{o['max_us']:.2f}) | {o['GBps']:.0f} | {100 * o['GBps'] / copy_bw['GBps']:.0f}% | "
            f"{x['median_us']:.2f} | {x['GBps']:.0f} | {ref['median_us']:.2f} | "
            f"{x['median_us'] / o['median_us']:.2f}x | {'yes' if equal else '**NO**'} | "
            f"{copies}{'' if copies == '0 / 0 / 0' else ' **COPY**'} |")
    extra = [(r, k, v) for r in rows for k, v in r.items() if k.startswith("ours_")]
    if extra:
        lines += ["", "| tokens | pattern | config | us (min-max) | GB/s | equal |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['pattern']} | {k} | {v['median_us']:.2f} "
                  f"({v['min_us']:.2f}-{v['max_us']:.2f}) | {v['GBps']:.0f} | "
                  f"{'yes' if v['equal'] else '**NO**'} |" for r, k, v in extra]
    done = [r for r in rows if "ours" in r]
    if done:
        lines += ["", "Compile (s, whole loop): ours " + ", ".join(
            f"{r['ours']['compile_s']:.1f}" for r in done) + "; XLA " + ", ".join(
            f"{r['xla']['compile_s']:.1f}" for r in done), "",
            "pool copies: pool-sized copy instructions in the compiled loop, ours / XLA / ref."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON results path "
                        "(the Markdown table goes next to it as .md and to stdout)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny pool in interpret mode on the CPU (checks the script runs)")
    parser.add_argument("--tokens", default=None, help=f"comma-separated, default {TOKENS}")
    parser.add_argument("--patterns", default=",".join(PATTERNS), help="scattered,blocks")
    parser.add_argument("--layers", type=int, default=PoolConfig.layers)
    parser.add_argument("--num-blocks", type=int, default=PoolConfig.num_blocks)
    parser.add_argument("--sweep", action="store_true",
                        help="also time tokens_per_program x num_warps variants of ours")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    if args.cpu_smoke:
        cfg, tokens, copy_bytes, args.reps = SMOKE, (1, 16, 64), 1 << 24, 2
    else:
        cfg = PoolConfig(layers=args.layers, num_blocks=args.num_blocks)
        tokens, copy_bytes = TOKENS, 2 << 30
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    patterns = args.patterns.split(",")
    if bad := set(patterns) - set(PATTERNS):
        parser.error(f"unknown patterns {sorted(bad)}; choose from {PATTERNS}")
    device = f"{jax.devices()[0].device_kind} (jax {jax.__version__})"
    t_start = time.perf_counter()
    copy_bw = copy_bandwidth(copy_bytes, max(args.reps, 5))
    print(f"# {device}: copy {copy_bw['GBps']:.0f} GB/s; pools {cfg.shape} {cfg.dtype}",
          flush=True)
    rows = []
    for num_tokens in tokens:
        for pattern in patterns:
            if num_tokens > cfg.num_blocks * cfg.block_size or not (args.cpu_smoke or fits(cfg)):
                rows.append({"tokens": num_tokens, "pattern": pattern,
                             "skipped": "does not fit in the pool or in memory"})
                continue
            t0 = time.perf_counter()
            rows.append(r := bench_row(cfg, num_tokens, pattern, args))
            print(f"tokens {num_tokens:5d} {pattern:9s}: ours {r['ours']['median_us']:8.2f} us"
                  f" | XLA {r['xla']['median_us']:8.2f} us | ref "
                  f"{r['xla_reference']['median_us']:8.2f} us | equal "
                  f"{r['ours']['equal'] and r['xla_reference']['equal']} | "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
    table = markdown(rows, cfg, copy_bw, device)
    print(table)
    args.out.write_text(json.dumps({"device": device, "pool": dataclasses.asdict(cfg),
                                    "copy": copy_bw, "rows": rows,
                                    "total_s": time.perf_counter() - t_start}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
