"""The tokenizer stored in a GGUF file's metadata, rebuilt the way
`transformers.integrations.gguf` does:

* `gpt2` (Qwen, Llama 3, SmolLM2): byte-level BPE from tokens + merges, text split by the regex
  its `tokenizer.ggml.pre` name stands for (Qwen2's splits digits one by one, Llama 3's in runs
  of up to three).
* `llama` (sentencepiece; Mistral, Llama 2, Gemma, Phi-3): the sentencepiece-style BPE of
  `jinfer.text.tokenizer`, merges ordered by the token scores, with two architectures
  (`general.architecture`) rebuilt as their own tokenizers are: Gemma (no dummy prefix, spaces
  turned into "▁" by a normalizer, merges in file order since its scores do not follow
  them, whitespace tokens stored as spaces respelled with "▁") and Phi-3 (the dummy prefix
  and "▁" from a normalizer, no pre-tokenizer).

Control tokens become special tokens and user-defined ones plain added tokens; BOS/EOS are added
as `tokenizer.ggml.add_bos_token` / `add_eos_token` say; `tokenizer.chat_template` is the chat
template."""

from __future__ import annotations

import functools
import logging
import os

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

from jinfer.text.tokenizer import (Tokenizer, _add_named_special_tokens, _add_typed_tokens,
                              _sentencepiece_bpe, _set_post_processor, generate_merges)

logger = logging.getLogger(__name__)

# Split regexes of the byte-level vocabularies, by `tokenizer.ggml.pre` name (transformers'
# GGUF_PRE_TOKENIZER_SPLITS; llama.cpp's llama-vocab.cpp has the same ones).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_GPT2_PRE_NAMES = frozenset({"default", "gpt2", "gpt-2"})
# Architectures whose sentencepiece (`llama`) vocabulary has a tokenizer of its own.
_GEMMA_ARCHS = frozenset({"gemma", "gemma2", "gemma3"})
_PHI3_ARCHS = frozenset({"phi3"})


def load_gguf_tokenizer(path: str | os.PathLike, reader=None) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (pass an open `gguf.GGUFReader` as
    `reader` to avoid reading the file twice)."""
    if reader is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist; check the path.")
        import gguf
        reader = gguf.GGUFReader(str(path))
    fields = _read_gguf_tokenizer_fields(reader)
    kind = fields.get("model")
    if kind == "gpt2":
        backend = _gguf_byte_level(fields)
    elif kind == "llama":
        backend = _SENTENCEPIECE_BUILDERS.get(fields.get("architecture"), _gguf_sentencepiece)(
            fields)
    else:
        raise ValueError(
            f"GGUF file {str(path)!r} has tokenizer model {kind!r} (tokenizer.ggml.model), which "
            "jinfer does not support; supported: 'gpt2' (byte-level BPE) and 'llama' "
            "(sentencepiece BPE). Use the model's Hugging Face folder instead.")
    tokens = fields["tokens"]

    def name(key):
        token_id = fields.get(key)
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    names = {"bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
             "unk_token": name("unknown_token_id"), "pad_token": name("padding_token_id")}
    _add_named_special_tokens(backend, names.values())
    # The flag decides, like transformers: for SmolLM2's GGUF it is False, so no BOS is added
    # even though a bos id (<|im_start|>) is set. Without the flag, transformers (and llama.cpp)
    # add BOS for sentencepiece (`llama`) vocabularies and not for byte-level (`gpt2`) ones.
    add_bos = fields.get("add_bos_token", kind == "llama")
    _set_post_processor(backend, names["bos_token"], names["eos_token"], bool(add_bos),
                        bool(fields.get("add_eos_token", False)))
    return Tokenizer(backend, bos_token=names["bos_token"], eos_token=names["eos_token"],
                     chat_template=fields.get("chat_template"), special_tokens=names,
                     source=str(path))


_GGUF_KEYS = {
    "tokenizer.ggml.model": "model", "tokenizer.ggml.pre": "pre",
    "tokenizer.ggml.tokens": "tokens", "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type", "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unknown_token_id",
    "tokenizer.ggml.padding_token_id": "padding_token_id",
    "tokenizer.ggml.add_bos_token": "add_bos_token", "tokenizer.ggml.add_eos_token": "add_eos_token",
    "tokenizer.ggml.add_space_prefix": "add_space_prefix",
    "tokenizer.chat_template": "chat_template", "general.architecture": "architecture",
}


def _read_gguf_tokenizer_fields(reader) -> dict:
    """The tokenizer metadata of an open GGUFReader, under short names (see `_GGUF_KEYS`)."""
    fields = {}
    for key, short in _GGUF_KEYS.items():
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            fields[short] = value.tolist() if hasattr(value, "tolist") else value
    if "tokens" not in fields:
        raise ValueError(
            "This GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens); load the "
            "tokenizer from the model's Hugging Face folder instead.")
    return fields


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def _gguf_byte_level(fields: dict) -> tokenizers.Tokenizer:
    """transformers' GPT2Tokenizer backend from a `gpt2` GGUF vocabulary."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(token: str) -> str:  # tokens stored as raw text get their byte-level spelling
        return token if set(token) <= alphabet else "".join(
            spelling[b] for b in token.encode("utf-8"))

    vocab = {spell(token): i for i, token in enumerate(fields["tokens"])}
    merges = [tuple(m.split(" ")) for m in fields.get("merges", [])]
    if not merges:
        merges = generate_merges(vocab)
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(fields.get("pre", "default"))
    backend.decoder = decoders.ByteLevel()
    # A control token with characters outside the byte alphabet is a llama.cpp mislabel;
    # transformers skips it (adding it would grow the vocabulary).
    _add_typed_tokens(backend, fields["tokens"], fields.get("token_type", []),
                      skip_control=lambda tok: not set(tok) <= alphabet)
    return backend


def _byte_level_pre_tokenizer(pre: str):
    """The split regex a byte-level vocabulary was trained with, by `tokenizer.ggml.pre` name."""
    if pre == "smollm":
        # SmolLM's own tokenizer.json: single digits, then the GPT-2 regex. transformers uses the
        # plain GPT-2 regex for "smollm"; the two agree here because SmolLM's vocabulary has no
        # multi-character token containing a digit.
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2_PRE_NAMES:
        logger.warning("Unknown GGUF pre-tokenizer %r; splitting text with the GPT-2 regex "
                       "(as transformers does), which may tokenize differently.", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _gguf_sentencepiece(fields: dict) -> tokenizers.Tokenizer:
    """transformers' LlamaTokenizer backend from a `llama` (sentencepiece) GGUF vocabulary."""
    tokens = fields["tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if fields.get("merges"):
        merges = [tuple(m.split(" ")) for m in fields["merges"]]
    else:
        scores = fields.get("scores") or [0.0] * len(tokens)
        merges = generate_merges(vocab, dict(zip(tokens, scores)))
    # transformers ignores add_space_prefix and always prepends; we honour an explicit False
    # (llama.cpp does too).
    prepend = "never" if fields.get("add_space_prefix") is False else "first"
    backend = _sentencepiece_bpe(vocab, merges, prepend)
    _add_typed_tokens(backend, tokens, fields.get("token_type", []))
    return backend


def _gguf_gemma(fields: dict) -> tokenizers.Tokenizer:
    """transformers' GemmaTokenizer backend from a Gemma `llama` vocabulary: spaces become
    "\u2581" in a normalizer (no dummy prefix), byte-fallback BPE whose merges follow the file's
    token order (Gemma's scores do not), and whitespace-only tokens the file stores as spaces
    spelled with "\u2581" so the merges reach them."""
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in fields["tokens"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    if fields.get("merges"):
        merges = [tuple(m.split(" ")) for m in fields["merges"]]
    else:
        merges = generate_merges(vocab, {token: -i for i, token in enumerate(tokens)})
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None,
        byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    _add_typed_tokens(backend, fields["tokens"], fields.get("token_type", []))
    return backend


def _gguf_phi3(fields: dict) -> tokenizers.Tokenizer:
    """Phi-3's tokenizer from its `llama` vocabulary: the sentencepiece BPE, but the dummy prefix
    and the "\u2581" for spaces come from a normalizer and there is no pre-tokenizer (so
    "  hi" is "\u2581\u2581\u2581hi", as in Phi-3's own tokenizer.json)."""
    backend = _gguf_sentencepiece({**fields, "add_space_prefix": True})
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    return backend


_SENTENCEPIECE_BUILDERS = {**dict.fromkeys(_GEMMA_ARCHS, _gguf_gemma),
                           **dict.fromkeys(_PHI3_ARCHS, _gguf_phi3)}
