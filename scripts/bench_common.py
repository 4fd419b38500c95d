"""Timing helpers shared by the GPU benchmark scripts (bench_attention, bench_prefill,
bench_kv_write): a compiled loop timed apart from its compile, and the device copy bandwidth
that the roofline figures are measured against."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def measure(fn, args, iters: int, reps: int) -> dict:
    """Compiles `fn` (a jitted loop of `iters` calls returning (accumulated, last output))
    apart, warms up once, then times `reps` loops. Times in microseconds per call."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, last = jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) / iters * 1e6)
    return {"median_us": statistics.median(times), "min_us": min(times), "max_us": max(times),
            "compile_s": compile_s, "last": last}


def copy_bandwidth(nbytes: int, reps: int) -> dict:
    """jnp.copy of an nbytes array: (read + written bytes) / time, median (and best) over reps."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(jnp.copy)
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    del x
    return {"bytes": nbytes, "median_us": med * 1e6, "GBps": 2 * nbytes / med / 1e9,
            "GBps_best": 2 * nbytes / min(times) / 1e9}
