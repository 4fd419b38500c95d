"""scripts/generate.py, as a new user runs it: chat messages by default, and a note on stderr
when a completion shows no answer (the model ended its turn at once) or was cut short."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import pytest

from jinfer import LLM, SamplingParams
from jinfer.api.outputs import CompletionOutput
from jinfer.text.tokenizer import Tokenizer

_scripts = pathlib.Path(__file__).parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("generate", _scripts / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

PROMPT = "Why is the sky blue?"
SMALL = ["--max-model-len", "128"]  # fewer step shapes to compile


def completion(text="", token_ids=(), finish_reason="stop", stop_reason=None):
    return CompletionOutput(0, text, list(token_ids), None, None, finish_reason, stop_reason)


def test_finish_notes():
    note = generate.finish_note
    assert note(completion(), 8, generate.EMPTY_TURN_NO_CHAT) == generate.EMPTY_TURN_NO_CHAT
    assert note(completion(" \n"), 8) == generate.EMPTY_TURN  # whitespace shows nothing either
    assert note(completion("4", [19]), 8) is None  # an answer, then the end of the turn
    assert note(completion("", stop_reason="Once"), 8) is None  # the user's stop string
    assert "--max-tokens 3" in note(completion("abc", [1, 2, 3], "length"), 3)
    assert "--max-model-len" in note(completion("ab", [1, 2], "length"), 3)


@pytest.fixture(scope="module")
def eos_first_model(tiny_model_dir, tmp_path_factory) -> pathlib.Path:
    """The tiny model, with the token it writes first after the raw PROMPT made an eos id."""
    llm = LLM(str(tiny_model_dir), max_model_len=128, enable_compilation_cache=False)
    ids = llm.get_tokenizer().encode(PROMPT)
    (out,) = llm.generate(prompt_token_ids=[ids], use_tqdm=False,
                          sampling_params=SamplingParams(temperature=0.0, max_tokens=1))
    folder = tmp_path_factory.mktemp("eos_first") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": out.outputs[0].token_ids[0]}))
    return folder


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_raw_prompt_ended_at_once_gets_a_hint(eos_first_model, capsys, stream):
    assert generate.main([PROMPT, "--model", str(eos_first_model), "--no-chat", stream,
                          *SMALL]) == 0
    out, err = capsys.readouterr()
    answer = out.splitlines()[-1] if out.strip() else ""
    assert answer == ""  # no text: the model ended its turn at once
    assert generate.EMPTY_TURN_NO_CHAT in err
    if stream == "--no-stream":
        assert f"--- {PROMPT!r} [0] (stop)" in out


def test_chat_is_the_default_and_a_cut_answer_says_so(tiny_model_dir, capsys, monkeypatch):
    rendered = []
    original = Tokenizer.apply_chat_template
    monkeypatch.setattr(Tokenizer, "apply_chat_template",
                        lambda self, *a, **k: rendered.append(a[0]) or original(self, *a, **k))
    assert generate.main([PROMPT, "--model", str(tiny_model_dir), "--max-tokens", "3",
                          *SMALL]) == 0
    out, err = capsys.readouterr()
    assert rendered == [[{"role": "user", "content": PROMPT}]]
    assert len(out) > 1  # three tokens of random text (newlines, for this model), then "\n"
    assert "finish_reason=length: cut at --max-tokens 3" in err
    assert "ended its turn" not in err


def test_bad_model_path_is_an_error(tmp_path, capsys):
    assert generate.main([PROMPT, "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
