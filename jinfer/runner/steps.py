"""The device step of the engine loop: jitted pure functions over (params, kv_cache, inputs),
the pool donated, and the programs compiled from them, counted and bounded.

Three kinds of program (each compiled once per shape bucket and sampler flags):
- `step`: one step over the packed row (decode rows and prompt chunks): decoder stack ->
  logits at each row's last token -> sampler. A step whose prompt chunks ask for prompt
  logprobs is a variant of its own (its StepInput's `prompt_logprobs`, part of the layout)
  that also scores every prompt token on the device; only [P, top-N] comes back.
- `decode_steps`: up to `num_scheduler_steps` decode steps in one call, each step's samples
  the next one's inputs. How the steps loop (KernelConfig.decode_loop, `StepPrograms.loop`):
    "while"     the step count is an argument (a while loop with a dynamic trip count): one
                program serves every count. The CPU default (compiles are its bottleneck).
    "scan"      the count is static (a scan of that length): one program per count (8 and
                1: `buckets.decode_steps_bucket`). The GPU default: XLA:GPU decides each
                iteration of a dynamic-count while loop on the host (the predicate is copied
                back and the stream waits). Offline throughput on the H100 was 36,087
                output tok/s with static counts (session 11), 26,851 after the engine moved
                to "while" (session 17), in the same 147 engine steps, and 37,096 with "scan"
                (session 18; BENCHMARKS.md).
    "unrolled"  calls of at most `unroll_max_rows` rows (GPU) run their steps as straight-line
                code, one program per count (no per-step graph launch: 956.5 vs 937.8 tok/s
                at batch 1 on an H100).
- `logits`: every position's logits of one prompt (parity checks, scoring).

Under tensor parallelism (`EngineConfig.tensor_parallel_size` > 1) the same programs run over
the devices' mesh: the decoder stack and the LM head inside shard_map on each device's shard
(jinfer.runner.sharding), everything else (sampler, scoring, the decode loop) replicated.

The compile budget: a CPU process maps memory for every program it holds (about 600 maps per
step program of the default model, measured, against the kernel's limit of 65,530), so `StepPrograms`
counts the programs it has built and, past `max_programs`, drops them all (they reload from
JAX's persistent cache on next use) rather than let the process die.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp

from jinfer.config import EngineConfig
from jinfer.model import sampler as sampler_lib
from jinfer.model.attention import AttentionMetadata, StepAttention, get_attention_backend
from jinfer.model.config import ModelConfig
from jinfer.model.decoder import compute_logits, forward_hidden, num_params, rope_tables
from jinfer.model.kv_cache import PAD_BLOCK
from jinfer.model.moe import expert_impl
from jinfer.runner import host_transfer
from jinfer.runner.batch import StepInput, describe
from jinfer.runner.sharding import tensor_parallel

logger = logging.getLogger(__name__)

# XLA's rematerialization pass counts the donated KV pool as if the step held it twice and,
# finding the step "over" device memory, recomputes activations to save space (on an H100 it
# ran each layer's QKV projection twice). The pool is sized from the step's measured scratch
# (jinfer.runner.memory), so the steps are compiled without that pass.
STEP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}
# XLA:CPU hands dots to YNNPACK fusions by default (jax 0.10); its own dot emitter ran the
# default model's batch-16 decode matmuls 1.4x faster on a 2-core EPYC (the layer stack 43-49 vs
# 55-75 ms, a whole batch-16 generate 5.7-6.3 vs 8.0-9.7 s; BENCHMARKS.md, session 22), and no
# slower at batch 1 or for prefills. Used where the installed XLA knows the option.
CPU_STEP_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Programs a process holds before they are dropped (see the module docstring): ~48,000 maps of
# the default model's step programs on the CPU, under the kernel's 65,530; warm-up's defaults
# build 64 (39,145 maps measured after them).
DEFAULT_MAX_PROGRAMS = {"cpu": 80}
# default_unroll_max_rows: models up to this many parameters unroll batch-1 decode steps on GPU
UNROLL_MAX_PARAMS = 4 * 10**9


# Prompt tokens `_prompt_logprobs` scores at a time: the scratch is their [rows, vocab] logits
# (64 MiB at a 64k vocabulary), not the whole prompt's.
PROMPT_LOGPROBS_ROWS = 256


def _model(tp):
    """(forward_hidden, compute_logits): jinfer.model.decoder's, or under tensor parallelism
    (`tp`, a jinfer.runner.sharding.TensorParallel) the same run in shard_map on every
    device's shard, with the replicated hidden states and full-vocabulary logits out."""
    return (forward_hidden, compute_logits) if tp is None else (tp.forward_hidden,
                                                                tp.compute_logits)


def _step(params, kv_cache, step_input: StepInput, *, config, attention_backend, kernels, flags,
          layer_tiling=None, tp=None, rope=None):
    """One device step: decoder stack, logits at each row's last token, sampling; and, where
    the step input asks, the prompt tokens' scores. Returns (SamplerOutput [S], the scores
    [P] or None, the pool). `rope`: the step's RoPE tables, or None (forward_hidden's)."""
    forward, logits_of = _model(tp)
    hidden, kv_cache = forward(
        params, kv_cache, step_input.token_ids, step_input.attention, config=config,
        backend=get_attention_backend(attention_backend, kernels), layer_tiling=layer_tiling,
        moe_impl=expert_impl(kernels.moe_impl), rope=rope)
    with jax.named_scope("lm_head"):
        logits = logits_of(params, hidden[step_input.logits_indices], config)  # [S, vocab]
    with jax.named_scope("sampler"):
        samples = sampler_lib.sample(logits, step_input.sampling, flags)
    prompt = step_input.prompt_logprobs
    scores = None if prompt is None else _prompt_logprobs(params, hidden, prompt, config,
                                                          logits_of)
    return samples, scores, kv_cache


def _prompt_logprobs(params, hidden, prompt, config,
                     logits_of=compute_logits) -> sampler_lib.SamplerOutput:
    """Each of the packed row's last P tokens (the prompt chunks and their padding) scores the
    token after it: its logprob, rank and the top-N under log_softmax of its logits (fields
    [P]), PROMPT_LOGPROBS_ROWS tokens at a time. hidden [T, hidden]; prompt: a
    PromptLogprobsInput."""
    def score_token(token):  # (hidden state [hidden], the token after it [])
        token_hidden, next_token = token
        return sampler_lib.score(logits_of(params, token_hidden, config), next_token,
                                 prompt.num_logprobs)

    prompt_hidden = hidden[hidden.shape[0] - prompt.next_tokens.shape[0]:]  # [P, hidden]
    return jax.lax.map(score_token, (prompt_hidden, prompt.next_tokens),
                       batch_size=PROMPT_LOGPROBS_ROWS)


def _decode_steps(params, kv_cache, step_input: StepInput, num_steps, *, max_steps: int,
                  loop: str, flags, **static):
    """Decode steps in one call: each step's sampled tokens are the next step's inputs,
    positions and context lengths advance on device, the slots come from the block tables (the
    host reserved them beforehand), and each step's samples join the rows' output tokens
    (penalties read them; min_tokens bans lapse by step count): the sampler sees exactly what
    single steps would show it.

    `num_steps` [] int32 steps run, at most `max_steps`, with loop (static) "while"; with
    "scan" or "unrolled" exactly `max_steps` run (a scan, or straight-line code). Returns
    (SamplerOutput fields [max_steps, S], rows past `num_steps` zero; the pool; the last
    step's sampled tokens [rows], the input of a call that continues these rows).

    Each step's RoPE tables come with its positions in the loop's state: XLA:CPU would
    otherwise fuse their cos and sin into every layer's RoPE and compute them per head and
    layer (~8% of a batch-16 CPU decode step of the default model)."""
    meta = step_input.attention.decode
    tables, block_size = meta.block_tables, kv_cache.block_size  # [rows, width]
    live = meta.context_lens > 0  # [rows]; padding rows stay empty and write to the pad block
    rows = jnp.arange(tables.shape[0])
    config = static["config"]

    def one_step(kv, tokens, positions, rope, context_lens, sampling):
        slots = tables[rows, positions // block_size] * block_size + positions % block_size
        attention = StepAttention(
            positions=positions, slot_mapping=jnp.where(live, slots, PAD_BLOCK * block_size),
            decode=AttentionMetadata(positions=positions[:, None], block_tables=tables,
                                     context_lens=context_lens))
        step = StepInput(token_ids=tokens, attention=attention,
                         logits_indices=step_input.logits_indices, sampling=sampling)
        out, _, kv = _step(params, kv, step, flags=flags, rope=rope, **static)
        advance = live.astype(jnp.int32)
        sampling = sampler_lib.append_outputs(sampling, out.tokens, live[:out.tokens.shape[0]])
        if not flags.num_logprobs:  # ranks are zeros: made once below, not per step
            out = dataclasses.replace(out, ranks=None)
        positions = positions + advance
        return (kv, out.tokens[:tokens.shape[0]], positions, rope_tables(config, positions),
                context_lens + advance, sampling), out

    positions = step_input.attention.positions
    init = (kv_cache, step_input.token_ids, positions, rope_tables(config, positions),
            meta.context_lens, step_input.sampling)
    if loop in ("scan", "unrolled"):
        (kv_cache, last_tokens, *_), outs = jax.lax.scan(
            lambda carry, _: one_step(*carry), init, None, length=max_steps,
            unroll=loop == "unrolled")
    else:
        buffers = _output_buffers(max_steps, step_input.logits_indices.shape[0], flags)
        kv_cache, last_tokens, outs = _loop(one_step, init, num_steps, buffers)
    if outs.ranks is None:
        outs = dataclasses.replace(outs, ranks=jnp.zeros_like(outs.tokens))
    return outs, kv_cache, last_tokens


def _output_buffers(max_steps: int, rows: int, flags) -> sampler_lib.SamplerOutput:
    """Zeroed SamplerOutput fields [max_steps, rows, ...] for `_loop` to fill (ranks None
    without logprobs, as `one_step` returns them)."""
    n = flags.num_logprobs
    return sampler_lib.SamplerOutput(
        tokens=jnp.zeros((max_steps, rows), jnp.int32),
        logprobs=jnp.zeros((max_steps, rows), jnp.float32),
        ranks=jnp.zeros((max_steps, rows), jnp.int32) if n else None,
        top_logprobs=jnp.zeros((max_steps, rows, n), jnp.float32),
        top_ids=jnp.zeros((max_steps, rows, n), jnp.int32))


def _loop(one_step, init, num_steps, outs):
    """`one_step` run num_steps (traced) times from `init`, step i's outputs written into row
    i of the buffers `outs` (rows past num_steps stay zero)."""

    def body(loop):
        i, carry, outs = loop
        carry, out = one_step(*carry)
        outs = jax.tree.map(lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i, 0),
                            outs, out)
        return i + 1, carry, outs

    _, (kv_cache, last_tokens, *_), outs = jax.lax.while_loop(
        lambda loop: loop[0] < num_steps, body, (jnp.int32(0), init, outs))
    return kv_cache, last_tokens, outs


def _packed_step(params, kv_cache, buffer, *, layout, **kwargs):
    """`_step` on a StepInput packed into one int32 buffer (one host-to-device copy)."""
    return _step(params, kv_cache, host_transfer.unpack(buffer, layout), **kwargs)


def _packed_decode_steps(params, kv_cache, buffer, token_ids, num_steps, *, layout, **kwargs):
    """`_decode_steps` on a StepInput packed into one int32 buffer; the first step's input
    tokens come apart, as they may still be on the device (the last call's samples)."""
    step_input = dataclasses.replace(host_transfer.unpack(buffer, layout), token_ids=token_ids)
    return _decode_steps(params, kv_cache, step_input, num_steps, **kwargs)


def _all_logits(params, kv_cache, token_ids, attention, *, config, attention_backend, kernels,
                tp=None):
    forward, logits_of = _model(tp)
    hidden, kv_cache = forward(params, kv_cache, token_ids, attention, config=config,
                               backend=get_attention_backend(attention_backend, kernels),
                               moe_impl=expert_impl(kernels.moe_impl))
    return logits_of(params, hidden, config), kv_cache


@jax.jit
def _replace_head(buffer, head):
    """buffer [L] with its first n entries replaced by head [n] (on the device)."""
    return jax.lax.dynamic_update_slice(buffer, head.astype(buffer.dtype), (0,))


def step_compiler_options(backend: str, cpu_options: dict = CPU_STEP_COMPILER_OPTIONS) -> dict:
    """The XLA options the step programs are compiled with on `backend`: on the CPU with
    `cpu_options` where this XLA knows them."""
    if backend != "cpu":
        return STEP_COMPILER_OPTIONS
    options = {**STEP_COMPILER_OPTIONS, **cpu_options}
    try:  # a trivial program tells whether this XLA knows the options
        jax.jit(lambda: jnp.zeros(()), compiler_options=options).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        logger.info("compiling steps with XLA's defaults on the CPU (%s)", e)
        return STEP_COMPILER_OPTIONS
    return options


def default_unroll_max_rows(model_config: ModelConfig, on_gpu: bool) -> int:
    """KernelConfig.unroll_max_rows=None: 2 on GPU for models of at most
    UNROLL_MAX_PARAMS parameters, else 0. Unrolling saves the loop's per-step graph launch
    (Llama-3.2-1B at batch 1 on an H100: 956.5 vs 937.8 tok/s, a 1-ms step), while the
    program grows with layers x steps: the 8-step program of Qwen3-8B took 18.9 s to compile
    (one step: 2.9 s), and Qwen3-30B-A3B's pool sizing, which compiled its 8-step program and a
    13.7-s prefill, took 122 s; a larger model's longer step makes the launches a smaller
    share. The CPU has no launches to save."""
    if not on_gpu:
        return 0
    return 2 if num_params(model_config) <= UNROLL_MAX_PARAMS else 0


class StepPrograms:
    """The jitted step functions of one model and engine configuration, and the programs
    compiled from them: each new program is counted and logged; past `max_programs` all are
    dropped (see the module docstring)."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, layer_tiling=None,
                 max_programs: Optional[int] = None):
        kernels = config.kernels
        self.tp = tensor_parallel(model_config, config.tensor_parallel_size,  # None: one device
                                  config.enable_expert_parallel)
        static = dict(config=model_config, attention_backend=config.attention_backend,
                      kernels=kernels, tp=self.tp)
        self._logits = jax.jit(functools.partial(_all_logits, **static), donate_argnums=(1,))
        static = dict(static, layer_tiling=layer_tiling)  # used by one-row decode steps
        options = step_compiler_options(jax.default_backend())
        self._step = jax.jit(functools.partial(_packed_step, **static),
                             static_argnames=("layout", "flags"), donate_argnums=(1,),
                             compiler_options=options)
        self._decode_steps = jax.jit(functools.partial(_packed_decode_steps, **static),
                                     static_argnames=("layout", "flags", "max_steps", "loop"),
                                     donate_argnums=(1,), compiler_options=options)
        self.max_steps = config.num_scheduler_steps
        on_gpu = jax.default_backend() == "gpu"
        self.unroll_max_rows = kernels.unroll_max_rows
        if self.unroll_max_rows is None:
            self.unroll_max_rows = default_unroll_max_rows(model_config, on_gpu)
        self.decode_loop = kernels.decode_loop or ("scan" if on_gpu else "while")
        self.max_programs = (DEFAULT_MAX_PROGRAMS.get(jax.default_backend())
                             if max_programs is None else max_programs)
        self._programs: set = set()  # keys of the programs held now
        self.num_compiles = 0        # programs built (compiled or loaded from the disk cache)
        self.num_evictions = 0       # times every program was dropped to stay in budget

    def step(self, params, kv_cache, step_input: StepInput, flags, token_ids=None):
        """Dispatches one step: (SamplerOutput [S] on the device, the prompt tokens' scores [P]
        on the device or None, the pool). `token_ids` (device or host, [n]) replace the first n
        token ids (the decode rows) on the device."""
        buffer, layout = host_transfer.pack(step_input)
        if token_ids is not None:
            assert layout.leaves[0] == ("int32", 0, step_input.token_ids.shape), layout.leaves[0]
            buffer = _replace_head(buffer, token_ids)
        with self._counted(("step", layout, flags), step_input, "a step"):
            return self._step(params, kv_cache, buffer, layout=layout, flags=flags)

    def decode_steps(self, params, kv_cache, step_input: StepInput, flags, num_steps: int,
                     token_ids=None):
        """Dispatches `num_steps` decode steps: (SamplerOutput fields [steps, S] on the device,
        steps >= num_steps, the pool, the last sampled tokens [rows])."""
        assert 1 <= num_steps <= self.max_steps, num_steps
        buffer, layout = host_transfer.pack(step_input)
        loop = self.loop(step_input.token_ids.shape[0])
        max_steps = self.max_steps if loop == "while" else num_steps
        tokens = step_input.token_ids if token_ids is None else token_ids
        what = (f"up to {max_steps} decode steps" if loop == "while"
                else f"{num_steps} decode steps ({loop})")
        with self._counted(("decode_steps", layout, flags, max_steps, loop), step_input, what):
            return self._decode_steps(params, kv_cache, buffer, tokens, jnp.int32(num_steps),
                                      layout=layout, flags=flags, max_steps=max_steps,
                                      loop=loop)

    def loop(self, rows: int) -> str:
        """How a decode-steps call of `rows` rows loops (module docstring)."""
        return "unrolled" if rows <= self.unroll_max_rows else self.decode_loop

    def logits(self, params, kv_cache, token_ids, attention):
        """Every position's float32 logits [T, vocab] and the pool."""
        with self._counted(("logits", token_ids.shape), None, "prompt logits"):
            return self._logits(params, kv_cache, token_ids, attention)

    def lower_step(self, params, kv_cache, step_input: StepInput, flags):
        """The step's program lowered for `step_input`'s shapes (params and kv_cache may be
        abstract, jax.ShapeDtypeStruct): compile it for XLA's memory analysis."""
        buffer, layout = host_transfer.pack(step_input)
        return self._step.lower(params, kv_cache, buffer, layout=layout, flags=flags)

    def lower_decode_steps(self, params, kv_cache, step_input: StepInput, flags,
                           num_steps: Optional[int] = None):
        """The decode-steps program lowered for `step_input`'s shapes, of num_steps steps
        (default: its longest loop)."""
        buffer, layout = host_transfer.pack(step_input)
        num_steps = num_steps or self.max_steps
        return self._decode_steps.lower(params, kv_cache, buffer, step_input.token_ids,
                                        jnp.int32(num_steps), layout=layout, flags=flags,
                                        max_steps=num_steps,
                                        loop=self.loop(step_input.token_ids.shape[0]))

    @property
    def num_programs(self) -> int:
        """Programs held now."""
        return len(self._programs)

    @contextlib.contextmanager
    def _counted(self, key, step_input: Optional[StepInput], what: str):
        """Times the dispatch inside and logs it as a compile when its program is new
        (dispatch returns once the program is compiled)."""
        new, started = self._admit(key), time.perf_counter()
        yield
        if new:
            shapes = describe(step_input) if step_input is not None else ""
            logger.info("compiled %s for %s in %.2f s (program %d of this process)", what,
                        shapes, time.perf_counter() - started, self.num_compiles)

    def _admit(self, key) -> bool:
        """Registers a program about to be built; True when it is new."""
        if key in self._programs:
            return False
        if self.max_programs is not None and len(self._programs) >= self.max_programs:
            logger.warning("compile budget: %d programs held (max_programs=%d); dropping them "
                           "all (they reload from the compilation cache on next use)",
                           len(self._programs), self.max_programs)
            for fn in (self._step, self._decode_steps, self._logits):
                fn.clear_cache()
            self._programs.clear()
            self.num_evictions += 1
        self._programs.add(key)
        self.num_compiles += 1
        return True
