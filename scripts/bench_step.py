#!/usr/bin/env python
"""Times jinfer's jitted model step on random weights of a real model's shape (no download).

Decode steps (one token per sequence) at several batch sizes and a prefill chunk, each timed after
its compile, next to the weight-streaming roofline (weight bytes / copy bandwidth measured in the
same run). Works on CPU and GPU: `python scripts/bench_step.py --shape smollm2-135m`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.model.attention import default_attention_backend
from jinfer.config import EngineConfig
from jinfer.model.kv_cache import init_kv_cache
from jinfer.model.sampler import SamplingRow
from jinfer.model.shapes import MODEL_SHAPES, random_run_params
from jinfer.runner.model_runner import ModelRunner
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def copy_bandwidth(num_bytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device copy of a `num_bytes` array."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    started = time.perf_counter()
    for _ in range(5):
        x = copy(x)
    x.block_until_ready()
    return 2 * num_bytes * 5 / (time.perf_counter() - started)


def time_step(runner: ModelRunner, batch: int, q_len: int, context: int, iters: int) -> dict:
    params = SamplingParams(temperature=0)
    seqs = []
    for i in range(batch):
        seq = Sequence(i, str(i), 0, [1] * context, params, seed=i, detokenizer=None)
        seq.num_computed_tokens = context - q_len
        blocks = -(-context // runner.block_size)
        seq.block_table = list(range(1 + i * blocks, 1 + (i + 1) * blocks))
        seqs.append(seq)
    items = [ScheduledSequence(s, q_len) for s in seqs]
    rows = [SamplingRow(params, s.seed, 0, s.prompt_token_ids) for s in seqs]
    step_input, flags = runner.prepare([] if q_len > 1 else items, items if q_len > 1 else [],
                                       rows, 0)
    started = time.perf_counter()
    runner.execute(step_input, flags)
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        runner.execute(step_input, flags)
        times.append(time.perf_counter() - started)
    return {"batch": batch, "q_len": q_len, "context": context, "compile_s": compile_s,
            "step_ms_median": 1e3 * float(np.median(times)), "step_ms_min": 1e3 * min(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--attention-backend", default=default_attention_backend(),
                   choices=["pallas", "triton", "reference"])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    config = MODEL_SHAPES[args.shape]
    num_blocks = 1 + max(args.batch) * -(-args.context // 16)
    engine_config = EngineConfig(max_model_len=max(args.context, args.prefill) * 2,
                                 max_num_seqs=max(args.batch),
                                 attention_backend=args.attention_backend)
    params = random_run_params(config, args.dtype)  # made and fused on device, a layer at a time
    pool = init_kv_cache(config, num_blocks, engine_config.block_size, DTYPES[args.dtype])
    runner = ModelRunner(config, engine_config, params, pool)
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(runner.params))
    bandwidth = copy_bandwidth()
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "shape": args.shape, "dtype": args.dtype, "weight_bytes": weight_bytes,
               "attention_backend": args.attention_backend,
               "copy_GBps": bandwidth / 1e9, "runs": []}
    for batch in args.batch:
        r = time_step(runner, batch, 1, args.context, args.iters)
        r["tok_s"] = batch / (r["step_ms_median"] / 1e3)
        r["roofline_step_ms"] = 1e3 * weight_bytes / bandwidth
        results["runs"].append(r)
        print(json.dumps(r))
    r = time_step(runner, 1, args.prefill, args.prefill, max(3, args.iters // 4))
    r["prefill_tok_s"] = args.prefill / (r["step_ms_median"] / 1e3)
    results["runs"].append(r)
    print(json.dumps(r))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
