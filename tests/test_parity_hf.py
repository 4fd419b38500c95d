"""End-to-end parity with Hugging Face transformers on tiny random Llama-family models.

For each family of `scripts/make_parity_fixtures.py` (llama2: sentencepiece, rope 1e4, untied;
llama3: llama3 RoPE scaling with original_max_position_embeddings 64, byte-level BPE; smollm2:
tied, 9/3 heads) a random float32 checkpoint is written, then loaded by `jinfer.LLM` and by
transformers (eager attention, float32 CPU torch), and compared:

- prompt logits at every position (prompts of 1..150 tokens, past the llama3 scaling horizon),
- tokenizer encode / decode / chat template,
- greedy generation of a batch of prompts (token ids and each token's log-probability),
- invariance to paging: block sizes 1/16/32, a shuffled free list, chunked prefill, preemption.

After every workload the KV pool must be whole again (no leaked blocks).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jinfer  # noqa: E402
from parity_support import (assert_pool_whole, first_difference, greedy,  # noqa: E402
                             load_fixture_module, relative_errors)
from jinfer import SamplingParams  # noqa: E402



fixtures = load_fixture_module()

# Query buckets 1, 16, 16, 128, 256; 70 and 150 run past llama3's original_max_position (64).
PROMPT_LENGTHS = (1, 5, 13, 70, 150)
MAX_TOKENS = 24
MAX_MODEL_LEN = 256
LOGITS_RTOL = 1e-4     # max |jinfer - HF| / max |HF| per position, both float32
LOGPROB_ATOL = 1e-4    # per generated token, log-softmax of float32 logits
PAGING_RTOL = 1e-5     # jinfer vs jinfer under another paging layout
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)

TEXTS = [
    "Hello world",
    " The quick brown fox jumps over the lazy dog.",
    "Numbers 12345 and 3.14159, dates 2024-01-01",
    "  two leading spaces and trailing   ",
    "new\nlines\n\nand\ttabs",
    "caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e emoji \U0001F600\U0001F680 (byte fallback)",
    "<|im_start|>user\nhi<|im_end|>",
]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the sky made of? "}]


# ----------------------------------------------------------------------------- fixtures

class Reference:
    """One family's checkpoint folder and transformers' answers on it."""

    def __init__(self, family: str, folder: pathlib.Path):
        self.family = family
        self.folder, self.model, self.prompts, self.logits = fixtures.make_fixture(
            family, folder, lengths=PROMPT_LENGTHS)
        self.tokens, self.logprobs, self.margins = fixtures.reference_greedy(
            self.model, self.prompts, MAX_TOKENS)


@pytest.fixture(scope="module", params=fixtures.FAMILIES)
def family(request) -> str:
    return request.param


_REFERENCES: dict[str, Reference] = {}
_LLMS: dict[str, "jinfer.LLM"] = {}


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory) -> Reference:
    if family not in _REFERENCES:
        _REFERENCES[family] = Reference(family, tmp_path_factory.mktemp(family))
    return _REFERENCES[family]


def make_llm(ref: Reference, block_size: int = 16, **kwargs) -> "jinfer.LLM":
    """jinfer on the reference folder; the pool holds every prompt's full sequence at once."""
    kwargs.setdefault("num_kv_blocks", 1 + 512 // block_size)
    return jinfer.LLM(str(ref.folder), dtype="float32", block_size=block_size,
                      max_model_len=MAX_MODEL_LEN, **kwargs)


@pytest.fixture(scope="module")
def llm(reference) -> "jinfer.LLM":
    if reference.family not in _LLMS:
        _LLMS[reference.family] = make_llm(reference)
    return _LLMS[reference.family]


def assert_same_tokens(got: list[list[int]], ref: Reference, what: str) -> None:
    for i, (g, want) in enumerate(zip(got, ref.tokens)):
        if g != want:
            step = first_difference(g, want)
            pytest.fail(
                f"{ref.family} {what}: prompt {i} (length {len(ref.prompts[i])}) diverges from "
                f"HF at step {step}; HF's top-1/top-2 logit gap there is "
                f"{ref.margins[i][min(step, len(want) - 1)]:.3g}\n  jinfer {g}\n  HF     {want}")


# ----------------------------------------------------------------------------- model parity

def test_prompt_logits_match_hf(reference, llm):
    worst = 0.0
    for ids, want in zip(reference.prompts, reference.logits):
        got = llm.prompt_logits(ids)
        assert_pool_whole(llm)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert np.isfinite(got).all()
        errors = relative_errors(got, want)
        worst = max(worst, max(errors))
        bad = [p for p, e in enumerate(errors) if e > LOGITS_RTOL]
        assert not bad, (f"{reference.family}: prompt of {len(ids)} tokens, positions {bad[:10]} "
                         f"exceed relative error {LOGITS_RTOL} (max {max(errors):.3g})")
    print(f"\n{reference.family}: max relative logits error vs HF {worst:.3g}")


def test_greedy_generation_matches_hf(reference, llm):
    tokens, logprobs = greedy(llm, reference.prompts, GREEDY)
    assert_same_tokens(tokens, reference, "greedy batch")
    worst = max(float(np.abs(np.subtract(g, w)).max())
                for g, w in zip(logprobs, reference.logprobs))
    print(f"\n{reference.family}: max generated-token logprob error vs HF {worst:.3g}")
    assert worst <= LOGPROB_ATOL


def test_prompt_logprobs_match_hf(reference, llm):
    """Each prompt token's logprob (prompt_logprobs) against the log_softmax of HF's logits."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate(prompt_token_ids=reference.prompts, sampling_params=params,
                           use_tqdm=False)
    assert_pool_whole(llm)
    for ids, logits, out in zip(reference.prompts, reference.logits, outputs):
        want = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()
        got = [entry[token].logprob for token, entry in zip(ids[1:], out.prompt_logprobs[1:])]
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
        np.testing.assert_allclose(got, want[np.arange(len(ids) - 1), ids[1:]],
                                   atol=LOGPROB_ATOL)


# ----------------------------------------------------------------------------- tokenizer

class _SentencePieceOracle:
    """sentencepiece itself, for `tokenizer.model` when transformers cannot convert it (its
    converter needs `protobuf`): BOS + pieces. It agrees with transformers' LlamaTokenizer
    (legacy=False) on plain text that does not start with whitespace, so only such text is
    checked against it."""

    def __init__(self, folder: pathlib.Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.sp.bos_id()] if add_special_tokens else []) + self.sp.encode(text)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.sp.decode(list(ids))


def reference_tokenizer(folder: pathlib.Path):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    except (ImportError, ValueError):
        if not (folder / "tokenizer.model").is_file():
            raise
        return _SentencePieceOracle(folder)


def test_tokenizer_matches_hf(reference, llm):
    ours = llm.get_tokenizer()
    theirs = reference_tokenizer(reference.folder)
    texts = TEXTS
    if isinstance(theirs, _SentencePieceOracle):  # see its docstring
        texts = [t for t in TEXTS if not t[:1].isspace() and "<|" not in t]
    for text in texts:
        for add_special in (True, False):
            want = theirs.encode(text, add_special_tokens=add_special)
            assert ours.encode(text, add_special_tokens=add_special) == want, (text, add_special)
        ids = theirs.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert (ours.decode(ids, skip_special_tokens=skip)
                    == theirs.decode(ids, skip_special_tokens=skip)), (text, skip)
        if not isinstance(theirs, _SentencePieceOracle):  # defaults agree: special tokens kept
            assert ours.decode(ids) == theirs.decode(ids), text
    if isinstance(theirs, _SentencePieceOracle):
        return
    rendered = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == rendered
    assert (ours.encode(rendered, add_special_tokens=False)
            == theirs.encode(rendered, add_special_tokens=False))


# ----------------------------------------------------------------------------- paging

PAGING_VARIANTS = {
    "block1": dict(block_size=1),
    "block32": dict(block_size=32),
    "shuffled": dict(block_size=16, shuffle_blocks_seed=123),
    "chunked_prefill": dict(block_size=32, max_num_batched_tokens=16, shuffle_blocks_seed=7),
    "chunked_odd": dict(block_size=16, max_num_batched_tokens=13),
}


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> tuple[Reference, "jinfer.LLM"]:
    """The llama3 family (GQA 4:1, 3 layers, scaled RoPE) and its default-paging LLM."""
    if "llama3" not in _REFERENCES:
        _REFERENCES["llama3"] = Reference("llama3", tmp_path_factory.mktemp("llama3"))
    ref = _REFERENCES["llama3"]
    if "llama3" not in _LLMS:
        _LLMS["llama3"] = make_llm(ref)
    return ref, _LLMS["llama3"]


@pytest.mark.parametrize("variant", list(PAGING_VARIANTS))
def test_paging_is_invisible(variant, llama3):
    ref, base = llama3
    llm = make_llm(ref, **PAGING_VARIANTS[variant])
    for ids in (ref.prompts[2], ref.prompts[-1]):  # 13 tokens (one block or less), 150 tokens
        want = base.prompt_logits(ids)
        got = llm.prompt_logits(ids)
        assert_pool_whole(llm)
        np.testing.assert_allclose(got, want, rtol=PAGING_RTOL,
                                   atol=PAGING_RTOL * np.abs(want).max())
    tokens, logprobs = greedy(llm, ref.prompts, GREEDY)
    assert_same_tokens(tokens, ref, f"paging variant {variant}")
    for g, w in zip(logprobs, ref.logprobs):
        np.testing.assert_allclose(g, w, atol=LOGPROB_ATOL)


def test_preemption_is_invisible(llama3):
    """Four 60-token prompts fill the 16 usable blocks exactly (4 blocks each); the 65th token
    needs a fifth block, so sequences are preempted and recomputed, with the same output."""
    ref, _ = llama3
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, ref.model.config.vocab_size, size=60).tolist() for _ in range(4)]
    hf_tokens, hf_logprobs, margins = fixtures.reference_greedy(ref.model, prompts, MAX_TOKENS)
    llm = make_llm(ref, block_size=16, num_kv_blocks=17)
    tokens, logprobs = greedy(llm, prompts, GREEDY)
    assert llm.stats()["num_preemptions"] > 0, "the small pool was meant to force preemption"
    for i, (g, want) in enumerate(zip(tokens, hf_tokens)):
        assert g == want, f"prompt {i}: jinfer {g} vs HF {want} (HF margins {margins[i]})"
        np.testing.assert_allclose(logprobs[i], hf_logprobs[i], atol=LOGPROB_ATOL)
