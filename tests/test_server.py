"""The real server (`python -m jinfer.server`, a subprocess on loopback) with a tiny random model,
driven by the official openai client and raw httpx, against offline `LLM.generate` on the same
weights: streamed == non-streamed text, usage == token counts, greedy text == offline, every
bad input a 4xx in OpenAI's format, disconnects abort, SIGTERM ends it cleanly."""

from __future__ import annotations

import asyncio
import math
import re
import signal
import time

import httpx
import numpy as np
import openai
import pytest

from jinfer import LLM, SamplingParams
from tests.server_support import RemoteServer

KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 512
ENGINE_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "320",
               "--max-num-seqs", "8", "--max-num-batched-tokens", "64"]
PROMPTS = ["The quick brown fox", "Why is the sky blue?", "numbers 12345 and 3.14159"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with RemoteServer([str(tiny_model_dir), "--served-model-name", MODEL, "--no-warmup",
                       "--max-n", "4", *ENGINE_ARGS], api_key=KEY) as remote:
        yield remote


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=320,
               max_num_seqs=8, max_num_batched_tokens=64, enable_compilation_cache=False)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _offline(llm, prompts, **params):
    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def _stream_text(chunks, n=1):
    texts, finish, usage = [""] * n, [None] * n, None
    for chunk in chunks:
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for choice in chunk.choices:
            assert finish[choice.index] is None, "a choice went on after its finish_reason"
            piece = choice.text if hasattr(choice, "text") else choice.delta.content
            texts[choice.index] += piece or ""
            finish[choice.index] = choice.finish_reason
    return texts, finish, usage


def test_completions_greedy_equal_offline_streamed_or_not(server, client, llm):
    want = _offline(llm, PROMPTS, temperature=0, max_tokens=12, ignore_eos=True)
    got = client.completions.create(model=MODEL, prompt=PROMPTS, temperature=0, max_tokens=12,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [
        o.outputs[0].text for o in want]
    assert got.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    assert got.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in want) == 36
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    for prompt, offline in zip(PROMPTS, want):
        chunks = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        texts, finish, usage = _stream_text(chunks)
        assert texts == [offline.outputs[0].text] and finish == ["length"]
        assert usage.completion_tokens == 12
        assert usage.prompt_tokens == len(offline.prompt_token_ids)


def test_chat_equals_offline_chat_streamed_or_not(client, llm):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Why is the sky blue?"}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         max_tokens=10)
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_completion_tokens=10, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, finish, usage = _stream_text(chunks)
    assert texts == [want.outputs[0].text]
    assert finish == [want.outputs[0].finish_reason]
    assert usage.completion_tokens == len(want.outputs[0].token_ids)


def test_n_and_seeded_sampling_stream_the_same_choices(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[:2], n=3, temperature=3.0, seed=7, max_tokens=8,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    texts, finish, usage = _stream_text(client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}), n=6)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == texts
    assert finish == ["length"] * 6
    assert usage.completion_tokens == 48 == whole.usage.completion_tokens
    assert len(set(texts[:3])) > 1  # n samples differ


def test_completion_logprobs_match_offline(client, llm):
    want = _offline(llm, [PROMPTS[0]], temperature=0, max_tokens=5, logprobs=3,
                    ignore_eos=True)[0].outputs[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=5,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token_id, step, value, top in zip(want.token_ids, want.logprobs, lp.token_logprobs,
                                          lp.top_logprobs):
        assert value == pytest.approx(step[token_id].logprob, abs=1e-5)
        assert len(top) >= 3 and max(top.values()) == pytest.approx(value, abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert "".join(lp.tokens) == got.choices[0].text


def test_chat_logprobs_match_offline(client, llm):
    messages = [{"role": "user", "content": "Hello there"}]
    want = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, logprobs=2),
                    use_tqdm=False)[0].outputs[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         max_tokens=4, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry, token_id, step in zip(content, want.token_ids, want.logprobs):
        assert entry.logprob == pytest.approx(step[token_id].logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_echo_scores_the_prompt_like_prompt_logits(client, llm):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens=0."""
    got = client.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, logprobs=1,
                                    max_tokens=0, temperature=0)
    choice = got.choices[0]
    assert choice.text == PROMPTS[1]
    assert got.usage.completion_tokens == 0
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    logits = llm.prompt_logits(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    want = [None] + [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[0] is None
    np.testing.assert_allclose(choice.logprobs.token_logprobs[1:], want[1:], atol=1e-4)


def test_models_health_version_and_auth(server):
    headers = server.headers
    models = httpx.get(server.url("/v1/models"), headers=headers).json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url("/health")).status_code == 200  # no key needed
    assert httpx.get(server.url("/version"), headers=headers).json()["version"]
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url("/v1/models"), headers=bad)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(server.url("/metrics"), headers=bad).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0
                      ).completions.create(model=MODEL, prompt="hi", max_tokens=1)


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi", ', 400, None),
    ("prompt of the wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("max_tokens a string", "/v1/completions", {"prompt": "hi", "max_tokens": "x"}, 400,
     "max_tokens"),
    ("temperature below 0", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400,
     "temperature"),
    ("top_p 0", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("logprobs over the limit", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400,
     "logprobs"),
    ("top_logprobs over the limit", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30},
     400, "top_logprobs"),
    ("n over the server's limit", "/v1/completions", {"prompt": "hi", "n": 5}, 400, "n"),
    ("a token id outside the vocabulary", "/v1/completions", {"prompt": [1, 10**6]}, 400,
     None),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("an unknown role", "/v1/chat/completions", {"messages": [{"role": "x", "content": "hi"}]},
     400, "messages"),
    ("an unknown model", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_an_openai_error_and_the_next_request_succeeds(server, client, name,
                                                                      path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url(path), headers={**server.headers,
                                              "Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"].endswith("Error")
    if param is not None:
        assert error["param"] == param and param in error["message"]
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_an_over_long_prompt_names_both_lengths(server, client):
    prompt = [1 + i % 300 for i in range(MAX_MODEL_LEN + 21)]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    message = info.value.body["message"]
    assert str(MAX_MODEL_LEN) in message and str(len(prompt)) in message
    r = httpx.post(server.url("/v1/completions"), headers=server.headers,
                   content=b'{"prompt": "' + b"x" * (17 * 2**20) + b'"}')
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url("/metrics"), headers=server.headers).text
    values = {}
    for line in text.splitlines():
        match = re.match(r'^(jinfer:[a-z0-9_]+)(\{[^}]*\})? (\S+)$', line)
        if match:
            name, labels, value = match.groups()
            reason = re.search(r'finished_reason="(\w+)"', labels or "")
            if "_bucket" not in name:
                values[name + (f"[{reason.group(1)}]" if reason else "")] = float(value)
    return values


def test_100_streams_with_20_disconnects(server, llm):
    """The 80 streams read to the end get exactly their offline text; the 20 dropped mid-stream
    are aborted; afterwards nothing runs or waits and no KV block is held."""
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(100)]
    want = [o.outputs[0].text for o in _offline(llm, prompts, temperature=0, max_tokens=24,
                                                ignore_eos=True)]
    before = _metrics(server)

    async def one(client, i):
        leaves = i % 5 == 0  # with a long completion, so that it is still running
        stream = await client.completions.create(
            model=MODEL, prompt=prompts[i], temperature=0, max_tokens=480 if leaves else 24,
            stream=True, extra_body={"ignore_eos": True})
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].text
            if leaves:
                await stream.close()  # the client goes away mid-stream
                return None
        return text

    async def main():
        async with server.async_client(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(100)))

    got = asyncio.run(main())
    for i, text in enumerate(got):
        if i % 5:
            assert text == want[i], i
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _metrics(server)
        if after["jinfer:num_requests_running"] == after["jinfer:num_requests_waiting"] == 0:
            break
        time.sleep(0.1)
    assert after["jinfer:num_requests_running"] == 0
    assert after["jinfer:num_requests_waiting"] == 0
    assert after["jinfer:kv_cache_usage_perc"] == 0  # every block back in the pool
    finished, aborted = (after[f"jinfer:request_success_total[{r}]"]
                         - before.get(f"jinfer:request_success_total[{r}]", 0)
                         for r in ("length", "abort"))
    # A client that leaves after its first chunk is still running (aborted), unless on a busy
    # CPU its 480 tokens were all done before its close arrived.
    assert finished + aborted == 100 and finished >= 80 and aborted >= 10
    assert after["jinfer:time_to_first_token_seconds_count"] >= 100
    assert math.isfinite(after["jinfer:e2e_request_latency_seconds_sum"])


def test_sigterm_during_streams_exits_cleanly(tiny_model_dir):
    with RemoteServer([str(tiny_model_dir), "--served-model-name", MODEL, "--no-warmup",
                       *ENGINE_ARGS]) as remote:
        async def stream():
            async with remote.async_client(timeout=30) as client:
                chunks = await client.completions.create(
                    model=MODEL, prompt="fox", max_tokens=100, stream=True,
                    extra_body={"ignore_eos": True})
                async for _ in chunks:
                    pass

        async def main():
            tasks = [asyncio.ensure_future(stream()) for _ in range(4)]
            await asyncio.sleep(1.0)
            remote.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*tasks, return_exceptions=True)

        started = time.monotonic()
        asyncio.run(main())
        code, _ = remote.stop(timeout=15)
        # uvicorn re-raises the SIGTERM once its graceful shutdown is done
        assert code in (0, -signal.SIGTERM), remote.log()
        assert "Finished server process" in remote.log()
        assert time.monotonic() - started < 12


@pytest.mark.slow
def test_the_default_model_serves_what_offline_chat_gives():
    """`jinfer serve` with no model: the embedded SmolLM2-135M-Instruct, greedy chat and a
    streamed completion equal to offline LLM() on the same weights."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    args = ["--max-model-len", "512", "--max-num-seqs", "4"]
    llm = LLM(max_model_len=512, max_num_seqs=4, enable_compilation_cache=False)
    want_chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24),
                         use_tqdm=False)[0].outputs[0]
    want_text = _offline(llm, ["The capital of France is"], temperature=0,
                         max_tokens=12)[0].outputs[0]
    del llm
    with RemoteServer(["--no-warmup", *args]) as remote:
        client = remote.client()
        (card,) = client.models.list().data
        assert card.id == "SmolLM2-135M-Instruct"
        got = client.chat.completions.create(model=card.id, messages=messages, temperature=0,
                                             max_tokens=24)
        texts, finish, _ = _stream_text(client.completions.create(
            model=card.id, prompt="The capital of France is", temperature=0, max_tokens=12,
            stream=True))
    assert got.choices[0].message.content == want_chat.text and want_chat.text.strip()
    assert texts == [want_text.text] and finish == [want_text.finish_reason]
