"""SamplingParams: vLLM defaults, validation messages, normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer.api.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == () and p.stop_token_ids == ()
    assert (p.ignore_eos, p.max_tokens, p.min_tokens, p.logprobs) == (False, 16, 0, None)
    assert p.prompt_logprobs is None
    assert p.skip_special_tokens is True and p.include_stop_str_in_output is False
    assert not p.greedy and not p.has_penalties and not p.has_truncation


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(n=0), "n"),
    (dict(n="2"), "n"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=None), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=2.5), "prompt_logprobs"),
    (dict(prompt_logprobs="5"), "prompt_logprobs"),
    (dict(prompt_logprobs=True), "prompt_logprobs"),
    (dict(stop=""), "stop"),
    (dict(stop=["ok", ""]), "stop"),
    (dict(stop=[1, 2]), "stop"),
    (dict(stop_token_ids=[1, -5]), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"),
    (dict(seed=1.5), "seed"),
    (dict(seed="42"), "seed"),
    (dict(seed=True), "seed"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_invalid_field_raises_with_name_and_value(kwargs, field):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert field in message
    assert repr(next(iter(kwargs.values())))[:6] in message or field == "min_tokens"


def test_messages_state_valid_range():
    with pytest.raises(ValueError, match=r"top_p .*\(0, 1\]"):
        SamplingParams(top_p=2.0)
    with pytest.raises(ValueError, match=r"presence_penalty .*\[-2, 2\]"):
        SamplingParams(presence_penalty=9.0)
    with pytest.raises(ValueError, match=r"min_tokens .*max_tokens=10"):
        SamplingParams(min_tokens=11, max_tokens=10)
    with pytest.raises(ValueError, match=r"prompt_logprobs .*\[0, 20\] or None"):
        SamplingParams(prompt_logprobs=21)


def test_boundaries_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, logprobs=20, min_tokens=16, max_tokens=16, seed=-3)
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs == 0
    assert SamplingParams(prompt_logprobs=np.int64(20)).prompt_logprobs == 20


def test_numeric_coercion():
    p = SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), seed=np.int32(7))
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert type(p.top_k) is int and p.top_k == 5
    assert type(p.seed) is int and p.seed == 7


def test_stop_normalisation():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    assert SamplingParams(stop_token_ids=np.array([3, 4]).tolist()).stop_token_ids == (3, 4)


def test_greedy_and_feature_properties():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy  # vLLM's eps
    assert not SamplingParams(temperature=1e-4).greedy
    # Truncation is meaningless for greedy rows, so it does not count as a feature there.
    assert not SamplingParams(temperature=0.0, top_k=5).has_truncation
    assert SamplingParams(top_k=5).has_truncation
    assert SamplingParams(top_p=0.9).has_truncation
    assert SamplingParams(min_p=0.1).has_truncation
    assert SamplingParams(temperature=0.0, repetition_penalty=1.2).has_penalties
    assert SamplingParams(frequency_penalty=0.5).has_penalties
