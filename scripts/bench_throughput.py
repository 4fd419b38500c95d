#!/usr/bin/env python
"""Offline throughput on random weights of a real model's shape: jinfer vs HF transformers.

The workload is nano-vllm's benchmark: 256 requests, prompt and output lengths each uniform in
[100, 1024] (seeded), random prompt token ids, ignore_eos, greedy unless --temperature.
  - jinfer gets all requests in one `generate` call (one SamplingParams per request, with its
    own max_tokens), with max_num_seqs=--max-num-seqs; then again at each --sweep batch size
    for the plot. Each run is its own subprocess: load, a warm-up run of the same workload on
    other prompt ids (same lengths, so it compiles the shapes the timed run meets; the prefix
    cache cannot reuse it; --warmup-fraction < 1 cuts its outputs, faster but it may leave
    compiles to the timed run), then the timed run. JAX compiles during it are counted.
  - HF transformers `generate` on the same requests at each --hf-batch-sizes, in its own
    subprocess: requests sorted by output length, batched, left-padded (pad id 0), each batch
    generating its longest output (static batching: the shorter ones' extra tokens are not
    counted). Largest batch first; a batch size that runs out of memory is recorded as such;
    once one has run, the sizes left when --hf-time-budget is spent are skipped (logged).
Figures: output tokens/s (requested output tokens / wall time) and total tokens/s (prompt +
output tokens / wall time); jinfer over HF's best batch size (goal: >= 25x). The PNG plots
output tokens/s against batch size with two ceilings at the copy bandwidth measured in the
same run: each step streaming only the weights (batch x bandwidth / weight bytes), and the
weights plus every sequence's K/V at the workload's mean decode context.

  python scripts/bench_throughput.py --out throughput.json     # Llama-3.2-1B shape, bf16
  python scripts/bench_throughput.py --quick --out t.json      # no sweep, one HF batch size
  python scripts/bench_throughput.py --cpu-smoke --out /tmp/t.json  # tiny, CPU, no HF
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import tempfile
import time

from bench_latency import (GiB, CompileWatch, add_common_args, build_hf_model,
                           child_env, copy_bandwidth, device_info, fmt, hf_generate,
                           model_source, roofline, run_child, setup_child_logging)
from jinfer.model.shapes import config_to_hf_dict, num_params

logger = logging.getLogger("bench_throughput")


# ----------------------------------------------------------------------------- workload

def make_workload(vocab_size: int, num_requests: int, low: int, high: int, seed: int,
                  warmup_fraction: float = 1.0) -> dict:
    """Prompt ids and output lengths (lengths uniform in [low, high]); a warm-up set of other
    prompt ids of the same lengths, outputs scaled by `warmup_fraction`."""
    import numpy as np
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(low, high + 1, num_requests).tolist()
    output_lens = rng.integers(low, high + 1, num_requests).tolist()
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in prompt_lens]
    warm = [rng.integers(0, vocab_size, n).tolist() for n in prompt_lens]
    return {"prompts": prompts, "output_lens": output_lens, "warm_prompts": warm,
            "warm_output_lens": [max(1, round(n * warmup_fraction)) for n in output_lens]}


def mean_decode_context(prompt_lens: list[int], output_lens: list[int]) -> float:
    """Context length averaged over every generated token (token j of a request sees its
    prompt and j earlier outputs)."""
    total = sum(o * p + o * (o - 1) / 2 for p, o in zip(prompt_lens, output_lens))
    return total / sum(output_lens)


# ----------------------------------------------------------------------------- children

def timed_generate(llm, prompts: list[list[int]], output_lens: list[int],
                   temperature: float) -> float:
    """Seconds `llm.generate` takes for the token-id prompts, each forced to its output length
    (ignore_eos); raises if an output has another length."""
    from jinfer import SamplingParams
    params = [SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True)
              for n in output_lens]
    started = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    if [len(o.outputs[0].token_ids) for o in outputs] != list(output_lens):
        raise RuntimeError("jinfer returned outputs of other lengths than max_tokens")
    return elapsed


def jinfer_throughput(spec: dict) -> dict:
    """One engine at max_num_seqs=spec["max_num_seqs"]: load, warm up, time the workload."""
    from jinfer import LLM
    from jinfer.config import KernelConfig
    watch = CompileWatch()
    bandwidth = copy_bandwidth(spec["copy_bytes"])
    started = time.perf_counter()
    llm = LLM(spec["model"], load_format="dummy", dtype=spec["dtype"], seed=0,
              max_model_len=spec["max_model_len"], max_num_seqs=spec["max_num_seqs"],
              max_num_batched_tokens=spec["max_num_batched_tokens"], gpu_memory_utilization=0.9,
              tensor_parallel_size=spec["tensor_parallel_size"],
              kernel_config=KernelConfig(moe_impl=spec["moe_impl"],
                                         decode_loop=spec["decode_loop"]))
    load_s = time.perf_counter() - started

    warmup_s = timed_generate(llm, spec["warm_prompts"], spec["warm_output_lens"],
                              spec["temperature"])
    before = watch.snapshot()
    preemptions = llm.stats().get("num_preemptions", 0)
    elapsed = timed_generate(llm, spec["prompts"], spec["output_lens"], spec["temperature"])
    after = watch.snapshot()
    return {**device_info(), "copy_Bps": bandwidth, "max_num_seqs": spec["max_num_seqs"],
            "load_s": load_s, "warmup_s": warmup_s, "elapsed_s": elapsed,
            "num_preemptions": llm.stats().get("num_preemptions", 0) - preemptions,
            "compiles_timed": after[0] - before[0], "compile_s_timed": after[1] - before[1]}


def hf_throughput(spec: dict) -> dict:
    """HF generate over the workload at each batch size, largest first, within the budget."""
    started = time.perf_counter()
    model, torch, device, info = build_hf_model(spec["hf_config"], spec["dtype"])
    load_s = time.perf_counter() - started
    prompts, output_lens = spec["prompts"], spec["output_lens"]
    order = sorted(range(len(prompts)), key=lambda i: (output_lens[i], len(prompts[i])))
    hf_generate(model, torch, device, [p[:16] for p in prompts[:2]], 4)  # CUDA/cuBLAS init
    runs, budget_started = [], time.perf_counter()
    for batch in sorted(spec["hf_batch_sizes"], reverse=True):
        done = any(r["status"] == "ok" for r in runs)
        if done and time.perf_counter() - budget_started > spec["hf_time_budget_s"]:
            logger.warning("HF batch %d skipped: the %.0f s time budget is spent", batch,
                           spec["hf_time_budget_s"])
            runs.append({"batch": batch, "status": "skipped (time budget)"})
            continue
        try:
            elapsed = sum(
                hf_generate(model, torch, device, [prompts[i] for i in chunk],
                            max(output_lens[i] for i in chunk))
                for chunk in (order[k:k + batch] for k in range(0, len(order), batch)))
            runs.append({"batch": batch, "status": "ok", "elapsed_s": elapsed})
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            logger.warning("HF batch %d ran out of GPU memory", batch)
            runs.append({"batch": batch, "status": "out of memory"})
        logger.info("HF batch %d: %s", batch, runs[-1])
    return {**info, "load_s": load_s, "runs": runs}


# ----------------------------------------------------------------------------- report

def add_rates(run: dict, prompt_tokens: int, output_tokens: int) -> dict:
    if "elapsed_s" in run:
        run["output_tok_s"] = output_tokens / run["elapsed_s"]
        run["total_tok_s"] = (prompt_tokens + output_tokens) / run["elapsed_s"]
    return run


def print_table(results: dict, spec: dict) -> None:
    w = results["workload"]
    main = results["jinfer"][0]
    print(f"\n{spec['label']}, {spec['dtype']}: {w['num_requests']} requests, prompts "
          f"{w['prompt_tokens']:,} tokens, outputs {w['output_tokens']:,} tokens (lengths uniform "
          f"in [{spec['low']}, {spec['high']}]), ignore_eos, temperature {spec['temperature']}; "
          f"device {main['device']}; copy bandwidth {main['copy_Bps']['median'] / 1e9:,.0f} GB/s\n")
    print("| engine | batch | output tok/s | total tok/s | time s | load s / warm-up s | "
          "preemptions / JAX compiles in the timed run | ceiling tok/s (weights / +K/V) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["jinfer"]:
        print(f"| jinfer | max_num_seqs {r['max_num_seqs']} | {fmt(r['output_tok_s'], 0)} | "
              f"{fmt(r['total_tok_s'], 0)} | {r['elapsed_s']:.1f} | {r['load_s']:.1f} / "
              f"{r['warmup_s']:.1f} | {r['num_preemptions']} / {r['compiles_timed']} | "
              f"{fmt(r['roofline_weights_tok_s'], 0)} / {fmt(r['roofline_kv_tok_s'], 0)} |")
    hf = results.get("hf", {})
    for r in hf.get("runs", []):
        if r["status"] != "ok":
            print(f"| HF transformers | {r['batch']} | {r['status']} | | | | | |")
            continue
        print(f"| HF transformers | {r['batch']} | {fmt(r['output_tok_s'], 0)} | "
              f"{fmt(r['total_tok_s'], 0)} | {r['elapsed_s']:.1f} | {hf['load_s']:.1f} / — "
              f"| | |")
    print(f"\nmean decode context {w['mean_decode_context']:.0f} tokens; the ceilings assume "
          f"full batches, while the workload drains as requests finish")
    best = results.get("hf_best")
    if best:
        print(f"jinfer / HF best (batch {best['batch']}): "
              f"{main['output_tok_s'] / best['output_tok_s']:.1f}x output tok/s, "
              f"{main['total_tok_s'] / best['total_tok_s']:.1f}x total tok/s (goal >= 25x)")


def plot(path: str, results: dict, label: str) -> bool:
    """Output tokens/s against batch size, with the ceilings; False (logged) without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not importable: no plot written (the JSON has the figures)")
        return False
    runs = sorted(results["jinfer"], key=lambda r: r["max_num_seqs"])
    batches = [r["max_num_seqs"] for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ceilings = results["ceilings"]
    ax.plot([c["batch"] for c in ceilings], [c["weights_tok_s"] for c in ceilings], "k--",
            label="ceiling: weights only at copy bandwidth")
    ax.plot([c["batch"] for c in ceilings], [c["kv_tok_s"] for c in ceilings], "k:",
            label="ceiling: weights + K/V at mean context")
    ax.plot(batches, [r["output_tok_s"] for r in runs], "o-", label="jinfer (max_num_seqs)")
    hf = [r for r in results.get("hf", {}).get("runs", []) if r["status"] == "ok"]
    if hf:
        hf.sort(key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in hf], [r["output_tok_s"] for r in hf], "s-",
                label="HF transformers generate (batch size)")
    ax.set_xscale("log", base=2)
    ticks = sorted({*batches, *(r["batch"] for r in hf), *(c["batch"] for c in ceilings)})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{label}: {results['workload']['num_requests']} requests, "
                 f"{results['jinfer'][0]['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- parent

def make_spec(args, model: str, config) -> dict:
    if args.cpu_smoke:
        num_requests, low, high, max_num_seqs, sweep = 4, 4, 12, 4, [2]
    else:
        num_requests, low, high = args.num_requests, args.min_len, args.max_len
        max_num_seqs, sweep = args.max_num_seqs, ([] if args.quick else args.sweep)
    return {"model": model, "dtype": args.dtype, "temperature": args.temperature,
            "label": args.model or ("smoke" if args.cpu_smoke else args.model_shape),
            "low": low, "high": high, "num_requests": num_requests,
            "max_model_len": 2 * high, "max_num_seqs": max_num_seqs,
            "sweep": [b for b in sweep if b != max_num_seqs],
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "tensor_parallel_size": args.tensor_parallel_size, "moe_impl": args.moe_impl,
            "decode_loop": args.decode_loop,
            "copy_bytes": (64 << 20) if args.cpu_smoke else 2 * GiB,
            "hf_batch_sizes": args.hf_batch_sizes,
            "hf_time_budget_s": 0.0 if args.quick else args.hf_time_budget,
            "hf_config": config_to_hf_dict(config),
            **make_workload(config.vocab_size, num_requests, low, high, args.seed,
                             args.warmup_fraction)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="jinfer's sampling temperature (HF always greedy)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--sweep", type=int, nargs="*", default=[16, 64],
                   help="more max_num_seqs values to run jinfer at, for the plot (each a "
                        "subprocess with a full warm-up: about 2x the workload's time)")
    p.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[256, 128, 64])
    p.add_argument("--hf-time-budget", type=float, default=60.0,
                   help="seconds of HF runs after which smaller batch sizes are skipped (the "
                        "largest always runs)")
    p.add_argument("--warmup-fraction", type=float, default=1.0,
                   help="warm-up outputs as a fraction of the timed ones")
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args()
    if args.child:
        setup_child_logging()
        spec = json.loads(pathlib.Path(args.spec).read_text())
        result = jinfer_throughput(spec) if args.child == "jinfer" else hf_throughput(spec)
        print(json.dumps(result))
        return 0
    if not args.out:
        p.error("--out FILE.json is required")
    with tempfile.TemporaryDirectory() as workdir:
        model, config = model_source(args, workdir)
        spec = make_spec(args, model, config)
        env = child_env("jinfer", args.cpu_smoke)
        runs = []
        for batch in [spec["max_num_seqs"]] + spec["sweep"]:
            runs.append(run_child(__file__, "jinfer", {**spec, "max_num_seqs": batch}, env))
            logger.warning("jinfer max_num_seqs=%d: %.2f s (load %.1f s, warm-up %.1f s)", batch,
                           runs[-1]["elapsed_s"], runs[-1]["load_s"], runs[-1]["warmup_s"])
        results = {"jinfer": runs}
        if not (args.skip_hf or args.cpu_smoke):
            results["hf"] = run_child(__file__, "hf", spec, child_env("hf", False))
    prompt_lens = [len(q) for q in spec["prompts"]]
    prompt_tokens, output_tokens = sum(prompt_lens), sum(spec["output_lens"])
    context = mean_decode_context(prompt_lens, spec["output_lens"])
    bandwidth = runs[0]["copy_Bps"]["median"]
    for r in runs:
        add_rates(r, prompt_tokens, output_tokens)
        r["roofline_weights_tok_s"] = roofline(config, args.dtype, bandwidth,
                                               r["max_num_seqs"], 0)["tok_s"]
        r["roofline_kv_tok_s"] = roofline(config, args.dtype, bandwidth, r["max_num_seqs"],
                                          context)["tok_s"]
    ok = [add_rates(r, prompt_tokens, output_tokens)
          for r in results.get("hf", {}).get("runs", []) if r["status"] == "ok"]
    if ok:
        results["hf_best"] = max(ok, key=lambda r: r["output_tok_s"])
    largest = max([r["max_num_seqs"] for r in runs] + spec["hf_batch_sizes"])
    results["ceilings"] = [
        {"batch": b, "weights_tok_s": roofline(config, args.dtype, bandwidth, b, 0)["tok_s"],
         "kv_tok_s": roofline(config, args.dtype, bandwidth, b, context)["tok_s"]}
        for b in (1 << i for i in range(largest.bit_length())) if b <= largest]
    results["workload"] = {"num_requests": spec["num_requests"], "prompt_tokens": prompt_tokens,
                           "output_tokens": output_tokens, "mean_decode_context": context}
    results["spec"] = {k: v for k, v in spec.items() if "prompts" not in k and "lens" not in k}
    results["num_params"] = num_params(config)
    print_table(results, spec)
    png = args.plot or str(pathlib.Path(args.out).with_suffix(".png"))
    if plot(png, results, spec["label"]):
        results["plot"] = png
        print(f"plot: {png}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
