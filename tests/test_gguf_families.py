"""GGUF files of the decoder families under the architectures llama.cpp's converter gives them
(qwen2, qwen3, gemma2, gemma3, phi3, qwen3moe, and llama for Mistral and Mixtral), against
transformers on the checkpoints they were converted from.

Each family's tiny random float32 checkpoint comes from `scripts/make_parity_fixtures.py` with the
changes a GGUF needs (`GGUF_CHANGES`: what the file cannot say, llama.cpp hard-codes), is written
as a GGUF by `tests/gguf_support.py` the way convert_hf_to_gguf.py writes it (Q/K permutation,
Gemma's 1 + w norms and dropped lm_head, Phi-3's fused projections and LongRoPE factor tensors,
stacked experts), and is loaded by `jinfer.LLM`. Checked:

- the ModelConfig equals the one jinfer builds from the Hugging Face folder,
- prompt logits at every position of a 40-token prompt (past every 8- or 16-token window, and past
  Phi-3's LongRoPE original context of 32, so its long factors are used) within 1e-4 of the
  largest logit of transformers (float32, eager attention),
- the chat template, the tokenization of the rendered chat and the end-of-turn token, read from
  the metadata.

And the errors: an unsupported architecture names itself and the supported ones.
"""

from __future__ import annotations

import dataclasses
import pathlib
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import gguf_support  # noqa: E402
import jinfer  # noqa: E402
from jinfer.loader import load_hf_config  # noqa: E402
from jinfer.loader.gguf_weights import load_gguf  # noqa: E402
from parity_support import assert_pool_whole, load_fixture_module, relative_errors  # noqa: E402

fixtures = load_fixture_module()

PROMPT_LENGTH = 40
MAX_MODEL_LEN = 64
LOGITS_RTOL = 1e-4     # max |jinfer - HF| / max |HF| per position, both float32
CHAT = [{"role": "user", "content": "What is the sky made of? "}]
# family -> (GGUF architecture, end-of-turn token of its chat template)
FAMILIES = {"qwen2": ("qwen2", "<|im_end|>"), "qwen3": ("qwen3", "<|im_end|>"),
            "mistral": ("llama", "</s>"), "gemma2": ("gemma2", "<end_of_turn>"),
            "gemma3": ("gemma3", "<end_of_turn>"), "phi3": ("phi3", "<|end|>"),
            "mixtral": ("llama", "</s>"), "qwen3_moe": ("qwen3moe", "<|im_end|>")}
# What a GGUF file cannot carry and llama.cpp hard-codes, set on the checkpoint instead.
GGUF_CHANGES = {
    "gemma2": {"query_pre_attn_scalar": 16},   # the scale is 1/sqrt(head_dim) (not the 27B)
    "gemma3": {"query_pre_attn_scalar": 16},
    "mistral": {"sliding_window": None},       # the llama architecture has no window
    "mixtral": {"sliding_window": None},
    "qwen3_moe": {"norm_topk_prob": True},     # llama.cpp renormalises the top-k weights
}


@dataclasses.dataclass
class Converted:
    """One family's folder, its GGUF, prompt and transformers' logits on it."""

    family: str
    folder: pathlib.Path
    path: pathlib.Path
    prompt: list[int]
    logits: np.ndarray


def convert_family(family: str, root: pathlib.Path) -> Converted:
    config_class, shape = fixtures.FAMILY_SHAPES[family]
    changed = (config_class, {**shape, **GGUF_CHANGES.get(family, {})})
    with mock.patch.dict(fixtures.FAMILY_SHAPES, {family: changed}):
        folder, _, (prompt,), (logits,) = fixtures.make_fixture(
            family, root / family, lengths=(PROMPT_LENGTH,))
    path = gguf_support.convert(folder, root / f"{family}.gguf")
    return Converted(family, folder, path, prompt, logits)


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(request, tmp_path_factory) -> Converted:
    return convert_family(request.param, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="module")
def llm(converted) -> "jinfer.LLM":
    return jinfer.LLM(str(converted.path), dtype="float32", max_model_len=MAX_MODEL_LEN,
                      block_size=16, num_kv_blocks=1 + 2 * MAX_MODEL_LEN // 16,
                      max_num_batched_tokens=MAX_MODEL_LEN)


def assert_same(got, want, path: str = "config") -> None:
    """got == want, recursing through dataclasses, dicts and sequences, floats to 1e-6
    relative (the file stores float32)."""
    if dataclasses.is_dataclass(got):
        assert type(got) is type(want), (path, got, want)
        for field in dataclasses.fields(got):
            assert_same(getattr(got, field.name), getattr(want, field.name),
                        f"{path}.{field.name}")
    elif isinstance(got, (tuple, list)):
        assert isinstance(want, (tuple, list)) and len(got) == len(want), (path, got, want)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{path}[{i}]")
    elif isinstance(got, float) and isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-6), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_config_matches_the_folders(converted):
    config, _, _ = load_gguf(converted.path, "float32")
    want = load_hf_config(converted.folder)
    if FAMILIES[converted.family][0] == "llama":  # Mistral and Mixtral files are "llama"
        assert config.model_type == {"mistral": "llama"}.get(want.model_type, want.model_type)
        config = dataclasses.replace(config, model_type=want.model_type)
    assert_same(config, want)


def test_prompt_logits_match_hf(converted, llm):
    got = llm.prompt_logits(converted.prompt)
    assert_pool_whole(llm)
    assert got.shape == converted.logits.shape and np.isfinite(got).all()
    errors = relative_errors(got, converted.logits)
    print(f"\n{converted.family} GGUF: max relative logits error vs HF {errors.max():.3g}")
    bad = np.flatnonzero(errors > LOGITS_RTOL)
    assert not len(bad), (f"{converted.family}: positions {bad[:10]} exceed relative error "
                          f"{LOGITS_RTOL} (max {errors.max():.3g})")


def test_chat_template_and_end_of_turn_from_metadata(converted, llm):
    ours = llm.get_tokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(str(converted.folder))
    rendered = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True) == rendered
    assert ours.encode(rendered) == theirs.encode(rendered)
    end_of_turn = theirs.convert_tokens_to_ids(FAMILIES[converted.family][1])
    assert end_of_turn in llm.engine.eos_token_ids


# ----------------------------------------------------------------------------- metadata

def metadata_gguf(path: pathlib.Path, arch: str, layers: int, *extra) -> pathlib.Path:
    """A GGUF of `arch` holding only the shared metadata (hidden 64, 4 heads of 32, 2 KV heads)
    and `extra` writer calls; its one tensor is a 32-token embedding."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_key_length(32)
    w.add_value_length(32)
    w.add_layer_norm_rms_eps(1e-6)
    for call in extra:
        call(w)
    gguf_support.finish(w, {"token_embd.weight": np.zeros((32, 64), np.float32)})
    return path


@pytest.mark.parametrize("arch,layers,extra,want", [
    # Gemma 3: llama.cpp's period of six, windowed RoPE base 10000, scale 1/sqrt(head_dim) ...
    ("gemma3", 8, [lambda w: w.add_sliding_window(16)],
     dict(layer_windows=(16,) * 5 + (None, 16, 16), local_rope_theta=10000.0,
          query_pre_attn_scalar=32.0, final_logit_softcap=None, attn_logit_softcap=None)),
    # ... 1/sqrt(hidden / heads) for the 27B (62 layers); no window key: every layer global
    ("gemma3", 62, [lambda w: w.add_rope_freq_base_swa(2e4)],
     dict(layer_windows=None, local_rope_theta=2e4, query_pre_attn_scalar=16.0)),
    ("gemma3", 3, [lambda w: w.add_sliding_window(8),
                   lambda w: w.add_sliding_window_pattern([True, False, True])],
     dict(layer_windows=(8, None, 8))),
    # Gemma 2: alternate windows of 4096, soft-caps 50 and 30, RoPE base 10000
    ("gemma2", 4, [],
     dict(layer_windows=(4096, None, 4096, None), attn_logit_softcap=50.0,
          final_logit_softcap=30.0, rope_theta=10000.0, query_pre_attn_scalar=32.0,
          tie_word_embeddings=True)),
    ("gemma2", 46, [lambda w: w.add_sliding_window(8)],
     dict(query_pre_attn_scalar=16.0, layer_windows=(8, None) * 23)),
    # Phi-3: a window of 0 is none
    ("phi3", 2, [lambda w: w.add_sliding_window(0)], dict(layer_windows=None)),
])
def test_what_llama_cpp_hard_codes(tmp_path, arch, layers, extra, want):
    from jinfer.loader.gguf_config import GGUFFile, read_config
    config, _ = read_config(GGUFFile(metadata_gguf(tmp_path / "m.gguf", arch, layers, *extra)))
    assert {key: getattr(config, key) for key in want} == want


# ----------------------------------------------------------------------------- errors

def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    gguf_support.finish(w, {"token_embd.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError) as info:
        jinfer.LLM(str(path))
    message = str(info.value)
    for word in ("'falcon'", "unsupported architecture", str(path), *(
            f"'{arch}'" for arch in ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3",
                                     "phi3"))):
        assert word in message, (word, message)
