"""Sequence: token counts, slices without copies, and the work left past tokens in flight."""

from __future__ import annotations

from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.sequence import Sequence, SequenceStatus


def make_seq(prompt=(1, 2, 3), outputs=(), **params) -> Sequence:
    seq = Sequence(0, "r", 0, list(prompt), SamplingParams(**params), seed=0, detokenizer=None)
    seq.output_token_ids = list(outputs)
    return seq


def test_counts_and_token_ids():
    seq = make_seq(outputs=(4, 5))
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (3, 2, 5)
    assert seq.token_ids() == [1, 2, 3, 4, 5]
    assert seq.status is SequenceStatus.WAITING and not seq.is_finished
    seq.status = SequenceStatus.FINISHED
    assert seq.is_finished


def test_token_ids_slice_reads_the_output_alone_when_it_can():
    seq = make_seq(outputs=(4, 5, 6))
    assert seq.token_ids_slice(4, 5) == [5]  # a decode's one token
    assert seq.token_ids_slice(2, 5) == [3, 4, 5]  # across the prompt's end
    assert seq.token_ids_slice(0, 2) == [1, 2]
    assert seq.token_ids_slice(5, 9) == [6]  # past the end: what there is


def test_uncomputed_tokens_count_samples_in_flight_and_skip_positions_in_flight():
    """What the next call can compute: every known or still-sampled token whose K/V no call
    computes yet."""
    seq = make_seq(prompt=range(10))
    assert seq.num_uncomputed_tokens == 10
    seq.num_in_flight = 10  # a call computes the whole prompt and samples its first token
    seq.num_samples_in_flight = 1
    assert seq.num_uncomputed_tokens == 1  # that sample's K/V, next
    seq.num_computed_tokens, seq.num_in_flight = 10, 0  # read back: the sample is on the host
    seq.num_samples_in_flight = 0
    seq.output_token_ids.append(7)
    assert seq.num_uncomputed_tokens == 1


def test_logprobs_are_kept_only_when_asked():
    assert make_seq().logprobs is None
    assert make_seq(logprobs=0).logprobs == []
