"""Turns a scheduler decision into padded device arrays and runs the jitted step on them.

Shapes come from buckets (batch size, query length, block-table width), so a run compiles a
bounded number of programs; the KV pool is donated to every step and updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.runner import host_transfer
from jinfer.runner.buckets import StepBuckets, packed_tokens_bucket, query_bucket
from jinfer.model import sampler as sampler_lib
from jinfer.model.attention import (AttentionMetadata, PrefillMetadata, StepAttention,
                              get_attention_backend)
from jinfer.config import EngineConfig
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache, PAD_BLOCK, copy_blocks, init_kv_cache
from jinfer.model.llama import compute_logits, forward_hidden, layer_kernel_tiling
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence
from pallas_kernels import paged_prefill_mgpu
from pallas_kernels.decode_layer_mgpu import TailTiling

logger = logging.getLogger(__name__)

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """Everything one device step reads besides weights and pool, padded to buckets."""

    token_ids: jax.Array       # [T] int32: decode rows, then prompt chunks, then padding
    attention: StepAttention
    logits_indices: jax.Array  # [S] int32, index into token_ids of each sampled row's token
    sampling: sampler_lib.SamplingMetadata  # [S] rows: decodes, then prompt chunks, padding


def _step(params, kv_cache, step_input: StepInput, *, config, attention_backend, kernels, flags,
          layer_tiling=None):
    """The jitted device step: decoder stack, logits at each row's last token, sampling."""
    hidden, kv_cache = forward_hidden(
        params, kv_cache, step_input.token_ids, step_input.attention, config=config,
        backend=get_attention_backend(attention_backend, kernels), layer_tiling=layer_tiling)
    logits = compute_logits(params, hidden[step_input.logits_indices], config)  # [S, vocab]
    return sampler_lib.sample(logits, step_input.sampling, flags), kv_cache


def _decode_steps(params, kv_cache, step_input: StepInput, *, config, attention_backend, kernels,
                  flags, num_steps: int, layer_tiling=None, unroll_rows: int = 0):
    """`num_steps` decode steps in one jitted call (a scan): each step's sampled tokens are the
    next step's inputs, positions and context lengths advance on device, and the slots come
    from the block tables (the host reserved them beforehand), and each step's samples join
    the rows' output tokens (penalties read them; min_tokens bans lapse by step count): the
    sampler sees exactly what single steps would show it. Returns (SamplerOutput fields
    stacked [num_steps, S], the pool, the last step's sampled tokens [rows]: the input of a
    call that continues these rows). Calls of at most `unroll_rows` rows run the steps as
    straight-line code instead of a loop (KernelConfig.unroll_max_rows)."""
    meta = step_input.attention.decode
    tables, block_size = meta.block_tables, kv_cache.block_size  # [rows, width]
    live = meta.context_lens > 0  # [rows]; padding rows stay empty and write to the pad block
    rows = jnp.arange(tables.shape[0])

    def one_step(carry, _):
        kv, tokens, positions, context_lens, sampling = carry
        slots = tables[rows, positions // block_size] * block_size + positions % block_size
        attention = StepAttention(
            positions=positions, slot_mapping=jnp.where(live, slots, PAD_BLOCK * block_size),
            decode=AttentionMetadata(positions=positions[:, None], block_tables=tables,
                                     context_lens=context_lens))
        step = StepInput(token_ids=tokens, attention=attention,
                         logits_indices=step_input.logits_indices, sampling=sampling)
        out, kv = _step(params, kv, step, config=config, attention_backend=attention_backend,
                        kernels=kernels, flags=flags, layer_tiling=layer_tiling)
        advance = live.astype(jnp.int32)
        sampling = sampler_lib.append_outputs(sampling, out.tokens, live[:out.tokens.shape[0]])
        if not flags.num_logprobs:  # ranks are zeros: stacked outside the loop, not per step
            out = dataclasses.replace(out, ranks=None)
        return (kv, out.tokens[:tokens.shape[0]], positions + advance, context_lens + advance,
                sampling), out

    init = (kv_cache, step_input.token_ids, step_input.attention.positions, meta.context_lens,
            step_input.sampling)
    (kv_cache, last_tokens, *_), outs = jax.lax.scan(one_step, init, None, length=num_steps,
                                                     unroll=tables.shape[0] <= unroll_rows)
    if outs.ranks is None:
        outs = dataclasses.replace(outs, ranks=jnp.zeros_like(outs.tokens))
    return outs, kv_cache, last_tokens


def _packed_step(params, kv_cache, buffer, *, layout, **kwargs):
    """`_step` on a StepInput packed into one int32 buffer (one host-to-device copy)."""
    return _step(params, kv_cache, host_transfer.unpack(buffer, layout), **kwargs)


def _packed_decode_steps(params, kv_cache, buffer, token_ids, *, layout, **kwargs):
    """`_decode_steps` on a StepInput packed into one int32 buffer; the first step's input
    tokens come apart, as they may still be on the device (the last call's samples)."""
    step_input = dataclasses.replace(host_transfer.unpack(buffer, layout), token_ids=token_ids)
    return _decode_steps(params, kv_cache, step_input, **kwargs)


@jax.jit
def _replace_head(buffer, head):
    """buffer [L] with its first n entries replaced by head [n] (on the device)."""
    return jax.lax.dynamic_update_slice(buffer, head.astype(buffer.dtype), (0,))


# XLA's rematerialization pass counts the donated KV pool as if the step held it twice and,
# finding the step "over" device memory, recomputes activations to save space (on an H100 it
# ran each layer's QKV projection twice). The pool is sized from the step's measured scratch
# (jinfer.runner.memory), so the steps are compiled without that pass.
STEP_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}


def _all_logits(params, kv_cache, token_ids, attention, *, config, attention_backend, kernels):
    hidden, kv_cache = forward_hidden(params, kv_cache, token_ids, attention, config=config,
                                      backend=get_attention_backend(attention_backend, kernels))
    return compute_logits(params, hidden, config), kv_cache


class ModelRunner:
    """Owns the device state (weights, KV pool) and the compiled step functions."""

    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, params: dict,
                 num_blocks: int, dtype):
        self.model_config = model_config
        self.config = engine_config
        self.params = params
        self.block_size = engine_config.block_size
        self.kv_cache: KVCache = init_kv_cache(model_config, num_blocks, self.block_size, dtype)
        self.layer_tiling = self._layer_tiling(params)
        kernels = engine_config.kernels
        static = dict(config=model_config, attention_backend=engine_config.attention_backend,
                      kernels=kernels)
        self._logits_fn = jax.jit(functools.partial(_all_logits, **static), donate_argnums=(1,))
        static = dict(static, layer_tiling=self.layer_tiling)  # used by one-row decode steps
        self._step_fn = jax.jit(functools.partial(_packed_step, **static),
                                static_argnames=("layout", "flags"), donate_argnums=(1,),
                                compiler_options=STEP_COMPILER_OPTIONS)
        unroll_rows = kernels.unroll_max_rows
        if unroll_rows is None:
            unroll_rows = 2 if jax.default_backend() == "gpu" else 0
        self._decode_steps_fn = jax.jit(functools.partial(_packed_decode_steps, **static,
                                                          unroll_rows=unroll_rows),
                                        static_argnames=("layout", "flags", "num_steps"),
                                        donate_argnums=(1,),
                                        compiler_options=STEP_COMPILER_OPTIONS)
        # XLA on GPU turns a one-row matmul of a small weight (under ~10M elements: Llama's QKV
        # and output projections) into a multiply + reduce that ran 2-3x slower than a GEMM on an
        # H100; decode steps there carry at least two rows (a padding row is nearly free),
        # unless one row goes through the layer kernel.
        min_decode_rows = 2 if jax.default_backend() == "gpu" and self.layer_tiling is None else 1
        self.buckets = StepBuckets(
            block_size=self.block_size,
            max_blocks_per_seq=-(-engine_config.max_model_len // self.block_size),
            min_decode_rows=min_decode_rows)
        self._compiled_shapes: set = set()

    def _layer_tiling(self, params: dict) -> Optional[TailTiling]:
        """The layer kernel's tiling where decode steps of one row use it (see
        KernelConfig.decode_layer_kernel), else None."""
        config, kernels = self.config, self.config.kernels
        wanted = kernels.decode_layer_kernel
        if not wanted or config.attention_backend != "pallas" or (
                wanted != "always" and not paged_prefill_mgpu.hopper_gpu()):
            return None
        tiling = layer_kernel_tiling(self.model_config, params["layers"][0]["wo"].dtype,
                                     kernels.layer_tiling)
        if tiling is None:
            logger.info("decode steps of one row run the layers in XLA: the layer kernel does "
                        "not take this model's shapes or dtype")
        return tiling

    # -- host -> device arrays ---------------------------------------------------------------
    def _slot(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Pool slots of the tokens at `positions` [..., n] under block tables `table` [...,
        width] (one table, or one per row)."""
        blocks = np.take_along_axis(table, positions // self.block_size, axis=-1)
        return (blocks * self.block_size + positions % self.block_size).astype(np.int32)

    def _decode_arrays(self, items: list[ScheduledSequence], ahead: int = 0):
        """One new token per sequence -> (token ids, positions, slots) [rows] and their
        AttentionMetadata [rows, 1]; padding rows have context 0 and write to the pad block.
        `ahead` > 0: the rows continue a call still running, which computes their next `ahead`
        tokens past `item.start`. A row whose input token is not on the host yet (a sample of a
        call still running) gets 0 here; the caller gives it on the device."""
        rows = self.buckets.decode_rows(len(items))
        width = self.buckets.blocks(max(len(item.seq.block_table) for item in items))
        tables = np.full((rows, width), PAD_BLOCK, np.int32)  # [rows, width]
        positions = np.zeros((rows,), np.int32)               # [rows]
        context_lens = np.zeros((rows,), np.int32)            # [rows]
        token_ids = np.zeros((rows,), np.int32)               # [rows]
        for i, item in enumerate(items):
            seq, start = item.seq, item.start + ahead
            assert item.num_new_tokens == 1, "decode rows carry exactly one new token"
            tables[i, :len(seq.block_table)] = seq.block_table
            positions[i], context_lens[i] = start, start + 1
            if start < seq.num_tokens:
                token_ids[i] = seq.token_ids_slice(start, start + 1)[0]
        slots = self._slot(tables, positions[:, None])[:, 0]  # [rows]
        slots[len(items):] = PAD_BLOCK * self.block_size
        meta = AttentionMetadata(positions=positions[:, None], block_tables=tables,
                                 context_lens=context_lens)
        return token_ids, positions, slots, meta

    def _prefill_arrays(self, items: list[ScheduledSequence]):
        """Prompt chunks back to back -> (token ids, positions, slots) [num_tokens] (a packed
        bucket, so the matmuls do no per-sequence padding work) and the PrefillMetadata."""
        chunks, tables = [], []
        for item in items:
            start = item.start
            chunks.append((start, item.seq.token_ids_slice(start, start + item.num_new_tokens)))
            tables.append(item.seq.block_table)
        rows = self.buckets.rows(len(items))
        q_len = query_bucket(max(len(chunk) for _, chunk in chunks))
        total = sum(len(chunk) for _, chunk in chunks)
        num_tokens = packed_tokens_bucket(total)
        width = self.buckets.blocks(max(len(table) for table in tables))
        block_tables = np.full((rows, width), PAD_BLOCK, np.int32)  # [rows, width]
        row_positions = np.zeros((rows, q_len), np.int32)           # [rows, q_len]
        context_lens = np.zeros((rows,), np.int32)                  # [rows]
        query_start_loc = np.full((rows + 1,), total, np.int32)     # [rows + 1]
        to_rows = np.full((rows, q_len), total - 1, np.int32)       # [rows, q_len]
        token_ids = np.zeros((num_tokens,), np.int32)               # [num_tokens]
        positions = np.zeros((num_tokens,), np.int32)               # [num_tokens]
        slots = np.full((num_tokens,), PAD_BLOCK * self.block_size, np.int32)
        to_tokens = np.zeros((num_tokens,), np.int32)               # [num_tokens]
        offset = 0
        for i, ((start, chunk), table) in enumerate(zip(chunks, tables)):
            n, span = len(chunk), slice(offset, offset + len(chunk))
            block_tables[i, :len(table)] = table
            pos = np.arange(start, start + n, dtype=np.int32)
            row_positions[i, :n], row_positions[i, n:] = pos, pos[-1]
            context_lens[i], query_start_loc[i] = start + n, offset
            to_rows[i, :n] = np.arange(offset, offset + n)
            token_ids[span], positions[span] = chunk, pos
            slots[span] = self._slot(block_tables[i], pos)
            to_tokens[span] = i * q_len + np.arange(n)
            offset += n
        # Padding tokens take the last real token's position and query slot; they write to the
        # pad block.
        positions[total:], to_tokens[total:] = positions[total - 1], to_tokens[total - 1]
        meta = PrefillMetadata(
            attention=AttentionMetadata(positions=row_positions, block_tables=block_tables,
                                        context_lens=context_lens),
            query_start_loc=query_start_loc, to_rows=to_rows, to_tokens=to_tokens)
        ends = np.append(query_start_loc[1:len(items)], total)  # [len(items)]
        return token_ids, positions, slots, meta, ends - 1

    def prepare(self, decode: list[ScheduledSequence], prefill: list[ScheduledSequence],
                sampling_rows, num_logprobs: int, ahead: int = 0, num_steps: int = 1):
        """One step's work -> (StepInput of NumPy arrays, sampler flags).

        The packed row holds the decode rows first, then the prompt chunks; `sampling_rows`
        (one per sequence, in that order) become the sampler's rows. `ahead`: decode rows that
        continue a call still in flight (see `_decode_arrays`). `num_steps`: decode steps the
        call runs (penalised rows' output tokens keep room for the ones it appends).
        """
        assert decode or prefill, "an empty step"
        parts, decode_meta, prefill_meta = [], None, None
        last_tokens = []  # packed index of each sequence's last new token
        if decode:
            *arrays, decode_meta = self._decode_arrays(decode, ahead)
            parts.append(arrays)
            last_tokens += range(len(decode))
        if prefill:
            *arrays, prefill_meta, ends = self._prefill_arrays(prefill)
            last_tokens += list(ends + (len(parts[0][0]) if parts else 0))
            parts.append(arrays)
        token_ids, positions, slots = (np.concatenate(column) for column in zip(*parts))
        # A decode-only step samples every row it runs (multi-step feeds them all back).
        num_rows = len(parts[0][0]) if not prefill else self.buckets.rows(len(last_tokens))
        logits_indices = np.zeros((num_rows,), np.int32)  # [S]
        logits_indices[:len(last_tokens)] = last_tokens
        attention = StepAttention(positions=positions, slot_mapping=slots, decode=decode_meta,
                                  prefill=prefill_meta)
        sampling = sampler_lib.make_sampling_metadata(sampling_rows, pad_to=num_rows,
                                                      spare_output_columns=num_steps - 1)
        flags = sampler_lib.sampler_flags([r[0] for r in sampling_rows], num_logprobs)
        return StepInput(token_ids=token_ids, attention=attention, logits_indices=logits_indices,
                         sampling=sampling), flags

    # -- device ------------------------------------------------------------------------------
    def execute(self, step_input: StepInput, flags) -> sampler_lib.SamplerOutput:
        """Runs one step; returns the sampler's output as NumPy (the only device->host copy)."""
        return jax.device_get(self.launch_step(step_input, flags))

    def launch_step(self, step_input: StepInput, flags,
                    token_ids=None) -> sampler_lib.SamplerOutput:
        """Dispatches one step and returns at once, before the device is done: the sampler's
        output, still on the device. `token_ids` (device or host, [n]) replace the step input's
        first n token ids (its decode rows) on the device: a call planned while another is in
        flight passes that call's samples without reading them back."""
        buffer, layout = host_transfer.pack(step_input)
        if token_ids is not None:
            assert layout.leaves[0] == ("int32", 0, step_input.token_ids.shape), layout.leaves[0]
            buffer = _replace_head(buffer, token_ids)
        key = (layout, flags)
        started = time.perf_counter()
        result, self.kv_cache = self._step_fn(self.params, self.kv_cache, buffer, layout=layout,
                                              flags=flags)
        if key not in self._compiled_shapes:  # dispatch returns once compiled
            self._compiled_shapes.add(key)
            logger.info("compiled a step for %s in %.2f s", _describe(step_input),
                        time.perf_counter() - started)
        return result

    def launch_decode_steps(self, step_input: StepInput, flags, num_steps: int,
                            token_ids=None) -> tuple:
        """Dispatches `num_steps` decode steps of a decode-only StepInput in one call (see
        `_decode_steps`) and returns at once, before the device is done: (the sampler outputs
        stacked [num_steps, S], the last sampled tokens [rows]), both still on the device.
        `token_ids` (device or host, [rows]) replaces the step input's first tokens: a call
        that continues the previous one passes that call's last tokens without reading them."""
        buffer, layout = host_transfer.pack(step_input)
        key = (layout, flags, num_steps)
        tokens = step_input.token_ids if token_ids is None else token_ids
        started = time.perf_counter()
        results, self.kv_cache, last_tokens = self._decode_steps_fn(
            self.params, self.kv_cache, buffer, tokens, layout=layout, flags=flags,
            num_steps=num_steps)
        if key not in self._compiled_shapes:  # dispatch returns once compiled
            self._compiled_shapes.add(key)
            logger.info("compiled %d decode steps for %s in %.2f s", num_steps,
                        _describe(step_input), time.perf_counter() - started)
        return results, last_tokens

    def execute_decode_steps(self, step_input: StepInput, flags,
                             num_steps: int) -> sampler_lib.SamplerOutput:
        """`launch_decode_steps` and wait: the sampler outputs [num_steps, S] as NumPy."""
        results, _ = self.launch_decode_steps(step_input, flags, num_steps)
        return jax.device_get(results)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write on the device: each (src, dst) block duplicated in every layer. Runs
        after every call dispatched before it, as every call on the pool does."""
        self.kv_cache = copy_blocks(self.kv_cache, copies)

    def compile_step(self, step_input: StepInput, flags):
        """The compiled (not run) program of a single step on `step_input`'s shapes: for its
        memory analysis (jinfer.runner.memory)."""
        buffer, layout = host_transfer.pack(step_input)
        return self._step_fn.lower(self.params, self.kv_cache, buffer, layout=layout,
                                   flags=flags).compile()

    def prompt_logits(self, seq: Sequence) -> np.ndarray:
        """Logits at every prompt position [len, vocab], computed through the paged pool.

        For parity tests and scoring: one sequence, prefilled in a single step into the blocks
        of its block table (which the caller owns).
        """
        n = seq.num_prompt_tokens
        token_ids, positions, slots, meta, _ = self._prefill_arrays([ScheduledSequence(seq, n)])
        attention = StepAttention(positions=positions, slot_mapping=slots, prefill=meta)
        logits, self.kv_cache = self._logits_fn(self.params, self.kv_cache, token_ids, attention)
        return np.asarray(logits[:n])


def _describe(step_input: StepInput) -> str:
    """The shape buckets of a step, for the compile log line."""
    att, parts = step_input.attention, [f"{step_input.token_ids.shape[0]} tokens"]
    if att.decode is not None:
        parts.append("decode rows x blocks %s" % (att.decode.block_tables.shape,))
    if att.prefill is not None:
        parts.append("prompt rows x q_len %s, %d blocks" % (
            att.prefill.attention.positions.shape, att.prefill.attention.block_tables.shape[1]))
    parts.append(f"{step_input.logits_indices.shape[0]} sampled rows")
    return ", ".join(parts)
