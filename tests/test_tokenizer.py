"""Tokenizer parity with the reference tokenizers (transformers / tokenizers / sentencepiece).

Each source `jinfer.text.tokenizer` reads (`tokenizer.json` folders, a sentencepiece
`tokenizer.model` folder) must encode and decode exactly like transformers does for the same
files, with and without special tokens; chat templates render as transformers renders them.
GGUF vocabularies (`jinfer.text.gguf_tokenizer`, the default model's included) are tested in
test_gguf_tokenizer.py.
"""

from __future__ import annotations

import json

import pytest

try:
    from tests import tokenizer_fixtures as F
except ImportError:  # tests/ is on sys.path instead of the repo root
    import tokenizer_fixtures as F

from jinfer.text.tokenizer import load_tokenizer

# ----------------------------------------------------------------------------- HF folders


def test_bytelevel_tokenizer_json_folder():
    # Llama 3 style: <|begin_of_text|> comes from tokenizer.json's post-processor;
    # clean_up_tokenization_spaces=True is ignored for BPE, as in transformers.
    folder = F.build_bytelevel_folder()
    ours, ref = load_tokenizer(folder), F.reference_folder_tokenizer(folder)
    F.assert_parity(ours, ref)
    assert ours.encode("hi")[0] == ours.bos_token_id == ref.bos_token_id
    ids = ours.encode("don't , stop .")
    assert ours.decode(ids, skip_special_tokens=True) == "don't , stop ."
    messages = [{"role": "system", "content": "  be brief "}, {"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_decode_keeps_special_tokens_by_default_like_transformers():
    folder = F.build_bytelevel_folder()
    ours, ref = load_tokenizer(folder), F.reference_folder_tokenizer(folder)
    ids = ours.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True)
    eot = ours.encode("<|eot_id|>", add_special_tokens=False)
    assert ids[0] == ours.bos_token_id and eot[0] in ids and eot[0] in ours.all_special_ids
    expected = "<|begin_of_text|><|im_start|>user\nhi there<|eot_id|><|im_start|>assistant\n"
    assert ours.decode(ids) == ref.decode(ids) == expected  # both defaults keep them
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
        ids, skip_special_tokens=True) == "user\nhi thereassistant\n"


def test_smollm_saved_tokenizer_json_folder():
    # transformers' SmolLM2 tokenizer saved as tokenizer.json + chat_template.jinja.
    folder = F.build_smollm_json_folder()
    ours = load_tokenizer(folder)
    ref = F.reference_folder_tokenizer(folder)
    F.assert_parity(ours, ref)
    assert ours.chat_template == ref.chat_template


def test_sentencepiece_folder_matches_transformers():
    folder = F.build_spm_folder()
    ours = load_tokenizer(folder)
    F.assert_parity(ours, F.reference_spm_tokenizer())
    assert ours.encode("hi")[0] == ours.bos_token_id == 1  # add_bos_token: true
    assert ours.byte_fallback_ids  # <0x00>..<0xFF>


def test_sentencepiece_folder_matches_sentencepiece():
    # transformers (and so jinfer) differs from sentencepiece itself only for text starting with
    # whitespace (Metaspace does not add a second dummy space) and for special-token text.
    sp = F.sentencepiece_processor()
    ours = load_tokenizer(F.build_spm_folder())
    plain = [s for s in F.TRICKY_STRINGS if s.strip() and not s[0].isspace() and "<" not in s]
    assert len(plain) > 10
    for text in plain:
        ids = sp.encode(text)
        assert ours.encode(text) == [sp.bos_id()] + ids, text
        assert ours.decode(ids) == sp.decode(ids), text
    # Byte fallback: an emoji the training text never saw becomes <0xXX> pieces.
    pieces = ours.convert_ids_to_tokens(ours.encode("👨‍👩", add_special_tokens=False))
    assert "<0xF0>" in pieces


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm_chat_template_matches_transformers(system, add_generation_prompt):
    ours, ref = F.smollm_tokenizer(), F.reference_gguf_tokenizer(F.require_smollm())
    messages = [{"role": "user", "content": "What is 2+2? Answer in 日本語 😀"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Thanks!"}]
    if system:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    expected = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt) == expected
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   tokenize=True)
    assert ids == ref.encode(expected, add_special_tokens=False)


def test_chat_template_helpers_match_transformers():
    ours = load_tokenizer(F.build_bytelevel_folder())
    ref = F.reference_folder_tokenizer(F.build_bytelevel_folder())
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}"
        "{% endif %}{{ m | tojson }}\n{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% endfor %}{{ bos_token }}|{{ eos_token }}|{{ extra }}|{{ strftime_now('%Y') }}")
    messages = [{"role": "user", "content": "<b>é\"</b> 😀"}, {"role": "user", "content": "x"},
                {"role": "user", "content": "y"}, {"role": "user", "content": "z"}]
    ours.chat_template = template
    expected = ref.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=False, extra=7)
    assert ours.apply_chat_template(messages, add_generation_prompt=False, extra=7) == expected
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        ours.apply_chat_template([{"role": "bad", "content": ""}])


def test_chat_template_in_tokenizer_config_and_json(tmp_path):
    source = F.build_bytelevel_folder()
    (tmp_path / "tokenizer.json").write_text((source / "tokenizer.json").read_text())
    config = {"eos_token": "<|eot_id|>",
              "chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "{{ eos_token }}D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).apply_chat_template([]) == "<|eot_id|>D"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert load_tokenizer(tmp_path).apply_chat_template([]) == "J"


# ----------------------------------------------------------------------------- errors


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_no_chat_template(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        (F.build_bytelevel_folder() / "tokenizer.json").read_text())
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template.*--no-chat"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_unigram_sentencepiece_is_rejected(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(F.TRAIN_TEXT), model_prefix=str(tmp_path / "tokenizer"),
        model_type="unigram", vocab_size=100, minloglevel=2)
    with pytest.raises(ValueError, match="only BPE"):
        load_tokenizer(tmp_path)
