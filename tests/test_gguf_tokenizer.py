"""The tokenizer of a GGUF file's metadata (`jinfer.text.gguf_tokenizer`) against transformers'
own GGUF loader on the same file: the default model's (SmolLM2, byte-level `gpt2` with the
`smollm` pre-tokenizer), synthetic `llama` (sentencepiece) and `gpt2` vocabularies with other
`pre` names, and the errors for files it cannot read.
"""

from __future__ import annotations

import logging

import pytest

try:
    from tests import tokenizer_fixtures as F
except ImportError:  # tests/ is on sys.path instead of the repo root
    import tokenizer_fixtures as F

from jinfer.text.gguf_tokenizer import _bytes_to_unicode, load_gguf_tokenizer

# ----------------------------------------------------------------------------- SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm():
    return F.smollm_tokenizer()


@pytest.fixture(scope="module")
def smollm_ref():
    return F.reference_gguf_tokenizer(F.require_smollm())


def test_smollm_gguf_matches_transformers(smollm, smollm_ref):
    F.assert_parity(smollm, smollm_ref)


def test_smollm_gguf_special_tokens(smollm, smollm_ref):
    # The GGUF's add_bos_token is False, so neither transformers nor we add <|im_start|> (bos).
    assert smollm.encode("hi") == smollm_ref("hi")["input_ids"]
    assert smollm.encode("hi")[0] != smollm.bos_token_id
    assert smollm.convert_ids_to_tokens([smollm.bos_token_id, smollm.eos_token_id]) == [
        "<|im_start|>", "<|im_end|>"]
    # Control tokens are single ids in a prompt and dropped by decode(skip_special_tokens=True).
    assert smollm.encode("<|im_start|>user", add_special_tokens=False)[0] == smollm.bos_token_id
    assert set(smollm_ref.all_special_ids) <= smollm.all_special_ids
    assert smollm.byte_fallback_ids == frozenset()


def test_smollm_decode_keeps_special_tokens_by_default(smollm, smollm_ref):
    # A chat prompt and an answer ending the turn, as the engine sees them.
    prompt = smollm.apply_chat_template([{"role": "user", "content": "Why is the sky blue?"}],
                                        tokenize=True)
    ids = prompt + smollm.encode("Rayleigh scattering.", add_special_tokens=False) + [
        smollm.eos_token_id]
    text = smollm.decode(ids)
    assert text == smollm_ref.decode(ids)  # transformers' defaults: skip_special_tokens=False
    assert text.startswith("<|im_start|>system\n") and text.endswith("scattering.<|im_end|>")
    skipped = smollm.decode(ids, skip_special_tokens=True)
    assert skipped == smollm_ref.decode(ids, skip_special_tokens=True)
    assert "<|im_" not in skipped and skipped.endswith("Rayleigh scattering.")


def test_smollm_gguf_round_trips_text(smollm):
    for text in F.TRICKY_STRINGS:
        assert smollm.decode(smollm.encode(text)) == text, text


# ----------------------------------------------------------------------------- synthetic vocabs


def test_sentencepiece_gguf_matches_references():
    ref = F.reference_spm_tokenizer()
    ours = load_gguf_tokenizer(F.build_llama_gguf(add_bos=True))
    F.assert_parity(ours, ref)
    F.assert_parity(ours, F.reference_gguf_tokenizer(F.build_llama_gguf(add_bos=True)))
    assert ours.chat_template == F.SMOLLM_CHAT_TEMPLATE


def test_sentencepiece_gguf_bos_default():
    # No add_bos_token key: transformers (like llama.cpp) adds BOS for sentencepiece vocabularies.
    path = F.build_llama_gguf(add_bos=None)
    ours, ref = load_gguf_tokenizer(path), F.reference_gguf_tokenizer(path)
    assert ours.encode("hello world") == ref("hello world")["input_ids"]
    assert ours.encode("hello world")[0] == ours.bos_token_id


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("default", False)])
def test_byte_level_gguf_pre_tokenizers(pre, add_bos):
    F.require_smollm()
    path = F.build_gpt2_gguf(pre, add_bos)
    ours, ref = load_gguf_tokenizer(path), F.reference_gguf_tokenizer(path)
    F.assert_parity(ours, ref, random_decodes=5)
    assert (ours.encode("hi")[0] == ours.bos_token_id) == add_bos


def test_unknown_pre_tokenizer_warns_and_splits_like_gpt2(caplog):
    F.require_smollm()
    gpt2 = load_gguf_tokenizer(F.build_gpt2_gguf("default", False))
    with caplog.at_level(logging.WARNING, logger="jinfer.text.gguf_tokenizer"):
        unknown = load_gguf_tokenizer(F.build_gpt2_gguf("some-future-pre", False))
    assert "Unknown GGUF pre-tokenizer 'some-future-pre'" in caplog.text
    for text in F.TRICKY_STRINGS:
        assert unknown.encode(text) == gpt2.encode(text), text


def test_byte_alphabet_is_gpt2s():
    # The table that spells raw-text tokens: the same characters the byte-level pre-tokenizer of
    # `tokenizers` writes for each byte.
    from tokenizers import pre_tokenizers
    spelling = _bytes_to_unicode()
    assert sorted(spelling) == list(range(256))
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = "".join(map(chr, range(1, 128))) + "é 日本 😀"
    (piece, _), = split.pre_tokenize_str(text)
    assert piece == "".join(spelling[b] for b in text.encode("utf-8"))


# ----------------------------------------------------------------------------- errors


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf_tokenizer(tmp_path / "nope.gguf")


def test_gguf_without_vocabulary(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "no_vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    F._write_gguf(writer)
    with pytest.raises(ValueError, match="no tokenizer vocabulary.*Hugging Face folder"):
        load_gguf_tokenizer(path)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    F._write_gguf(writer)
    with pytest.raises(ValueError, match="'bert'.*'gpt2'.*'llama'"):
        load_gguf_tokenizer(path)
