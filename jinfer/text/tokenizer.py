"""Tokenizer: encode, decode and chat templates, from a Hugging Face folder or a GGUF file.

Every source becomes one `tokenizers.Tokenizer` (the Rust library transformers itself runs on), so
encode/decode behave the same whatever the model came from, and match transformers 5:

* `tokenizer.json` is loaded as is (transformers also takes BOS/EOS from its post-processor then).
* `tokenizer.model` (sentencepiece BPE, Llama 2 style) is rebuilt the way transformers rebuilds it:
  a byte-fallback BPE whose merges are recovered from the vocabulary order, a `Metaspace`
  pre-tokenizer (dummy prefix on the first piece only) and a decoder that drops that space again.
* A GGUF file's vocabulary metadata: see `jinfer.text.gguf_tokenizer`.

Chat templates render with jinja2 in the sandbox transformers uses, with the same helpers.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import pathlib
import struct
from typing import Any, Optional, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4

class Tokenizer:
    """One interface over every tokenizer source: encode, decode, special ids, chat template.

    Attributes:
      vocab_size: number of ids, added tokens included (what `decode` accepts).
      bos_token_id / eos_token_id: ids of the BOS/EOS tokens, or None.
      all_special_ids: ids that `decode(..., skip_special_tokens=True)` drops.
      byte_fallback_ids: ids of the `<0xXX>` byte tokens when the decoder joins runs of them
        into UTF-8 (sentencepiece byte fallback), else empty. A run that is not valid UTF-8
        decodes to one "\ufffd" per byte, including its valid bytes, so a streaming decoder must
        not cut a run.
      chat_template: the jinja2 chat template, or None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: Optional[str],
                 eos_token: Optional[str], chat_template: Optional[str],
                 special_tokens: Optional[dict[str, str]] = None,
                 clean_up_tokenization_spaces: bool = False, source: str = ""):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self.byte_fallback_ids = _byte_fallback_ids(backend)
        self.chat_template = chat_template
        self.source = source
        # Template variables: bos_token, eos_token, unk_token, pad_token (transformers passes its
        # special tokens map).
        self._special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._special_tokens.setdefault("bos_token", bos_token)
        self._special_tokens.setdefault("eos_token", eos_token)
        # transformers ignores clean_up_tokenization_spaces for BPE models (it corrupts their text).
        is_bpe = isinstance(backend.model, models.BPE)
        self._clean_up = clean_up_tokenization_spaces and not is_bpe

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS are added when the tokenizer adds them and
        `add_special_tokens` is True. Special-token text (e.g. `<|im_start|>`) maps to its id."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, exactly as the reference tokenizer decodes it: special tokens are kept
        unless `skip_special_tokens` (transformers' default too). Engine output text is decoded
        with the request's `SamplingParams.skip_special_tokens` (True by default) instead."""
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings of `ids` (None for an id out of range)."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render `messages` with the chat template, as transformers' `apply_chat_template` does.

        With `tokenize=True` the rendered text is encoded without adding special tokens (the
        template writes them itself), like transformers.
        """
        if not self.chat_template:
            raise ValueError(
                f"The model ({self.source or 'this tokenizer'}) has no chat template, so chat "
                "messages cannot be formatted. Pass a plain text prompt instead (or --no-chat).")
        variables = dict(self._special_tokens)
        variables.update(tools=None, documents=None)
        variables.update(kwargs)
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id})")


def _byte_fallback_ids(backend: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of `<0xXX>` tokens, if the decoder turns them into bytes (checked on `<0x41>`)."""
    vocab = backend.get_vocab(with_added_tokens=False)
    probe = vocab.get("<0x41>")
    if probe is None or backend.decode([probe], skip_special_tokens=False) != "A":
        return frozenset()
    return frozenset(i for i in (vocab.get(f"<0x{b:02X}>") for b in range(256)) if i is not None)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (spaces before punctuation and contractions)."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                     (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                     (" 're", "'re")):
        text = text.replace(old, new)
    return text


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """The template compiled in the sandboxed environment transformers renders chat templates in."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Like transformers: no HTML escaping, and the usual json.dumps options.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


# ----------------------------------------------------------------------------- HF folders


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (`tokenizer.json`, else `tokenizer.model`)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Tokenizer folder {str(folder)!r} does not exist. Pass the folder holding the "
            "model's tokenizer.json or tokenizer.model.")
    config = _read_json(folder / "tokenizer_config.json")
    for key, value in _read_json(folder / "special_tokens_map.json").items():
        config[key] = value  # legacy file: its entries win, as in transformers
    names = {key: _token_content(config.get(key))
             for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if (folder / "tokenizer.json").is_file():
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        # transformers ignores add_bos_token/add_eos_token here and keeps the post-processor.
        _add_named_special_tokens(backend, names.values())
    elif (folder / "tokenizer.model").is_file():
        names = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 **{k: v for k, v in names.items() if v is not None}}
        backend = _load_sentencepiece(folder / "tokenizer.model", config, names)
    else:
        raise FileNotFoundError(
            f"No tokenizer found in {str(folder)!r}: looked for tokenizer.json and "
            "tokenizer.model. Copy the tokenizer files of the model into that folder (or pass a "
            "GGUF file, which carries its own vocabulary).")
    return Tokenizer(
        backend, bos_token=names["bos_token"], eos_token=names["eos_token"],
        chat_template=_folder_chat_template(folder, config), special_tokens=names,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        source=str(folder))


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> Optional[str]:
    """A special token given as a string or as an AddedToken dict ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _folder_chat_template(folder: pathlib.Path, config: dict) -> Optional[str]:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's entry."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        by_name = {t.get("name"): t.get("template") for t in template}
        template = by_name.get("default", next(iter(by_name.values()), None))
    return template


def _add_named_special_tokens(backend: tokenizers.Tokenizer, names) -> None:
    """Mark bos/eos/unk/pad as special added tokens, as transformers does (only tokens that
    exist in the vocabulary: transformers would append missing ones as new ids)."""
    added = {tok.content for tok in backend.get_added_tokens_decoder().values()}
    vocab = backend.get_vocab(with_added_tokens=True)
    for name in names:
        if name and name in vocab and name not in added:
            backend.add_special_tokens([AddedToken(name, special=True, normalized=False)])
            added.add(name)


def _load_sentencepiece(path: pathlib.Path, config: dict, names: dict) -> tokenizers.Tokenizer:
    """A Llama 2 style sentencepiece BPE model, rebuilt as transformers' LlamaTokenizer does."""
    pieces, model_type = _read_sentencepiece_model(path)
    if model_type != 2:  # 1 unigram, 2 bpe, 3 word, 4 char
        raise ValueError(
            f"{path} is a sentencepiece model of type {model_type} (1 = unigram); only BPE "
            "sentencepiece models (Llama 2 style) are supported. Provide a tokenizer.json "
            "instead.")
    tokens = [piece for piece, _, _ in pieces]
    vocab = {token: i for i, token in enumerate(tokens)}
    add_prefix_space = config.get("add_prefix_space")
    prepend = _prepend_scheme(True if add_prefix_space is None else add_prefix_space,
                              legacy=bool(config.get("legacy", False)))
    backend = _sentencepiece_bpe(vocab, generate_merges(vocab), prepend)
    _add_typed_tokens(backend, tokens, [t for _, _, t in pieces])
    _add_named_special_tokens(backend, names.values())
    # Llama 2 convention (and the slow LlamaTokenizer / llama.cpp default): BOS unless told not.
    _set_post_processor(backend, names.get("bos_token"), names.get("eos_token"),
                        bool(config.get("add_bos_token", True)),
                        bool(config.get("add_eos_token", False)))
    return backend


def _prepend_scheme(add_prefix_space: bool, legacy: bool) -> str:
    if not add_prefix_space:
        return "never"
    return "always" if legacy else "first"


def _sentencepiece_bpe(vocab: dict[str, int], merges: list[tuple[str, str]],
                       prepend_scheme: str) -> tokenizers.Tokenizer:
    """transformers' LlamaTokenizer backend: byte-fallback BPE, Metaspace, Strip'ed decoder."""
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme=prepend_scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend_scheme != "never":
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_typed_tokens(backend: tokenizers.Tokenizer, tokens: Sequence[str],
                      types: Sequence[int], skip_control=lambda token: False) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so their
    text in a prompt maps to their single id (as transformers and llama.cpp do)."""
    control = [AddedToken(tok, normalized=False, special=True)
               for tok, typ in zip(tokens, types) if typ == _CONTROL and not skip_control(tok)]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, typ in zip(tokens, types) if typ == _USER_DEFINED and tok in vocab]
    if user:
        backend.add_tokens(user)


def _set_post_processor(backend: tokenizers.Tokenizer, bos: Optional[str], eos: Optional[str],
                        add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: BOS/EOS around the text when asked for."""
    add_bos = add_bos and bos is not None and backend.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and backend.token_to_id(eos) is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + (
        [(eos, backend.token_to_id(eos))] if add_eos else [])
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special)


def generate_merges(vocab: dict[str, int],
                    scores: Optional[dict[str, float]] = None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (transformers' `generate_merges`).

    Every split of a token into two vocabulary tokens is a merge; merges are ranked by the id of
    the merged token (best first), or by its score (highest first) when `scores` is given.
    """
    rank = scores if scores is not None else vocab
    merges = []
    for merged, piece_rank in rank.items():
        local = [(merged[:i], merged[i:], piece_rank) for i in range(1, len(merged))
                 if merged[:i] in vocab and merged[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in merges]


def _read_sentencepiece_model(path: pathlib.Path) -> tuple[list[tuple[str, float, int]], int]:
    """(pieces as (piece, score, type), trainer model_type) from a sentencepiece ModelProto.

    Reads the protobuf wire format directly (ModelProto.pieces = 1 with piece = 1, score = 2,
    type = 3; ModelProto.trainer_spec = 2 with model_type = 3), so no protobuf package is needed.
    """
    data = memoryview(path.read_bytes())
    pieces, model_type = [], 1  # proto defaults: unigram; piece type NORMAL, score 0
    for field, value in _proto_fields(data):
        if field == 1:
            piece, score, kind = "", 0.0, 1
            for sub, sub_value in _proto_fields(value):
                if sub == 1:
                    piece = bytes(sub_value).decode("utf-8")
                elif sub == 2:
                    score = _float32(sub_value)
                elif sub == 3:
                    kind = sub_value
            pieces.append((piece, score, kind))
        elif field == 2:
            model_type = next((v for f, v in _proto_fields(value) if f == 3), 1)
    if not pieces:
        raise ValueError(f"{path} holds no sentencepiece vocabulary; is it a tokenizer.model?")
    return pieces, model_type


def _proto_fields(data: memoryview):
    """Yields (field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError("not a sentencepiece model file (unexpected protobuf wire type)")
        yield key >> 3, value


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _float32(raw: memoryview) -> float:
    return struct.unpack("<f", bytes(raw))[0]
