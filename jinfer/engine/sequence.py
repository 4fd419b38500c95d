"""Host-side state of one generated sequence: tokens, blocks, progress, detokenizer."""

from __future__ import annotations

import enum
from typing import Optional

from jinfer.api.outputs import Logprob


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One completion being generated.

    `num_computed_tokens` counts tokens whose K/V are in the pool; the rest of `token_ids` still
    has to be prefilled (the prompt, a prompt chunk, or everything after a preemption).

    With lookahead (see jinfer.engine.llm_engine) a device call may still be computing the next
    `num_in_flight` positions after those, and sampling `num_samples_in_flight` tokens that
    follow `token_ids` but are not on the host yet: the scheduler counts both when it plans a
    call (and plans past them), and the engine folds them into `num_computed_tokens` and
    `output_token_ids` when it reads the call back.
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params, seed: int, detokenizer):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n completions
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.detokenizer = detokenizer
        # [num blocks] physical block of each block_size positions; PAD_BLOCK where released
        # (outside the sliding window: see BlockManager)
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_in_flight = 0          # positions past num_computed_tokens an unread call computes
        self.num_samples_in_flight = 0  # tokens past token_ids it samples (still on the device)
        self.status = SequenceStatus.WAITING
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[object] = None
        self.cumulative_logprob = 0.0
        self.logprobs: Optional[list[dict[int, Logprob]]] = (
            [] if params.logprobs is not None else None)
        # Per prompt token, filled as the prompt's chunks are read back; held by sequence 0
        # alone (n > 1 siblings fork after the prompt), None when not asked for.
        self.prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = (
            [None] if params.prompt_logprobs is not None and index == 0 else None)
        self.num_preemptions = 0
        self.resumed_at_step = -1  # scheduler step at which it last resumed after a preemption

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """token_ids()[start:end] without copying the whole sequence (decode reads one token)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        return self.token_ids()[start:end]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all read back yet: the prompt's positions must all
        be computed (no prefix-cache hits)."""
        return (self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens (known or still being sampled) whose K/V no call has computed or is computing:
        what the next step can compute."""
        return (self.num_tokens + self.num_samples_in_flight
                - self.num_computed_tokens - self.num_in_flight)
