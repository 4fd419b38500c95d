"""A request inside the engine: its prompt and the n sequences generated for it."""

from __future__ import annotations

from typing import Optional

from jinfer.api.outputs import CompletionOutput, RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.engine.sequence import Sequence


class Request:
    """A prompt and its n sequences (sequence 0 prefills the prompt; the others fork from it)."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        """The request as it stands: every completion's text and tokens so far."""
        completions = [CompletionOutput(
            index=seq.index, text=seq.detokenizer.output_text if seq.detokenizer else "",
            token_ids=list(seq.output_token_ids), cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        ) for seq in self.seqs]
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, completions,
                             self.finished, self.seqs[0].prompt_logprobs)
