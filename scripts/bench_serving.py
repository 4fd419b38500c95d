#!/usr/bin/env python
"""Online serving benchmark of jinfer's OpenAI-compatible server (the method of vLLM's
`vllm bench serve`), with the offline `LLM.generate` ceiling of the same requests.

The script launches `python -m jinfer.server MODEL ...` on loopback (a free port; it waits for
`/health`, shows the server's log if it fails, and stops it with SIGTERM at the end), or drives
a server that is already running (`--base-url`; then it can also drive any OpenAI-compatible
server, vLLM's included).
  - Requests: token-id prompts (`"prompt": [ids]`, so lengths are exact) of a seeded dataset:
    `random` (lengths uniform in [L(1-r), L(1+r)], vLLM's --random-range-ratio), `sharegpt-like`
    (prompt and output lengths drawn from a lognormal fit of ShareGPT's, no download), or
    `shared-prefix` (--num-prefixes prefixes of --prefix-len tokens, each request one of them
    plus its own suffix: prefix caching). Outputs are forced to their length (`max_tokens`,
    `ignore_eos: true`). Each rate of a sweep gets other token ids of the same lengths, so no
    run reuses another's prefix-cache blocks.
  - Load: Poisson arrivals at --request-rate (`inf`: all at once; --burstiness != 1: gamma
    intervals, as vLLM), optionally capped by --max-concurrency (a request that arrives while
    the cap is reached waits, and its timings start when it is sent, as vLLM's). A warm-up of
    the same lengths (other ids, all at once) runs first, its time reported apart: it carries
    the server's compiles. --request-rates 1 4 16 inf runs each rate in turn on one server.
  - Client: streaming `/v1/completions` with `stream_options.include_usage` through one httpx
    AsyncClient. As vLLM: a streamed chunk with a choice is one token arrival, its text empty
    or not (a model without a tokenizer streams empty text): TTFT = first arrival - send, ITL =
    gaps between arrivals, e2e = last arrival - send; the output token count comes from
    `usage.completion_tokens`, TPOT = (e2e - TTFT) / (output tokens - 1). A server that sends
    several tokens per chunk shows fewer, longer ITLs: `tokens_per_chunk` says so (and a
    separate finishing chunk with no token adds one ITL). A failed request (HTTP error,
    error event, broken or unfinished stream) is counted and its error shown, never dropped.
  - Report per rate: request/s, output and total tok/s (completed requests over the run's wall
    time, first arrival to last finish), TTFT, TPOT, ITL and e2e at mean/p50/p90/p99, errors,
    outputs of another length than asked, and the prefix-cache hit rate from the server's
    `/metrics` counters (`jinfer:prefix_cache_{queries,hits}_total`, or vLLM's) before and
    after the run, next to the dataset's ideal hits (every full block of an earlier prompt's
    prefix reused; in tokens, as the counters).
  - Offline ceiling (--offline-ceiling; on by default when the script launched the server):
    after the server stops, a subprocess runs the same requests through
    `LLM(...).generate(prompt_token_ids=..., SamplingParams(max_tokens=n, ignore_eos=True))`
    with the server's engine options, after a warm-up like the server's; server output tok/s
    over offline output tok/s is the figure of merit.

  python scripts/bench_serving.py --model llama3-1b --load-format dummy --out serve.json
  python scripts/bench_serving.py --model llama3-1b --load-format dummy \\
      --request-rates 1 4 16 64 inf --num-prompts 500 --out sweep.json --plot sweep.png
  python scripts/bench_serving.py --model llama3-1b --load-format dummy \\
      --dataset shared-prefix --prefix-len 512 --num-prefixes 8 --out prefix.json
  python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --model llama3-1b  # running
  python scripts/bench_serving.py --cpu-smoke --out /tmp/serve_smoke.json  # tiny, CPU, ~1-2 min
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench_latency import (CompileWatch, child_env, device_info, fmt, run_child,
                           setup_child_logging, write_smoke_model)
from bench_throughput import timed_generate
from jinfer.model.shapes import resolve_model_config

PERCENTILES = (50, 90, 99)
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "e2e"))
WARMUP_VARIANT = 1_000_000  # token-id variant of the warm-up requests (runs use 0, 1, ...)
# Server-side counters of the prefix cache (tokens queried / found), jinfer's then vLLM's names.
PREFIX_CACHE_METRICS = [("jinfer:prefix_cache_queries_total", "jinfer:prefix_cache_hits_total"),
                        ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
                        ("vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total")]


# ----------------------------------------------------------------------------- datasets

@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]   # token ids
    output_len: int     # max_tokens (forced: ignore_eos)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """vLLM's random-dataset interval: [floor(L(1-r)), ceil(L(1+r))], at least 1."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    return (max(1, math.floor(length * (1 - range_ratio))),
            max(1, math.ceil(length * (1 + range_ratio))))


def _lengths(rng, length: int, range_ratio: float, num: int) -> list[int]:
    low, high = length_bounds(length, range_ratio)
    return rng.integers(low, high + 1, num).tolist()


def _token_rng(seed: int, variant: int):
    """Token ids come from their own stream: the same lengths (seed) with other ids (variant)."""
    return np.random.default_rng([seed, variant])


def random_dataset(num: int, input_len: int, output_len: int, range_ratio: float,
                   vocab_size: int, seed: int, variant: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    prompt_lens = _lengths(rng, input_len, range_ratio, num)
    output_lens = _lengths(rng, output_len, range_ratio, num)
    tokens = _token_rng(seed, variant)
    return [Request(tokens.integers(0, vocab_size, p).tolist(), o)
            for p, o in zip(prompt_lens, output_lens)]


# ShareGPT-like lengths: ln(tokens) ~ Normal(mu, sigma), then vLLM's ShareGPT filter (drop
# prompts or outputs under 4 tokens, prompts over 1024, prompt + output over 2048; here: draw
# again). The means are fitted (this filter applied) to two published `bench serve` runs on
# ShareGPT: vLLM PR #18566 (1000 prompts of ShareGPT_Vicuna_unfiltered, Llama-3.1-8B
# tokenizer: 229,711 input / 203,068 output tokens) and sglang issue #1639 (2000 prompts:
# 453,502 / 376,493), i.e. about 230 prompt and 200 output tokens a request. The spreads are our
# assumption, not a fit (ShareGPT's prompts, from short questions to pasted documents, spread
# wider than its answers): sigma 1.3 and 0.9 give medians of about 150 and 140 after the filter.
SHAREGPT_PROMPT_LOGNORMAL = (5.135, 1.3)  # (mu, sigma): exp(mu) = 170 tokens before the filter
SHAREGPT_OUTPUT_LOGNORMAL = (4.934, 0.9)  # exp(mu) = 139 tokens


def sharegpt_like_lengths(num: int, max_model_len: int, rng) -> tuple[list[int], list[int]]:
    """(prompt lengths, output lengths): the fit above, then clipped to max_model_len (prompt
    to max_model_len - 1, output to what is left)."""
    prompts, outputs = np.zeros(0, np.int64), np.zeros(0, np.int64)
    while len(prompts) < num:
        p = np.rint(np.exp(rng.normal(*SHAREGPT_PROMPT_LOGNORMAL, 2 * num))).astype(np.int64)
        o = np.rint(np.exp(rng.normal(*SHAREGPT_OUTPUT_LOGNORMAL, 2 * num))).astype(np.int64)
        keep = (p >= 4) & (o >= 4) & (p <= 1024) & (p + o <= 2048)
        prompts, outputs = np.concatenate([prompts, p[keep]]), np.concatenate([outputs, o[keep]])
    prompts = np.minimum(prompts[:num], max_model_len - 1)
    outputs = np.maximum(1, np.minimum(outputs[:num], max_model_len - prompts))
    return prompts.tolist(), outputs.tolist()


def sharegpt_like_dataset(num: int, max_model_len: int, vocab_size: int, seed: int,
                          variant: int = 0) -> list[Request]:
    prompt_lens, output_lens = sharegpt_like_lengths(num, max_model_len,
                                                     np.random.default_rng(seed))
    tokens = _token_rng(seed, variant)
    return [Request(tokens.integers(0, vocab_size, p).tolist(), o)
            for p, o in zip(prompt_lens, output_lens)]


def shared_prefix_dataset(num: int, prefix_len: int, num_prefixes: int, suffix_len: int,
                          output_len: int, range_ratio: float, vocab_size: int, seed: int,
                          variant: int = 0) -> list[Request]:
    """Request i: prefix g(i) (g a seeded shuffle of i mod num_prefixes) + its own suffix of
    about suffix_len tokens (range_ratio)."""
    if num_prefixes < 1:
        raise ValueError(f"--num-prefixes must be at least 1, got {num_prefixes}")
    rng = np.random.default_rng(seed)
    suffix_lens = _lengths(rng, suffix_len, range_ratio, num)
    output_lens = _lengths(rng, output_len, range_ratio, num)
    groups = rng.permutation(np.arange(num) % num_prefixes).tolist()
    tokens = _token_rng(seed, variant)
    prefixes = [tokens.integers(0, vocab_size, prefix_len).tolist() for _ in range(num_prefixes)]
    return [Request(prefixes[g] + tokens.integers(0, vocab_size, s).tolist(), o)
            for g, s, o in zip(groups, suffix_lens, output_lens)]


def make_dataset(args, vocab_size: int, max_model_len: int, variant: int,
                 num: int | None = None) -> list[Request]:
    num = args.num_prompts if num is None else num
    if args.dataset == "random":
        requests = random_dataset(num, args.input_len, args.output_len, args.range_ratio,
                                  vocab_size, args.seed, variant)
    elif args.dataset == "sharegpt-like":
        requests = sharegpt_like_dataset(num, max_model_len, vocab_size, args.seed, variant)
    else:
        requests = shared_prefix_dataset(num, args.prefix_len, args.num_prefixes,
                                         args.suffix_len, args.output_len, args.range_ratio,
                                         vocab_size, args.seed, variant)
    longest = max((r.prompt_len + r.output_len for r in requests), default=0)
    if longest > max_model_len:
        raise ValueError(f"a request of {longest} tokens (prompt + output) exceeds "
                         f"max_model_len {max_model_len}: lower the lengths or --range-ratio")
    return requests


def ideal_prefix_hits(requests: list[Request], block_size: int) -> int:
    """Prompt tokens an unbounded block cache could serve, requests taken in order: the full
    blocks of each prompt's longest prefix that an earlier prompt already had (of its first
    prompt_len - 1 tokens: the last one is always computed)."""
    seen, hits = set(), 0
    for r in requests:
        key, matching = (), True
        for start in range(0, r.prompt_len - block_size, block_size):
            key = hash((key, tuple(r.prompt[start:start + block_size])))
            if matching and key in seen:
                hits += block_size
            else:
                matching = False
                seen.add(key)
    return hits


def dataset_stats(requests: list[Request], block_size: int) -> dict:
    p = [r.prompt_len for r in requests]
    o = [r.output_len for r in requests]
    hits = ideal_prefix_hits(requests, block_size)
    return {"num_requests": len(requests), "prompt_tokens": sum(p), "output_tokens": sum(o),
            "prompt_len": {"mean": float(np.mean(p)), "p50": float(np.median(p)),
                           "min": min(p), "max": max(p)},
            "output_len": {"mean": float(np.mean(o)), "p50": float(np.median(o)),
                           "min": min(o), "max": max(o)},
            "ideal_prefix_hit_tokens": hits, "ideal_prefix_hit_rate": hits / sum(p)}


# ----------------------------------------------------------------------------- load

def arrival_offsets(num: int, rate: float, seed: int, burstiness: float = 1.0) -> np.ndarray:
    """Send times (s from the start) of `num` requests: the first at 0, then intervals of a
    Poisson process at `rate` req/s (gamma(burstiness) intervals of the same mean, as vLLM's
    get_request); rate inf: all at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate and burstiness must be positive, got {rate}, "
                         f"{burstiness}")
    if math.isinf(rate):
        return np.zeros(num)
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


# ----------------------------------------------------------------------------- client

@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    expected_output_len: int
    success: bool = False
    error: str = ""
    output_tokens: int = 0     # usage.completion_tokens (else the token chunks counted)
    usage_reported: bool = False
    chunks: int = 0            # streamed chunks that carried a token
    ttft: float = 0.0          # s
    latency: float = 0.0       # s, send -> last token chunk
    itl: list[float] = dataclasses.field(default_factory=list)
    dispatch_lag: float = 0.0  # s the send came after its scheduled arrival (client-side load)


async def send_request(client, url: str, model: str, request: Request, temperature: float,
                       extra_body: dict | None = None) -> RequestResult:
    """One streaming completion; its timings and token counts, or its error."""
    result = RequestResult(request.prompt_len, request.output_len)
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
               "temperature": temperature, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True}, **(extra_body or {})}
    done = False
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):  # event separators, ": ping" comments
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = f"error event in the stream: {json.dumps(chunk['error'])[:300]}"
                    return result
                choices = chunk.get("choices") or []
                if choices:  # a token arrival, even with empty text (vLLM's rule)
                    if result.chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.chunks += 1
                if chunk.get("usage"):
                    result.output_tokens = int(chunk["usage"].get("completion_tokens") or 0)
                    result.usage_reported = True
    except Exception as e:  # connection refused or reset, timeouts, bad JSON: all counted
        result.error = f"{type(e).__name__}: {e}"[:300]
        return result
    if not done:
        result.error = "the stream ended without data: [DONE]"
    elif result.chunks == 0:
        result.error = "no token chunk before data: [DONE]"
    else:
        result.success, result.latency = True, last - start
        if not result.usage_reported:
            result.output_tokens = result.chunks
    return result


async def run_requests(client, url: str, model: str, requests: list[Request], rate: float,
                       max_concurrency: int | None, seed: int, burstiness: float,
                       temperature: float, desc: str,
                       extra_body: dict | None = None) -> tuple[list[RequestResult], float]:
    """Sends the requests at their Poisson arrival times; (results in order, wall seconds from
    the first arrival to the last finish)."""
    from tqdm import tqdm
    offsets = arrival_offsets(len(requests), rate, seed, burstiness)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc=desc, unit="req", file=sys.stderr)
    started = time.perf_counter()

    async def one(request: Request, offset: float) -> RequestResult:
        await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
        lag = time.perf_counter() - (started + offset)
        async with limit:
            result = await send_request(client, url, model, request, temperature, extra_body)
        result.dispatch_lag = lag
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
    finally:
        bar.close()
    return list(results), time.perf_counter() - started


# ----------------------------------------------------------------------------- metrics

def latency_stats(seconds) -> dict:
    """mean and percentiles in ms (None where there is no value)."""
    ms = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p))
                                         for p in PERCENTILES}}


def tpot(result: RequestResult) -> float | None:
    """(e2e - TTFT) / (output tokens - 1); None for a one-token output."""
    if result.output_tokens < 2:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.success]
    duration_s = max(duration_s, 1e-9)
    prompt_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    errors = collections.Counter(r.error for r in results if not r.success)
    chunks = sum(r.chunks for r in ok)
    return {
        "num_requests": len(results), "completed": len(ok), "errors": sum(errors.values()),
        "error_samples": [{"error": e, "count": n} for e, n in errors.most_common(5)],
        "duration_s": duration_s, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_tok_s": output_tokens / duration_s,
        "total_tok_s": (prompt_tokens + output_tokens) / duration_s,
        # Little's law: requests in flight on average, from the client's side.
        "mean_concurrency": sum(r.latency for r in ok) / duration_s,
        "output_len_mismatches": sum(r.output_tokens != r.expected_output_len for r in ok),
        "usage_missing": sum(not r.usage_reported for r in ok),
        "tokens_per_chunk": output_tokens / chunks if chunks else None,
        "ttft_ms": latency_stats(r.ttft for r in ok),
        "tpot_ms": latency_stats(t for t in map(tpot, ok) if t is not None),
        "itl_ms": latency_stats(x for r in ok for x in r.itl),
        "e2e_ms": latency_stats(r.latency for r in ok),
        "dispatch_lag_ms": latency_stats(r.dispatch_lag for r in results),
    }


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value summed over its label sets}."""
    values: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # name{label="value",...} value [timestamp]
            name, rest = line[:line.index("{")], line[line.rindex("}") + 1:]
        else:
            name, _, rest = line.partition(" ")
        with contextlib.suppress(ValueError, IndexError):
            values[name] += float(rest.split()[0])
    return dict(values)


def prefix_cache_delta(before: dict | None, after: dict | None) -> dict | None:
    """Hit rate of the prefix cache over a run, from the counters before and after it; None
    when the server does not export them."""
    if before is None or after is None:
        return None
    for queries, hits in PREFIX_CACHE_METRICS:
        if queries in after and hits in after:
            q = after[queries] - before.get(queries, 0.0)
            h = after[hits] - before.get(hits, 0.0)
            return {"metric": queries, "queries": q, "hits": h,
                    "hit_rate": h / q if q > 0 else None}
    return None


def counter_deltas(before: dict | None, after: dict | None) -> dict:
    """Every counter (`*_total`) that moved during the run."""
    if before is None or after is None:
        return {}
    return {k: v - before.get(k, 0.0) for k, v in after.items()
            if k.endswith("_total") and v != before.get(k, 0.0)}


async def scrape_metrics(client, base_url: str) -> dict | None:
    try:
        response = await client.get(f"{base_url}/metrics")
    except Exception:  # a server without /metrics: the hit rate is left out
        return None
    return parse_prometheus(response.text) if response.status_code == 200 else None


# ----------------------------------------------------------------------------- the sweep

def make_client(num_connections: int, request_timeout: float):
    """One AsyncClient for the whole benchmark: a connection per request in flight (httpx's
    default pool of 100 would queue requests inside the client), no proxies from the
    environment (loopback)."""
    import httpx
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=num_connections,
                            max_keepalive_connections=num_connections),
        timeout=httpx.Timeout(request_timeout, connect=60.0), trust_env=False)


async def first_model_id(client, base_url: str) -> str | None:
    try:
        response = await client.get(f"{base_url}/v1/models")
        return response.json()["data"][0]["id"] if response.status_code == 200 else None
    except Exception:
        return None


async def run_sweep(base_url: str, model: str | None, runs: list[tuple[float, list[Request]]],
                    warmup: list[Request], args) -> dict:
    """The warm-up, then each (rate, requests) in turn; each run's summary and server
    counters."""
    url = f"{base_url}/v1/completions"
    largest = max([len(warmup)] + [len(r) for _, r in runs])
    async with make_client(args.max_concurrency or largest + 8, args.request_timeout) as client:
        try:
            health = (await client.get(f"{base_url}/health")).status_code
        except Exception as e:
            raise RuntimeError(f"no server answers at {base_url}: {type(e).__name__}: {e}")
        if health != 200:
            print(f"{base_url}/health answered {health}; going on", file=sys.stderr)
        model = args.served_model_name or await first_model_id(client, base_url) or model
        if model is None:
            raise RuntimeError("no model name: pass --model or --served-model-name (the server "
                               "lists none at /v1/models)")
        out = {"model_name": model, "runs": []}
        if warmup:
            results, elapsed = await run_requests(
                client, url, model, warmup, float("inf"), args.max_concurrency, args.seed,
                1.0, args.temperature, "warm-up")
            summary = summarize(results, elapsed)
            out["warmup"] = {"num_requests": len(warmup), "duration_s": elapsed,
                             "errors": summary["errors"],
                             "error_samples": summary["error_samples"]}
            print(f"warm-up: {len(warmup)} requests in {elapsed:.1f} s "
                  f"({summary['errors']} errors)", file=sys.stderr)
        for index, (rate, requests) in enumerate(runs):
            before = await scrape_metrics(client, base_url)
            results, elapsed = await run_requests(
                client, url, model, requests, rate, args.max_concurrency, args.seed + index,
                args.burstiness, args.temperature, f"rate {rate:g} req/s")
            after = await scrape_metrics(client, base_url)
            run = {"request_rate": rate, "max_concurrency": args.max_concurrency,
                   "burstiness": args.burstiness, **summarize(results, elapsed),
                   "prefix_cache": prefix_cache_delta(before, after),
                   "server_counters": counter_deltas(before, after)}
            out["runs"].append(run)
            if run["errors"]:
                print(f"rate {rate:g}: {run['errors']} of {len(results)} requests failed, "
                      f"e.g. {run['error_samples'][0]['error']}", file=sys.stderr)
        return out


# ----------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_options(args) -> dict:
    """The engine options given on the command line (the rest: the engine's defaults), the
    same for the server and the offline ceiling."""
    options = {"load_format": args.load_format, "dtype": args.dtype,
               "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "max_num_batched_tokens": args.max_num_batched_tokens,
               "enable_prefix_caching": args.enable_prefix_caching,
               "gpu_memory_utilization": args.gpu_memory_utilization,
               "tensor_parallel_size": args.tensor_parallel_size}
    return {k: v for k, v in options.items() if v is not None}


def server_command(model: str, port: int, options: dict, extra: str = "") -> list[str]:
    """`python -m jinfer.server MODEL --host 127.0.0.1 --port P` and vLLM-style flags."""
    cmd = [sys.executable, "-m", "jinfer.server", model, "--host", "127.0.0.1",
           "--port", str(port)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            cmd += [flag, str(value)]
    return cmd + shlex.split(extra)


class ServerProcess:
    """A server subprocess, its output in a log file; `with` waits for GET /health to answer
    200 and stops the process (SIGTERM, then SIGKILL after `stop_timeout`) on the way out."""

    def __init__(self, cmd: list[str], base_url: str, log_path: str, env: dict | None = None,
                 startup_timeout: float = 900.0, stop_timeout: float = 30.0):
        self.cmd, self.base_url, self.log_path = cmd, base_url, log_path
        self.env, self.startup_timeout, self.stop_timeout = env, startup_timeout, stop_timeout
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return pathlib.Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ServerProcess":
        import httpx
        started = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(self.env or {})})
        try:
            with httpx.Client(timeout=5.0, trust_env=False) as client:
                while True:
                    if self.process.poll() is not None:
                        raise RuntimeError(
                            f"the server exited (code {self.process.returncode}) before "
                            f"{self.base_url}/health answered. Command: {shlex.join(self.cmd)}\n"
                            f"Its log ({self.log_path}), last lines:\n{self.log_tail()}")
                    if time.perf_counter() - started > self.startup_timeout:
                        raise RuntimeError(
                            f"the server did not answer {self.base_url}/health within "
                            f"{self.startup_timeout:.0f} s. Command: {shlex.join(self.cmd)}\n"
                            f"Its log ({self.log_path}), last lines:\n{self.log_tail()}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{self.base_url}/health").status_code == 200:
                            break
                    time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is not None:
            if self.startup_s is not None:  # it was up, and died before being stopped
                print(f"the server exited by itself (code {self.process.returncode}); its log "
                      f"({self.log_path}), last lines:\n{self.log_tail()}", file=sys.stderr)
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            print(f"the server did not stop within {self.stop_timeout:.0f} s of SIGTERM: killed",
                  file=sys.stderr)
            self.process.kill()
            return self.process.wait()


# ----------------------------------------------------------------------------- offline ceiling

def offline_child(spec: dict) -> dict:
    """The same requests through LLM.generate (all at once), after a warm-up: the ceiling."""
    from jinfer import LLM
    watch = CompileWatch()
    started = time.perf_counter()
    llm = LLM(spec["model"], **spec["engine_options"])
    load_s = time.perf_counter() - started

    warmup_s = (timed_generate(llm, spec["warm_prompts"], spec["warm_output_lens"],
                               spec["temperature"]) if spec["warm_prompts"] else 0.0)
    before = watch.snapshot()
    elapsed = timed_generate(llm, spec["prompts"], spec["output_lens"], spec["temperature"])
    after = watch.snapshot()
    prompt_tokens = sum(map(len, spec["prompts"]))
    output_tokens = sum(spec["output_lens"])
    return {**device_info(), "load_s": load_s, "warmup_s": warmup_s, "elapsed_s": elapsed,
            "num_requests": len(spec["prompts"]), "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "request_throughput": len(spec["prompts"]) / elapsed,
            "output_tok_s": output_tokens / elapsed,
            "total_tok_s": (prompt_tokens + output_tokens) / elapsed,
            "compiles_timed": after[0] - before[0]}


# ----------------------------------------------------------------------------- report

def print_report(results: dict) -> None:
    d = results["dataset"]
    print(f"\n{results['label']}: dataset {results['config']['dataset']}, "
          f"{d['num_requests']} requests a run, prompts {d['prompt_len']['mean']:.0f} tokens on "
          f"average ({d['prompt_len']['min']}-{d['prompt_len']['max']}), outputs "
          f"{d['output_len']['mean']:.0f} ({d['output_len']['min']}-{d['output_len']['max']}), "
          f"ignore_eos, temperature {results['config']['temperature']}; max concurrency "
          f"{results['config']['max_concurrency'] or 'unbounded'}; device "
          f"{results.get('device', '?')}")
    if "server_startup_s" in results:
        print(f"server start to /health: {results['server_startup_s']:.1f} s")
    if "warmup" in results:
        w = results["warmup"]
        print(f"warm-up (compiles): {w['num_requests']} requests at once, {w['duration_s']:.1f} s"
              f", {w['errors']} errors")
    offline = results.get("offline")
    print("\n| rate req/s | completed / errors | req/s | output tok/s | total tok/s | "
          "TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | "
          "prefix hits | server / offline |")
    print("|---" * 11 + "|")
    for r in results["runs"]:
        cells = [f"{fmt(r[k]['p50'], 1)} / {fmt(r[k]['p99'], 1)}" for k, _ in LATENCIES]
        hits = r["prefix_cache"] and r["prefix_cache"]["hit_rate"]
        ratio = f"{r['output_tok_s'] / offline['output_tok_s']:.2f}" if offline else "—"
        print(f"| {r['request_rate']:g} | {r['completed']} / {r['errors']} | "
              f"{r['request_throughput']:.2f} | {r['output_tok_s']:,.0f} | "
              f"{r['total_tok_s']:,.0f} | " + " | ".join(cells) +
              f" | {'—' if hits is None else f'{100 * hits:.1f}%'} | {ratio} |")
    if offline:
        print(f"| offline LLM.generate | {offline['num_requests']} / 0 | "
              f"{offline['request_throughput']:.2f} | {offline['output_tok_s']:,.0f} | "
              f"{offline['total_tok_s']:,.0f} | | | | | | 1 |")
    for r in results["runs"]:
        print(f"\nrate {r['request_rate']:g} req/s: {r['duration_s']:.2f} s, mean concurrency "
              f"{r['mean_concurrency']:.1f}, {fmt(r['tokens_per_chunk'], 2)} tokens per chunk, "
              f"{r['output_len_mismatches']} outputs of another length than asked, client "
              f"dispatch lag p99 {fmt(r['dispatch_lag_ms']['p99'], 1)} ms")
        print("| ms | mean | " + " | ".join(f"p{p}" for p in PERCENTILES) + " |")
        print("|---" * (2 + len(PERCENTILES)) + "|")
        for key, name in LATENCIES:
            print(f"| {name} | {fmt(r[key]['mean'], 2)} | " +
                  " | ".join(fmt(r[key][f'p{p}'], 2) for p in PERCENTILES) + " |")
        for e in r["error_samples"]:
            print(f"  error x{e['count']}: {e['error']}")
        if r["prefix_cache"]:
            pc = r["prefix_cache"]
            print(f"prefix cache ({pc['metric']}): {pc['hits']:,.0f} tokens hit of "
                  f"{pc['queries']:,.0f} queried; ideal: {d['ideal_prefix_hit_tokens']:,} tokens "
                  f"hit ({100 * d['ideal_prefix_hit_rate']:.1f}% of the prompt tokens)")
    if offline:
        print(f"\noffline ceiling: load {offline['load_s']:.1f} s, warm-up "
              f"{offline['warmup_s']:.1f} s, timed {offline['elapsed_s']:.2f} s, "
              f"{offline['compiles_timed']} JAX compiles in the timed run")


def plot(path: str, results: dict) -> bool:
    """TTFT and TPOT (p50, p99) against the output tok/s reached at each rate, with the offline
    ceiling; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: no plot written (the JSON has the figures)",
              file=sys.stderr)
        return False
    runs = sorted((r for r in results["runs"] if r["completed"]),
                  key=lambda r: r["request_rate"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, name) in zip(axes, LATENCIES[:2]):
        x = [r["output_tok_s"] for r in runs]
        for p, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot(x, [r[key][p] for r in runs], style, label=f"{name} {p}")
        for r in runs:
            ax.annotate(f"{r['request_rate']:g}/s", (r["output_tok_s"], r[key]["p50"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        if results.get("offline"):
            ax.axvline(results["offline"]["output_tok_s"], color="k", ls=":",
                       label="offline LLM.generate")
        ax.set_xlabel("output tokens/s (server)")
        ax.set_ylabel(f"{name} ms")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['label']}, {results['config']['dataset']}: latency vs throughput "
                 f"over request rates ({results.get('device', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- parent

def model_config(model: str | None):
    """The ModelConfig of a shape name, a HF folder or a .gguf (None: jinfer's default)."""
    if model is None or str(model).lower().endswith(".gguf"):
        from jinfer.loader import resolve_model_path
        from jinfer.loader.gguf_weights import _open, gguf_config
        path = resolve_model_path(model)
        return gguf_config(_open(path), path)
    return resolve_model_config(model)


def apply_cpu_smoke(args, workdir: str) -> None:
    """bench_latency's 2-layer smoke model (random weights) and a tiny workload, on the CPU."""
    args.model, args.load_format = write_smoke_model(workdir), "dummy"
    args.dtype = args.dtype or "float32"
    args.max_model_len, args.max_num_seqs = 128, 4
    args.num_prompts, args.input_len, args.output_len = 8, 40, 8
    args.prefix_len, args.suffix_len, args.num_prefixes = 32, 16, 2
    args.request_rates = args.request_rates or [16.0, float("inf")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("server (launched unless --base-url)")
    g.add_argument("--base-url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    g.add_argument("--model", default=None,
                   help="what the server loads: a HF folder, a .gguf, or a shape name of "
                        "jinfer/model/shapes.py with --load-format dummy; also gives the "
                        "vocabulary size and max_model_len for the prompts")
    g.add_argument("--load-format", default=None, help="e.g. dummy (random weights)")
    g.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                   help="the server's and the offline ceiling's tensor parallelism")
    g.add_argument("--server-args", default="",
                   help="more flags for the server, one string (not given to the offline run)")
    g.add_argument("--server-timeout", type=float, default=900.0,
                   help="seconds to wait for /health")
    g.add_argument("--server-log", default=None, help="keep the server's log here")
    g.add_argument("--served-model-name", default=None,
                   help="the request's model field (default: /v1/models' first, else --model)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="prompt token ids are below this (default: the model's vocabulary)")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", default="random", choices=["random", "sharegpt-like",
                                                           "shared-prefix"])
    d.add_argument("--num-prompts", type=int, default=1000)
    d.add_argument("--input-len", type=int, default=1024, help="random: prompt tokens")
    d.add_argument("--output-len", type=int, default=128, help="random, shared-prefix")
    d.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [L(1-r), L(1+r)] (random, shared-prefix)")
    d.add_argument("--prefix-len", type=int, default=256, help="shared-prefix")
    d.add_argument("--suffix-len", type=int, default=256, help="shared-prefix")
    d.add_argument("--num-prefixes", type=int, default=10, help="shared-prefix")
    d.add_argument("--block-size", type=int, default=16,
                   help="KV block size, for the dataset's ideal prefix-cache hit rate")
    d.add_argument("--seed", type=int, default=0)
    ld = p.add_argument_group("load")
    ld.add_argument("--request-rate", type=float, default=float("inf"),
                    help="requests/s, Poisson arrivals (inf: all at once)")
    ld.add_argument("--request-rates", type=float, nargs="+", default=None,
                    help="a sweep: each rate in turn on the same server (overrides "
                         "--request-rate)")
    ld.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of the intervals (1: Poisson; <1 burstier)")
    ld.add_argument("--max-concurrency", type=int, default=None)
    ld.add_argument("--num-warmup-prompts", type=int, default=None,
                    help="warm-up requests (same lengths, other ids, all at once) before the "
                         "timed runs (default: --num-prompts; 0: none)")
    ld.add_argument("--temperature", type=float, default=0.0)
    ld.add_argument("--request-timeout", type=float, default=3600.0)
    o = p.add_argument_group("output")
    o.add_argument("--offline-ceiling", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the requests through LLM.generate after the server stops "
                        "(default: on when this script launched the server)")
    o.add_argument("--out", default=None, help="JSON file for the results")
    o.add_argument("--plot", default=None, help="PNG of latency vs throughput over the rates")
    o.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model and workload on the CPU: checks the script runs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def jsonable(obj):
    """inf (the rate of requests sent all at once) as the string "inf": strict JSON."""
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def describe_device(cpu: bool) -> str:
    """The GPU's name from nvidia-smi (the parent never starts JAX: the server needs the GPU)."""
    if cpu:
        return "cpu"
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        setup_child_logging()
        print(json.dumps(offline_child(json.loads(pathlib.Path(args.spec).read_text()))))
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        if args.cpu_smoke:
            apply_cpu_smoke(args, workdir)
        launch = args.base_url is None
        if launch and args.model is None:
            raise SystemExit("--model is required when the script launches the server")
        config = None
        if args.model is not None and (args.vocab_size is None or args.max_model_len is None):
            try:
                config = model_config(args.model)
            except (ValueError, FileNotFoundError) as e:
                if args.vocab_size is None:
                    raise SystemExit(f"{e}\n(pass --vocab-size, and --max-model-len, for a "
                                     f"model this script cannot read)")
        if args.vocab_size is None and config is None:
            raise SystemExit("--vocab-size is required without --model")
        vocab_size = args.vocab_size or config.vocab_size
        max_model_len = args.max_model_len or (
            min(config.max_position_embeddings, 8192) if config else 8192)  # jinfer's default
        rates = args.request_rates or [args.request_rate]
        runs = [(rate, make_dataset(args, vocab_size, max_model_len, variant=i))
                for i, rate in enumerate(rates)]
        num_warmup = args.num_prompts if args.num_warmup_prompts is None else \
            args.num_warmup_prompts
        warmup = make_dataset(args, vocab_size, max_model_len, WARMUP_VARIANT, num_warmup) \
            if num_warmup else []
        options = engine_options(args)
        results = {"label": (pathlib.Path(args.model).name if args.cpu_smoke else args.model)
                   or args.base_url,
                   "config": {k: v for k, v in vars(args).items() if k not in ("child", "spec")},
                   "engine_options": options, "vocab_size": vocab_size,
                   "max_model_len": max_model_len,
                   "dataset": dataset_stats(runs[0][1], args.block_size)}
        env = child_env("jinfer", args.cpu_smoke)
        if launch:
            base_url = f"http://127.0.0.1:{free_port()}"
            cmd = server_command(args.model, int(base_url.rsplit(":", 1)[1]), options,
                                 args.server_args)
            log_path = args.server_log or str(pathlib.Path(workdir) / "server.log")
            print(f"starting: {shlex.join(cmd)} (log: {log_path})", file=sys.stderr)
            results["server_command"] = shlex.join(cmd)
            server = ServerProcess(cmd, base_url, log_path, env, args.server_timeout)
        else:
            base_url, server = args.base_url.rstrip("/"), contextlib.nullcontext()
        with server:
            if launch:
                results["server_startup_s"] = server.startup_s
            results.update(asyncio.run(run_sweep(base_url, args.model, runs, warmup, args)))
        results["device"] = describe_device(args.cpu_smoke)
        if launch:
            results["server_exit_code"] = server.process.returncode
        if args.offline_ceiling if args.offline_ceiling is not None else launch:
            if args.model is None:
                raise SystemExit("--offline-ceiling needs --model")
            first = runs[0][1]
            spec = {"model": args.model, "engine_options": options,
                    "temperature": args.temperature,
                    "prompts": [r.prompt for r in first],
                    "output_lens": [r.output_len for r in first],
                    "warm_prompts": [r.prompt for r in warmup],
                    "warm_output_lens": [r.output_len for r in warmup]}
            try:
                results["offline"] = run_child(__file__, "offline", spec, env)
            except RuntimeError as e:  # the server's figures are still reported
                results["offline_error"] = str(e)
                print(f"offline ceiling failed: {e}", file=sys.stderr)
            else:
                results["device"] = results["offline"]["device"]
                for run in results["runs"]:
                    run["server_over_offline"] = (run["output_tok_s"] /
                                                  results["offline"]["output_tok_s"])
    print_report(results)
    if args.plot and plot(args.plot, results):
        results["plot"] = args.plot
        print(f"plot: {args.plot}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(jsonable(results), f, indent=2)
        print(f"results: {args.out}")
    failed = sum(r["errors"] for r in results["runs"])
    return 1 if failed == sum(r["num_requests"] for r in results["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
