#!/usr/bin/env python
"""Batch-1 latency on random weights of a real model's shape: jinfer vs HF transformers.

Each engine runs in its own subprocess, one after the other, so neither holds GPU memory that
the other needs (the parent imports neither JAX nor torch). Both get the same random prompt
token ids (--prompt-len tokens; a fresh prompt for every call, so jinfer's prefix cache cannot
skip a prefill) and generate greedily with ignore_eos:
  - TTFT: median wall time of a max_tokens=1 generate (the prefill and the first token);
  - decode tok/s: (N - 1) / (median t(N) - median t(1)), the decode phase alone (N =
    --output-len), as in bench_cpu.py;
  - end-to-end tok/s: N / median t(N).
Warm-up calls of the same shapes come first; their time (jinfer's compiles) is reported on its
own line, and JAX compiles seen during the timed calls are counted (they should be 0).
Roofline: the bytes a batch-1 decode step must read (the weights, less an untied embedding
table of which one row is read, plus the K/V of the mean context) over the copy bandwidth
measured in the jinfer subprocess (a jitted copy of 2 GiB, bytes read + written; the best of
its repetitions).

  python scripts/bench_latency.py --out latency.json                  # Llama-3.2-1B shape, bf16
  python scripts/bench_latency.py --model-shape llama3-8b --out latency_8b.json
  python scripts/bench_latency.py --skip-hf --no-layer-kernel --out xla.json  # XLA layers
  python scripts/bench_latency.py --cpu-smoke --out /tmp/latency_smoke.json  # tiny, CPU, no HF

The helpers here (subprocess children, copy bandwidth, the HF peer) are shared with
bench_throughput.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from jinfer.model.moe import EXPERT_IMPLS
from jinfer.model.shapes import (MODEL_SHAPES, config_to_hf_dict, kv_bytes_per_token,
                                 num_params, resolve_model_config)

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
# --cpu-smoke: SmolLM2-135M's shape cut to 2 layers and to 8 heads (4 KV heads) of 64, so that
# tensor_parallel_size 2, 4 and 8 divide it (bench_tp.py --cpu-smoke), passed to LLM as a folder
# with config.json (write_smoke_model).
SMOKE_CONFIG = dataclasses.replace(MODEL_SHAPES["smollm2-135m"], num_layers=2, hidden_size=512,
                                   num_heads=8, num_kv_heads=4)
GiB = 2**30


# ----------------------------------------------------------------------------- shared helpers

def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-shape", default="llama3-1b", choices=sorted(MODEL_SHAPES),
                   help="random weights of this shape (jinfer.model.shapes)")
    p.add_argument("--model", default=None,
                   help="a local model folder with config.json instead (random weights of its "
                        "shape; no weights or tokenizer are read)")
    p.add_argument("--dtype", default=None, choices=sorted(ITEMSIZE),
                   help="bfloat16 (float32 with --cpu-smoke, where bf16 is emulated)")
    p.add_argument("--skip-hf", action="store_true", help="run jinfer only")
    p.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model and workload on the CPU, no HF: checks the script runs")
    p.add_argument("--out", help="JSON file for the results (required)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split jinfer's model over this many devices (the roofline is then "
                        "one device's share of the bytes; HF runs on one device)")
    p.add_argument("--moe-impl", default=None, choices=EXPERT_IMPLS,
                   help="how expert layers run their experts (KernelConfig.moe_impl; default: "
                        "the device's)")
    p.add_argument("--decode-loop", default=None, choices=["scan", "while"],
                   help="how multi-step decode calls loop (KernelConfig.decode_loop; default: "
                        "the device's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)


def write_smoke_model(workdir: str) -> str:
    """SMOKE_CONFIG as a model folder (its config.json alone: load it with load_format="dummy")
    under workdir -> the folder's path."""
    folder = pathlib.Path(workdir) / "smoke_model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_hf_dict(SMOKE_CONFIG)))
    return str(folder)


def model_source(args, workdir: str) -> tuple[str, object]:
    """(what LLM gets as its model, the ModelConfig): a shape name or a folder; --cpu-smoke
    writes the tiny config as a folder's config.json. Also settles the default --dtype."""
    args.dtype = args.dtype or ("float32" if args.cpu_smoke else "bfloat16")
    if args.cpu_smoke:
        return write_smoke_model(workdir), SMOKE_CONFIG
    name = args.model or args.model_shape
    return name, resolve_model_config(name)


def weight_bytes_read(config, itemsize: int) -> int:
    """Bytes of weights a batch-1 decode step reads: all of them, less an untied embedding
    table (a step gathers only its batch's rows from it; a tied one is read whole as the LM
    head), and, with experts, less those a token does not route to (it reads
    num_experts_per_tok of num_experts per layer)."""
    untied_embed = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    idle_experts = config.num_experts - config.num_experts_per_tok
    idle = idle_experts * 3 * config.hidden_size * config.intermediate_size * config.num_layers
    return (num_params(config) - untied_embed - idle) * itemsize


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "n": len(times)}


def run_child(script: str, which: str, spec: dict, env: dict) -> dict:
    """Runs `script --child which` in a fresh interpreter with `spec` (JSON) as its input;
    its stderr (logs, progress) passes through, its last stdout line is the JSON result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        out = subprocess.run([sys.executable, script, "--child", which, "--spec", f.name],
                             env={**os.environ, **env}, stdout=subprocess.PIPE, text=True)
    finally:
        os.unlink(f.name)
    if out.returncode:
        raise RuntimeError(f"the {which} subprocess failed (exit {out.returncode}); its log "
                           f"is above. stdout tail:\n{out.stdout[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_env(which: str, cpu: bool) -> dict:
    if cpu:
        return {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    if which.startswith("jinfer"):  # alone on the GPU: let JAX take more than its default 75%
        return {"XLA_PYTHON_CLIENT_MEM_FRACTION":
                os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")}
    return {}


def setup_child_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for name in ("jinfer", "bench_throughput"):
        logging.getLogger(name).setLevel(logging.INFO)


def copy_bandwidth(num_bytes: int = 2 * GiB, reps: int = 5, inner: int = 5) -> dict:
    """Device copy bandwidth in bytes/s (read + written), from a jitted `a + 1` over a
    `num_bytes` float32 array, `inner` chained copies per timing; median/min/max over `reps`.
    Freed afterwards, before the engine sizes its KV pool."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    x = copy(x).block_until_ready()
    rates = []
    for _ in range(reps):
        started = time.perf_counter()
        for _ in range(inner):
            x = copy(x)
        x.block_until_ready()
        rates.append(2 * num_bytes * inner / (time.perf_counter() - started))
    del x
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "bytes": num_bytes}


class CompileWatch:
    """Counts JAX backend compiles (and all compile-phase seconds) through jax.monitoring."""

    def __init__(self):
        import jax
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name: str, seconds: float, **kwargs) -> None:
        if name.startswith("/jax/core/compile/"):
            self.seconds += seconds
            self.count += name.endswith("backend_compile_duration")

    def snapshot(self) -> tuple[int, float]:
        return self.count, self.seconds


def device_info() -> dict:
    import jax
    return {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
            "jax": jax.__version__}


def build_hf_model(hf_dict: dict, dtype: str, seed: int = 0):
    """(the family's transformers model with random weights of the shape, torch, device), built
    on the GPU in `dtype` (the CPU where torch sees no GPU)."""
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.for_model(**hf_dict))
    finally:
        torch.set_default_dtype(default)
    model.eval()
    model.generation_config.pad_token_id = 0
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "attn_implementation": model.config._attn_implementation}
    return model, torch, device, info


def hf_generate(model, torch, device: str, prompts: list[list[int]], new_tokens: int,
                **generate_kwargs) -> float:
    """Seconds for HF `generate` of exactly `new_tokens` greedy tokens per prompt (left padding
    with id 0), synchronized on the GPU."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, **generate_kwargs)
    sync()
    elapsed = time.perf_counter() - started
    if out.shape[1] - width != new_tokens:
        raise RuntimeError(f"HF generated {out.shape[1] - width} tokens, asked {new_tokens}")
    return elapsed


# ----------------------------------------------------------------------------- children

def jinfer_latency(spec: dict) -> dict:
    """Load, warm up, then time max_tokens=1 and max_tokens=N generates at batch 1."""
    from jinfer import LLM, SamplingParams
    import dataclasses
    from jinfer.config import KernelConfig
    tiling = KernelConfig().layer_tiling
    if spec.get("layer_stages") is not None:
        tiling = dataclasses.replace(tiling, stages=spec["layer_stages"])
    kernels = KernelConfig(decode_layer_kernel=spec["decode_layer_kernel"], layer_tiling=tiling,
                           moe_impl=spec["moe_impl"], decode_loop=spec["decode_loop"])
    watch = CompileWatch()
    bandwidth = copy_bandwidth(spec["copy_bytes"])
    started = time.perf_counter()
    llm = LLM(spec["model"], load_format="dummy", dtype=spec["dtype"], seed=0,
              max_model_len=spec["prompt_len"] + spec["output_len"], max_num_seqs=1,
              max_num_batched_tokens=max(512, spec["prompt_len"]), gpu_memory_utilization=0.9,
              kernel_config=kernels, tensor_parallel_size=spec["tensor_parallel_size"],
              num_scheduler_steps=spec["num_scheduler_steps"])
    load_s = time.perf_counter() - started
    prompts = iter(spec["prompts"])

    def timed(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        started = time.perf_counter()
        (out,) = llm.generate(prompt_token_ids=[next(prompts)], sampling_params=params,
                              use_tqdm=False)
        elapsed = time.perf_counter() - started
        if len(out.outputs[0].token_ids) != n:
            raise RuntimeError(f"jinfer generated {len(out.outputs[0].token_ids)} tokens, "
                               f"asked {n}")
        return elapsed

    n = spec["output_len"]
    started = time.perf_counter()
    timed(n), timed(1)
    warmup_s = time.perf_counter() - started
    before = watch.snapshot()
    first = [timed(1) for _ in range(spec["reps_first"])]
    full = [timed(n) for _ in range(spec["reps_full"])]
    after = watch.snapshot()
    return {**device_info(), "copy_Bps": bandwidth, "load_s": load_s, "warmup_s": warmup_s,
            "t_first_s": summary(first), "t_full_s": summary(full),
            "compiles_timed": after[0] - before[0],
            "layer_kernel": llm.engine.runner.layer_tiling is not None,
            "compile_s_timed": after[1] - before[1]}


def hf_latency(spec: dict) -> dict:
    """HF peers at batch 1: eager generate, and with --hf-compile a static cache + compile."""
    started = time.perf_counter()
    model, torch, device, info = build_hf_model(spec["hf_config"], spec["dtype"])
    load_s = time.perf_counter() - started
    prompts = iter(spec["prompts"])
    n = spec["output_len"]
    variants = {"hf": {}}
    if spec["hf_compile"]:
        from transformers import CompileConfig
        variants["hf_compile"] = {"cache_implementation": "static", "compile_config":
                                  CompileConfig(fullgraph=True, mode="reduce-overhead")}
    results = {}
    for name, kwargs in variants.items():
        def timed(k: int) -> float:
            return hf_generate(model, torch, device, [next(prompts)], k, **kwargs)
        started = time.perf_counter()
        if kwargs:  # compiled: every shape used, twice (compile, then CUDA-graph capture)
            timed(n), timed(1), timed(n), timed(1)
        else:  # eager: nothing to compile; CUDA and cuBLAS initialisation
            timed(min(n, 16)), timed(1)
        warmup_s = time.perf_counter() - started
        first = [timed(1) for _ in range(spec["hf_reps_first"])]
        full = [timed(n) for _ in range(spec["hf_reps_full"])]
        results[name] = {**info, "load_s": load_s, "warmup_s": warmup_s,
                         "t_first_s": summary(first), "t_full_s": summary(full)}
    return results


# ----------------------------------------------------------------------------- parent

def derive(r: dict, n: int) -> dict:
    """decode tok/s, TTFT and end-to-end tok/s from the medians of t(1) and t(N)."""
    t1, tn = r["t_first_s"]["median"], r["t_full_s"]["median"]
    return {"ttft_ms": 1e3 * t1, "decode_tok_s": (n - 1) / (tn - t1) if tn > t1 else float("nan"),
            "e2e_tok_s": n / tn}


def roofline(config, dtype: str, bandwidth: float, batch: int, context: float,
             devices: int = 1) -> dict:
    """Tokens/s at batch `batch` if a decode step took only the time to stream its bytes (the
    weights once, each sequence's K/V at `context`) at `bandwidth`; over `devices` devices
    (tensor parallelism) each streams 1/devices of them at that bandwidth."""
    weights = weight_bytes_read(config, ITEMSIZE[dtype]) / devices
    kv = batch * context * kv_bytes_per_token(config, ITEMSIZE[dtype]) / devices
    step_s = (weights + kv) / bandwidth
    return {"weight_bytes": weights, "kv_bytes": kv, "step_ms": 1e3 * step_s,
            "tok_s": batch / step_s}


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x is None or x != x else f"{x:,.{digits}f}"


def print_latency_table(results: dict, spec: dict) -> None:
    engines = [k for k in ("jinfer", "hf", "hf_compile") if k in results]
    names = {"jinfer": "jinfer", "hf": "HF transformers (eager)",
             "hf_compile": "HF (static cache + compile)"}
    roof = results["roofline"]
    d = {k: results[k]["derived"] for k in engines}
    copy = results["jinfer"]["copy_Bps"]
    print(f"\n{spec['label']}, {spec['dtype']}, batch 1, prompt {spec['prompt_len']}, "
          f"{spec['output_len']} new tokens, greedy, ignore_eos, {spec['num_scheduler_steps']} "
          f"steps per call; decode layers: "
          f"{'persistent layer kernel' if results['jinfer']['layer_kernel'] else 'XLA'}; device "
          f"{results['jinfer']['device']}; copy bandwidth {copy['max'] / 1e9:,.0f} GB/s (best of "
          f"the run, the roofline's; median {copy['median'] / 1e9:,.0f}, min "
          f"{copy['min'] / 1e9:,.0f})\n")
    print("| metric | " + " | ".join(names[k] for k in engines) + " | roofline |")
    print("|---" * (len(engines) + 2) + "|")
    rows = [("decode tok/s", "decode_tok_s", fmt(roof["tok_s"])),
            ("decode ms/token", None, fmt(roof["step_ms"], 3)),
            ("TTFT ms", "ttft_ms", "—"),
            (f"end-to-end tok/s ({spec['output_len']} tokens)", "e2e_tok_s", "—")]
    for label, key, ceiling in rows:
        cells = [fmt(d[k][key]) if key else fmt(1e3 / d[k]["decode_tok_s"], 3) for k in engines]
        print(f"| {label} | " + " | ".join(cells) + f" | {ceiling} |")
    print("| load s / warm-up s | " + " | ".join(
        f"{results[k]['load_s']:.1f} / {results[k]['warmup_s']:.1f}" for k in engines) + " | — |")
    j = d["jinfer"]["decode_tok_s"]
    share = j / roof["tok_s"]
    # The goals: 80% for Llama's shapes (the engine's first), 75% for the other families
    goal = 0.8 if (spec.get("hf_config") or {}).get("model_type", "llama") == "llama" else 0.75
    print(f"\njinfer decode: {100 * share:.1f}% of the HBM roofline (goal >= {goal:.0%}: "
          f"{'met' if share >= goal else 'not met'}); JAX compiles during the timed calls: "
          f"{results['jinfer']['compiles_timed']}")
    for k in engines[1:]:
        print(f"jinfer / {names[k]}: {j / d[k]['decode_tok_s']:.1f}x decode, "
              f"{d[k]['ttft_ms'] / d['jinfer']['ttft_ms']:.1f}x faster TTFT")


def make_spec(args, model: str, config) -> dict:
    import numpy as np
    if args.cpu_smoke:
        prompt_len, output_len, reps_first, reps_full = 16, 8, 3, 2
    elif args.quick:  # 1 + 64 new tokens: the prefill's, then 8 calls of 8 decode steps (one
        # decode program to build, where 64 tokens took four: 8 x 7 + 4 + 2 + 1)
        prompt_len, output_len, reps_first, reps_full = args.prompt_len, 65, 3, 2
    else:
        prompt_len, output_len = args.prompt_len, args.output_len
        reps_first, reps_full = 5, 3
    num_prompts = 2 + reps_first + reps_full + 4 + 2 * (reps_first + reps_full)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, config.vocab_size, (num_prompts, prompt_len)).tolist()
    return {"model": model, "label": args.model or ("smoke" if args.cpu_smoke else
                                                    args.model_shape),
            "dtype": args.dtype, "prompt_len": prompt_len, "output_len": output_len,
            "reps_first": reps_first, "reps_full": reps_full,
            "hf_reps_first": 3, "hf_reps_full": 1 if args.quick else 2,
            "copy_bytes": (64 << 20) if args.cpu_smoke else 2 * GiB,
            "prompts": prompts, "hf_config": config_to_hf_dict(config),
            "hf_compile": args.hf_compile,
            "decode_layer_kernel": (False if args.no_layer_kernel else
                                    "always" if args.layer_kernel_always else True),
            "layer_stages": args.layer_stages,
            "num_scheduler_steps": args.num_scheduler_steps,
            "tensor_parallel_size": args.tensor_parallel_size, "moe_impl": args.moe_impl,
            "decode_loop": args.decode_loop}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-compile", action="store_true",
                   help="also time HF with a static cache and torch.compile (slower to start)")
    p.add_argument("--num-scheduler-steps", type=int, default=8,
                   help="decode steps per device call (LLM's num_scheduler_steps)")
    p.add_argument("--no-layer-kernel", action="store_true",
                   help="decode with XLA's matmuls (KernelConfig(decode_layer_kernel=False)), not the "
                        "persistent layer kernel (Hopper)")
    p.add_argument("--layer-kernel-always", action="store_true",
                   help="KernelConfig(decode_layer_kernel='always'): also the layers the "
                        "kernels take by request only (mixture of experts)")
    p.add_argument("--layer-stages", type=int, default=None,
                   help="the layer kernel's weight ring slots (default: KernelConfig().layer_tiling)")
    args = p.parse_args()
    if args.child:
        setup_child_logging()
        spec = json.loads(pathlib.Path(args.spec).read_text())
        result = jinfer_latency(spec) if args.child == "jinfer" else hf_latency(spec)
        print(json.dumps(result))
        return 0
    if not args.out:
        p.error("--out FILE.json is required")
    with tempfile.TemporaryDirectory() as workdir:
        model, config = model_source(args, workdir)
        spec = make_spec(args, model, config)
        results = {"jinfer": run_child(__file__, "jinfer", spec,
                                       child_env("jinfer", args.cpu_smoke))}
        if not (args.skip_hf or args.cpu_smoke):
            results.update(run_child(__file__, "hf", spec, child_env("hf", False)))
    n = spec["output_len"]
    for k in ("jinfer", "hf", "hf_compile"):
        if k in results:
            results[k]["derived"] = derive(results[k], n)
    context = spec["prompt_len"] + n / 2  # mean context over the decode steps
    # The best copy rate of the run: the bandwidth the device showed it can reach. (The median
    # moved with noise: 2,746 vs 2,870 GB/s best in one H100 run, which flattered the ratio.)
    results["roofline"] = roofline(config, args.dtype, results["jinfer"]["copy_Bps"]["max"],
                                   1, context, devices=args.tensor_parallel_size)
    results["spec"] = {k: v for k, v in spec.items() if k != "prompts"}
    results["num_params"] = num_params(config)
    print_latency_table(results, spec)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
