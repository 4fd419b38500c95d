"""Request-level sampling options (`SamplingParams`), with vLLM's names, defaults and semantics.

A `SamplingParams` is plain host-side data: it is validated once when built, so that bad user
input fails at `generate()` time with a message that says how to fix it, never inside jit.
`jinfer.model.sampler` turns a batch of them into per-row device arrays.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

# Temperatures below this are treated as greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5

# Most top logprobs a request may ask for per generated or prompt token (the OpenAI API's limit).
MAX_LOGPROBS = 20


def _check_int(name: str, value, lo: int, hi: Optional[int] = None, hint: str = "") -> int:
    """Returns `value` as an int, or raises ValueError naming the field, value and valid range."""
    valid = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {valid}{hint}, got {value!r} "
                         f"(type {type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {valid}{hint}, got {value!r}")
    return int(value)


def _check_float(name: str, value, valid: str, ok) -> float:
    """Returns `value` as a float if it is a finite real number with `ok(value)` true.

    `valid` describes the accepted range for the error message, e.g. "in (0, 1]".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number {valid}, got {value!r} "
                         f"(type {type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a number {valid}, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _normalize_stop(stop) -> tuple[str, ...]:
    """None, a string or a sequence of strings -> tuple of non-empty strings."""
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"stop must contain only strings, got {item!r} in {stop!r}")
        if not item:
            raise ValueError(f"stop strings must be non-empty, got {stop!r}; "
                             "remove the empty string")
    return tuple(items)


def _normalize_stop_token_ids(ids) -> tuple[int, ...]:
    """None or a sequence of non-negative ints -> tuple of ints."""
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise ValueError(f"stop_token_ids must be a list of token ids (ints), got {ids!r}")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0:
            raise ValueError(f"stop_token_ids must contain only token ids (integers >= 0), "
                             f"got {i!r} in {ids!r}")
    return tuple(int(i) for i in ids)


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request's completion (vLLM's `SamplingParams` subset).

    Attributes:
      n: number of completions to generate for the prompt.
      temperature: softmax temperature; 0 (or below 1e-5) means greedy argmax.
      top_p: nucleus sampling, keep the smallest set of tokens whose probability sums to >= top_p.
        1 disables it.
      top_k: keep the k most likely tokens; 0 or -1 disables it.
      min_p: drop tokens whose probability is below min_p times the most likely token's; 0 = off.
      repetition_penalty: HF/vLLM multiplicative penalty on tokens seen in the prompt or output
        (positive logits are divided by it, negative ones multiplied); 1 = off.
      presence_penalty: OpenAI additive penalty on tokens present in the output; in [-2, 2].
      frequency_penalty: OpenAI additive penalty times the token's count in the output; [-2, 2].
      seed: makes sampling reproducible; None lets the engine draw one.
      stop: strings that end generation when they appear in the output (tuple after init).
      stop_token_ids: token ids that end generation (tuple after init).
      ignore_eos: keep generating after the EOS token.
      max_tokens: most tokens to generate (generation also stops at max_model_len).
      min_tokens: EOS and stop tokens are banned until this many tokens are generated.
      logprobs: number of top log-probabilities to return per generated token; 0 returns only
        the sampled token's; None returns none.
      prompt_logprobs: the same for every prompt token (its own logprob, rank and the top-N),
        computed in the prefill; None returns none. Every prompt position is then computed:
        the request takes no prefix-cache hits.
      skip_special_tokens: leave special tokens out of the detokenized text.
      include_stop_str_in_output: keep the matched stop string at the end of the text.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Union[None, str, Sequence[str]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        self.n = _check_int("n", self.n, 1)
        self.temperature = _check_float("temperature", self.temperature,
                                        ">= 0 (0 means greedy)", lambda v: v >= 0)
        self.top_p = _check_float("top_p", self.top_p, "in (0, 1] (1 disables it)",
                                  lambda v: 0 < v <= 1)
        self.top_k = _check_int("top_k", self.top_k, -1, hint=" (0 or -1 disables it)")
        self.min_p = _check_float("min_p", self.min_p, "in [0, 1] (0 disables it)",
                                  lambda v: 0 <= v <= 1)
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, "> 0 (1 disables it)",
            lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, _check_float(name, getattr(self, name),
                                             "in [-2, 2] (0 disables it)", lambda v: -2 <= v <= 2))
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
                raise ValueError(f"seed must be an integer or None, got {self.seed!r} "
                                 f"(type {type(self.seed).__name__})")
            self.seed = int(self.seed)
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            _check_bool(name, getattr(self, name))
        self._check_lengths()
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _check_int(name, getattr(self, name), 0, MAX_LOGPROBS,
                                               hint=" or None"))

    def _check_lengths(self) -> None:
        self.max_tokens = _check_int("max_tokens", self.max_tokens, 1)
        self.min_tokens = _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}; lower min_tokens or raise max_tokens")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0, or below 1e-5 as in vLLM)."""
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition/presence/frequency penalties is active."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def has_truncation(self) -> bool:
        """True when top-k, top-p or min-p cuts the distribution (never for greedy requests)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0)
