"""Incremental detokenization: output token ids in, exact text deltas out, stop strings handled.

Decoding one token at a time is wrong for most tokenizers: a sentencepiece token's leading space
depends on what precedes it, and an emoji may span several byte tokens. Following vLLM, we decode
a short window of ids twice, `ids[prefix_offset:read_offset]` (text already emitted) and
`ids[prefix_offset:]`, and emit the difference; when that difference ends in an incomplete UTF-8
character ("\\ufffd") we hold it back until more tokens arrive. With sentencepiece byte fallback
we also hold back while the window ends in a `<0xXX>` byte token: the decoder turns a whole run of
them into text at once (an invalid run becomes one "\\ufffd" per byte, valid bytes included), so a
run must not be cut. Skipped special tokens never reach the decoder and stay out of the window.
Only the window is kept, so each token costs O(window), not O(sequence length).

Stop strings are matched on the decoded text, across token boundaries. Text that could still be
the start of a stop string is held back, so a stop string is never emitted, not even in part.
The detokenizer only finds them (`stop_reason`); whether and why a sequence finishes is decided
in one place, jinfer.engine.stopping, which reads it.
"""

from __future__ import annotations

from typing import Sequence

# Prompt tokens decoded before the first output token, so its leading space comes out right.
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas, exactly.

    The deltas of `append` followed by `flush` concatenate to the output's text as decoded in the
    context of the prompt: `decode(prompt + output)` minus `decode(prompt)`. That is
    `tokenizer.decode(output_ids)` for byte-level tokenizers, and for an empty prompt; a
    sentencepiece tokenizer keeps the first token's leading space, which decoding the output on
    its own drops (vLLM behaves the same).

    Attributes:
      stop_reason: the stop string found in the text, or None; once found, later tokens are
        ignored (jinfer.engine.stopping finishes the sequence on it).
      output_text: all text emitted so far; after a stop it ends before the stop string (or
        after it, with `include_stop_str_in_output`).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Skipped special tokens never reach the decoder, so they are left out of the window.
        self._skipped_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else ()
        self._byte_ids = frozenset(getattr(tokenizer, "byte_fallback_ids", ()))
        self._include_stop = include_stop_str_in_output
        self._stops = tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)
        # Window of ids: _window[:_read] is decoded and emitted; _window[_read:] is pending.
        self._window: list[int] = list(
            prompt_token_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET:])
        self._read = len(self._window)
        self._prefix_text: str | None = None  # cached decode of _window[:_read]
        self._pending = ""  # decoded text held back because it may begin a stop string
        self._pieces: list[str] = []  # emitted deltas
        self.stop_reason: str | None = None

    @property
    def stopped(self) -> bool:
        """Whether a stop string was found."""
        return self.stop_reason is not None

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def append(self, token_id: int) -> str:
        """Adds one output token; returns the text that is safe to emit now (may be "")."""
        if self.stopped:
            return ""
        token_id = int(token_id)
        if token_id in self._skipped_ids:
            return ""
        self._window.append(token_id)
        return self._emit(self._decode_window(final=False))

    def flush(self) -> str:
        """At the end of a sequence: emits the text held back (an incomplete character at the
        end, or a tail that looked like the start of a stop string)."""
        if self.stopped:
            return ""
        delta = self._emit(self._decode_window(final=True))
        if self.stopped:
            return delta
        rest, self._pending = self._pending, ""
        if rest:
            self._pieces.append(rest)
        return delta + rest

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_window(self, final: bool) -> str:
        """New text of the window's unread ids; "" while it would end mid-character."""
        if self._read == len(self._window):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._window[:self._read])
        prefix_text = self._prefix_text
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text):
            return ""  # nothing new yet
        if not final and (new_text.endswith("\ufffd") or self._window[-1] in self._byte_ids):
            return ""  # an incomplete UTF-8 character, or a byte run that may go on: wait
        delta = new_text[len(prefix_text):]
        # The ids just read become the prefix window of the next step.
        del self._window[:self._read]
        self._read = len(self._window)
        self._prefix_text = None
        return delta

    def _emit(self, delta: str) -> str:
        """Adds decoded text; returns what can be emitted without risking a stop string."""
        if not delta and not self._pending:
            return ""
        text = self._pending + delta
        if self._stops:
            match = _find_stop(text, self._stops)
            if match is not None:
                start, stop = match
                self.stop_reason, self._pending = stop, ""
                out = text[:start + len(stop)] if self._include_stop else text[:start]
                self._pieces.append(out)
                return out
            hold = _stop_prefix_len(text, self._stops)
        else:
            hold = 0
        out, self._pending = text[:len(text) - hold], text[len(text) - hold:]
        if out:
            self._pieces.append(out)
        return out


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(start, stop string) of the earliest stop string in `text` (ties: first listed)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
