"""The batch step (jinfer/runner/batch.py): scheduled rows -> bucketed arrays, checked by hand,
and the reuse of a larger prefill shape on the CPU."""

from __future__ import annotations

import numpy as np

from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence
from jinfer.model.sampler import SamplingRow
from jinfer.runner.batch import BatchBuilder, PrefillShape
from jinfer.runner.buckets import StepBuckets

GREEDY = SamplingParams(temperature=0)


def _seq(seq_id: int, tokens: list[int], computed: int, table: list[int]) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, tokens, GREEDY, seed=0, detokenizer=None)
    seq.num_computed_tokens, seq.block_table = computed, table
    return seq


def _rows(items):
    return [SamplingRow(item.seq.params, 0, 0) for item in items]


def test_decode_then_prefill_in_one_packed_row():
    builder = BatchBuilder(StepBuckets(block_size=4, max_blocks_per_seq=8, min_context_tokens=8))
    decode = [ScheduledSequence(_seq(0, [5, 6, 7, 8, 9], 4, [3, 7]), 1)]
    prefill = [ScheduledSequence(_seq(1, [1, 2, 3], 0, [2]), 3)]
    step, flags = builder.prepare(decode, prefill, _rows(decode + prefill), 0)
    assert flags.all_greedy
    # Decode row: token 9 at position 4 -> block 7, offset 0 -> slot 28.
    assert step.token_ids[0] == 9 and step.attention.positions[0] == 4
    assert step.attention.slot_mapping[0] == 28
    assert list(step.attention.decode.block_tables[0]) == [3, 7]
    assert step.attention.decode.context_lens[0] == 5
    # Prompt chunk after the decode row: tokens 1, 2, 3 at positions 0-2 of block 2.
    assert list(step.token_ids[1:4]) == [1, 2, 3]
    assert list(step.attention.slot_mapping[1:4]) == [8, 9, 10]
    assert (step.attention.slot_mapping[4:] == 0).all()  # padding writes to the pad block
    # Sampled rows: the decode row, then the prompt's last token (packed index 3).
    assert list(step.logits_indices[:2]) == [0, 3]


def test_prompt_logprobs_score_the_token_after_each_prompt_token():
    """The prompt chunks' next tokens, back to back after the decode rows (0 after a
    sequence's last known token and in the padding); none without prompt logprobs."""
    builder = BatchBuilder(StepBuckets(block_size=4, max_blocks_per_seq=8, min_context_tokens=8))
    decode = [ScheduledSequence(_seq(0, [5, 6, 7, 8, 9], 4, [3, 7]), 1)]
    prefill = [ScheduledSequence(_seq(1, [1, 2, 3, 4, 5], 0, [2, 4]), 3),  # a first chunk
               ScheduledSequence(_seq(2, [6, 7, 8], 1, [5]), 2)]           # a last chunk
    items = decode + prefill
    step, _ = builder.prepare(decode, prefill, _rows(items), 0, num_prompt_logprobs=5)
    assert step.prompt_logprobs.num_logprobs == 5
    assert step.token_ids.shape == (1 + 16,) and step.prompt_logprobs.next_tokens.shape == (16,)
    assert list(step.prompt_logprobs.next_tokens[:6]) == [2, 3, 4, 8, 0, 0]
    assert builder.prepare(decode, prefill, _rows(items), 0)[0].prompt_logprobs is None


def test_a_prefill_reuses_a_larger_shape_within_the_factor():
    buckets = StepBuckets(block_size=16, max_blocks_per_seq=64, min_context_tokens=256,
                          context_growth="pow2", reuse_larger_prefill=4)
    builder = BatchBuilder(buckets)
    first = [ScheduledSequence(_seq(0, list(range(40)), 0, [1, 2, 3]), 40)]
    step, _ = builder.prepare([], first, _rows(first), 0)
    assert step.token_ids.shape == (48,)
    # The same prompt with its first two blocks cached: 8 new tokens, bucket 16 of its own,
    # laid out in the 48-token shape already compiled (3x the work).
    again = [ScheduledSequence(_seq(1, list(range(40)), 32, [1, 2, 3]), 8)]
    step, _ = builder.prepare([], again, _rows(again), 0)
    assert step.token_ids.shape == (48,)
    assert list(step.token_ids[:8]) == list(range(32, 40))
    assert step.logits_indices[0] == 7
    # Far smaller work than any shape seen: its own buckets.
    tiny = PrefillShape(rows=1, q_len=1, num_tokens=16, width=16)
    assert builder._prefill_shape(tiny) == tiny


def test_a_reused_shape_gets_its_own_program_once_its_padding_budget_is_spent():
    buckets = StepBuckets(block_size=16, max_blocks_per_seq=64, min_context_tokens=256,
                          context_growth="pow2", reuse_larger_prefill=4, reuse_padding_tokens=64)
    builder = BatchBuilder(buckets)
    first = [ScheduledSequence(_seq(0, list(range(40)), 0, [1, 2, 3]), 40)]
    assert builder.prepare([], first, _rows(first), 0)[0].token_ids.shape == (48,)
    again = [ScheduledSequence(_seq(1, list(range(40)), 32, [1, 2, 3]), 8)]
    # 32 padded tokens a step: the second step spends the budget of 64, the third would pass it.
    shapes = [builder.prepare([], again, _rows(again), 0)[0].token_ids.shape for _ in range(4)]
    assert shapes == [(48,), (48,), (16,), (16,)]


def test_no_reuse_where_the_factor_is_zero():
    builder = BatchBuilder(StepBuckets(block_size=16, max_blocks_per_seq=64))
    for n in (40, 8):
        items = [ScheduledSequence(_seq(n, list(range(n)), 0, [1, 2, 3]), n)]
        step, _ = builder.prepare([], items, _rows(items), 0)
        assert step.token_ids.shape == ({40: 48, 8: 16}[n],)


def test_padding_rows_of_a_reused_shape_sample_nothing_real():
    buckets = StepBuckets(block_size=4, max_blocks_per_seq=16, reuse_larger_prefill=4,
                          min_context_tokens=16)
    builder = BatchBuilder(buckets)
    two = [ScheduledSequence(_seq(i, [1, 2, 3, 4, 5], 0, [1 + 2 * i, 2 + 2 * i]), 5)
           for i in range(2)]
    builder.prepare([], two, _rows(two), 0)
    one = two[:1]
    step, _ = builder.prepare([], one, _rows(one), 0)
    meta = step.attention.prefill
    assert meta.attention.context_lens.shape == (2,)
    np.testing.assert_array_equal(meta.attention.context_lens, [5, 0])
    assert step.logits_indices.shape == (2,)
