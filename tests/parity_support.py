"""What the parity tests against transformers share (tests/test_parity_hf.py,
tests/test_families.py): scripts/make_parity_fixtures.py loaded as a module (scripts/ is not a
package), jinfer's greedy tokens, and the logits' error measure."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_fixture_module():
    name = "make_parity_fixtures"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def assert_pool_whole(llm) -> None:
    assert llm.engine.block_manager.is_whole(), f"KV blocks leaked: {llm.stats()}"


def greedy(llm, prompts, params) -> tuple[list[list[int]], list[list[float]]]:
    """jinfer's tokens and their log-probabilities (params: greedy, logprobs=0), all prompts in
    one generate call; the pool must be whole afterwards."""
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert_pool_whole(llm)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[entry[t].logprob for t, entry in zip(toks, o.outputs[0].logprobs)]
                for toks, o in zip(tokens, outputs)]
    return tokens, logprobs


def relative_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """[len, vocab] logits -> per position max |got - want| / max |want| (the position's scale:
    near-zero logits do not blow up)."""
    return np.abs(got - want).max(-1) / np.abs(want).max(-1)


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix)."""
    return next((s for s, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
