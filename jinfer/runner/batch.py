"""The batch step of the engine loop: a Schedule's rows -> bucketed NumPy arrays (`StepInput`).

The step's tokens lie in one packed row: one token per decode row (a bucketed number of rows),
then every prompt chunk back to back, then padding. Every dimension is padded to a bucket of
`jinfer.runner.buckets`, so equal buckets give equal shapes and share one compiled program.
Host only: nothing here touches the device.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple, Optional

import jax
import numpy as np

from jinfer.engine.scheduler import ScheduledSequence
from jinfer.model import sampler as sampler_lib
from jinfer.model.attention import AttentionMetadata, PrefillMetadata, StepAttention
from jinfer.model.kv_cache import PAD_BLOCK
from jinfer.runner.buckets import StepBuckets, packed_tokens_bucket, query_bucket


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptLogprobsInput:
    """What a step needs to score its prompt tokens (prompt logprobs): each packed prompt
    token's logits score the token after it."""

    next_tokens: jax.Array  # [P] int32: the token after each of the packed row's last P tokens
    num_logprobs: int = dataclasses.field(metadata=dict(static=True))  # top-N, a bucket


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInput:
    """Everything one device step reads besides weights and pool, padded to buckets."""

    token_ids: jax.Array       # [T] int32: decode rows, then prompt chunks, then padding
    attention: StepAttention
    logits_indices: jax.Array  # [S] int32, index into token_ids of each sampled row's token
    sampling: sampler_lib.SamplingMetadata  # [S] rows: decodes, then prompt chunks, padding
    # None but in a step whose prompt chunks ask for prompt logprobs (its own programs: the
    # field and its static top-N are part of the packed layout)
    prompt_logprobs: Optional[PromptLogprobsInput] = None


class PrefillShape(NamedTuple):
    """The padded dimensions of a step's prompt chunks (each a bucket)."""

    rows: int        # prompt rows
    q_len: int       # longest chunk (the per-row layout of the jnp reference)
    num_tokens: int  # packed tokens
    width: int       # block-table width

    def cost(self) -> tuple[int, int]:
        """(matmul work, attention work), in padded tokens."""
        return self.num_tokens, self.rows * self.q_len * self.width

    def fits_in(self, other: "PrefillShape", factor: float) -> bool:
        """Whether `other` holds every dimension of this shape with at most `factor` times its
        attention work."""
        return (all(a <= b for a, b in zip(self, other))
                and other.cost()[1] <= factor * self.cost()[1])


class BatchBuilder:
    """Lays scheduled rows out as a `StepInput` of NumPy arrays, padded to `buckets`."""

    def __init__(self, buckets: StepBuckets):
        self.buckets = buckets
        self._prefill_shapes: set[PrefillShape] = set()  # shapes of the prefills laid out so far
        self._padded: collections.Counter[PrefillShape] = collections.Counter()  # tokens padded

    def _prefill_shape(self, needed: PrefillShape) -> PrefillShape:
        """The shape to lay a prefill out in: its buckets, or, where
        `buckets.reuse_larger_prefill` allows, the cheapest shape used before that holds it
        with at most that factor more attention work (its program is compiled already), until
        the tokens padded for `needed` so far would pass `buckets.reuse_padding_tokens`: then
        it gets its own program. A compile is paid once, padding at every step (on the CPU a
        compile costs 1.5-10 s, about what prefilling 1,000-6,000 tokens of the default model
        does), so a shape asked for once or twice never stalls the loop for a compile and one
        asked for often soon runs unpadded."""
        factor = self.buckets.reuse_larger_prefill
        fits = [shape for shape in self._prefill_shapes
                if factor and needed.fits_in(shape, factor)]
        shape = min(fits, key=PrefillShape.cost) if fits else needed
        padding = shape.num_tokens - needed.num_tokens
        if self._padded[needed] + padding > self.buckets.reuse_padding_tokens:
            shape, padding = needed, 0
        self._padded[needed] += padding
        self._prefill_shapes.add(shape)
        return shape

    def _slot(self, table: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Pool slots of the tokens at `positions` [..., n] under block tables `table` [...,
        width] (one table, or one per row)."""
        blocks = np.take_along_axis(table, positions // self.buckets.block_size, axis=-1)
        return (blocks * self.buckets.block_size + positions % self.buckets.block_size).astype(np.int32)

    def _decode_arrays(self, items: list[ScheduledSequence]):
        """One new token per sequence -> (token ids, positions, slots) [rows] and their
        AttentionMetadata [rows, 1]; padding rows have context 0 and write to the pad block.
        A row whose input token is not on the host yet (a sample of a call still running) gets
        0 here; the caller gives it on the device."""
        rows = self.buckets.decode_rows(len(items))
        width = self.buckets.blocks(max(len(item.seq.block_table) for item in items))
        tables = np.full((rows, width), PAD_BLOCK, np.int32)  # [rows, width]
        positions = np.zeros((rows,), np.int32)               # [rows]
        context_lens = np.zeros((rows,), np.int32)            # [rows]
        token_ids = np.zeros((rows,), np.int32)               # [rows]
        for i, item in enumerate(items):
            seq, start = item.seq, item.start
            assert item.num_new_tokens == 1, "decode rows carry exactly one new token"
            tables[i, :len(seq.block_table)] = seq.block_table
            positions[i], context_lens[i] = start, start + 1
            if start < seq.num_tokens:
                token_ids[i] = seq.token_ids_slice(start, start + 1)[0]
        slots = self._slot(tables, positions[:, None])[:, 0]  # [rows]
        slots[len(items):] = PAD_BLOCK * self.buckets.block_size
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
        total = sum(len(chunk) for _, chunk in chunks)
        rows, q_len, num_tokens, width = self._prefill_shape(PrefillShape(
            rows=self.buckets.rows(len(items)),
            q_len=query_bucket(max(len(chunk) for _, chunk in chunks)),
            num_tokens=packed_tokens_bucket(total),
            width=self.buckets.blocks(max(len(table) for table in tables))))
        block_tables = np.full((rows, width), PAD_BLOCK, np.int32)  # [rows, width]
        row_positions = np.zeros((rows, q_len), np.int32)           # [rows, q_len]
        context_lens = np.zeros((rows,), np.int32)                  # [rows]
        query_start_loc = np.full((rows + 1,), total, np.int32)     # [rows + 1]
        to_rows = np.full((rows, q_len), total - 1, np.int32)       # [rows, q_len]
        token_ids = np.zeros((num_tokens,), np.int32)               # [num_tokens]
        positions = np.zeros((num_tokens,), np.int32)               # [num_tokens]
        slots = np.full((num_tokens,), PAD_BLOCK * self.buckets.block_size, np.int32)
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
                sampling_rows, num_logprobs: int, num_prompt_logprobs: int = 0,
                num_steps: int = 1):
        """One step's work -> (StepInput of NumPy arrays, sampler flags).

        The packed row holds the decode rows first, then the prompt chunks; `sampling_rows`
        (one per sequence, in that order) become the sampler's rows. `num_prompt_logprobs`:
        0, or the top-N of the prompt tokens' logprobs the step computes (a LOGPROB_BUCKETS
        bucket). `num_steps`: decode steps the call runs at most (penalised rows' output tokens
        keep room for the ones it appends).
        """
        assert decode or prefill, "an empty step"
        parts, decode_meta, prefill_meta = [], None, None
        last_tokens = []  # packed index of each sequence's last new token
        if decode:
            *arrays, decode_meta = self._decode_arrays(decode)
            parts.append(arrays)
            last_tokens += range(len(decode))
        prompt_logprobs = None
        if prefill:
            *arrays, prefill_meta, ends = self._prefill_arrays(prefill)
            last_tokens += list(ends + (len(parts[0][0]) if parts else 0))
            parts.append(arrays)
            if num_prompt_logprobs:
                prompt_logprobs = PromptLogprobsInput(
                    _next_tokens(prefill, len(arrays[0])), num_prompt_logprobs)
        token_ids, positions, slots = (np.concatenate(column) for column in zip(*parts))
        # A decode-only step samples every row it runs (multi-step feeds them all back); a
        # prefill-only step samples one row per prompt row.
        if not prefill:
            num_rows = len(parts[0][0])
        elif not decode:
            num_rows = prefill_meta.attention.context_lens.shape[0]
        else:
            num_rows = self.buckets.rows(len(last_tokens))
        logits_indices = np.zeros((num_rows,), np.int32)  # [S]
        logits_indices[:len(last_tokens)] = last_tokens
        attention = StepAttention(positions=positions, slot_mapping=slots, decode=decode_meta,
                                  prefill=prefill_meta)
        sampling = sampler_lib.make_sampling_metadata(sampling_rows, pad_to=num_rows,
                                                      spare_output_columns=num_steps - 1)
        flags = sampler_lib.sampler_flags([row.params for row in sampling_rows], num_logprobs)
        return StepInput(token_ids=token_ids, attention=attention, logits_indices=logits_indices,
                         sampling=sampling, prompt_logprobs=prompt_logprobs), flags


def _next_tokens(prefill: list[ScheduledSequence], num_tokens: int) -> np.ndarray:
    """[num_tokens] the token after each packed prompt-chunk token in its sequence (0 after a
    sequence's last token, and in the padding)."""
    next_tokens = np.zeros((num_tokens,), np.int32)
    offset = 0
    for item in prefill:
        start = item.start + 1
        tokens = item.seq.token_ids_slice(start, start + item.num_new_tokens)
        next_tokens[offset:offset + len(tokens)] = tokens
        offset += item.num_new_tokens
    return next_tokens


def describe(step_input: StepInput) -> str:
    """The shape buckets of a step, for the compile log line."""
    att, parts = step_input.attention, [f"{step_input.token_ids.shape[0]} tokens"]
    if att.decode is not None:
        parts.append("decode rows x blocks %s" % (att.decode.block_tables.shape,))
    if att.prefill is not None:
        parts.append("prompt rows x q_len %s, %d blocks" % (
            att.prefill.attention.positions.shape, att.prefill.attention.block_tables.shape[1]))
    parts.append(f"{step_input.logits_indices.shape[0]} sampled rows")
    if step_input.prompt_logprobs is not None:
        parts.append(f"prompt logprobs (top {step_input.prompt_logprobs.num_logprobs})")
    return ", ".join(parts)
