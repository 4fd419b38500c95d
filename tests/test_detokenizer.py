"""IncrementalDetokenizer: streamed deltas equal the reference decode; stop strings never leak.

The oracle is `Tokenizer.decode` of the whole id list, itself checked against transformers in
test_tokenizer.py: deltas + flush() must concatenate to `decode(output_ids)` (or, after a prompt,
to `decode(prompt + output)` minus `decode(prompt)`), for every tokenizer kind.
"""

from __future__ import annotations

import random

import pytest

try:
    from tests import tokenizer_fixtures as F
except ImportError:  # tests/ is on sys.path instead of the repo root
    import tokenizer_fixtures as F

from jinfer.text.detokenizer import IncrementalDetokenizer
from jinfer.text.gguf_tokenizer import load_gguf_tokenizer
from jinfer.text.tokenizer import load_tokenizer

KINDS = ["smollm_gguf", "bytelevel_json", "spm_model", "llama_gguf"]

TEXTS = [
    "Hello world! How are you?",
    " leading space and  double  spaces",
    "日本語のテキストと中文文本",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 and 🚀🚀",
    "caf\u00e9 na\u00efve se\u00f1or, cafe\u0301 \u00fcber",
    "lines\n\n  indented\ttab\n",
    "mixed 中文 words, emoji 🚀 and 12345!",
]


def _load(kind: str):
    if kind == "smollm_gguf":
        return load_gguf_tokenizer(F.require_smollm(), reader=F.smollm_reader())
    if kind == "bytelevel_json":
        return load_tokenizer(F.build_bytelevel_folder())
    if kind == "spm_model":
        return load_tokenizer(F.build_spm_folder())
    return load_gguf_tokenizer(F.build_llama_gguf(add_bos=True))


@pytest.fixture(scope="module", params=KINDS)
def tok(request):
    return F._cached(("detok_tokenizer", request.param), lambda: _load(request.param))


def stream(tok, prompt, output, **kwargs):
    """(deltas of append, flush delta, detokenizer) for `output` after `prompt`."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas = [detok.append(t) for t in output]
    return deltas, detok.flush(), detok


def test_deltas_concatenate_to_decode(tok):
    split_chars = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        deltas, tail, detok = stream(tok, [], ids)
        assert "".join(deltas) + tail == tok.decode(ids) == detok.output_text
        # Partial UTF-8 is held back, never emitted as U+FFFD.
        assert not any("\ufffd" in d for d in deltas + [tail]), text
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
    assert split_chars > 0  # some character really spans several tokens


def test_deltas_after_prompt_keep_leading_space(tok):
    text = "Hello world, 日本語 and 😀 caf\u00e9 here"
    full = tok.encode(text)
    for cut in range(2, len(full)):
        prompt, output = full[:cut], full[cut:]
        deltas, tail, _ = stream(tok, prompt, output)
        whole, head = tok.decode(full), tok.decode(prompt)
        if whole.startswith(head) and not head.endswith("\ufffd"):
            assert "".join(deltas) + tail == whole[len(head):], cut
    # The word after the prompt keeps its space (a sentencepiece decode of the output alone
    # would drop it).
    prompt = tok.encode("Hello")
    output = tok.encode("Hello world", add_special_tokens=True)[len(prompt):]
    deltas, tail, _ = stream(tok, prompt, output)
    assert "".join(deltas) + tail == " world"


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_concatenate_to_decode(tok, skip):
    rng = random.Random(1)
    specials = sorted(tok.all_special_ids)
    for _ in range(60):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 40))]
        deltas, tail, detok = stream(tok, [], ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip), ids
        assert detok.output_text == tok.decode(ids, skip_special_tokens=skip)


def _assert_never_leaks(deltas, expected):
    """Every prefix of the delta stream is a prefix of the final (stop-truncated) text."""
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert expected.startswith(emitted), (emitted, expected)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, include):
    text = "The ENDLESS answer is 42.\nEND of answer 😀, more text after"
    stop = "END of"
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    start = full.index(stop)
    # The stop string is spread over several tokens.
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    assert sum(start < len(p) < start + len(stop) for p in pieces) >= 1
    deltas, tail, detok = stream(tok, [], ids, stop=["zzz", stop],
                                 include_stop_str_in_output=include)
    expected = full[:start + len(stop)] if include else full[:start]
    if not include:
        _assert_never_leaks(deltas, expected)
    assert detok.stopped and detok.stop_reason == stop
    assert "".join(deltas) == detok.output_text == expected
    assert tail == "" and detok.append(ids[0]) == ""


def test_earliest_stop_string_wins(tok):
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    deltas, _, detok = stream(tok, [], ids, stop=["delta", "beta g"])
    assert detok.stop_reason == "beta g" and "".join(deltas) == "alpha "


def test_stop_string_with_multibyte_chars(tok):
    ids = tok.encode("say 日本語 or 😀👍🏽 now", add_special_tokens=False)
    for stop in ("日本", "😀👍"):
        deltas, _, detok = stream(tok, [], ids, stop=[stop])
        full = tok.decode(ids)
        _assert_never_leaks(deltas, full[:full.index(stop)])
        assert detok.stopped and detok.output_text == full[:full.index(stop)]


def test_held_stop_prefix_is_flushed(tok):
    # The text ends with "EN", a prefix of the stop string: held while streaming, then flushed.
    ids = tok.encode("Final words: THE EN", add_special_tokens=False)
    deltas, tail, detok = stream(tok, [], ids, stop=["END"])
    full = tok.decode(ids)
    assert not "".join(deltas).endswith("EN") and tail.endswith("EN")
    assert "".join(deltas) + tail == full == detok.output_text
    assert not detok.stopped and detok.stop_reason is None


def test_stop_string_in_prompt_is_ignored(tok):
    prompt = tok.encode("Say STOP twice: STOP")
    ids = tok.encode(" and go on", add_special_tokens=False)
    deltas, tail, detok = stream(tok, prompt, ids, stop=["STOP"])
    assert not detok.stopped and "go on" in "".join(deltas) + tail


def test_per_token_work_stays_bounded(tok):
    """Each append decodes a short window, however long the sequence grows."""
    class Recorder:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0
            self.all_special_ids = inner.all_special_ids
            self.byte_fallback_ids = inner.byte_fallback_ids

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    recorder = Recorder(tok)
    ids = tok.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    prompt = tok.encode("A prompt of some length." * 20)
    deltas, tail, detok = stream(recorder, prompt, ids, stop=["no such stop string"])
    assert recorder.longest <= 40  # window: prompt tail + the longest multi-token character
    whole, head = tok.decode(prompt + ids), tok.decode(prompt)
    assert "".join(deltas) + tail == whole[len(head):]
