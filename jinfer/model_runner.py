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
import numpy as np

from jinfer import sampler as sampler_lib
from jinfer.attention import AttentionMetadata, PackedTokens, get_attention_backend
from jinfer.config import EngineConfig, ModelConfig
from jinfer.kv_cache import KVCache, PAD_BLOCK, init_kv_cache
from jinfer.model import compute_logits, forward_hidden
from jinfer.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

MIN_PREFILL_BUCKET = 16
# Tokens; smaller block tables are padded up to this. Decode attention costs in proportion to the
# padded context, so this stays small; each extra bucket is one more compile per batch size.
MIN_CONTEXT_BUCKET = 32


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def three_quarter_bucket(n: int) -> int:
    """The smallest of the powers of two and the 1.5x steps between them (1, 2, 3, 4, 6, 8, 12,
    16, 24, ...) that holds n: padding stays under a third for 2x the compiles of powers of two."""
    power = next_power_of_2(n)
    return power * 3 // 4 if n <= power * 3 // 4 else power


def packed_bucket(n: int) -> int:
    """Token-count bucket of a packed prefill (16, 24, 32, 48, 64, 96, ...)."""
    return three_quarter_bucket(max(n, MIN_PREFILL_BUCKET))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """Everything one device step reads besides weights and pool, padded to a bucket."""

    token_ids: jax.Array       # [batch, q_len] int32, or [1, num_tokens] when packed
    attention: AttentionMetadata
    logits_indices: jax.Array  # [batch] int32, flat index into token_ids of each row's sampled token
    sampling: sampler_lib.SamplingMetadata
    packed: Optional[PackedTokens] = None  # set for packed prefill (several sequences, one row)


def _step(params, kv_cache, step_input: StepInput, *, config, attention_backend, flags):
    """The jitted device step: decoder stack, logits at each row's last token, sampling."""
    hidden, kv_cache = forward_hidden(
        params, kv_cache, step_input.token_ids, step_input.attention, config=config,
        attn_fn=get_attention_backend(attention_backend), packed=step_input.packed)
    last = hidden.reshape(-1, hidden.shape[-1])[step_input.logits_indices]  # [batch, hidden]
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
        """Block-table width for a longest table of n blocks: attention reads (and the decode
        step's cost grows with) the padded width, hence the 1.5x steps."""
        minimum = -(-MIN_CONTEXT_BUCKET // self.block_size)
        return min(max(minimum, three_quarter_bucket(n)),
                   three_quarter_bucket(self.max_blocks_per_seq))

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
        """SchedulerOutput -> (StepInput of NumPy arrays, sampler flags).

        Prompt chunks of several sequences are packed into one row (see `PackedTokens`); decode
        rows and single chunks keep the [batch, q_len] layout.
        """
        items = out.scheduled
        batch = self.batch_bucket(len(items))
        q_len = self.query_bucket(max(item.num_new_tokens for item in items))
        rows, chunks = [], []
        for item in items:
            seq, start = item.seq, item.seq.num_computed_tokens
            chunks.append(seq.token_ids_slice(start, start + item.num_new_tokens))
            rows.append((seq.block_table, start, item.num_new_tokens))
        meta = self._attention_arrays(rows, batch, q_len)
        sampling = sampler_lib.make_sampling_metadata(sampling_rows, pad_to=batch)
        flags = sampler_lib.sampler_flags([r[0] for r in sampling_rows], num_logprobs)
        if q_len > 1 and len(items) > 1:
            token_ids, packed, logits_indices = self._pack(chunks, meta, batch, q_len)
        else:
            packed = None
            token_ids = np.zeros((batch, q_len), np.int32)  # [batch, q_len]
            logits_indices = np.zeros((batch,), np.int32)    # [batch]
            for i, chunk in enumerate(chunks):
                token_ids[i, :len(chunk)] = chunk
                logits_indices[i] = i * q_len + len(chunk) - 1
        step_input = StepInput(token_ids=token_ids, attention=meta,
                               logits_indices=logits_indices, sampling=sampling, packed=packed)
        return step_input, flags

    def _pack(self, chunks, meta: AttentionMetadata, batch: int, q_len: int):
        """Lays the chunks back to back in one row -> (token_ids [1, n], PackedTokens,
        logits_indices [batch]); `meta` holds the per-sequence layout the attention reads."""
        lengths = [len(chunk) for chunk in chunks]
        total = sum(lengths)
        n = packed_bucket(total)
        token_ids = np.zeros((1, n), np.int32)
        to_tokens = np.full((n,), (len(chunks) - 1) * q_len + lengths[-1] - 1, np.int32)
        to_rows = np.full((batch, q_len), total - 1, np.int32)
        logits_indices = np.zeros((batch,), np.int32)
        offset = 0
        for i, (chunk, length) in enumerate(zip(chunks, lengths)):
            token_ids[0, offset:offset + length] = chunk
            to_tokens[offset:offset + length] = i * q_len + np.arange(length)
            to_rows[i, :length] = offset + np.arange(length)
            offset += length
            logits_indices[i] = offset - 1
        # Padding tokens take the last real token's position and write to the pad block.
        positions = meta.positions.reshape(-1)[to_tokens][None]  # [1, n]
        slots = meta.slot_mapping.reshape(-1)[to_tokens][None]   # [1, n]
        slots[0, total:] = PAD_BLOCK * self.block_size
        packed = PackedTokens(positions=positions, slot_mapping=slots, to_rows=to_rows,
                              to_tokens=to_tokens)
        return token_ids, packed, logits_indices

    # -- device ------------------------------------------------------------------------------
    def execute(self, step_input: StepInput, flags) -> sampler_lib.SamplerOutput:
        """Runs one step; returns the sampler's output as NumPy (the only device->host copy)."""
        meta = step_input.attention
        key = (step_input.token_ids.shape, meta.positions.shape, meta.block_tables.shape[1], flags)
        started = time.perf_counter()
        result, self.kv_cache = self._step_fn(self.params, self.kv_cache, step_input, flags=flags)
        result = jax.device_get(result)
        if key not in self._compiled_shapes:
            self._compiled_shapes.add(key)
            logger.info("compiled step for tokens %s, attention rows x q_len %s, %d blocks, %s "
                        "in %.2f s", *key, time.perf_counter() - started)
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
