#!/usr/bin/env python
"""Batch-1 fused decode attention (`pallas_kernels/fused_decode.py`) by context split count and
step size (pages gathered per inner iteration), as the one-row decode path calls it.

Llama-3.2-1B's attention (8 KV heads x 4 query heads of 64), a bf16 pool of 16-token blocks,
the QKV row as 8 float32 partial sums (the layer kernel's output). Each configuration runs 16
calls (one per layer of the pool) inside a jitted `fori_loop` of 50 iterations, each call's
output feeding the next call's input; per-call wall time = loop time / 800, the best of 5 loops
(compile excluded). "auto" is the launch plan the engine picks (`paged_decode.make_plan`).

  python scripts/bench_decode_steps.py --out decode_steps.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels.fused_decode import fused_decode_attention_pallas  # noqa: E402

LAYERS, BLOCKS, BLOCK, KV_HEADS, GROUP, HEAD_DIM = 16, 512, 16, 8, 4, 64
CONTEXTS = {257: 24, 384: 24, 512: 32, 1024: 96, 2048: 192}  # tokens: table width (blocks)


def time_config(k, v, parts, context: int, width: int, splits, pages, iters: int = 50,
                partials: bool = False):
    heads = KV_HEADS * GROUP
    tables = (jnp.arange(1, width + 1, dtype=jnp.int32)[None]) % BLOCKS
    lens = jnp.array([context], jnp.int32)
    slots = jnp.array([BLOCK + context - 1], jnp.int32)
    cos = jnp.ones((1, HEAD_DIM // 2), jnp.float32)
    sin = jnp.zeros((1, HEAD_DIM // 2), jnp.float32)

    def body(_, carry):
        k, v, feed = carry
        for layer in range(LAYERS):
            out, k, v = fused_decode_attention_pallas(
                parts + feed, cos, sin, k, v, layer, slots, tables, lens, num_heads=heads,
                scale=HEAD_DIM ** -0.5, num_splits=splits, pages_per_compute_block=pages,
                partials=partials)
            first = out[0] if partials else out  # (acc, max, sum) splits, or the output
            # a data dependence, no change
            feed = first.reshape(-1)[:1].astype(jnp.float32).reshape(1, 1, 1) * 0
        return k, v, feed

    run = jax.jit(lambda k, v, n: lax.fori_loop(0, n, body, (k, v, jnp.zeros((1, 1, 1)))),
                  donate_argnums=(0, 1))
    k, v, _ = run(k, v, 2)
    jax.block_until_ready(k)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        k, v, _ = run(k, v, iters)
        jax.block_until_ready(k)
        best = min(best, time.perf_counter() - started)
    return k, v, 1e6 * best / (iters * LAYERS)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS),
                   choices=list(CONTEXTS))
    p.add_argument("--splits", nargs="+", default=["auto", "1", "2"],
                   help="split counts ('auto': the engine's plan)")
    p.add_argument("--pages", type=int, nargs="+", default=[4, 8])
    p.add_argument("--partials", action="store_true",
                   help="the output as the splits' softmax states (as the layer kernel takes it)")
    args = p.parse_args()

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (LAYERS, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    k = jax.random.normal(keys[0], shape, jnp.bfloat16)
    v = jax.random.normal(keys[1], shape, jnp.bfloat16)
    width = (KV_HEADS * GROUP + 2 * KV_HEADS) * HEAD_DIM
    parts = 0.1 * jax.random.normal(keys[2], (8, 1, width), jnp.float32)
    results = []
    print(f"{jax.devices()[0].device_kind}: fused decode at batch 1, us per call")
    print("| context | splits | pages per step | us |\n|---|---|---|---|")
    for context in args.contexts:
        for splits in (None if s == "auto" else int(s) for s in args.splits):
            for pages in args.pages:
                k, v, us = time_config(k, v, parts, context, CONTEXTS[context], splits, pages,
                                       partials=args.partials)
                results.append({"context": context, "splits": splits or "auto",
                                "pages_per_step": pages, "partials": args.partials,
                                "us_per_call": us})
                print(f"| {context} | {splits or 'auto'} | {pages} | {us:.2f} |", flush=True)
    pathlib.Path(args.out).write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                                  "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
