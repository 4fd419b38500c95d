"""Beam search on top of the engine, as vLLM's `LLM.beam_search` does it.

Each step asks the engine for one token of every live beam with its top 2 x beam_width logprobs,
then keeps the best `beam_width` extensions per prompt. Every beam is a request whose prompt is
the beam's tokens, so beams of one prompt share their common blocks through the prefix cache:
a fork costs no copy, and a dropped beam frees only what it alone held.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from jinfer.api.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """beam_width beams per prompt, each up to max_tokens new tokens.

    Scores are cumulative logprob / length ** length_penalty (length counts prompt and output,
    less a final eos), as in vLLM and HF.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0

    def __post_init__(self):
        if not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= 10:
            raise ValueError(f"beam_width must be an integer in [1, 10], got {self.beam_width!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")


@dataclasses.dataclass
class BeamSearchSequence:
    tokens: list[int]            # prompt + generated
    num_prompt_tokens: int
    cum_logprob: float = 0.0
    finished: bool = False
    text: Optional[str] = None   # the generated text, filled in at the end

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


def beam_score(beam: BeamSearchSequence, eos_token_ids, length_penalty: float) -> float:
    length = len(beam.tokens) - (1 if beam.finished and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / (length ** length_penalty)


def beam_search(llm, prompts: Sequence[Union[str, Sequence[int]]],
                params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Runs beam search for every prompt together; returns the beam_width best per prompt."""
    tokenizer, eos = llm.get_tokenizer(), llm.engine.eos_token_ids
    width = params.beam_width
    beams = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        beams.append([BeamSearchSequence(ids, len(ids))])
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    step_params = SamplingParams(temperature=0, max_tokens=1, logprobs=2 * width,
                                 ignore_eos=True)
    max_len = llm.config.max_model_len
    for _ in range(params.max_tokens):
        live = [(i, b) for i, group in enumerate(beams) for b in group
                if len(b.tokens) < max_len]
        if not live:
            break
        outputs = llm.generate(prompt_token_ids=[b.tokens for _, b in live],
                               sampling_params=step_params, use_tqdm=False)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(live, outputs):
            for token, logprob in out.outputs[0].logprobs[0].items():
                finished = token in eos and not params.ignore_eos
                new = BeamSearchSequence(beam.tokens + [token], beam.num_prompt_tokens,
                                         beam.cum_logprob + logprob.logprob, finished)
                (done[i] if finished else candidates[i]).append(new)
        beams = [sorted(c, key=lambda b: -beam_score(b, eos, params.length_penalty))[:width]
                 for c in candidates]
    results = []
    for group, finished in zip(beams, done):
        best = sorted(group + finished, key=lambda b: -beam_score(b, eos, params.length_penalty))
        for beam in best[:width]:
            beam.text = tokenizer.decode(beam.output_token_ids, skip_special_tokens=True)
        results.append(BeamSearchOutput(best[:width]))
    return results
