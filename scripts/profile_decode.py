#!/usr/bin/env python
"""Where a decode step's time goes: a jax.profiler trace of generate, summed per GPU kernel.

Random weights of a real model's shape (jinfer.model.shapes), greedy, ignore_eos. After a warm-up
generate of the same shape, one generate runs under the profiler; the trace's device events are
grouped by kernel name and reported per decoded token: how many kernels a token launches, how long
they run, how much of the wall time the GPU sits idle, and the kernels that cost the most; and
per model scope (the named scopes on each kernel's op_name: attention, mlp and a mixture of
experts' route / experts / combine, all_reduce under tensor parallelism, lm_head, sampler).

  python scripts/profile_decode.py --model-shape llama3-1b --batch 1 --out prof.json
  python scripts/profile_decode.py --model-shape llama3-8b -tp 2 --out prof.json  # all_reduce
  python scripts/profile_decode.py --model-shape smollm2-135m --batch 1 --cpu   # the CPU's ops
  XLA_FLAGS=--xla_dump_to=/tmp/hlo python scripts/profile_decode.py ...         # and the HLO
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import device_events, kernel_names  # noqa: E402


def trace_events(trace_dir: str, device_prefix: str):
    """(device events, host events): (name, start_ns, duration_ns, stats) of every event on
    the device planes' stream lines, and (name, start_ns, duration_ns) of the host plane's
    driver-API and XLA runtime events (kernel launches, graph launches, copies,
    synchronisation, thunk execution); none with --cpu, where the host's XLA plane is the
    device plane."""
    device = device_events(trace_dir, device_prefix)
    host = [e[:3] for e in device_events(trace_dir, "/host")
            if not device_prefix.startswith("/host")
            and (e[0].startswith("cu") or "Thunk" in e[0] or "CommandBuffer" in e[0])]
    return device, host


GAP_BINS_US = (2, 10, 100, 1000, float("inf"))


def idle_gaps(events) -> list[list[float]]:
    """[upper bound us, count, total ms] of the idle gaps between consecutive device events."""
    bins = [[bound, 0, 0.0] for bound in GAP_BINS_US]
    end = None
    for _, start, duration, *_ in sorted(events, key=lambda e: e[1]):
        if end is not None and start > end:
            gap_us = (start - end) / 1e3
            row = next(b for b in bins if gap_us < b[0])
            row[1] += 1
            row[2] += gap_us / 1e3
        end = start + duration if end is None else max(end, start + duration)
    return bins


def long_gaps(events, min_us: float = 100.0, limit: int = 20) -> list[dict]:
    """The idle gaps of at least min_us: when (ms from the first event), how long, and the
    kernels on either side (where the device waits on the host)."""
    found, end, last, first = [], None, None, None
    for name, start, duration, *_ in sorted(events, key=lambda e: e[1]):
        first = start if first is None else first
        if end is not None and (start - end) / 1e3 >= min_us:
            found.append({"at_ms": (end - first) / 1e6, "us": (start - end) / 1e3,
                          "after": last, "before": name})
        if end is None or start + duration > end:
            end, last = start + duration, name
    return found[:limit]


def event_sequence(events, count: int) -> list[list]:
    """`count` consecutive device events from the middle of the trace: [name, duration us,
    idle gap before it us] (negative: it started before the previous one ended)."""
    ordered = sorted(events, key=lambda e: e[1])
    start = max(1, len(ordered) // 2 - count // 2)
    rows = []
    for prev, (name, begin, duration, *_) in zip(ordered[start - 1:],
                                                 ordered[start:start + count]):
        rows.append([name, duration / 1e3, (begin - prev[1] - prev[2]) / 1e3])
    return rows


def per_name(events) -> list[list]:
    """[name, count, total us] per distinct event name, costliest first."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for name, _, duration, *_ in events:
        totals[name][0] += 1
        totals[name][1] += duration / 1e3
    return sorted(([n, c, t] for n, (c, t) in totals.items()), key=lambda r: -r[2])


# The model's named scopes (jinfer.model.decoder, moe, runner.steps), innermost last.
SCOPES = ("attention", "mlp", "route", "experts", "combine", "all_reduce", "lm_head", "sampler")


def scope_of(op_name: str) -> str:
    """The model scopes on a kernel's op_name path ("jit(f)/.../layer_3/mlp/experts/dot" ->
    "mlp/experts"); "other" for an op outside them (embedding, the step loop's own ops), "no
    op name" for an event the profiler gave none (copies; kernels it could not map)."""
    if not op_name:
        return "no op name"
    return "/".join(part for part in op_name.split("/") if part in SCOPES) or "other"


def hlo_scopes(hlo_texts) -> dict[str, dict[str, set]]:
    """{HLO module name: {kernel name: the model scopes of the instructions it runs under}}
    from optimized HLO texts (XLA's dump): how a kernel inside a CUDA graph, whose profiler
    event names only the command buffer, is attributed."""
    modules = collections.defaultdict(lambda: collections.defaultdict(set))
    for text in hlo_texts:
        m = re.match(r"\s*HloModule\s+([^\s,]+)", text)
        module = modules[m.group(1) if m else ""]
        for name, op_name in kernel_names(text):
            module[name].add(scope_of(op_name))
    return modules


def event_scope(event, modules: dict) -> str:
    """An event's model scope: from its own op_name (`tf_op`), else from the HLO of its module
    (`hlo_module` stat; any module where that is missing) by kernel name; "several" where the
    name runs under more than one scope."""
    name, stats = event[0], event[3]
    scope = scope_of(str(stats.get("tf_op", "")))
    if scope not in ("other", "no op name") or not modules:
        return scope
    module = str(stats.get("hlo_module", ""))
    found = set()
    for key, names in modules.items():
        if not module or key == module or module.startswith(key) or key.startswith(module):
            found |= names.get(name, set())
    if not found:
        return scope
    return found.pop() if len(found) == 1 else "several"


def per_scope(events, modules: dict | None = None) -> list[list]:
    """[scope, kernel count, total us] per model scope (`event_scope`), costliest first."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for event in events:
        row = totals[event_scope(event, modules or {})]
        row[0] += 1
        row[1] += event[2] / 1e3
    return sorted(([n, c, t] for n, (c, t) in totals.items()), key=lambda r: -r[2])


def busy_ns(events) -> float:
    """Length of the union of the events' intervals."""
    total, end = 0.0, -1.0
    for _, start, duration, *_ in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="llama3-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--num-scheduler-steps", type=int, default=8)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--no-layer-kernel", action="store_true",
                   help="KernelConfig(decode_layer_kernel=False): XLA's matmuls at batch 1 on Hopper")
    p.add_argument("--layer-kernel-always", action="store_true",
                   help="KernelConfig(decode_layer_kernel='always'): also the layers the "
                        "kernels take by request only (mixture of experts)")
    p.add_argument("--moe-impl", default=None,
                   help="KernelConfig.moe_impl for expert layers (default: the device's)")
    p.add_argument("--top", type=int, default=30, help="kernels listed")
    p.add_argument("--cpu", action="store_true", help="profile the CPU backend's ops instead")
    p.add_argument("--sequence", type=int, default=0,
                   help="also list this many consecutive device events from the middle of the "
                        "traced generate (name, duration, idle gap before): one step's kernels "
                        "in order")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="LLM's tensor_parallel_size; the tables are then device 0's kernels "
                        "(the all_reduce scope: the collectives' share of a step)")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="LLM's gpu_memory_utilization (raise it for models over a third of the "
                        "device; the script lets JAX take 90%% of the GPU)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # JAX takes 75% of the GPU by default: too little for Qwen3-30B-A3B's 57 GiB on an H100
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    # The optimized HLO of every program, to attribute the kernels of CUDA graphs to scopes
    # (their events carry only the command buffer's name); kept where the caller dumps already.
    dump_dir = None
    if not args.cpu and "--xla_dump_to" not in os.environ.get("XLA_FLAGS", ""):
        dump_dir = tempfile.mkdtemp(prefix="profile_decode_hlo_")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()

    import jax
    if args.cpu:
        jax.config.update("jax_platforms", "cpu")
    from jinfer import LLM, SamplingParams
    from jinfer.config import KernelConfig
    from jinfer.model.shapes import resolve_model_config

    config = resolve_model_config(args.model_shape)
    layer_kernel = (False if args.no_layer_kernel else
                    "always" if args.layer_kernel_always else True)
    kwargs = dict(load_format="dummy", dtype=args.dtype, seed=0, max_num_seqs=args.batch,
                  max_model_len=args.prompt_len + args.tokens,
                  num_scheduler_steps=args.num_scheduler_steps,
                  kernel_config=KernelConfig(decode_layer_kernel=layer_kernel,
                                              moe_impl=args.moe_impl))
    if args.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    if not args.cpu:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    llm = LLM(args.model_shape, **kwargs)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)

    def generate() -> float:
        prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)).tolist()
        started = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        return time.perf_counter() - started

    def prefill_only() -> float:
        prompts = rng.integers(0, config.vocab_size, (args.batch, args.prompt_len)).tolist()
        started = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, use_tqdm=False,
                     sampling_params=SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        return time.perf_counter() - started

    generate(), prefill_only(), generate()  # compile every shape
    t_full = min(generate() for _ in range(3))
    t_first = min(prefill_only() for _ in range(3))
    decode_tok_s = args.batch * (args.tokens - 1) / (t_full - t_first)

    # under tensor parallelism every device runs the same kernels: device 0's stand for all
    prefix = "/host:CPU" if args.cpu else (
        "/device:GPU:0" if args.tensor_parallel_size > 1 else "/device:GPU")
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        started = time.perf_counter()
        generate()
        wall_ns = (time.perf_counter() - started) * 1e9
        jax.profiler.stop_trace()
        events, host_events = trace_events(trace_dir, prefix)
    if not events:
        print(f"no events on {prefix} planes in the trace", file=sys.stderr)
        return 1

    kernels = per_name(events)
    hlo = [] if dump_dir is None else [
        path.read_text() for path in pathlib.Path(dump_dir).glob("*after_optimizations.txt")]
    if dump_dir is not None:
        shutil.rmtree(dump_dir, ignore_errors=True)
    tokens = args.tokens  # steps: one prefill + (tokens - 1) decodes
    span = max(e[1] + e[2] for e in events) - min(e[1] for e in events)
    busy = busy_ns(events)
    kernel_ns = 1e3 * sum(row[2] for row in kernels)
    gaps = idle_gaps(events)
    result = {
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "model_shape": args.model_shape, "tensor_parallel_size": args.tensor_parallel_size,
        "batch": args.batch, "prompt_len": args.prompt_len,
        "tokens": args.tokens, "num_scheduler_steps": args.num_scheduler_steps,
        "decode_tok_s": decode_tok_s, "decode_ms_per_step": 1e3 * (t_full - t_first) / (
            args.tokens - 1),
        "traced_wall_ms": wall_ns / 1e6, "device_span_ms": span / 1e6,
        "device_busy_ms": busy / 1e6, "kernel_ms": kernel_ns / 1e6,
        "kernels": len(events), "kernels_per_token": len(events) / tokens,
        "top": kernels[:args.top], "scopes": per_scope(events, hlo_scopes(hlo)),
        "idle_gaps": gaps, "long_gaps": long_gaps(events),
        "host": per_name(host_events)[:args.top],
        "sequence": event_sequence(events, args.sequence),
    }
    print(f"{result['device']}, {args.model_shape} {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.tokens} tokens, {args.num_scheduler_steps} steps per call")
    print(f"decode {decode_tok_s:,.1f} tok/s ({result['decode_ms_per_step']:.3f} ms/step); "
          f"traced generate {wall_ns / 1e6:.1f} ms, device busy {busy / 1e6:.1f} ms "
          f"({100 * busy / wall_ns:.0f}%), {len(events)} kernels "
          f"({len(events) / tokens:.0f} per token, mean {kernel_ns / len(events) / 1e3:.1f} us)")
    print("\n| kernel | count | per token | total ms | mean us | share |\n|---|---|---|---|---|---|")
    for name, count, total_us in result["top"]:
        print(f"| {name[:90]} | {count} | {count / tokens:.1f} | {total_us / 1e3:.2f} | "
              f"{total_us / count:.1f} | {100 * total_us * 1e3 / kernel_ns:.1f}% |")
    print("\n| model scope | kernels per token | us per token | share |\n|---|---|---|---|")
    for scope, count, total_us in result["scopes"]:
        print(f"| {scope} | {count / tokens:.1f} | {total_us / tokens:,.1f} | "
              f"{100 * total_us * 1e3 / kernel_ns:.1f}% |")
    print("\nidle gaps between device events: " + ", ".join(
        f"<{bound:g} us: {count} ({total:.1f} ms)" for bound, count, total in gaps))
    for gap in result["long_gaps"]:
        print(f"  idle {gap['us']:,.0f} us at {gap['at_ms']:.2f} ms: after {gap['after'][:50]}, "
              f"before {gap['before'][:50]}")
    print("\n| host event | count | per token | total ms | mean us |\n|---|---|---|---|---|")
    for name, count, total_us in result["host"][:15]:
        print(f"| {name[:90]} | {count} | {count / tokens:.1f} | {total_us / 1e3:.2f} | "
              f"{total_us / count:.1f} |")
    if result["sequence"]:
        print("\n| # | kernel | us | gap before us |\n|---|---|---|---|")
        for i, (name, us, gap) in enumerate(result["sequence"]):
            print(f"| {i} | {name[:70]} | {us:.1f} | {gap:.1f} |")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
