"""StopChecker: every finish reason, their order, min_tokens, the prediction for samples still in
flight, and the ids the sampler bans (no model: a fake tokenizer decodes id i as " i")."""

from __future__ import annotations

try:
    from tests.fake_runner import FakeTokenizer
except ImportError:  # tests/ is on sys.path instead of the repo root
    from fake_runner import FakeTokenizer

from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.sequence import Sequence
from jinfer.engine.stopping import Finish, StopChecker
from jinfer.text.detokenizer import IncrementalDetokenizer

EOS = 2
CHECKER = StopChecker(eos_token_ids=[EOS], max_model_len=12)


def make_seq(prompt=(10, 11), tokenizer: bool = True, **params) -> Sequence:
    params = SamplingParams(**{"max_tokens": 6, **params})
    detok = IncrementalDetokenizer(FakeTokenizer(), list(prompt), stop=params.stop) \
        if tokenizer else None
    return Sequence(0, "r", 0, list(prompt), params, seed=0, detokenizer=detok)


def generate(seq: Sequence, tokens) -> list:
    """Appends `tokens` one by one as the engine does; the checks after each, up to a finish."""
    finishes = []
    for token in tokens:
        seq.output_token_ids.append(token)
        finishes.append(CHECKER.check(seq))
        if finishes[-1] is not None:
            break
    return finishes


def test_goes_on_until_max_tokens():
    seq = make_seq(max_tokens=3)
    assert generate(seq, [5, 6, 7, 8]) == [None, None, Finish("length")]
    assert seq.detokenizer.output_text == " 5 6 7"  # the last token's text is emitted too


def test_max_model_len_counts_the_prompt():
    seq = make_seq(prompt=range(10, 20), max_tokens=100)  # 10 prompt tokens of 12
    assert generate(seq, [5, 6]) == [None, Finish("length")]


def test_eos_stops_without_its_text_unless_ignored():
    seq = make_seq()
    assert generate(seq, [5, EOS]) == [None, Finish("stop", None)]
    assert seq.detokenizer.flush() == "" and seq.detokenizer.output_text == " 5"
    ignored = make_seq(ignore_eos=True)
    assert generate(ignored, [5, EOS, 6]) == [None, None, None]


def test_stop_token_id_reports_the_id():
    seq = make_seq(stop_token_ids=[7, 8])
    assert generate(seq, [5, 8]) == [None, Finish("stop", 8)]
    assert "8" not in seq.detokenizer.flush() + seq.detokenizer.output_text


def test_min_tokens_holds_eos_and_stop_ids_off():
    """Before min_tokens tokens are out, eos and stop ids go on (into the text); the first one
    after them stops."""
    seq = make_seq(min_tokens=2, stop_token_ids=[7])
    assert generate(seq, [EOS, 7, 7]) == [None, None, Finish("stop", 7)]
    assert seq.detokenizer.output_text + seq.detokenizer.flush() == f" {EOS} 7"


def test_stop_string_is_found_across_tokens_and_never_emitted():
    seq = make_seq(stop=["6 7"])
    assert generate(seq, [5, 6, 7, 8]) == [None, None, Finish("stop", "6 7")]
    assert seq.detokenizer.output_text == " 5 "
    held = make_seq(stop=["7 9"], max_tokens=3)  # "7" may begin it: held back, then flushed
    assert generate(held, [5, 6, 7]) == [None, None, Finish("length")]
    assert held.detokenizer.output_text == " 5 6 " and held.detokenizer.flush() == "7"


def test_min_tokens_does_not_hold_stop_strings_off():
    seq = make_seq(stop=["5"], min_tokens=3)
    assert generate(seq, [5]) == [Finish("stop", "5")]


def test_token_stops_come_before_text_and_length():
    seq = make_seq(stop_token_ids=[6], stop=["6"], max_tokens=2)
    assert generate(seq, [5, 6]) == [None, Finish("stop", 6)]
    seq = make_seq(stop=["6"], max_tokens=2)
    assert generate(seq, [5, 6]) == [None, Finish("stop", "6")]


def test_token_ids_only_without_a_tokenizer():
    seq = make_seq(tokenizer=False, stop_token_ids=[6])
    assert generate(seq, [5, 6]) == [None, Finish("stop", 6)]


def test_samples_in_flight_finish_only_by_length():
    """Ahead of read-back the samples' values are unknown: only lengths tell, and the
    detokenizer is left alone."""
    seq = make_seq(max_tokens=5)
    generate(seq, [5, 6])
    assert CHECKER.check(seq, num_ahead=2) is None
    assert CHECKER.check(seq, num_ahead=3) == Finish("length")
    long = make_seq(prompt=range(10, 19), max_tokens=100)  # 9 prompt tokens of 12
    generate(long, [5])
    assert CHECKER.check(long, num_ahead=1) is None
    assert CHECKER.check(long, num_ahead=2) == Finish("length")
    assert long.detokenizer.output_text == " 5"


def test_banned_ids_until_min_tokens():
    seq = make_seq(tokenizer=False, min_tokens=2, stop_token_ids=[9, 7])
    assert CHECKER.banned_ids(seq) == [9, 7, EOS]
    seq.output_token_ids.append(5)
    assert CHECKER.banned_ids(seq) == [9, 7, EOS]
    seq.output_token_ids.append(5)
    assert CHECKER.banned_ids(seq) == []
    assert CHECKER.banned_ids(make_seq(min_tokens=1, ignore_eos=True)) == []
    assert CHECKER.banned_ids(make_seq(min_tokens=1, ignore_eos=True, stop_token_ids=[3])) == [3]
    assert CHECKER.banned_ids(make_seq(stop_token_ids=[3])) == []
