#!/usr/bin/env python
"""CPU benchmark: jinfer vs HF transformers (torch CPU) on the default SmolLM2-135M, float32.

Each engine runs in its own subprocess so start-up is measured from a cold interpreter:
  - load: process start -> model ready (imports, weights, dequantization)
  - ttft: process start -> first streamed token; jinfer twice, with an empty compilation
    cache (cold) and with the cache it just filled (warm)
  - tok/s, greedy, ignore_eos, 64 new tokens per sequence, batch 1 and 16, timed after a warm-up
    run of the same shapes, measured the same way for both engines:
      end-to-end: new tokens / wall time of the whole generate call (prefill included);
      decode: (64 - 1) new tokens per sequence / (time for 64 tokens - time for 1 token), the
      decode phase alone (the first token's time is the prefill, reported as TTFT).
    jinfer's prefix cache is cleared before every run, so repeated runs do equal work.
--first-calls measures what a new user sees instead: a new process generates 4 tokens, then 64
(batch 1 and 16, greedy, ignore_eos), and the second call's end-to-end tok/s is reported for
jinfer (empty and warm compilation cache) and HF transformers, each in a process of its own.
Prints a Markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPTS = ["Why is the sky blue?", "Write a haiku about the sea.", "What is 17 times 23?",
           "Explain photosynthesis to a child.", "Name three prime numbers.",
           "What is the capital of France?", "Give me a tip for learning Python.",
           "Describe a cat in one sentence."] * 2


def run_jinfer(new_tokens: int, threads: int) -> dict:
    started = time.perf_counter()
    from jinfer import LLM, SamplingParams
    llm = LLM(dtype="float32", max_model_len=1024, max_num_seqs=16)
    loaded = time.perf_counter() - started
    tok = llm.get_tokenizer()
    chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                        add_special_tokens=False) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    next(iter(llm.stream(chats[0], params)))
    ttft = time.perf_counter() - started
    result = {"load_s": loaded, "ttft_s": ttft}

    def timed(batch: int, max_tokens: int) -> float:
        llm.engine.block_manager.reset_prefix_cache()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        started = time.perf_counter()
        llm.generate(prompt_token_ids=chats[:batch], sampling_params=params, use_tqdm=False)
        return time.perf_counter() - started

    return {**result, **measure(timed, new_tokens)}


def measure(timed, new_tokens: int) -> dict:
    """tok/s at batch 1 and 16 from `timed(batch, max_tokens) -> seconds` (after a warm-up)."""
    result = {}
    for batch in (1, 16):
        timed(batch, new_tokens), timed(batch, 1)  # warm-up: compile every shape used
        t_first = min(timed(batch, 1) for _ in range(2))
        t_all = timed(batch, new_tokens)
        result[f"tok_s_b{batch}"] = batch * new_tokens / t_all
        result[f"decode_tok_s_b{batch}"] = batch * (new_tokens - 1) / (t_all - t_first)
    return result


def run_hf(new_tokens: int, threads: int) -> dict:
    started = time.perf_counter()
    import torch
    import transformers
    from jinfer.loader.default_model import default_model_path
    torch.set_num_threads(threads)
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = time.perf_counter() - started
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in PROMPTS]

    def timed(batch: int, max_tokens: int) -> float:
        enc = tok(chats[:batch], return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=False, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        assert out.shape[1] - enc["input_ids"].shape[1] == max_tokens
        return time.perf_counter() - started

    return {"load_s": loaded, **measure(timed, new_tokens)}


def first_calls(which: str, batch: int, threads: int) -> dict:
    """In this new process: load, generate 4 tokens, then 64; the second call's tok/s."""
    started = time.perf_counter()
    if which == "jinfer":
        from jinfer import LLM, SamplingParams
        llm = LLM(dtype="float32")
        tok = llm.get_tokenizer()
        chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                            add_special_tokens=False) for p in PROMPTS[:batch]]

        def call(n: int) -> None:
            llm.generate(prompt_token_ids=chats, use_tqdm=False, sampling_params=SamplingParams(
                temperature=0, max_tokens=n, ignore_eos=True))
    else:
        import torch
        import transformers
        from jinfer.loader.default_model import default_model_path
        torch.set_num_threads(threads)
        path = default_model_path()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tok.padding_side = "left"
        tok.pad_token = tok.pad_token or tok.eos_token
        enc = tok([tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS[:batch]],
                  return_tensors="pt", padding=True, add_special_tokens=False)

        def call(n: int) -> None:
            with torch.inference_mode():
                model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=tok.pad_token_id)
    loaded = time.perf_counter() - started
    call(4)
    started = time.perf_counter()
    call(64)
    second = time.perf_counter() - started
    result = {"load_s": loaded, "second_call_s": second, "tok_s": batch * 64 / second}
    if which == "jinfer":
        result["num_compiles"] = llm.stats()["num_compiles"]
    return result


def run_first_calls(args) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {"JINFER_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
        for batch in (1, 16):
            results[f"b{batch}"] = {
                "jinfer_cold": subprocess_run("jinfer", args, env, batch),
                "jinfer_warm": subprocess_run("jinfer", args, env, batch),
                **({} if args.skip_hf else {"hf": subprocess_run("hf", args, {}, batch)})}
    print("| batch | engine | load s | second call s | second call tok/s | x HF | programs |")
    print("|---|---|---|---|---|---|---|")
    for batch, runs in results.items():
        hf = runs.get("hf", {}).get("tok_s")
        for name, r in runs.items():
            ratio = f"{r['tok_s'] / hf:.2f}" if hf else "-"
            print(f"| {batch[1:]} | {name} | {r['load_s']:.1f} | {r['second_call_s']:.2f} | "
                  f"{r['tok_s']:.1f} | {ratio} | {r.get('num_compiles', '-')} |")
    return results


def subprocess_run(which: str, args, env_extra: dict, batch: int = 0) -> dict:
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, __file__, "--child", which, "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads), "--batch", str(batch)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--child", choices=["jinfer", "hf"])
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--first-calls", action="store_true",
                   help="a new process's first (4 tokens) and second (64 tokens) calls")
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child and args.batch:
        print(json.dumps(first_calls(args.child, args.batch, args.threads)))
        return 0
    if args.child:
        fn = run_jinfer if args.child == "jinfer" else run_hf
        print(json.dumps(fn(args.new_tokens, args.threads)))
        return 0
    if args.first_calls:
        results = run_first_calls(args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    with tempfile.TemporaryDirectory() as cache:
        env = {"JINFER_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
        results = {"jinfer_cold": subprocess_run("jinfer", args, env),
                   "jinfer_warm": subprocess_run("jinfer", args, env)}
    if not args.skip_hf:
        results["hf"] = subprocess_run("hf", args, {})
    print("| engine | load s | TTFT s | tok/s b=1 (decode / end-to-end) | "
          "tok/s b=16 (decode / end-to-end) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['load_s']:.1f} | {r.get('ttft_s', float('nan')):.1f} | "
              f"{r['decode_tok_s_b1']:.1f} / {r['tok_s_b1']:.1f} | "
              f"{r['decode_tok_s_b16']:.1f} / {r['tok_s_b16']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
