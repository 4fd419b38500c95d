"""The shape buckets (jinfer/runner/buckets.py): every value a bucket returns holds its input,
and the buckets stay few."""

import pytest

from jinfer.runner.buckets import (StepBuckets, copies_bucket, decode_steps_bucket,
                                   decode_steps_buckets, logprobs_bucket, packed_tokens_bucket,
                                   query_bucket, three_quarter_bucket, token_list_bucket)


@pytest.mark.parametrize("wanted,limit,expected", [
    (100, 8, 8), (8, 8, 8), (7, 8, 1), (4, 8, 1), (2, 8, 1), (1, 8, 1), (0, 8, 1),
    (5, 6, 1), (6, 6, 6), (3, 1, 1)])
def test_decode_steps_bucket(wanted, limit, expected):
    assert decode_steps_bucket(wanted, limit) == expected
    assert expected == 1 or expected in decode_steps_buckets(limit)


@pytest.mark.parametrize("wanted,limit,expected", [
    (100, 8, 8), (8, 8, 8), (7, 8, 7), (3, 8, 3), (1, 8, 1), (0, 8, 1), (5, 1, 1)])
def test_decode_steps_bucket_of_any_count(wanted, limit, expected):
    """A program that takes any count (the "while" loop) runs what the rows want, up to limit."""
    assert decode_steps_bucket(wanted, limit, any_count=True) == expected


def test_decode_steps_buckets():
    assert decode_steps_buckets(8) == [8]
    assert decode_steps_buckets(6) == [6]
    assert decode_steps_buckets(1) == []


def test_three_quarter_and_packed_buckets():
    assert [three_quarter_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25)] == [
        1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert {packed_tokens_bucket(n) for n in range(1, 513)} == {
        16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512}
    assert [query_bucket(n) for n in (1, 2, 16, 17, 100)] == [1, 16, 16, 32, 128]


def test_list_buckets():
    assert [logprobs_bucket(w) for w in ([], [0], [1], [2, 5], [6])] == [0, 1, 1, 5, 20]
    assert [token_list_bucket(n) for n in (0, 1, 8, 9, 100)] == [0, 8, 8, 16, 128]
    assert [copies_bucket(n) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


@pytest.mark.parametrize("growth,minimum,expected", [
    ("3/4", 32, [2, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]),
    ("pow2", 128, [8, 8, 8, 8, 8, 8, 16, 16, 32, 32, 64, 64])])
def test_block_table_widths(growth, minimum, expected):
    """Widths hold the table, never pass the widest table (max_model_len), and the CPU's
    coarse buckets (from 128 tokens, powers of two) give few distinct widths."""
    buckets = StepBuckets(block_size=16, max_blocks_per_seq=64, min_context_tokens=minimum,
                          context_growth=growth)
    tables = [1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 64]
    widths = [buckets.blocks(n) for n in tables]
    assert widths == expected
    assert all(w >= n for w, n in zip(widths, tables))


def test_decode_rows_have_a_minimum():
    buckets = StepBuckets(block_size=16, max_blocks_per_seq=8, min_decode_rows=2)
    assert [buckets.decode_rows(n) for n in (1, 2, 3, 5)] == [2, 2, 4, 8]
    assert [buckets.rows(n) for n in (1, 3)] == [1, 4]
