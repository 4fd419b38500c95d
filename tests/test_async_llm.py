"""AsyncLLM: one engine thread, a stream per request, abort on cancel, engine errors contained."""

from __future__ import annotations

import asyncio
import time

import pytest

from jinfer import LLM, AsyncLLM, SamplingParams
from jinfer.api.async_llm import EngineError, EngineOverloadedError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir), num_kv_blocks=48, max_model_len=128, max_num_seqs=8,
               enable_compilation_cache=False)


@pytest.fixture
def engine(llm):
    async_llm = AsyncLLM(llm, max_pending_requests=64)
    yield async_llm
    asyncio.run(async_llm.shutdown(timeout=1))
    assert llm.engine.block_manager.is_whole()


async def _final(engine: AsyncLLM, prompt, params=GREEDY, request_id=None):
    outputs = [o async for o in engine.generate(prompt, params, request_id)]
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    return outputs


PROMPTS = ["The quick brown fox", "Why is the sky blue?", "numbers 12345"]


@pytest.fixture(scope="module")
def offline_texts(llm):
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_streams_equal_offline_generate(offline_texts, engine):
    prompts, want = PROMPTS, offline_texts

    async def main():
        return await asyncio.gather(*(_final(engine, p) for p in prompts))

    results = asyncio.run(main())
    assert [r[-1].outputs[0].text for r in results] == want
    for outputs in results:  # cumulative outputs: each extends the one before
        texts = [o.outputs[0].text for o in outputs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_cancelling_a_stream_aborts_its_request_and_frees_its_blocks(llm, engine):
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        async def read_two():
            async for output in engine.generate("The quick brown fox", long, "cancelled"):
                if len(output.outputs[0].token_ids) >= 2:
                    return output
        first = await read_two()  # leaving the loop closes the generator: abort
        assert not first.finished
        others = await asyncio.gather(*(_final(engine, p) for p in ["sky", "fox"]))
        return await engine.get_stats(), others

    stats, others = asyncio.run(main())
    assert stats["num_used_blocks"] == 0 and stats["num_running"] == 0
    assert all(o[-1].outputs[0].finish_reason == "length" for o in others)
    assert engine.metrics.request_success.values["abort"] >= 1


def test_a_bad_request_fails_alone(engine):
    async def main():
        good = asyncio.ensure_future(_final(engine, "The quick brown fox"))
        with pytest.raises(ValueError, match="max_model_len"):
            await _final(engine, list(range(1, 200)))  # longer than max_model_len
        with pytest.raises(ValueError, match="request id"):  # a duplicate id
            await asyncio.gather(_final(engine, "a", request_id="same"),
                                 _final(engine, "b", request_id="same"))
        return await good

    assert asyncio.run(main())[-1].outputs[0].finish_reason == "length"


def test_an_engine_failure_fails_its_requests_and_the_engine_serves_on(llm, engine,
                                                                        monkeypatch):
    real_step = llm.engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost (injected)")
        return real_step()

    monkeypatch.setattr(llm.engine, "step", failing_step)

    async def main():
        with pytest.raises(EngineError, match="device lost"):
            await _final(engine, "The quick brown fox")
        return await _final(engine, "Why is the sky blue?")

    assert asyncio.run(main())[-1].outputs[0].finish_reason == "length"
    assert engine.metrics.request_success.values["error"] == 1


def test_pending_requests_are_bounded(llm):
    engine = AsyncLLM(llm, max_pending_requests=2)

    async def main():
        streams = [engine.generate("fox", GREEDY) for _ in range(3)]
        firsts = [await anext(s) for s in streams[:2]]
        with pytest.raises(EngineOverloadedError, match="limit"):
            await anext(streams[2])
        for s in streams[:2]:
            await s.aclose()
        return firsts

    asyncio.run(main())
    asyncio.run(engine.shutdown(timeout=1))
    assert llm.engine.block_manager.is_whole()


def test_shutdown_aborts_what_is_left_and_refuses_new_requests(llm, monkeypatch):
    real_step = llm.engine.step

    def slow_step():  # so that the request is surely running at the shutdown
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    engine = AsyncLLM(llm)

    async def main():
        stream = engine.generate("fox", SamplingParams(temperature=0, max_tokens=120,
                                                       ignore_eos=True))
        await anext(stream)
        await engine.shutdown(timeout=0.05)
        with pytest.raises(RuntimeError):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="shutting down"):
            await anext(engine.generate("sky", GREEDY))

    asyncio.run(main())
    assert llm.engine.block_manager.is_whole()


def test_idle_work_runs_between_requests_and_a_failure_ends_it_only(llm, offline_texts):
    """Idle work (the server's background warm-up) runs on the engine thread while no request
    is there, one item at a time; requests are served meanwhile with their offline text; an
    item that raises ends the idle work, not the engine."""
    import threading
    ran, gate = [], threading.Event()

    def slow():  # holds the engine thread until the test's request is queued
        gate.wait(5)
        ran.append("slow")

    def fail():
        ran.append("fail")
        raise RuntimeError("idle work broke")

    work = [lambda: ran.append("first"), slow, fail, lambda: ran.append("never")]
    engine = AsyncLLM(llm, idle_work=work)

    async def main():
        stream = _final(engine, PROMPTS[0])
        task = asyncio.ensure_future(stream)
        await asyncio.sleep(0.2)
        gate.set()  # the request waits for at most the item that is running
        return await task

    outputs = asyncio.run(main())
    assert outputs[-1].outputs[0].text == offline_texts[0]
    deadline = time.monotonic() + 5
    while "fail" not in ran and time.monotonic() < deadline:
        time.sleep(0.01)
    again = asyncio.run(_final(engine, PROMPTS[1]))  # the engine serves on after the failure
    assert again[-1].outputs[0].text == offline_texts[1]
    assert ran == ["first", "slow", "fail"]
    asyncio.run(engine.shutdown(timeout=1))
    assert llm.engine.block_manager.is_whole()
