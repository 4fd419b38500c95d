"""Beam search through the engine against a plain recompute-everything beam search."""

from __future__ import annotations

import numpy as np
import pytest

from jinfer import LLM, BeamSearchParams, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # float32 on every platform (dtype "auto" is bfloat16 on a GPU): the reference below
    # recomputes the whole prompt each step, and only float32 agrees with decode to 1e-3.
    return LLM(str(tiny_model_dir), num_kv_blocks=256, max_model_len=256, dtype="float32",
               enable_compilation_cache=False)


def reference_beam_search(llm, prompt_ids, width, steps, length_penalty=1.0):
    """Exact log-softmax from full prompt logits at every step; no eos (ignore_eos)."""
    beams = [(list(prompt_ids), 0.0)]
    for _ in range(steps):
        candidates = []
        for tokens, score in beams:
            row = llm.prompt_logits(tokens)[-1].astype(np.float64)
            logprobs = row - row.max() - np.log(np.exp(row - row.max()).sum())
            for token in np.argsort(-logprobs)[:2 * width]:
                candidates.append((tokens + [int(token)], score + logprobs[token]))
        candidates.sort(key=lambda c: -c[1] / len(c[0]) ** length_penalty)
        beams = candidates[:width]
    return beams


@pytest.mark.parametrize("width", [1, 3])
def test_beam_search_matches_reference(llm, width):
    prompt = llm.get_tokenizer().encode("The quick brown fox")
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=4,
                                                     ignore_eos=True))[0]
    expected = reference_beam_search(llm, prompt, width, 4)
    assert [b.tokens for b in out.sequences] == [tokens for tokens, _ in expected]
    for beam, (_, score) in zip(out.sequences, expected):
        assert beam.cum_logprob == pytest.approx(score, abs=1e-3)
    assert llm.engine.block_manager.is_whole()


def test_beam_width_one_is_greedy(llm):
    prompt = "Why is the sky blue?"
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    beam = llm.beam_search([prompt], BeamSearchParams(beam_width=1, max_tokens=6,
                                                      ignore_eos=True))[0].sequences[0]
    assert beam.output_token_ids == greedy.token_ids
    assert beam.text == greedy.text


def test_bad_beam_params():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
