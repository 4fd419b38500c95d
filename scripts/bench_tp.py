#!/usr/bin/env python
"""Tensor-parallel scaling: batch-1 decode and the offline throughput workload at each
tensor_parallel_size, as speedup and efficiency over TP=1 (the multi-GPU run of issue 27).

For each N of --tp-sizes, in order, runs scripts/bench_latency.py, scripts/bench_throughput.py
and (with --startup) scripts/bench_startup.py with `-tp N` (jinfer only: --skip-hf; --quick
unless --full), each in its own processes, and reads their JSON back:
  batch 1      decode tok/s; % of the roofline of 1/N of the weights per device at the run's
               copy rate (bench_latency's); speedup over TP=1; efficiency = speedup / N; the
               engine's load and warm-up seconds.
  throughput   output tok/s of the 256-request workload at each --concurrency (max_num_seqs:
               at most that many requests run at once; default 256); speedup; efficiency.
  start-up     --startup: process start to the first token, empty and then warm compilation
               cache (bench_startup's LLM(...) + one token).
Sizes past the visible devices are reported as skipped (the count comes from a child process,
so this one never holds GPU memory); a size that fails is reported with its error and the
rest still run. NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0, as the device notes
require) unless the environment sets it.

  python scripts/bench_tp.py --model-shape llama3-8b --tp-sizes 1 2 4 8 --out tp.json
  python scripts/bench_tp.py --model-shape llama3-70b --tp-sizes 4 8 --concurrency 64 256 \
      --startup --out tp70.json
  python scripts/bench_tp.py --model-shape qwen3-30b-a3b --tp-sizes 1 2 --out tp30.json
  python scripts/bench_tp.py --cpu-smoke --out /tmp/tp.json  # tiny, 8 virtual CPU devices

The collectives' share of a step: `scripts/profile_decode.py --model-shape ... -tp N` (its
all_reduce scope).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

SCRIPTS = pathlib.Path(__file__).resolve().parent
CPU_DEVICES = 8  # --cpu-smoke: virtual CPU devices


def child_env(cpu: bool) -> dict:
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0")}
    if cpu:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={CPU_DEVICES}").strip()
    return env


def device_count(cpu: bool) -> int:
    """jax.device_count() as a child process sees it (it allocates no GPU memory)."""
    env = {**child_env(cpu), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                         env=env, stdout=subprocess.PIPE, text=True, check=True)
    return int(out.stdout.split()[-1])


def run_script(script: str, args: list[str], cpu: bool) -> dict:
    """Runs scripts/<script> with args and --out a temporary file -> its JSON; raises with the
    exit code where it fails (its log has passed through)."""
    with tempfile.TemporaryDirectory() as workdir:
        out = pathlib.Path(workdir) / "out.json"
        done = subprocess.run([sys.executable, str(SCRIPTS / script), *args, "--out", str(out)],
                              env=child_env(cpu))
        if done.returncode or not out.exists():
            raise RuntimeError(f"{script} {' '.join(args)} failed (exit {done.returncode})")
        return json.loads(out.read_text())


def latency_row(r: dict) -> dict:
    decode = r["jinfer"]["derived"]["decode_tok_s"]
    return {"decode_tok_s": decode, "ttft_ms": r["jinfer"]["derived"]["ttft_ms"],
            "roofline_tok_s": r["roofline"]["tok_s"],
            "roofline_fraction": decode / r["roofline"]["tok_s"],
            "load_s": r["jinfer"].get("load_s"), "warmup_s": r["jinfer"].get("warmup_s")}


def throughput_row(r: dict) -> dict:
    run = r["jinfer"][0]
    return {"output_tok_s": run["output_tok_s"], "elapsed_s": run["elapsed_s"],
            "max_num_seqs": run["max_num_seqs"], "load_s": run.get("load_s"),
            "warmup_s": run.get("warmup_s")}


def startup_row(r: dict) -> dict:
    return {"cold_first_token_s": r["cold"]["first_token_s"],
            "warm_first_token_s": min(w["first_token_s"] for w in r["warm"]),
            "warm_load_s": min(w["load_s"] for w in r["warm"])}


def benchmarks(args) -> list[tuple[str, str, list[str], object]]:
    """(row key, script, its arguments, the reader of its JSON) of each run per TP size."""
    if args.cpu_smoke:
        common = ["--cpu-smoke"]
    else:
        common = ["--model-shape", args.model_shape, "--skip-hf"] + (
            [] if args.full else ["--quick"])
    if args.dtype:
        common += ["--dtype", args.dtype]
    runs = []
    if args.latency:
        runs.append(("latency", "bench_latency.py", common, latency_row))
    if args.throughput:
        for c in args.concurrency:
            runs.append((throughput_key(c), "bench_throughput.py",
                         common + ["--max-num-seqs", str(c), "--sweep"], throughput_row))
    if args.startup:
        startup = (["--cpu-smoke"] if args.cpu_smoke else
                   ["--model-shape", args.model_shape, "--dtype", args.dtype or "bfloat16"])
        runs.append(("startup", "bench_startup.py", startup + ["--warm-runs", "1"],
                     startup_row))
    return runs


def throughput_key(concurrency: int) -> str:
    return f"throughput@{concurrency}"


def add_scaling(rows: list[dict], key: str, metric: str) -> None:
    """speedup and efficiency of rows[i][key][metric] over the TP=1 row's (where measured)."""
    base = next((r[key][metric] for r in rows if r["tp"] == 1 and key in r), None)
    for r in rows:
        if key in r and base:
            r[key]["speedup"] = r[key][metric] / base
            r[key]["efficiency"] = r[key]["speedup"] / r["tp"]


def fmt(x, spec: str = ",.1f") -> str:
    return "—" if x is None else format(x, spec)


def print_table(rows: list[dict], label: str, concurrency: list[int]) -> None:
    print(f"\n{label}\n")
    head = ["TP", "batch-1 tok/s", "% roofline (1/N of the weights)", "speedup", "efficiency",
            "load s / warm-up s"]
    for c in concurrency:
        head += [f"throughput tok/s @{c}", "speedup", "efficiency"]
    head += ["first token s: cold / warm", "note"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        lat, start = r.get("latency", {}), r.get("startup", {})
        frac = lat.get("roofline_fraction")
        cells = [str(r["tp"]), fmt(lat.get("decode_tok_s")),
                 fmt(None if frac is None else 100 * frac), fmt(lat.get("speedup"), ".2f"),
                 fmt(lat.get("efficiency"), ".0%"),
                 f"{fmt(lat.get('load_s'))} / {fmt(lat.get('warmup_s'))}"]
        for c in concurrency:
            thr = r.get(throughput_key(c), {})
            cells += [fmt(thr.get("output_tok_s"), ",.0f"), fmt(thr.get("speedup"), ".2f"),
                      fmt(thr.get("efficiency"), ".0%")]
        cells += [f"{fmt(start.get('cold_first_token_s'))} / "
                  f"{fmt(start.get('warm_first_token_s'))}", r.get("note", "")]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="llama3-8b")
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--dtype", default=None)
    p.add_argument("--full", action="store_true",
                   help="the benchmarks' full runs (default: their --quick)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[256],
                   help="max_num_seqs of each throughput run (the requests running at once)")
    p.add_argument("--startup", action="store_true",
                   help="also time process start to first token, empty and warm cache")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the benchmarks' tiny CPU model on 8 virtual devices (checks the script)")
    p.add_argument("--out", required=True, help="JSON file for the results")
    args = p.parse_args()
    available = device_count(args.cpu_smoke)
    rows = []
    for n in args.tp_sizes:
        row = {"tp": n}
        rows.append(row)
        if n > available:
            row["note"] = f"skipped: {available} devices visible"
            continue
        for key, script, script_args, read in benchmarks(args):
            try:
                row[key] = read(run_script(script, script_args + ["-tp", str(n)],
                                           args.cpu_smoke))
            except Exception as e:  # noqa: BLE001 (reported; the other sizes still run)
                row["note"] = (row.get("note", "") + f" {key} failed: {e}").strip()
    add_scaling(rows, "latency", "decode_tok_s")
    for c in args.concurrency:
        add_scaling(rows, throughput_key(c), "output_tok_s")
    label = "smoke (CPU)" if args.cpu_smoke else args.model_shape
    print_table(rows, f"{label}: tensor-parallel scaling, {available} devices visible",
                args.concurrency if args.throughput else [])
    pathlib.Path(args.out).write_text(json.dumps(
        {"model_shape": label, "devices_visible": available, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
