"""The tokenizer of a GGUF file's metadata (`jinfer.text.gguf_tokenizer`) against transformers'
own GGUF loader on the same file: the default model's (SmolLM2, byte-level `gpt2` with the
`smollm` pre-tokenizer), synthetic `llama` (sentencepiece) and `gpt2` vocabularies with other
`pre` names, the errors for files it cannot read, and the families' vocabularies written as
llama.cpp's converter writes them (tests/gguf_support.py) from a Hugging Face folder, checked
against that folder's own tokenizer as well:

- Qwen2-like: a `Qwen2Tokenizer` (Qwen's split regex, NFC) on SmolLM2's vocabulary, `pre`
  "qwen2" (the NFC normaliser is not in the file: transformers' and llama.cpp's GGUF tokenizers
  have none, so the folder is matched on text NFC leaves alone);
- Gemma-like: a sentencepiece BPE without dummy prefix, architecture "gemma3";
- Phi-3-like: a Llama 2 style sentencepiece BPE, architecture "phi3".
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import unicodedata

import pytest

try:
    from tests import tokenizer_fixtures as F
except ImportError:  # tests/ is on sys.path instead of the repo root
    import tokenizer_fixtures as F

import gguf_support  # noqa: E402
from jinfer.text.gguf_tokenizer import (_bytes_to_unicode, _read_gguf_tokenizer_fields,
                                        load_gguf_tokenizer)
from parity_support import load_fixture_module  # noqa: E402

fixtures = load_fixture_module()

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



# ----------------------------------------------------------------------------- family vocabularies


def build_qwen2_folder():
    """A Hugging Face folder holding a Qwen2Tokenizer over the first 6000 tokens of SmolLM2's
    vocabulary (and their merges), its ChatML specials and template."""
    def build():
        transformers = pytest.importorskip("transformers")
        src = _read_gguf_tokenizer_fields(gguf_reader(F.build_gpt2_gguf("default", False)))
        tokenizer = transformers.Qwen2Tokenizer(
            vocab={token: i for i, token in enumerate(src["tokens"])},
            merges=[tuple(m.split(" ")) for m in src["merges"]], eos_token="<|im_end|>",
            additional_special_tokens=["<|im_start|>"], chat_template=fixtures.CHATML_TEMPLATE)
        folder = F._workdir() / "qwen2"
        tokenizer.save_pretrained(str(folder))
        return folder
    return F._cached("qwen2_folder", build)


USER_DEFINED = ["<start_of_turn>", "<end_of_turn>", "\u2581\u2581", "\u2581\u2581\u2581"]


def build_gemma_folder():
    """A Gemma-like folder: a sentencepiece BPE with byte fallback and no dummy prefix, Gemma's
    special ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4), turn tokens and user-defined
    runs of spaces, BOS added."""
    def build():
        import sentencepiece as spm
        folder = F._workdir() / "gemma"
        folder.mkdir()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(F.TRAIN_TEXT), model_prefix=str(folder / "tokenizer"),
            model_type="bpe", vocab_size=420, byte_fallback=True, split_digits=True,
            character_coverage=0.995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=["<mask>"], user_defined_symbols=USER_DEFINED, minloglevel=2)
        (folder / "tokenizer.vocab").unlink()
        # tokenizer_config.json as Gemma's repositories have it: every added token listed,
        # the whitespace runs as plain (non-special) ones.
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        added = {str(i): {"content": sp.id_to_piece(i), "special": not sp.id_to_piece(i)
                          .startswith("\u2581"), "normalized": False, "lstrip": False,
                          "rstrip": False, "single_word": False}
                 for i in range(sp.get_piece_size())
                 if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in USER_DEFINED}
        config = json.dumps({
            "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "mask_token": "<mask>", "added_tokens_decoder": added,
            "chat_template": fixtures.GEMMA_TEMPLATE})
        (folder / "tokenizer_config.json").write_text(config)
        return add_tokenizer_json(folder)
    return F._cached("gemma_folder", build)


def add_tokenizer_json(folder):
    """Adds the tokenizer.json transformers makes of a sentencepiece folder (model repositories
    hold both; the converter takes the special tokens' ids from it)."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def build_phi3_folder():
    """The Llama 2 style sentencepiece folder of tokenizer_fixtures, with its tokenizer.json."""
    return F._cached("phi3_folder", lambda: add_tokenizer_json(pathlib.Path(shutil.copytree(
        F.build_spm_folder(), F._workdir() / "phi3"))))


def gguf_reader(path):
    import gguf
    return gguf.GGUFReader(str(path))


def family_gguf(name, folder, arch, **kwargs):
    """The folder's vocabulary as the converter writes it, for architecture `arch`."""
    return F._cached(("family_gguf", name), lambda: gguf_support.convert_vocab(
        folder, F._workdir() / f"{name}.gguf", arch, **kwargs))


def test_qwen2_vocabulary_from_metadata():
    F.require_smollm()
    folder = build_qwen2_folder()
    path = family_gguf("qwen2", folder, "qwen2", pre="qwen2")
    ours = load_gguf_tokenizer(path)
    F.assert_parity(ours, F.reference_gguf_tokenizer(path), random_decodes=5)
    folder_tokenizer = F.reference_folder_tokenizer(folder)
    nfc = [t for t in F.TRICKY_STRINGS if unicodedata.normalize("NFC", t) == t]
    F.assert_parity(ours, folder_tokenizer, strings=nfc, random_decodes=5)
    # Qwen's regex splits digits one by one (GPT-2's keeps runs together).
    assert ours.encode("12345") == folder_tokenizer("12345")["input_ids"]
    assert len(ours.encode("12345")) == 5
    chat = [{"role": "user", "content": "hi"}]
    assert ours.chat_template == fixtures.CHATML_TEMPLATE
    assert ours.apply_chat_template(chat) == folder_tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token == "<|im_end|>" and ours.bos_token is None


def test_gemma_vocabulary_from_metadata():
    folder = build_gemma_folder()
    path = family_gguf("gemma", folder, "gemma3", space_prefix=False)
    ours = load_gguf_tokenizer(path)
    F.assert_parity(ours, F.reference_gguf_tokenizer(path))
    F.assert_parity(ours, F.reference_folder_tokenizer(folder))
    assert ours.encode("hi")[0] == ours.bos_token_id == 2 and ours.eos_token_id == 1
    turn = ours.backend.token_to_id("<start_of_turn>")
    assert ours.encode("<start_of_turn>user", add_special_tokens=False)[0] == turn
    assert ours.convert_ids_to_tokens([turn]) == ["<start_of_turn>"]
    assert ours.chat_template == fixtures.GEMMA_TEMPLATE


def test_phi3_vocabulary_from_metadata():
    path = family_gguf("phi3", build_phi3_folder(), "phi3")
    ours = load_gguf_tokenizer(path)
    F.assert_parity(ours, F.reference_gguf_tokenizer(path))
    # The prefix space comes from a normaliser: every leading space is kept (Metaspace would
    # merge the dummy prefix into the first one).
    spaces = ours.convert_ids_to_tokens(ours.encode("  hi", add_special_tokens=False))
    assert "".join(spaces).startswith("\u2581\u2581\u2581")
    plain = [t for t in F.TRICKY_STRINGS if "<" not in t]
    sp = F.sentencepiece_processor()
    for text in plain:
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
