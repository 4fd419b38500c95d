"""Tensor parallelism (jinfer.runner.sharding) on the virtual CPU devices of tests/conftest.py:
TP=2 and 4 give TP=1's greedy tokens, logprobs, prompt logprobs and prompt logits on a tiny
random Llama with 8 query and 2 KV heads (KV heads shared at TP 4 and 8) and a 250-token
vocabulary (padded at 4 and 8), over one workload with chunked prefill, prefix caching, n > 1
(copy-on-write), multi-step decode calls and preemption; TP=8 (each KV head on four devices)
gives TP=1's prompt logits and greedy tokens of one prompt (the same code paths as TP=4, in
fewer programs); each device holds 1/N of the sharded weights and of the pool; get_params /
update_weights, the per-device pool budget, dummy weights, a windowed soft-capped family and a
mixture-of-experts model under TP; sizes that do not fit are refused with the ones that do.

One engine per TP size serves every test of the module (each engine compiles its own
programs: the test's time); float32 throughout. On a host with several GPUs the module runs on
them (jax.devices() are the GPUs there); its gpu-marked test checks TP=N against TP=1 on a real
model's layer shapes with the GPU's kernels.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from jinfer import LLM, SamplingParams
from jinfer.model.config import ModelConfig
from jinfer.model import shapes
from jinfer.model.decoder import prepare_params
from jinfer.model.shapes import config_to_hf_dict
from jinfer.server import cli
from jinfer.testing import spread_params
from parity_support import assert_pool_whole, relative_errors

DEVICES = len(jax.devices())
WORKLOAD_SIZES = (2, 4)  # the whole workload; TP=8 runs one prompt (test_tp8_...)
CONFIG = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
# Gemma 2's layer (alternating windows of 8, soft-capped attention and logits, post norms,
# GeGLU, scaled tied embeddings) with Qwen's QKV biases and q/k norms on top.
WINDOWED = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                       model_type="gemma2", post_norms=True, activation="gelu_tanh",
                       embed_scale=8.0, query_pre_attn_scalar=16.0, attn_logit_softcap=50.0,
                       final_logit_softcap=30.0, layer_windows=(8, None), qkv_bias=True,
                       qk_norm=True)
MOE = ModelConfig(vocab_size=250, hidden_size=64, intermediate_size=32, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=8, model_type="qwen3_moe",
                  num_experts=4, num_experts_per_tok=2)
# Six usable blocks of 8 tokens for two running sequences of up to 40 tokens: preemption.
ENGINE = dict(block_size=8, num_kv_blocks=7, max_model_len=40, max_num_seqs=2,
              max_num_batched_tokens=16, num_scheduler_steps=4, enable_compilation_cache=False)
LOGITS_RTOL = 1e-5  # max |TP - TP1| / max |TP1| per position, float32


def needs_devices(n: int):
    return pytest.mark.skipif(DEVICES < n, reason=f"needs {n} devices, this host has {DEVICES}")


def tp_sizes(sizes=WORKLOAD_SIZES):
    return [pytest.param(n, marks=needs_devices(n), id=f"tp{n}") for n in sizes]


PARAMS = spread_params(CONFIG)
PREFIX = [int(t) for t in np.random.default_rng(1).integers(3, 250, 16)]
TAILS = [[int(t) for t in np.random.default_rng(2 + i).integers(3, 250, 1 + 2 * i)]
         for i in range(4)]
PROMPTS = [PREFIX + tail for tail in TAILS]  # 17-23 tokens: two 16-token prefill chunks
GREEDY = dict(temperature=0, ignore_eos=True)


def workload_params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=10, **GREEDY),
            SamplingParams(max_tokens=8, n=2, **GREEDY),            # shared blocks, COW
            SamplingParams(max_tokens=9, **GREEDY),
            SamplingParams(max_tokens=12, **GREEDY)]


# Alone, so that its steps are one program (prompt logprobs make a step a variant of its own).
PROMPT_LOGPROBS = SamplingParams(max_tokens=2, prompt_logprobs=3, **GREEDY)


_ENGINES: dict = {}
_RESULTS: dict = {}


def engine(n: int) -> LLM:
    if n not in _ENGINES:
        _ENGINES[n] = LLM.from_params(CONFIG, PARAMS, tensor_parallel_size=n, **ENGINE)
    return _ENGINES[n]


def results(n: int):
    """The workload's outputs on engine(n), run once; the pool must be whole after it, and the
    run must have preempted, hit the prefix cache and copied blocks (copy-on-write); then one
    prompt's prompt logprobs."""
    if n not in _RESULTS:
        llm = engine(n)
        runner, copies = llm.engine.runner, []
        copy_blocks = runner.copy_blocks
        runner.copy_blocks = lambda pairs: copies.extend(pairs) or copy_blocks(pairs)
        try:
            outputs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=workload_params(),
                                   use_tqdm=False)
        finally:
            del runner.copy_blocks
        assert_pool_whole(llm)
        stats = llm.stats()
        assert stats["num_preemptions"] > 0, "the pool must be small enough to preempt"
        assert stats["prefix_cache_hit_rate"] > 0 and copies
        scored = llm.generate(prompt_token_ids=PROMPTS[2:3], sampling_params=PROMPT_LOGPROBS,
                              use_tqdm=False)[0]
        assert_pool_whole(llm)
        _RESULTS[n] = outputs, scored.prompt_logprobs
    return _RESULTS[n]


@pytest.mark.parametrize("n", tp_sizes())
def test_tp_gives_tp1_tokens_logprobs_and_prompt_logits(n):
    (want, prompt_a), (got, prompt_b) = results(1), results(n)
    for a, b in zip(want, got):
        assert [c.token_ids for c in b.outputs] == [c.token_ids for c in a.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            assert cb.cumulative_logprob == pytest.approx(ca.cumulative_logprob, abs=1e-4)
    assert prompt_b[0] is None and len(prompt_b) == len(PROMPTS[2])
    for ea, eb in zip(prompt_a[1:], prompt_b[1:]):
        assert eb.keys() == ea.keys()
        assert all(eb[t].logprob == pytest.approx(ea[t].logprob, abs=1e-5) for t in ea)
    assert_prompt_logits_agree(n)


def assert_prompt_logits_agree(n: int) -> None:
    prompt = PROMPTS[3] + PROMPTS[0][:16]
    logits = engine(n).prompt_logits(prompt)
    assert logits.shape == (len(prompt), CONFIG.vocab_size)
    assert relative_errors(logits, engine(1).prompt_logits(prompt)).max() < LOGITS_RTOL
    assert_pool_whole(engine(n))


@needs_devices(8)
def test_tp8_gives_tp1_prompt_logits_and_tokens():
    """One KV head per device, each shared by four devices: one prompt, prefilled in two
    chunks and decoded in multi-step calls (programs TP=1 built for the workload)."""
    results(1)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want, got = (engine(n).generate(prompt_token_ids=PROMPTS[3:4], sampling_params=greedy,
                                    use_tqdm=False)[0].outputs[0].token_ids for n in (1, 8))
    assert got == want
    assert_prompt_logits_agree(8)


@pytest.mark.parametrize("n", tp_sizes((2, 4, 8)))
def test_each_device_holds_its_share_of_weights_and_pool(n):
    if n in WORKLOAD_SIZES:
        results(n)  # after a workload: steps and block copies keep the shardings
    runner = engine(n).engine.runner
    mesh_devices = set(runner.tp.mesh.devices.flat)
    assert len(mesh_devices) == n
    sharded_bytes = {d: 0 for d in mesh_devices}
    total = 0
    layer = runner.params["layers"][0]
    named = {**{k: v for k, v in runner.params.items() if k != "layers"}, **layer}
    for name, leaf in named.items():
        shards = leaf.addressable_shards
        assert {s.device for s in shards} == mesh_devices, name
        replicated = name.endswith("norm")
        for s in shards:
            assert s.data.size * (1 if replicated else n) == leaf.size, name
            if not replicated:
                sharded_bytes[s.device] += s.data.nbytes
        total += 0 if replicated else leaf.nbytes
    assert set(sharded_bytes.values()) == {total // n}
    # fused columns: each device's wqkv slice is its 8/n q heads and its KV head's k and v
    kv_local = max(1, CONFIG.num_kv_heads // n)
    assert layer["wqkv"].addressable_shards[0].data.shape == (
        CONFIG.hidden_size, (CONFIG.num_heads // n + 2 * kv_local) * CONFIG.head_dim)
    padded = math.ceil(CONFIG.vocab_size / n) * n
    assert runner.params["lm_head"].shape == (CONFIG.hidden_size, padded)
    pool = runner.kv_cache
    for buffer in (pool.k, pool.v):
        assert buffer.shape[3] == n * kv_local
        shards = buffer.addressable_shards
        assert {s.device for s in shards} == mesh_devices
        assert all(s.data.shape == (*buffer.shape[:3], kv_local, CONFIG.head_dim)
                   for s in shards)
        assert all(s.data.nbytes * n == buffer.nbytes for s in shards)


@needs_devices(4)
def test_get_params_and_update_weights_under_tp():
    """TP=4 (shared KV heads, padded vocabulary): get_params gives back the ordinary run
    layout exactly; update_weights re-lays and re-shards new weights (device arrays, here on
    one device), which then run as on one device, with no compile."""
    tp, one = engine(4), engine(1)
    results(4)
    original = one.get_params()
    got = tp.get_params()
    assert jax.tree.structure(got) == jax.tree.structure(original)
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(got)):
        assert a.shape == b.shape and np.array_equal(np.asarray(a), np.asarray(b))
    sharding = tp.engine.runner.params["layers"][0]["wqkv"].sharding
    compiles = tp.stats()["num_compiles"]
    new = jax.tree.map(lambda w: w * 1.5, original)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        for llm in (one, tp):
            llm.update_weights(new)
        assert tp.engine.runner.params["layers"][0]["wqkv"].sharding == sharding
        outs = [llm.generate(prompt_token_ids=PROMPTS[3:4], sampling_params=params,
                             use_tqdm=False)[0].outputs[0].token_ids for llm in (one, tp)]
        assert outs[0] == outs[1]
        assert outs[1] != results(4)[0][3].outputs[0].token_ids[:6]
        assert tp.stats()["num_compiles"] == compiles  # the programs took the new weights
        with pytest.raises(ValueError, match="wqkv"):
            bad = jax.tree.map(np.asarray, original)
            bad["layers"][0]["wqkv"] = bad["layers"][0]["wqkv"][:, :-1]
            tp.update_weights(bad)
    finally:
        for llm in (one, tp):
            llm.update_weights(original)
    assert_pool_whole(tp)


@needs_devices(4)
def test_the_pool_budget_is_per_device():
    """kv_cache_memory_bytes (like gpu_memory_utilization) is one device's budget: a block
    costs a device 2 (K, V) x 2 layers x 8 tokens x its KV heads x 8 x 4 bytes, 2 KV heads at
    TP=1 and 1 at TP=4, so TP=4 holds twice the blocks."""
    kwargs = dict(ENGINE, num_kv_blocks=None, kv_cache_memory_bytes=64 * 1024)
    for n, kv_heads in ((1, 2), (4, 1)):
        llm = LLM.from_params(CONFIG, PARAMS, tensor_parallel_size=n, **kwargs)
        block_bytes = 2 * 2 * 8 * kv_heads * 8 * 4
        assert llm.stats()["num_total_blocks"] == 64 * 1024 // block_bytes
        pool = llm.engine.runner.kv_cache
        assert all(2 * shard.data.nbytes == pool.num_blocks * block_bytes
                   for shard in pool.k.addressable_shards)


def test_sizes_that_do_not_fit_are_refused_with_the_ones_that_do():
    works = ", ".join(str(n) for n in (1, 2, 4, 8) if n <= DEVICES)
    if DEVICES >= 3:
        with pytest.raises(ValueError, match=rf"tensor_parallel_size=3 does not work.*8 "
                                             rf"attention heads.*one of {works}$"):
            LLM.from_params(CONFIG, PARAMS, tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ValueError, match=rf"only {DEVICES} .*device.*one of {works}$"):
        LLM.from_params(CONFIG, PARAMS, tensor_parallel_size=DEVICES + 1, **ENGINE)
    args = cli.add_server_args(cli.argparse.ArgumentParser()).parse_args(
        ["--tensor-parallel-size", "2"])
    assert cli.engine_kwargs(args)["tensor_parallel_size"] == 2


@needs_devices(2)
@pytest.mark.parametrize("config", [WINDOWED, MOE], ids=["windowed_softcap", "moe"])
def test_windowed_and_moe_models_at_tp2(config):
    """Windows, soft-caps, post norms, QKV biases and q/k norms (re-laid per shard like the
    weights), and experts (each expert's intermediate axis split), at TP=2 against TP=1: the
    logits of a prompt of 39 tokens, past the window, prefilled in 16-token chunks through the
    paged pool."""
    params = spread_params(config, seed=3)
    prompt = PROMPTS[3] + PROMPTS[0][:16]
    want, got = (LLM.from_params(config, params, tensor_parallel_size=n, **ENGINE)
                 .prompt_logits(prompt) for n in (1, 2))
    assert relative_errors(got, want).max() < LOGITS_RTOL


@needs_devices(2)
def test_dummy_weights_are_made_sharded(tmp_path):
    """load_format="dummy" at TP=2: the weights of TP=1's dummy model, made sharded."""
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_dict(CONFIG)))
    llm = LLM(str(tmp_path), load_format="dummy", tensor_parallel_size=2, **ENGINE)
    wqkv = llm.engine.runner.params["layers"][1]["wqkv"]
    assert len(wqkv.addressable_shards) == 2
    assert all(s.data.size * 2 == wqkv.size for s in wqkv.addressable_shards)
    got = llm.engine.runner.params
    for name, leaf in {**got["layers"][0], "embed": got["embed"]}.items():
        assert np.all(np.asarray(leaf) == 1) == name.endswith("norm"), name
    want = jax.jit(  # one leaf of TP=1's dummy weights (the rest dropped by XLA)
        lambda: prepare_params(shapes.random_params(CONFIG, "float32", 0))["layers"][1]["wqkv"])()
    np.testing.assert_allclose(np.asarray(wqkv),
                               llm.engine.runner.tp.to_layout("wqkv", np.asarray(want)),
                               rtol=1e-6, atol=1e-7)


def moe_engine(n: int, expert_parallel: bool) -> LLM:
    key = ("moe", n, expert_parallel)
    if key not in _ENGINES:
        _ENGINES[key] = LLM.from_params(MOE, spread_params(MOE, seed=3), tensor_parallel_size=n,
                                        enable_expert_parallel=expert_parallel, **ENGINE)
    return _ENGINES[key]


@needs_devices(4)
def test_expert_parallel_gives_tp1_tokens_and_holds_whole_experts():
    """enable_expert_parallel at TP=4 (one of the 4 experts per device, KV heads shared): the
    workload's greedy tokens (chunked prefill, prefix caching, n > 1, preemption) and a
    prompt's logits are TP=1's; each device holds one whole expert, the router whole."""
    one, ep = moe_engine(1, False), moe_engine(4, True)
    prompt = PROMPTS[3] + PROMPTS[0][:16]
    assert relative_errors(ep.prompt_logits(prompt), one.prompt_logits(prompt)).max() \
        < LOGITS_RTOL
    outputs = [llm.generate(prompt_token_ids=PROMPTS, sampling_params=workload_params(),
                            use_tqdm=False) for llm in (one, ep)]
    for want, got in zip(*outputs):
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert ep.stats()["num_preemptions"] > 0
    assert_pool_whole(ep)
    layer = ep.engine.runner.params["layers"][0]
    for name, shape in (("w_gate_up", (1, MOE.hidden_size, 2 * MOE.intermediate_size)),
                        ("w_down", (1, MOE.intermediate_size, MOE.hidden_size))):
        shards = layer[name].addressable_shards
        assert len(shards) == 4 and all(s.data.shape == shape for s in shards), name
        assert sorted(s.index[0].start for s in shards) == [0, 1, 2, 3]
    assert all(s.data.shape == layer["router_w"].shape
               for s in layer["router_w"].addressable_shards)
    # get_params gives back the ordinary layout
    for a, b in zip(jax.tree.leaves(one.get_params()), jax.tree.leaves(ep.get_params())):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@needs_devices(2)
def test_expert_parallel_at_tp2_and_its_sizes():
    """TP=2 with expert parallelism (two experts a device) gives TP=1's prompt logits; a size
    that does not divide the experts is refused naming them; dense models ignore the option;
    the server flag reaches the engine."""
    prompt = PROMPTS[3] + PROMPTS[0][:16]
    want = moe_engine(1, False).prompt_logits(prompt)
    got = LLM.from_params(MOE, spread_params(MOE, seed=3), tensor_parallel_size=2,
                          enable_expert_parallel=True, **ENGINE).prompt_logits(prompt)
    assert relative_errors(got, want).max() < LOGITS_RTOL
    if DEVICES >= 8:
        with pytest.raises(ValueError, match=r"tensor_parallel_size=8 does not work.*"
                                             r"its 4 experts \(expert parallelism\)"):
            LLM.from_params(MOE, spread_params(MOE), tensor_parallel_size=8,
                            enable_expert_parallel=True, **ENGINE)
    dense = LLM.from_params(CONFIG, PARAMS, tensor_parallel_size=2,
                            enable_expert_parallel=True, **ENGINE)
    assert not dense.engine.runner.tp.expert_parallel
    args = cli.add_server_args(cli.argparse.ArgumentParser()).parse_args(
        ["-tp", "2", "--enable-expert-parallel"])
    assert cli.engine_kwargs(args)["enable_expert_parallel"] is True


def gpu_count() -> int:
    return sum(d.platform == "gpu" for d in jax.devices())


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2, 4, 8])
def test_gpu_tp_gives_tp1_tokens_and_logits_on_a_real_shape(n, tmp_path):
    """On n GPUs (issue 27's correctness run; the tests above run on a host's GPUs too, where
    it has enough): Llama-3.2-1B's layer shapes (4 of its 16 layers, dummy float32 weights,
    the GPU's default backend and buckets) at TP=n give TP=1's greedy tokens for prompts that
    share a prefix (prefix caching, chunked prefill, n=2 copy-on-write), TP=1's prompt logits
    to 1e-5, and leave the pool whole."""
    if gpu_count() < n:
        pytest.skip(f"needs {n} GPUs, this host has {gpu_count()}")
    config = dataclasses.replace(shapes.MODEL_SHAPES["llama3-1b"], num_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_dict(config)))
    rng = np.random.default_rng(5)
    prefix = rng.integers(3, config.vocab_size, 200).tolist()
    prompts = [prefix + rng.integers(3, config.vocab_size, 7 * i + 1).tolist()
               for i in range(4)]
    params = [SamplingParams(max_tokens=24, **GREEDY),
              SamplingParams(max_tokens=16, n=2, **GREEDY),  # copy-on-write
              SamplingParams(max_tokens=20, **GREEDY), SamplingParams(max_tokens=8, **GREEDY)]
    outputs, logits = {}, {}
    for size in (1, n):
        llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", tensor_parallel_size=size,
                  num_kv_blocks=256, max_model_len=512, max_num_batched_tokens=128)
        outputs[size] = [[c.token_ids for c in o.outputs] for o in llm.generate(
            prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)]
        assert llm.stats()["prefix_cache_hit_rate"] > 0
        logits[size] = llm.prompt_logits(prompts[3])
        assert_pool_whole(llm)
        del llm
    assert outputs[n] == outputs[1]
    assert relative_errors(logits[n], logits[1]).max() < LOGITS_RTOL
