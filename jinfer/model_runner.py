"""Turns a scheduler decision into padded device arrays and runs the jitted step on them.

Shapes come from buckets (batch size, query length, block-table width), so a run compiles a
bounded number of programs; the KV pool is donated to every step and updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jinfer import sampler as sampler_lib
from jinfer.attention import AttentionMetadata, get_attention_backend
from jinfer.config import EngineConfig, ModelConfig
from jinfer.kv_cache import KVCache, PAD_BLOCK, init_kv_cache
from jinfer.model import compute_logits, forward_hidden
from jinfer.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

MIN_PREFILL_BUCKET = 16
MIN_CONTEXT_BUCKET = 256  # tokens; smaller block tables are padded up to this


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """Everything one device step reads besides weights and pool, padded to a bucket."""

    token_ids: jax.Array       # [batch, q_len] int32
    attention: AttentionMetadata
    logits_indices: jax.Array  # [batch] int32, the query index whose logits are sampled
    sampling: sampler_lib.SamplingMetadata


def _step(params, kv_cache, step_input: StepInput, *, config, attention_backend, flags):
    """The jitted device step: decoder stack, logits at each row's last token, sampling."""
    hidden, kv_cache = forward_hidden(
        params, kv_cache, step_input.token_ids, step_input.attention, config=config,
        attn_fn=get_attention_backend(attention_backend))
    last = jnp.take_along_axis(hidden, step_input.logits_indices[:, None, None], axis=1)[:, 0]
    logits = compute_logits(params, last, config)  # [batch, vocab]
    return sampler_lib.sample(logits, step_input.sampling, flags), kv_cache


def _all_logits(params, kv_cache, token_ids, meta, *, config, attention_backend):
    hidden, kv_cache = forward_hidden(params, kv_cache, token_ids, meta, config=config,
                                      attn_fn=get_attention_backend(attention_backend))
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
        static = dict(config=model_config, attention_backend=engine_config.attention_backend)
        self._step_fn = jax.jit(functools.partial(_step, **static),
                                static_argnames=("flags",), donate_argnums=(1,))
        self._logits_fn = jax.jit(functools.partial(_all_logits, **static), donate_argnums=(1,))
        self._compiled_shapes: set = set()
        self.max_blocks_per_seq = -(-engine_config.max_model_len // self.block_size)

    # -- buckets -------------------------------------------------------------------------------
    def batch_bucket(self, n: int) -> int:
        return next_power_of_2(n)

    def query_bucket(self, n: int) -> int:
        return n if n == 1 else max(MIN_PREFILL_BUCKET, next_power_of_2(n))

    def blocks_bucket(self, n: int) -> int:
        minimum = -(-MIN_CONTEXT_BUCKET // self.block_size)
        return min(max(minimum, next_power_of_2(n)), next_power_of_2(self.max_blocks_per_seq))

    # -- host -> device arrays ---------------------------------------------------------------
    def _attention_arrays(self, rows, batch: int, q_len: int):
        """rows: (block_table, start position, num_new) per sequence -> padded NumPy arrays."""
        width = self.blocks_bucket(max(len(table) for table, _, _ in rows))
        block_tables = np.full((batch, width), PAD_BLOCK, np.int32)    # [batch, width]
        positions = np.zeros((batch, q_len), np.int32)                 # [batch, q_len]
        slots = np.zeros((batch, q_len), np.int32)                     # [batch, q_len]
        context_lens = np.zeros((batch,), np.int32)                    # [batch]
        for i, (table, start, num_new) in enumerate(rows):
            block_tables[i, :len(table)] = table
            pos = np.arange(start, start + num_new, dtype=np.int32)
            positions[i, :num_new] = pos
            slots[i, :num_new] = block_tables[i, pos // self.block_size] * self.block_size + (
                pos % self.block_size)
            positions[i, num_new:] = pos[-1]  # padding queries: harmless, written to block 0
            context_lens[i] = start + num_new
        return AttentionMetadata(positions=positions, slot_mapping=slots,
                                 block_tables=block_tables, context_lens=context_lens)

    def prepare(self, out: SchedulerOutput, sampling_rows, num_logprobs: int):
        """SchedulerOutput -> (StepInput of NumPy arrays, sampler flags)."""
        items = out.scheduled
        batch = self.batch_bucket(len(items))
        q_len = self.query_bucket(max(item.num_new_tokens for item in items))
        token_ids = np.zeros((batch, q_len), np.int32)
        rows = []
        for i, item in enumerate(items):
            seq, start = item.seq, item.seq.num_computed_tokens
            token_ids[i, :item.num_new_tokens] = seq.token_ids()[start:start + item.num_new_tokens]
            rows.append((seq.block_table, start, item.num_new_tokens))
        logits_indices = np.zeros((batch,), np.int32)
        logits_indices[:len(items)] = [item.num_new_tokens - 1 for item in items]
        sampling = sampler_lib.make_sampling_metadata(sampling_rows, pad_to=batch)
        flags = sampler_lib.sampler_flags([r[0] for r in sampling_rows], num_logprobs)
        step_input = StepInput(token_ids=token_ids, attention=self._attention_arrays(
            rows, batch, q_len), logits_indices=logits_indices, sampling=sampling)
        return step_input, flags

    # -- device ------------------------------------------------------------------------------
    def execute(self, step_input: StepInput, flags) -> sampler_lib.SamplerOutput:
        """Runs one step; returns the sampler's output as NumPy (the only device->host copy)."""
        key = (step_input.token_ids.shape, step_input.attention.block_tables.shape[1], flags)
        started = time.perf_counter()
        result, self.kv_cache = self._step_fn(self.params, self.kv_cache, step_input, flags=flags)
        result = jax.device_get(result)
        if key not in self._compiled_shapes:
            self._compiled_shapes.add(key)
            logger.info("compiled step for batch x q_len %s, %d blocks, %s in %.2f s",
                        key[0], key[1], flags, time.perf_counter() - started)
        return result

    def prompt_logits(self, token_ids: list[int], block_table: list[int]) -> np.ndarray:
        """Logits at every prompt position [len, vocab], computed through the paged pool.

        For parity tests and scoring: one sequence, prefilled in a single step into the blocks
        of `block_table` (which the caller owns).
        """
        n = len(token_ids)
        q_len = self.query_bucket(n)
        ids = np.zeros((1, q_len), np.int32)
        ids[0, :n] = token_ids
        meta = self._attention_arrays([(block_table, 0, n)], 1, q_len)
        logits, self.kv_cache = self._logits_fn(self.params, self.kv_cache, ids, meta)
        return np.asarray(logits[0, :n])
