"""What `LLM.generate` returns, with vLLM's names."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class Logprob:
    """One candidate token's log-probability under the model's raw distribution."""

    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: Optional[str] = None


@dataclasses.dataclass
class CompletionOutput:
    """One generated sequence of a request (a request with n > 1 has n of them)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[dict[int, Logprob]]]  # per generated token, when asked for
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[object] = None  # the stop string or stop token id that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """A request's prompt and its completions (a stream's outputs are cumulative)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Per prompt token when asked for (SamplingParams.prompt_logprobs), complete from the first
    # output on; the first entry is None (nothing predicts the first token).
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
