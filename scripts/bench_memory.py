#!/usr/bin/env python
"""KV-cache memory benchmark: waste, sharing for n > 1, prefix caching. Runs the real engine on a
tiny random model (memory accounting does not depend on model size), on the CPU.

1. KV waste: 256 requests, prompt and output lengths uniform in [100, 1024] (ignore_eos);
   waste = slots allocated but not holding a token / slots allocated, over running sequences,
   sampled every step (slot-weighted mean and the worst step). vLLM reports under 4%.
2. Parallel sampling: n = 8 samples of a 1,000-token prompt, peak blocks in use, against 8
   separate requests with prefix caching off (no sharing).
3. Prefix caching: 100 requests sharing a 1,000-token system prompt (each with its own 16-token
   question): prompt tokens computed with prefix caching on and off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import numpy as np

from jinfer import LLM, SamplingParams
from jinfer.testing import write_tiny_llama


def run(llm: LLM, requests, on_step=None) -> None:
    """Feeds (prompt ids, params) to the engine and steps it until every request is done."""
    for i, (prompt, params) in enumerate(requests):
        llm.engine.add_request(f"r{i}", None, prompt, params)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        if on_step:
            on_step(llm)


def kv_waste(model_dir, args) -> dict:
    rng = np.random.default_rng(0)
    llm = LLM(str(model_dir), num_kv_blocks=8192, max_model_len=2048, max_num_seqs=64,
              enable_compilation_cache=False)
    requests = [([int(t) for t in rng.integers(3, 390, rng.integers(100, 1025))],
                 SamplingParams(temperature=0, max_tokens=int(rng.integers(100, 1025)),
                                ignore_eos=True)) for _ in range(args.num_requests)]
    wasted, allocated, worst = 0, 0, 0.0

    def on_step(llm):
        nonlocal wasted, allocated, worst
        bm, running = llm.engine.block_manager, llm.engine.scheduler.running
        slots = sum(len(s.block_table) for s in running) * bm.block_size
        if slots:
            waste = bm.kv_waste(running)
            wasted, allocated, worst = wasted + waste * slots, allocated + slots, max(worst, waste)

    started = time.perf_counter()
    run(llm, requests, on_step)
    assert llm.engine.block_manager.is_whole()
    return {"requests": args.num_requests, "kv_waste_mean": wasted / allocated,
            "kv_waste_worst_step": worst, "seconds": time.perf_counter() - started}


def peak_blocks(model_dir, requests, prefix_caching: bool) -> int:
    llm = LLM(str(model_dir), num_kv_blocks=2048, max_model_len=2048,
              enable_prefix_caching=prefix_caching, enable_compilation_cache=False)
    peak = 0

    def on_step(llm):
        nonlocal peak
        peak = max(peak, llm.engine.block_manager.num_used_blocks)

    run(llm, requests, on_step)
    return peak


def parallel_sampling(model_dir) -> dict:
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 390, 1000)]
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, seed=0)
    shared = peak_blocks(model_dir, [(prompt, dataclasses.replace(params, n=8))], True)
    separate = peak_blocks(model_dir, [(prompt, params)] * 8, False)
    return {"peak_blocks_n8_shared": shared, "peak_blocks_8_separate": separate,
            "ratio": separate / shared}


def prefix_caching(model_dir) -> dict:
    rng = np.random.default_rng(2)
    system = [int(t) for t in rng.integers(3, 390, 1000)]
    requests = [(system + [int(t) for t in rng.integers(3, 390, 16)],
                 SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                for _ in range(100)]
    computed = {}
    for enabled in (True, False):
        llm = LLM(str(model_dir), num_kv_blocks=4096, max_model_len=2048,
                  enable_prefix_caching=enabled, enable_compilation_cache=False)
        run(llm, requests)
        computed[enabled] = llm.stats()["num_computed_prompt_tokens"]
    return {"prompt_tokens_computed_cache_on": computed[True],
            "prompt_tokens_computed_cache_off": computed[False],
            "reduction": 1 - computed[True] / computed[False]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model_dir = write_tiny_llama(pathlib.Path(tempfile.mkdtemp()) / "tiny", layers=1)
    results = {"kv_waste": kv_waste(model_dir, args),
               "parallel_sampling": parallel_sampling(model_dir),
               "prefix_caching": prefix_caching(model_dir)}
    print(json.dumps(results, indent=2))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
