"""Timing helpers shared by the GPU benchmark scripts (bench_attention, bench_prefill,
bench_kv_write): a compiled loop timed apart from its compile, and the device copy bandwidth
that the roofline figures are measured against."""

from __future__ import annotations

import pathlib
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp


def measure(fn, args, iters: int, reps: int, scope: str | None = None) -> dict:
    """Compiles `fn` (a jitted loop of `iters` calls returning (accumulated, last output))
    apart, warms up once, then times `reps` loops. Times in microseconds per call.

    With `scope` (a `jax.named_scope` around the code under test inside the loop), one more
    loop runs under the profiler and `device_time` adds the per-call device time of the
    scope's kernels (`device_us`) and of all the loop's kernels (`device_all_us`)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _, last = jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t0) / iters * 1e6)
    result = {"median_us": statistics.median(times), "min_us": min(times),
              "max_us": max(times), "compile_s": compile_s, "last": last}
    if scope is not None:
        result.update(device_time(compiled, args, iters, scope))
    return result


def kernel_names(hlo_text: str) -> list[tuple[str, str]]:
    """(name, op_name) of the optimized HLO's instructions with op_name metadata: each
    instruction's own name, and the names its kernels run under on the GPU (the fusion's name
    with '.' as '_', its deduplicated name, a Pallas custom call's kernel name, Triton or Mosaic
    GPU). A profiler event carries either the instruction (`hlo_op` stat) or, inside a command
    buffer (a CUDA graph), only the kernel name."""
    pairs = []
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*op_name="([^"]*)"', line)
        if not m:
            continue
        names = {m.group(1), m.group(1).replace(".", "_")}
        names |= {n.replace(".", "_") for n in re.findall(r'deduplicated_name="([^"]*)"', line)}
        names |= set(re.findall(r'\bname = "([^"]*)"', line))  # Triton custom-call kernels
        # A Mosaic GPU custom call's kernel runs as "<pallas name>_mosaic_gpu_kernel"; the
        # "<pallas name>_mosaic_gpu" symbol is in its serialized module.
        names |= {n + "_kernel" for n in re.findall(r"([A-Za-z][\w]*_mosaic_gpu)(?!\w)", line)}
        pairs += [(name, m.group(2)) for name in sorted(names)]
    return pairs


def scoped_kernels(hlo_text: str, scope: str) -> tuple[set[str], set[str]]:
    """(names under `scope`, names outside it) of the optimized HLO's instructions with op_name
    metadata (`kernel_names`)."""
    inside, outside = set(), set()
    for name, op_name in kernel_names(hlo_text):
        (inside if scope in op_name else outside).add(name)
    return inside, outside


def events_under_scope(events, inside: set[str], outside: set[str], scope: str) -> list:
    """The profiler events of the code under `scope`: by the op_name a GPU kernel carries
    (`tf_op`), else by its instruction (`hlo_op`), else (inside a CUDA graph, where `hlo_op`
    names the command buffer) by a kernel name that only instructions under the scope have."""
    def under_scope(event) -> bool:
        name, _, _, stats = event
        if scope in str(stats.get("tf_op", "")):
            return True
        hlo_op = str(stats.get("hlo_op", ""))
        if hlo_op and not hlo_op.startswith("command_buffer"):
            return hlo_op in inside
        return name in inside and name not in outside
    return [e for e in events if under_scope(e)]


def device_events(trace_dir: str, plane_prefix: str) -> list[tuple[str, int, int, dict]]:
    """(name, start_ns, duration_ns, stats) of the events on the planes named `plane_prefix`
    of a jax.profiler trace; on a GPU plane, only its stream lines (kernels and copies)."""
    from jax._src.lib import _profile_data
    (path,) = pathlib.Path(trace_dir).rglob("*.xplane.pb")
    events = []
    for plane in _profile_data.ProfileData.from_file(str(path)).planes:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            if plane_prefix.startswith("/device:GPU") and not line.name.startswith("Stream"):
                continue
            events += [(e.name, e.start_ns, e.duration_ns, dict(e.stats)) for e in line.events]
    return events


def device_time(compiled, args, calls: int, scope: str) -> dict:
    """Runs `compiled(*args)` (`calls` calls of the code under `scope`) once under the profiler:
    per call, the summed durations of the kernels of `scope`'s instructions (`device_us`: the
    device time of the code under test alone, without the loop's own kernels or launch gaps)
    and of every kernel in the trace (`device_all_us`). On a CPU backend the events are the
    host's XLA thunks (checks the code path, not a device time)."""
    gpu = jax.default_backend() == "gpu"
    inside, outside = scoped_kernels(compiled.as_text(), scope)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(compiled(*args))
        jax.profiler.stop_trace()
        events = device_events(trace_dir, "/device:GPU" if gpu else "/host:CPU")
    if not gpu:
        events = [e for e in events if "hlo_op" in e[3] and not e[0].startswith("end:")]
    mine = events_under_scope(events, inside, outside, scope)
    per_call = lambda evs: sum(e[2] for e in evs) / calls / 1e3  # noqa: E731
    return {"device_us": per_call(mine) if mine else None, "device_all_us": per_call(events),
            "device_kernels_per_call": len(mine) / calls,
            "device_kernel_names": sorted({e[0] for e in mine})[:8],
            "device_other_kernels": sorted({e[0] for e in events} - {e[0] for e in mine})[:8]}


def call_seconds(fn, x, reps: int) -> list[float]:
    """Wall seconds of each of `reps` calls of jit(fn)(x), each waited for (after one untimed
    call that compiles)."""
    run = jax.jit(fn)
    jax.block_until_ready(run(x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - t0)
    return times


def copy_bandwidth(nbytes: int, reps: int) -> dict:
    """jnp.copy of an nbytes array: (read + written bytes) / time, median (and best) over reps."""
    times = call_seconds(jnp.copy, jnp.ones((nbytes // 4,), jnp.float32), reps)
    med = statistics.median(times)
    return {"bytes": nbytes, "median_us": med * 1e6, "GBps": 2 * nbytes / med / 1e9,
            "GBps_best": 2 * nbytes / min(times) / 1e9}
