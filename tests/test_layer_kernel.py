"""jinfer/model/layer_kernel.py: decode steps of one row through the persistent layer kernel
(`one_row_decode`) give the same hidden states, logits, KV pool and greedy tokens as the XLA
layers, on the CPU with the kernel in Mosaic GPU's interpreter (a small tiling, so tiny shapes
plan), and on a Hopper GPU compiled, on Llama-3.2-1B's and Qwen3-30B-A3B's shapes (the
mixture-of-experts kernels); `layer_kernel_tiling` takes only the shapes that plan."""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")  # needs absl-py too

from jinfer.config import KernelConfig  # noqa: E402
from jinfer.model.attention import (AttentionMetadata, PrefillMetadata,  # noqa: E402
                                    StepAttention, get_attention_backend)
from jinfer.model.config import ModelConfig  # noqa: E402
from jinfer.model.decoder import compute_logits, forward_hidden, prepare_params  # noqa: E402
from jinfer.model.kv_cache import init_kv_cache  # noqa: E402
from jinfer.model import moe  # noqa: E402
from jinfer.model.layer_kernel import layer_kernel_tiling  # noqa: E402
from jinfer.model.shapes import MODEL_SHAPES, random_params  # noqa: E402
from jinfer.testing import write_tiny_llama  # noqa: E402
from pallas_kernels import paged_prefill_mgpu  # noqa: E402
from pallas_kernels.decode_layer_plan import TailTiling  # noqa: E402

# hidden 128 (2 heads of 64, 1 KV head), MLP 256: with 4 CTAs and 64-wide chunks the output and
# down projections split K in two, so the kernel's partial sums are exercised.
TINY = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=256, num_layers=2,
                   num_heads=2, num_kv_heads=1, head_dim=64, tie_word_embeddings=True)
# Qwen3-MoE's layer on the same sizes: q/k head norms, 64 experts of 64, 2 per token (the
# experts' gate/up phase on 2 of the 4 CTAs).
TINY_MOE = dataclasses.replace(TINY, qk_norm=True, intermediate_size=64, num_experts=64,
                               num_experts_per_tok=2)
SMALL = TailTiling(block_n=64, block_k=64, stages=3, num_ctas=4)
BLOCK = 16


def _params(config, seed=0):
    """Random bf16 weights scaled to unit-variance activations (1 / sqrt(fan-in)), so each
    layer moves the residual stream as much as a trained one does."""
    params = prepare_params(random_params(config, jnp.bfloat16, seed))

    def rescale(name, w):
        return w if name.endswith("norm") else (w.astype(jnp.float32) / 0.02
                                                / w.shape[0] ** 0.5).astype(w.dtype)
    params["layers"] = [{k: rescale(k, v) for k, v in lp.items()} for lp in params["layers"]]
    return params


def _prefill_meta(n: int, table: np.ndarray) -> StepAttention:
    pos = np.arange(n, dtype=np.int32)
    slots = table[pos // BLOCK] * BLOCK + pos % BLOCK
    att = AttentionMetadata(positions=pos[None], block_tables=table[None],
                            context_lens=np.array([n], np.int32))
    return StepAttention(positions=pos, slot_mapping=slots.astype(np.int32),
                         prefill=PrefillMetadata(attention=att,
                                                 query_start_loc=np.array([0, n], np.int32),
                                                 to_rows=pos[None], to_tokens=pos))


def _decode_meta(position: int, table: np.ndarray) -> StepAttention:
    pos = np.array([position], np.int32)
    slots = (table[pos // BLOCK] * BLOCK + pos % BLOCK).astype(np.int32)
    return StepAttention(positions=pos, slot_mapping=slots,
                         decode=AttentionMetadata(positions=pos[:, None], block_tables=table[None],
                                                  context_lens=pos + 1))


def _decode_run(config, tiling, *, prompt_len=21, steps=3, backend="reference", seed=0):
    """Prefills a random prompt (XLA layers), then decodes `steps` tokens twice from the same
    pool, with and without the layer kernel, feeding both the XLA path's greedy tokens.
    Returns per step (hidden, logits) of each path, the two final pools, and per step whether
    the XLA path's expert routings were clear of near-ties (`_clear_steps`; dense models: all
    clear)."""
    params = _params(config, seed)
    backend_fns = get_attention_backend(backend)
    table = np.array([3, 1, 4, 2], np.int32)  # not contiguous, not in order
    fwd = jax.jit(lambda p, kv, ids, meta, t: forward_hidden(
        p, kv, ids, meta, config=config, backend=backend_fns, layer_tiling=t),
        static_argnums=4)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, config.vocab_size, prompt_len).astype(np.int32)
    kv = init_kv_cache(config, 6, BLOCK, jnp.bfloat16)
    routes = []  # the XLA path's router logits of its decode row, a row per call
    with _recording_routes(routes):
        hidden, kv = fwd(params, kv, prompt, _prefill_meta(prompt_len, table), None)
        token = np.argmax(np.asarray(compute_logits(params, hidden[-1:], config)), -1)
        pools = {None: kv, tiling: kv}
        results, clear = [], []
        for step in range(steps):
            meta = _decode_meta(prompt_len + step, table)
            out = {}
            for t in (None, tiling):
                first = len(routes)
                h, pools[t] = fwd(params, pools[t], token.astype(np.int32), meta, t)
                out[t] = (np.asarray(h, np.float32),
                          np.asarray(compute_logits(params, h, config), np.float32))
                jax.effects_barrier()
                if t is None:
                    clear.append(_clear_steps(config, routes[first:]))
            results.append(out)
            token = np.argmax(out[None][1], -1)
    return results, pools[None], pools[tiling], clear


@contextlib.contextmanager
def _recording_routes(routes: list):
    """moe.route (the XLA layers' routing; the kernel path calls its own import of it) also
    appends each call's first row of router logits to `routes`."""
    route = moe.route

    def recording(router_logits, top_k, norm_topk_prob, valid=None):
        jax.debug.callback(lambda x: routes.append(np.asarray(x, np.float32)), router_logits[0])
        return route(router_logits, top_k, norm_topk_prob, valid)
    with mock.patch.object(moe, "route", recording):
        yield


def _clear_steps(config, routes) -> bool:
    """Whether a step's routings (one per expert layer) are clear of near-ties
    (moe.clear_routes): the XLA layers round x @ router_w to bf16 in one op and the router
    kernel sums float32 partials, so where the k-th and (k+1)-th logits are a bf16 step or two
    apart the two paths may pick different experts, as two correct implementations may (and
    the outputs then differ by a whole expert's share, not by rounding)."""
    if not config.num_experts:
        return True
    assert len(routes) == config.num_layers
    return bool(moe.clear_routes(np.stack(routes), config.num_experts_per_tok).all())


def _check_close(results, xla_pool, kernel_pool, tiling, clear):
    """The steps up to the first one whose routing is near a tie (the paths may then rightly
    part: test_decode_layer_mgpu checks the kernels on such rows against their references),
    and the pools when every step was clear."""
    assert clear[0], "the first decode step's routing is near a tie: pick another seed"
    for out, step_clear in zip(results, clear):
        if not step_clear:
            break
        (h_xla, logits_xla), (h_kernel, logits_kernel) = out[None], out[tiling]
        # Both paths round every GEMM output or partial sum to bf16 in different places:
        # within a few bf16 steps (2**-8 relative) of the row's scale.
        scale = np.max(np.abs(h_xla))
        assert np.max(np.abs(h_kernel - h_xla)) <= 0.03 * scale
        assert np.max(np.abs(logits_kernel - logits_xla)) <= 0.03 * np.max(np.abs(logits_xla))
        assert np.argmax(logits_kernel) == np.argmax(logits_xla)
    if not all(clear):
        return
    # The K/V written: layer 0's from XLA's QKV projection in both paths (one row, or two on
    # the kernel path, which XLA on a GPU runs as different kernels), the next layers' from
    # the kernel's partial sums: within bf16 rounding.
    for a, b in [(xla_pool.k, kernel_pool.k), (xla_pool.v, kernel_pool.v)]:
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 0.03 * np.max(np.abs(a))


def test_tiling_accepts_only_shapes_that_plan():
    assert layer_kernel_tiling(TINY, jnp.bfloat16, SMALL) == SMALL
    assert layer_kernel_tiling(TINY, jnp.float32, SMALL) is None  # the kernel is bf16 only
    assert layer_kernel_tiling(MODEL_SHAPES["llama3-1b"], jnp.bfloat16, TailTiling()) is not None
    # SmolLM2-135M: hidden 576 is not a multiple of 128 (nor 9 strips of 64 of 128 CTAs)
    assert layer_kernel_tiling(MODEL_SHAPES["smollm2-135m"], jnp.bfloat16, TailTiling()) is None
    # Llama-3-8B: its gate/up projection (P1, not split along K) has 14336 / 64 = 224 strips,
    # not a multiple of 128 CTAs
    assert layer_kernel_tiling(MODEL_SHAPES["llama3-8b"], jnp.bfloat16,
                               KernelConfig().layer_tiling) is None
    # Qwen3's layers, dense and mixture-of-experts, run in the kernels; Mixtral's 8 router
    # columns do not plan
    assert layer_kernel_tiling(TINY_MOE, jnp.bfloat16, SMALL) == SMALL
    assert layer_kernel_tiling(MODEL_SHAPES["qwen3-30b-a3b"], jnp.bfloat16,
                               KernelConfig().layer_tiling) is not None
    assert layer_kernel_tiling(dataclasses.replace(TINY_MOE, num_experts=8), jnp.bfloat16,
                               SMALL) is None
    # any other layer runs XLA's layers, whatever its shapes
    for features in (dict(qkv_bias=True), dict(post_norms=True),
                     dict(activation="gelu_tanh"), dict(attn_logit_softcap=50.0),
                     dict(layer_windows=(8,) * TINY.num_layers)):
        assert layer_kernel_tiling(dataclasses.replace(TINY, **features), jnp.bfloat16,
                                   SMALL) is None, features


def test_qwen3_layers_take_the_kernels_on_request_only(monkeypatch):
    """On a Hopper GPU (stood in for) the runner takes the kernels for Llama's layers by
    default, for Qwen3's (q/k norms, experts) only with decode_layer_kernel="always"."""
    from jinfer.config import EngineConfig
    from jinfer.runner.model_runner import layer_tiling_for
    monkeypatch.setattr(paged_prefill_mgpu, "hopper_gpu", lambda: True)

    def tiling(config, wanted):
        engine = EngineConfig(attention_backend="pallas", kernels=KernelConfig(
            decode_layer_kernel=wanted, layer_tiling=SMALL))
        return layer_tiling_for(config, engine, jnp.bfloat16)
    assert tiling(TINY, True) == SMALL
    for qwen3 in (TINY_MOE, dataclasses.replace(TINY, qk_norm=True)):
        assert tiling(qwen3, True) is None
        assert tiling(qwen3, "always") == SMALL
    assert tiling(TINY, False) is None


def test_interpret_decode_matches_xla_layers():
    if jax.default_backend() != "cpu":
        pytest.skip("interpret mode is tested on the CPU backend (see test_decode_layer_mgpu)")
    # Two steps: the second reads the K/V the kernel wrote in the first. Each interpreted step
    # costs ~40 s of this CPU (the interpreter runs the kernel's CTAs as threads).
    results, xla_pool, kernel_pool, clear = _decode_run(TINY, SMALL, steps=2)
    _check_close(results, xla_pool, kernel_pool, SMALL, clear)


def test_interpret_moe_decode_matches_xla_layers():
    """Qwen3-MoE's layers (q/k head norms in the fused attention kernel, the router and experts'
    kernels, the routing between them) against the XLA layers, the Pallas attention kernels
    on both paths."""
    if jax.default_backend() != "cpu":
        pytest.skip("interpret mode is tested on the CPU backend (see test_decode_layer_mgpu)")
    results, xla_pool, kernel_pool, clear = _decode_run(TINY_MOE, SMALL, steps=1,
                                                        backend="pallas")
    _check_close(results, xla_pool, kernel_pool, SMALL, clear)


def test_engine_uses_one_row_and_matches_greedy_tokens(tmp_path):
    """LLM(...) with the kernel switched on (as on a Hopper GPU, the interpreter standing in):
    one sequence decodes one row per step through the kernel, with the same greedy tokens as
    with the kernel switched off, and the pool is whole afterwards."""
    if jax.default_backend() != "cpu":
        pytest.skip("interpret mode is tested on the CPU backend")
    from jinfer import LLM, SamplingParams
    folder = write_tiny_llama(tmp_path / "m", hidden=128, layers=1, heads=2, kv_heads=1,
                              intermediate=256)
    # 3 tokens: two decode steps through the (interpreted) kernel, ~15 s each on this CPU (the
    # second reads the K/V the kernel wrote in the first)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompt = "The quick brown fox"
    tokens = {}
    for enabled in (False, True):
        llm = LLM(str(folder), dtype="bfloat16", attention_backend="pallas",
                  num_kv_blocks=16, max_model_len=128, num_scheduler_steps=2,
                  kernel_config=KernelConfig(decode_layer_kernel=enabled and "always",
                                             layer_tiling=SMALL))
        runner = llm.engine.runner
        assert (runner.layer_tiling == SMALL) is enabled
        assert runner.buckets.decode_rows(1) == 1  # the CPU takes one row either way
        tokens[enabled] = llm.generate([prompt], params)[0].outputs[0].token_ids
        assert llm.engine.block_manager.is_whole()
    assert tokens[True] == tokens[False]


@pytest.mark.gpu
# Qwen3-30B-A3B's seed: one whose three decode steps route clear of near-ties (seed 0's
# second step has the 8th and 9th logits of a layer one bf16 step apart: on an H100 the two
# paths then picked different experts)
@pytest.mark.parametrize("shape,seed", [("llama3-1b", 0), ("qwen3-30b-a3b", 1)])
def test_gpu_decode_matches_xla_layers(shape, seed):
    """Compiled on the model's shapes (two layers, the engine's tiling) with the Pallas
    attention kernels: the kernel path against the XLA layers over three decode steps
    (Qwen3-30B-A3B: q/k head norms in the fused attention kernel, the router and experts'
    kernels)."""
    if not paged_prefill_mgpu.hopper_gpu():
        pytest.skip("the layer kernel needs a Hopper GPU (wgmma, TMA)")
    config = dataclasses.replace(MODEL_SHAPES[shape], num_layers=2, vocab_size=4096)
    tiling = layer_kernel_tiling(config, jnp.bfloat16, KernelConfig().layer_tiling)
    assert tiling is not None
    results, xla_pool, kernel_pool, clear = _decode_run(config, tiling, prompt_len=37,
                                                        backend="pallas", seed=seed)
    _check_close(results, xla_pool, kernel_pool, tiling, clear)
