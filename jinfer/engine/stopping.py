"""When a sequence finishes, and why: every finishing rule in one place (`StopChecker.check`).

The rules, in the order they are tried after each sampled token:
  1. an eos id (unless ignore_eos) or a stop token id, once min_tokens tokens came before it:
     "stop" (stop_reason: the stop id; None for eos). Its text is never emitted.
  2. a stop string in the output text: "stop" (stop_reason: the string). The sequence's
     detokenizer finds it, across token boundaries, and holds back text that may begin one.
     min_tokens does not hold stop strings off.
  3. max_tokens output tokens, or max_model_len tokens in all: "length".

min_tokens also has a device side: until a row has generated min_tokens tokens the sampler bans
its eos and stop ids (`banned_ids`), so rule 1 never meets them early with sampled tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from jinfer.engine.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class Finish:
    """Why a sequence finished, as `CompletionOutput` reports it."""

    reason: str                   # "stop" or "length"
    stop_reason: object = None    # the stop token id or stop string; None for eos and length


class StopChecker:
    """The finishing rules of one engine: its eos ids and max_model_len, with each sequence's
    own SamplingParams."""

    def __init__(self, eos_token_ids: Iterable[int], max_model_len: int):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def check(self, seq: Sequence, num_ahead: int = 0) -> Optional[Finish]:
        """Whether `seq` finishes, and why (None: it goes on).

        num_ahead 0: `seq`'s newest output token was just read back, and its detokenizer has
        not seen it yet. Rules 1-3 of the module docstring, in order; the token goes on to the
        detokenizer (which matches stop strings) unless rule 1 finishes the sequence.

        num_ahead > 0 (lookahead): whether `seq` finishes once `num_ahead` more samples, still
        on the device, are read back. Their values are unknown, so only rule 3 can tell; the
        scheduler plans nothing more for a sequence that finishes so.
        """
        assert num_ahead >= 0, num_ahead
        params = seq.params
        num_output = seq.num_output_tokens + num_ahead
        if num_ahead == 0:
            token = seq.output_token_ids[-1]
            if num_output > params.min_tokens:  # min_tokens tokens before this one
                if token in params.stop_token_ids:
                    return Finish("stop", token)
                if not params.ignore_eos and token in self.eos_token_ids:
                    return Finish("stop")
            detok = seq.detokenizer  # None without a tokenizer: token ids only
            if detok is not None:
                detok.append(token)
                if detok.stop_reason is not None:
                    return Finish("stop", detok.stop_reason)
        if (num_output >= params.max_tokens
                or seq.num_tokens + num_ahead >= self.max_model_len):
            return Finish("length")
        return None

    def banned_ids(self, seq: Sequence) -> list[int]:
        """The ids the sampler bans for `seq`'s next tokens: its stop ids and the eos ids (unless
        ignore_eos) while it has fewer than min_tokens output tokens on the host. The sampler
        lifts the ban itself once the row's step reaches min_tokens (see SamplingRow)."""
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            return []
        banned = list(params.stop_token_ids)
        if not params.ignore_eos:
            banned += sorted(self.eos_token_ids)
        return banned
