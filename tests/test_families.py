"""End-to-end parity with Hugging Face transformers for the decoder families beyond Llama: Qwen2,
Qwen3, Mistral, Gemma 2, Gemma 3, Phi-3, and the mixtures of experts Mixtral and Qwen3-MoE
(jinfer.model.families).

Each family's tiny random float32 checkpoint comes from `scripts/make_parity_fixtures.py` (its own
transformers config class, every weight redrawn: norms, biases; windows of 8 or 16 tokens) and is
loaded by `jinfer.LLM` and by transformers (eager attention, CPU torch), then compared:

- prompt logits at every position of two prompts of 36 and 41 tokens (past every window, and
  past Phi-3's LongRoPE original context of 32, so both take its long factors),
- greedy generation of 32 tokens with chunked prefill (16-token chunks) and prefix caching (the
  second prompt shares two blocks with the first), checked by teacher forcing: one HF forward
  over prompt + continuation must pick jinfer's token at every step,
- Phi-3's short LongRoPE factors where max_model_len stays within the original context,
- Gemma 3 (windowed and global layers) and Mixtral (experts, every layer windowed) under block
  sizes 1, 16 and 32,
- the chat template and the end-of-turn token every family stops at.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jinfer  # noqa: E402
from jinfer import SamplingParams  # noqa: E402
from parity_support import (assert_pool_whole, first_difference, greedy,  # noqa: E402
                             load_fixture_module, relative_errors)

fixtures = load_fixture_module()

FAMILIES = fixtures.OTHER_FAMILIES
SHARED_PREFIX = 32     # tokens the second prompt shares with the first: two 16-token blocks
MAX_TOKENS = 32
MAX_MODEL_LEN = 96
LOGITS_RTOL = 1e-4     # max |jinfer - HF| / max |HF| per position, both float32
LOGPROB_ATOL = 1e-4    # per generated token, log-softmax of float32 logits
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
CHAT = [{"role": "user", "content": "What is the sky made of? "}]
END_OF_TURN = {"qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "mistral": "</s>",
               "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>",
               "mixtral": "</s>", "qwen3_moe": "<|im_end|>"}


class Reference:
    """One family's checkpoint folder, its prompts and transformers' logits on them."""

    def __init__(self, family: str, folder: pathlib.Path):
        self.family = family
        self.folder, self.model, (first, tail), _ = fixtures.make_fixture(
            family, folder, lengths=(36, 41 - SHARED_PREFIX))
        self.prompts = [first, first[:SHARED_PREFIX] + tail]
        self.logits = fixtures.reference_logits(self.model, self.prompts)


_REFERENCES: dict[str, Reference] = {}
_LLMS: dict[str, "jinfer.LLM"] = {}


def get_reference(family: str, tmp_path_factory) -> Reference:
    if family not in _REFERENCES:
        _REFERENCES[family] = Reference(family, tmp_path_factory.mktemp(family))
    return _REFERENCES[family]


def get_llm(ref: Reference) -> "jinfer.LLM":
    """The family's LLM with 16-token blocks (shared by the tests of the module)."""
    if ref.family not in _LLMS:
        _LLMS[ref.family] = make_llm(ref)
    return _LLMS[ref.family]


def make_llm(ref: Reference, block_size: int = 16, **kwargs) -> "jinfer.LLM":
    """jinfer on the reference folder: 16-token prefill chunks, prefix caching on."""
    kwargs.setdefault("max_model_len", MAX_MODEL_LEN)
    return jinfer.LLM(str(ref.folder), dtype="float32", block_size=block_size,
                      num_kv_blocks=1 + 4 * MAX_MODEL_LEN // block_size,
                      max_num_batched_tokens=16, enable_prefix_caching=True, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request, tmp_path_factory) -> Reference:
    return get_reference(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llm(reference) -> "jinfer.LLM":
    return get_llm(reference)


def assert_logits_match(llm, prompts, logits, what: str) -> float:
    worst = 0.0
    for ids, want in zip(prompts, logits):
        got = llm.prompt_logits(ids)
        assert_pool_whole(llm)
        assert got.shape == want.shape and np.isfinite(got).all()
        errors = relative_errors(got, want)
        bad = np.flatnonzero(errors > LOGITS_RTOL)
        assert not len(bad), (f"{what}: prompt of {len(ids)} tokens, positions {bad[:10]} "
                              f"exceed relative error {LOGITS_RTOL} (max {errors.max():.3g})")
        worst = max(worst, float(errors.max()))
    return worst


def assert_hf_greedy_agrees(ref: Reference, prompts, tokens, logprobs, what: str) -> float:
    """Checks jinfer's greedy continuations against one transformers forward over each prompt
    and its continuation (teacher forcing): at every generated position HF's argmax is
    jinfer's token, so HF's greedy decoding makes the same choices, and its log-probability
    matches. Returns the largest log-probability error."""
    worst = 0.0
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        logits = fixtures.reference_logits(ref.model, [prompt + toks[:-1]])[0][len(prompt) - 1:]
        want = logits.argmax(-1).tolist()  # [steps]
        if toks != want:
            step = first_difference(toks, want)
            top2 = np.sort(logits[step])[-2:]
            pytest.fail(f"{ref.family} {what}: a prompt of {len(prompt)} tokens diverges from "
                        f"HF's greedy choice at step {step}; HF's top-1/top-2 logit gap there is "
                        f"{top2[1] - top2[0]:.3g}\n  jinfer {toks}\n  HF     {want}")
        hf = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
        worst = max(worst, float(np.abs(hf[np.arange(len(toks)), toks] - lps).max()))
    assert worst <= LOGPROB_ATOL, f"{ref.family} {what}: logprob error {worst:.3g}"
    return worst


# ----------------------------------------------------------------------------- model parity

def test_prompt_logits_match_hf(reference, llm):
    worst = assert_logits_match(llm, reference.prompts, reference.logits, reference.family)
    print(f"\n{reference.family}: max relative logits error vs HF {worst:.3g}")


def test_greedy_with_chunked_prefill_and_prefix_caching_matches_hf(reference, llm):
    """Both prompts in one call: the second is admitted while the first is prefilled in
    16-token chunks and finds their shared blocks in the prefix cache."""
    tokens, logprobs = greedy(llm, reference.prompts, GREEDY)
    assert llm.stats()["prefix_cache_hit_rate"] > 0, llm.stats()
    # Mistral, Phi-3 and Mixtral window every layer: their sequences release the blocks behind
    # it.
    windows = {"mistral": 8, "phi3": 16, "mixtral": 8}
    assert llm.engine.block_manager.sliding_window == windows.get(reference.family)
    worst = assert_hf_greedy_agrees(reference, reference.prompts, tokens, logprobs,
                                    "greedy, chunked prefill, prefix caching")
    print(f"\n{reference.family}: max generated-token logprob error vs HF {worst:.3g}")


@pytest.mark.parametrize("block_size", [1, 32])
@pytest.mark.parametrize("family", ["gemma3", "mixtral"])
def test_block_sizes_give_the_same_tokens(family, block_size, tmp_path_factory):
    """Gemma 3 (8-token windows on two layers of three, global RoPE on the third) and Mixtral
    (experts; an 8-token window on every layer, whose blocks behind it are released): pages of
    1 and 32 tokens give the tokens of pages of 16, which HF agrees with."""
    ref = get_reference(family, tmp_path_factory)
    want, _ = greedy(get_llm(ref), ref.prompts, GREEDY)
    tokens, logprobs = greedy(make_llm(ref, block_size=block_size), ref.prompts, GREEDY)
    assert tokens == want
    assert_hf_greedy_agrees(ref, ref.prompts, tokens, logprobs, f"block size {block_size}")


@pytest.mark.parametrize("impl", ["pallas", "pallas_pairs"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_expert_kernels_in_the_engine_match_hf(family, impl, tmp_path_factory):
    """The grouped-matmul kernels (interpret mode on the CPU), sorted by expert and by pair,
    in the whole engine: prompt logits and greedy tokens as HF gives them (the default on the
    CPU gathers or runs ragged_dot)."""
    from jinfer.config import KernelConfig
    ref = get_reference(family, tmp_path_factory)
    llm = make_llm(ref, kernel_config=KernelConfig(moe_impl=impl))
    assert_logits_match(llm, ref.prompts, ref.logits, f"{family}, moe_impl={impl}")
    tokens, logprobs = greedy(llm, ref.prompts, GREEDY)
    assert_hf_greedy_agrees(ref, ref.prompts, tokens, logprobs, f"moe_impl={impl}")


def test_pallas_attention_kernels_in_the_engine_match_hf(tmp_path_factory):
    """Qwen3 through the Pallas attention kernels (interpret mode on the CPU): the decode rows'
    q/k head norms run inside the fused decode kernel, the prompt's in XLA; prompt logits and
    greedy tokens as HF gives them (the default on the CPU is the jnp reference)."""
    ref = get_reference("qwen3", tmp_path_factory)
    llm = make_llm(ref, attention_backend="pallas")
    assert_logits_match(llm, ref.prompts, ref.logits, "qwen3, pallas attention")
    tokens, logprobs = greedy(llm, ref.prompts, GREEDY)
    assert_hf_greedy_agrees(ref, ref.prompts, tokens, logprobs, "pallas attention")


def test_phi3_short_factors_within_the_original_context(tmp_path_factory):
    """max_model_len up to LongRoPE's original context (32): the short factors, which HF
    takes for sequences that short."""
    ref = get_reference("phi3", tmp_path_factory)
    llm = make_llm(ref, max_model_len=32)
    assert not llm.model_config.rope_scaling.long
    prompts = [ref.prompts[0][:n] for n in (9, 31)]
    worst = assert_logits_match(llm, prompts, fixtures.reference_logits(ref.model, prompts),
                                "phi3 short factors")
    print(f"\nphi3 (short factors): max relative logits error vs HF {worst:.3g}")


# ----------------------------------------------------------------------------- tokenizer

def test_chat_template_and_end_of_turn(reference, llm):
    ours = llm.get_tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(str(reference.folder))
    rendered = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == rendered
    assert ours.encode(rendered) == theirs.encode(rendered)
    end_of_turn = theirs.convert_tokens_to_ids(END_OF_TURN[reference.family])
    assert end_of_turn in llm.engine.eos_token_ids
