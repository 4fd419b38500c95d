"""scripts/bench_serving.py on the CPU, without jinfer's server: its datasets (exact lengths,
seeded, a shared prefix really shared), the Poisson schedule, the metric arithmetic on
synthetic timings, the Prometheus scrape, the server launcher (a stand-in process), and its
HTTP client end to end against a fake OpenAI-compatible SSE server on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import pathlib
import signal
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "scripts"))
bs = pytest.importorskip("bench_serving")
httpx = pytest.importorskip("httpx")

FAIL_HTTP, FAIL_BROKEN = 999_999, 999_998  # a prompt starting with this id: HTTP 500 / cut off


# ----------------------------------------------------------------------------- datasets

def test_length_bounds_follow_vllms_range_ratio():
    assert bs.length_bounds(100, 0.0) == (100, 100)
    assert bs.length_bounds(100, 0.25) == (75, 125)
    assert bs.length_bounds(3, 0.5) == (1, 5)          # floor(1.5), ceil(4.5)
    assert bs.length_bounds(1, 0.9) == (1, 2)          # never 0 tokens
    with pytest.raises(ValueError):
        bs.length_bounds(100, 1.0)


def test_random_dataset_lengths_are_exact_and_seeded():
    reqs = bs.random_dataset(50, 32, 8, 0.0, vocab_size=500, seed=3)
    assert [r.prompt_len for r in reqs] == [32] * 50
    assert [r.output_len for r in reqs] == [8] * 50
    assert all(0 <= t < 500 for r in reqs for t in r.prompt)
    assert bs.random_dataset(50, 32, 8, 0.0, 500, seed=3) == reqs
    assert bs.random_dataset(50, 32, 8, 0.0, 500, seed=4) != reqs

    ranged = bs.random_dataset(400, 100, 20, 0.5, 500, seed=0)
    prompt_lens = [r.prompt_len for r in ranged]
    output_lens = [r.output_len for r in ranged]
    assert min(prompt_lens) >= 50 and max(prompt_lens) <= 150 and len(set(prompt_lens)) > 20
    assert min(output_lens) >= 10 and max(output_lens) <= 30
    # Another variant (a sweep's next rate): the same lengths, other token ids.
    other = bs.random_dataset(400, 100, 20, 0.5, 500, seed=0, variant=1)
    assert [(r.prompt_len, r.output_len) for r in other] == list(zip(prompt_lens, output_lens))
    assert all(a.prompt != b.prompt for a, b in zip(ranged, other))


def test_sharegpt_like_lengths_match_the_stated_fit_and_clip():
    reqs = bs.sharegpt_like_dataset(20000, 4096, vocab_size=1000, seed=0)
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.output_len for r in reqs])
    assert p.min() >= 4 and o.min() >= 4 and p.max() <= 1024 and (p + o).max() <= 2048
    assert 230 * 0.95 < p.mean() < 230 * 1.05       # the means the comment cites
    assert 203 * 0.95 < o.mean() < 203 * 1.05
    assert np.median(p) < p.mean()                   # long-tailed
    small = bs.sharegpt_like_dataset(300, 128, vocab_size=1000, seed=1)
    assert all(r.prompt_len + r.output_len <= 128 and r.output_len >= 1 for r in small)
    assert small == bs.sharegpt_like_dataset(300, 128, vocab_size=1000, seed=1)


def test_shared_prefix_dataset_shares_exactly_its_prefixes():
    reqs = bs.shared_prefix_dataset(20, prefix_len=32, num_prefixes=4, suffix_len=8,
                                    output_len=5, range_ratio=0.0, vocab_size=1000, seed=0)
    assert [r.prompt_len for r in reqs] == [40] * 20 and [r.output_len for r in reqs] == [5] * 20
    prefixes = [tuple(r.prompt[:32]) for r in reqs]
    assert len(set(prefixes)) == 4
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [5, 5, 5, 5]
    assert len({tuple(r.prompt[32:]) for r in reqs}) == 20  # each suffix its own
    order = {p: i for i, p in enumerate(dict.fromkeys(prefixes))}
    assert [order[p] for p in prefixes] != [i % 4 for i in range(20)]  # shuffled
    assert reqs == bs.shared_prefix_dataset(20, 32, 4, 8, 5, 0.0, 1000, seed=0)
    # An unbounded cache serves every prefix but the first of each group (32 = 2 blocks).
    assert bs.ideal_prefix_hits(reqs, 16) == (20 - 4) * 32
    assert bs.dataset_stats(reqs, 16)["ideal_prefix_hit_rate"] == pytest.approx(16 * 32 / 800)
    assert bs.ideal_prefix_hits(bs.random_dataset(20, 40, 5, 0.0, 1000, 0), 16) == 0


def test_ideal_hits_count_full_blocks_of_the_common_prefix_only():
    a = bs.Request(list(range(40)), 1)
    b = bs.Request(list(range(20)) + [7] * 20, 1)   # shares 20 tokens: one full block of 16
    assert bs.ideal_prefix_hits([a, b], 16) == 16
    assert bs.ideal_prefix_hits([a, a], 16) == 32
    c = bs.Request(list(range(32)), 1)  # its second block holds its last token: not reusable
    assert bs.ideal_prefix_hits([a, c], 16) == 16


def test_make_dataset_refuses_requests_longer_than_max_model_len():
    args = bs.parse_args(["--dataset", "random", "--num-prompts", "4", "--input-len", "100",
                          "--output-len", "30"])
    assert len(bs.make_dataset(args, 1000, 130, variant=0)) == 4
    with pytest.raises(ValueError, match="max_model_len"):
        bs.make_dataset(args, 1000, 129, variant=0)


# ----------------------------------------------------------------------------- schedule

def test_poisson_arrivals_have_the_rate_and_are_seeded():
    t = bs.arrival_offsets(20000, 4.0, seed=0)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)      # exponential: std == mean
    assert np.array_equal(t, bs.arrival_offsets(20000, 4.0, seed=0))
    bursty = np.diff(bs.arrival_offsets(20000, 4.0, seed=0, burstiness=0.25))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05) and bursty.std() > 1.5 * gaps.std()
    assert not bs.arrival_offsets(5, math.inf, seed=0).any()  # all at once
    with pytest.raises(ValueError):
        bs.arrival_offsets(5, 0.0, seed=0)


# ----------------------------------------------------------------------------- metrics

def result(ttft, itl, output_tokens, expected=None, prompt_len=10, chunks=None, usage=True):
    latency = ttft + sum(itl)
    return bs.RequestResult(prompt_len, expected or output_tokens, success=True,
                            output_tokens=output_tokens, usage_reported=usage,
                            chunks=chunks or len(itl) + 1, ttft=ttft, latency=latency,
                            itl=list(itl))


def test_latency_stats_are_ms_percentiles():
    s = bs.latency_stats([i / 1e3 for i in range(1, 101)])
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1)
    assert s["p99"] == pytest.approx(99.01)
    assert bs.latency_stats([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_excludes_the_first_token():
    r = result(0.5, [0.1, 0.1, 0.1], 4)
    assert bs.tpot(r) == pytest.approx(0.1)
    r = result(0.5, [0.3], 4, chunks=2)  # 4 tokens in 2 chunks: TPOT from the token count
    assert bs.tpot(r) == pytest.approx(0.1)
    assert bs.tpot(result(0.5, [], 1)) is None


def test_summarize_counts_errors_and_throughput_of_completed_requests():
    ok = [result(0.1, [0.02] * 9, 10), result(0.3, [0.04] * 4, 5, expected=8, prompt_len=20),
          result(0.2, [0.05], 4, chunks=2, usage=False)]
    failed = [bs.RequestResult(30, 8, error="HTTP 500: boom"),
              bs.RequestResult(30, 8, error="HTTP 500: boom"),
              bs.RequestResult(30, 8, error="ConnectError: refused")]
    s = bs.summarize(ok + failed, duration_s=2.0)
    assert (s["num_requests"], s["completed"], s["errors"]) == (6, 3, 3)
    assert s["error_samples"][0] == {"error": "HTTP 500: boom", "count": 2}
    assert s["prompt_tokens"] == 40 and s["output_tokens"] == 19
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_tok_s"] == pytest.approx(9.5) and s["total_tok_s"] == pytest.approx(29.5)
    assert s["output_len_mismatches"] == 1 and s["usage_missing"] == 1
    assert s["tokens_per_chunk"] == pytest.approx(19 / 17)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)
    itls = [20.0] * 9 + [40.0] * 4 + [50.0]
    assert s["itl_ms"]["mean"] == pytest.approx(np.mean(itls))
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(itls, 90))
    tpots = [20.0, 160 / 4, 50 / 3]
    assert s["tpot_ms"]["mean"] == pytest.approx(np.mean(tpots))
    assert s["e2e_ms"]["p50"] == pytest.approx(280.0)  # 280, 460, 250 ms
    assert s["mean_concurrency"] == pytest.approx((0.28 + 0.46 + 0.25) / 2.0)


def test_prometheus_counters_give_the_prefix_cache_hit_rate():
    before = bs.parse_prometheus(
        "# HELP jinfer:prefix_cache_queries_total Tokens looked up\n"
        "# TYPE jinfer:prefix_cache_queries_total counter\n"
        'jinfer:prefix_cache_queries_total{model_name="m"} 100\n'
        'jinfer:prefix_cache_hits_total{model_name="m"} 10\n'
        "jinfer:num_requests_running 3\n")
    after = bs.parse_prometheus(
        'jinfer:prefix_cache_queries_total{model_name="m",engine="0"} 250.0\n'
        'jinfer:prefix_cache_queries_total{model_name="m",engine="1"} 50.0\n'
        'jinfer:prefix_cache_hits_total{model_name="m"} 160 1700000000000\n'
        "jinfer:num_requests_running 0\n")
    assert before["jinfer:num_requests_running"] == 3.0
    assert after["jinfer:prefix_cache_queries_total"] == 300.0  # summed over label sets
    pc = bs.prefix_cache_delta(before, after)
    assert (pc["queries"], pc["hits"], pc["hit_rate"]) == (200.0, 150.0, 0.75)
    assert bs.counter_deltas(before, after) == {"jinfer:prefix_cache_queries_total": 200.0,
                                                "jinfer:prefix_cache_hits_total": 150.0}
    assert bs.prefix_cache_delta(before, None) is None
    assert bs.prefix_cache_delta({}, {"other_total": 1.0}) is None
    vllm = bs.prefix_cache_delta({}, {"vllm:prefix_cache_queries_total": 10.0,
                                      "vllm:prefix_cache_hits_total": 0.0})
    assert vllm["hit_rate"] == 0.0


def test_jsonable_writes_inf_as_a_string():
    assert bs.jsonable({"r": [math.inf, 1.5], "x": (2, -math.inf)}) == {"r": ["inf", 1.5],
                                                                          "x": [2, "-inf"]}


# ----------------------------------------------------------------------------- server launch

def test_server_command_passes_only_the_options_given():
    args = bs.parse_args(["--model", "llama3-1b", "--load-format", "dummy", "--max-num-seqs",
                          "32", "--no-enable-prefix-caching"])
    cmd = bs.server_command("llama3-1b", 8123, bs.engine_options(args), "--foo 1")
    assert cmd[:4] == [sys.executable, "-m", "jinfer.server", "llama3-1b"]
    assert cmd[4:] == ["--host", "127.0.0.1", "--port", "8123", "--load-format", "dummy",
                       "--max-num-seqs", "32", "--no-enable-prefix-caching", "--foo", "1"]
    args = bs.parse_args(["--enable-prefix-caching", "--dtype", "bfloat16"])
    assert bs.engine_options(args) == {"dtype": "bfloat16", "enable_prefix_caching": True}


HEALTH_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("stand-in server up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_server_process_waits_for_health_and_stops_with_sigterm(tmp_path):
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    server = bs.ServerProcess([sys.executable, "-c", HEALTH_SERVER, str(port)], url,
                              str(tmp_path / "log"), startup_timeout=30)
    with server:
        assert server.process.poll() is None and server.startup_s > 0
        assert httpx.get(f"{url}/health", trust_env=False).status_code == 200
    assert server.process.returncode == -signal.SIGTERM
    assert "stand-in server up" in server.log_tail()


def test_server_process_shows_the_log_when_the_server_dies_or_hangs(tmp_path):
    port = bs.free_port()
    url = f"http://127.0.0.1:{port}"
    dies = bs.ServerProcess([sys.executable, "-c", "print('no such model'); raise SystemExit(3)"],
                            url, str(tmp_path / "a.log"), startup_timeout=30)
    with pytest.raises(RuntimeError, match=r"(?s)exited \(code 3\).*no such model"):
        with dies:
            pass
    hangs = bs.ServerProcess([sys.executable, "-c",
                              "print('loading', flush=True); import time; time.sleep(60)"],
                             url, str(tmp_path / "b.log"), startup_timeout=1.0)
    with pytest.raises(RuntimeError, match=r"(?s)within 1 s.*loading"):
        with hangs:
            pass
    assert hangs.process.returncode == -signal.SIGTERM  # stopped, not left behind


# ----------------------------------------------------------------------------- fake server

class FakeOpenAIServer:
    """An OpenAI-compatible completions server on loopback, in its own thread and event loop:
    HTTP/1.1 keep-alive, chunked SSE. A completion streams max_tokens tokens, `tokens_per_chunk`
    to a chunk (the request's extra field, default 1; `empty_text`: chunks with text ""), the
    first after `ttft` s and the rest `gap` s apart, the last with its finish_reason (as vLLM),
    then the usage chunk and [DONE]. /metrics counts
    every prompt token as a prefix-cache query and half of them as hits."""

    def __init__(self, ttft: float = 0.15, gap: float = 0.03):
        self.ttft, self.gap = ttft, gap
        self.queries = self.hits = self.in_flight = self.max_in_flight = 0
        self.models_seen: set[str] = set()
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc) -> None:
        async def close():
            self.server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def handle(self, reader, writer) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                method, path, _ = head.split("\r\n")[0].split(" ", 2)
                headers = dict(line.lower().split(":", 1) for line in head.split("\r\n")[1:]
                               if ":" in line)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self.respond(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def send(writer, status: str, body: str, content_type="application/json") -> bool:
        data = body.encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        return True

    async def respond(self, method: str, path: str, body: bytes, writer) -> bool:
        if path == "/health":
            return await self.send(writer, "200 OK", "")
        if path == "/v1/models":
            return await self.send(writer, "200 OK", json.dumps(
                {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}))
        if path == "/metrics":
            return await self.send(writer, "200 OK", (
                "# TYPE jinfer:prefix_cache_queries_total counter\n"
                f'jinfer:prefix_cache_queries_total{{model_name="fake"}} {self.queries}\n'
                f'jinfer:prefix_cache_hits_total{{model_name="fake"}} {self.hits}\n'
                f"jinfer:num_requests_running {self.in_flight}\n"), "text/plain")
        if path != "/v1/completions" or method != "POST":
            return await self.send(writer, "404 Not Found", '{"error": "not found"}')
        request = json.loads(body)
        self.bodies.append(request)
        self.models_seen.add(request["model"])
        if request["prompt"][0] == FAIL_HTTP:
            return await self.send(writer, "500 Internal Server Error",
                                   '{"error": {"message": "engine exploded"}}')
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.stream(request, writer)
        finally:
            self.in_flight -= 1

    async def stream(self, request: dict, writer) -> bool:
        async def event(text: str) -> None:
            data = text.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()

        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        n, per = request["max_tokens"], request.get("tokens_per_chunk", 1)
        assert request["stream"] and request["ignore_eos"]
        assert request["stream_options"] == {"include_usage": True}
        await event(": ping\n\n")
        for i, start in enumerate(range(0, n, per)):
            await asyncio.sleep(self.ttft if i == 0 else self.gap)
            text = "" if request.get("empty_text") else "ab" * min(per, n - start)
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": request["model"],
                     "choices": [{"index": 0, "text": text,
                                  "finish_reason": "length" if start + per >= n else None}]}
            await event(f"data: {json.dumps(chunk)}\n\n")
            if request["prompt"][0] == FAIL_BROKEN and i == 1:
                return False  # the connection drops mid-stream
        usage = {"prompt_tokens": len(request["prompt"]), "completion_tokens": n,
                 "total_tokens": len(request["prompt"]) + n}
        await event(f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\n")
        await event("data: [DONE]\n\n")
        await event("")  # the last chunk of the chunked body
        self.queries += len(request["prompt"])
        self.hits += len(request["prompt"]) // 2
        return True


@pytest.fixture
def fake_server():
    with FakeOpenAIServer() as server:
        yield server


def send(server, request, **extra) -> bs.RequestResult:
    async def go():
        async with bs.make_client(8, 30.0) as client:
            return await bs.send_request(client, f"{server.url}/v1/completions", "m", request,
                                         0.0, extra or None)
    return asyncio.run(go())


def test_client_reads_ttft_itl_and_usage_from_the_stream(fake_server):
    r = send(fake_server, bs.Request([5] * 12, 6))
    assert r.success and r.error == ""
    assert r.output_tokens == 6 and r.usage_reported and r.chunks == 6
    assert 0.14 < r.ttft < 2.0   # the server waits 0.15 s; a loaded machine may add to it
    # then 5 gaps of 0.03 s: the last token cannot arrive before 0.3 s
    assert len(r.itl) == 5 and all(x >= 0 for x in r.itl) and 0.29 < r.latency < 4.0
    assert r.latency == pytest.approx(r.ttft + sum(r.itl), abs=1e-6)
    assert bs.tpot(r) == pytest.approx(sum(r.itl) / 5)
    body = fake_server.bodies[-1]
    assert body["prompt"] == [5] * 12 and body["max_tokens"] == 6 and body["temperature"] == 0.0


def test_client_counts_tokens_from_usage_when_chunks_carry_several(fake_server):
    r = send(fake_server, bs.Request([5] * 4, 7), tokens_per_chunk=3)
    assert r.success and r.chunks == 3 and len(r.itl) == 2 and r.output_tokens == 7
    assert bs.tpot(r) == pytest.approx((r.latency - r.ttft) / 6)


def test_client_counts_chunks_with_empty_text_as_tokens(fake_server):
    r = send(fake_server, bs.Request([5] * 4, 5), empty_text=True)  # a model without tokenizer
    assert r.success and r.chunks == 5 and len(r.itl) == 4 and r.output_tokens == 5


def test_client_reports_http_errors_broken_streams_and_refused_connections(fake_server):
    r = send(fake_server, bs.Request([FAIL_HTTP, 1, 2], 4))
    assert not r.success and r.error.startswith("HTTP 500") and "engine exploded" in r.error
    r = send(fake_server, bs.Request([FAIL_BROKEN, 1, 2], 6))
    assert not r.success and r.error
    dead = type("Dead", (), {"url": f"http://127.0.0.1:{bs.free_port()}"})()
    r = send(dead, bs.Request([1, 2], 4))
    assert not r.success and "Connect" in r.error


def test_sweep_against_the_fake_server(fake_server):
    args = bs.parse_args(["--max-concurrency", "3", "--seed", "1"])
    runs = [(math.inf, bs.random_dataset(8, 10, 4, 0.0, 1000, seed=0, variant=0)),
            (40.0, bs.random_dataset(8, 10, 4, 0.0, 1000, seed=0, variant=1)
             + [bs.Request([FAIL_HTTP] * 10, 4)])]
    warmup = bs.random_dataset(3, 10, 4, 0.0, 1000, seed=0, variant=bs.WARMUP_VARIANT)
    out = asyncio.run(bs.run_sweep(fake_server.url, None, runs, warmup, args))
    assert out["model_name"] == "fake-model" and fake_server.models_seen == {"fake-model"}
    assert out["warmup"]["num_requests"] == 3 and out["warmup"]["errors"] == 0
    first, second = out["runs"]
    assert (first["completed"], first["errors"]) == (8, 0)
    assert (second["completed"], second["errors"]) == (8, 1)
    assert second["error_samples"][0]["error"].startswith("HTTP 500")
    assert first["output_tokens"] == 32 and first["prompt_tokens"] == 80
    assert first["output_len_mismatches"] == 0 and first["tokens_per_chunk"] == 1.0
    assert first["prefix_cache"]["hit_rate"] == 0.5
    assert first["prefix_cache"]["queries"] == 80
    assert fake_server.max_in_flight <= 3
    # At 3 in flight, 8 requests of ~0.24 s each take 3 rounds.
    assert first["duration_s"] > 0.6 and first["ttft_ms"]["p50"] > 120
    assert second["duration_s"] > 8 / 40 * 0.5


def test_main_against_a_running_server_writes_the_report(fake_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    code = bs.main(["--base-url", fake_server.url, "--vocab-size", "1000",
                    "--max-model-len", "64", "--dataset", "shared-prefix", "--prefix-len", "16",
                    "--suffix-len", "4", "--num-prefixes", "2", "--output-len", "3",
                    "--num-prompts", "6", "--num-warmup-prompts", "2",
                    "--request-rates", "50", "inf", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["request_rate"] for r in results["runs"]] == [50.0, "inf"]
    assert all(r["completed"] == 6 and r["errors"] == 0 for r in results["runs"])
    assert results["dataset"]["ideal_prefix_hit_tokens"] == 4 * 16
    assert "offline" not in results  # not launched here: no ceiling unless asked
    printed = capsys.readouterr().out
    assert "| rate req/s |" in printed and "| TTFT |" in printed and "50.0%" in printed


# ----------------------------------------------------------------------------- offline ceiling

def test_offline_child_runs_the_requests_through_generate(tiny_model_dir):
    reqs = bs.random_dataset(3, 6, 4, 0.5, vocab_size=100, seed=0)
    warm = bs.random_dataset(3, 6, 4, 0.5, vocab_size=100, seed=0, variant=9)
    spec = {"model": str(tiny_model_dir), "temperature": 0.0,
            "engine_options": {"dtype": "float32", "max_model_len": 32, "max_num_seqs": 4},
            "prompts": [r.prompt for r in reqs], "output_lens": [r.output_len for r in reqs],
            "warm_prompts": [r.prompt for r in warm],
            "warm_output_lens": [r.output_len for r in warm]}
    out = bs.offline_child(spec)
    assert out["output_tokens"] == sum(r.output_len for r in reqs)
    assert out["output_tok_s"] == pytest.approx(out["output_tokens"] / out["elapsed_s"])
    assert out["platform"] == "cpu" and out["warmup_s"] > 0
