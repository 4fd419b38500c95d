"""A fake ModelRunner for engine tests: no model and no compiled program; tokens by arithmetic.

`FakeRunner` implements what LLMEngine uses of the runner (prepare, launch_step, execute,
launch_decode_steps, takes_any_step_count, copy_blocks, model_config.vocab_size). Its "KV
pool" holds token ids and positions instead of K/V: each row writes its tokens into the slots
its block table names, then reads its whole context back through the table and samples

    next token = (sum of the context's tokens + (0 if greedy else seed + step)) % vocab,

moved up past ids the row bans (min_tokens). `expected_tokens` computes the same by hand; a
prompt token's logprob (prompt_logprobs) is `prompt_logprob(position, token)`. So a
wrong block table, copy-on-write copy, prefix-cache hit, chunk, preemption or lookahead gather
changes the tokens, or trips an assertion here: a context slot that holds another position.
With `sliding_window=W` the model is windowed: a query at position p reads positions
p - W < k <= p only (the sum runs over the last token's window), and every position a row's
queries read must still hold its token, so a block released too early, or reused, trips it.

Calls run eagerly, in dispatch order, as the device runs them; a call's samples stay in its
(NumPy) results until the engine reads them, and a call continued on device tokens gets them
through the engine's real on-device gather. `calls` records every call for the tests.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from jinfer.engine.scheduler import ScheduledSequence
from jinfer.model.sampler import SamplerOutput, SamplingRow

LOGPROB = -0.25  # every sample's logprob: a completion's cumulative logprob is -0.25 per token


def prompt_logprob(position: int, token: int) -> float:
    """The fake model's logprob of prompt token `token` at `position` (rank 1): distinct for
    every position and token, so a score read back for the wrong one shows."""
    return -(position + token / 1000)


def next_token(context: Sequence[int], row: SamplingRow, vocab_size: int) -> int:
    """The fake model's sample after `context` (every token the last one attends to) for
    sampler row `row`."""
    token = (int(np.sum(context)) + (0 if row.params.greedy else row.seed + row.step))
    token %= vocab_size
    ban_until = row.params.min_tokens if row.params.min_tokens > 0 else float("inf")
    while row.step < ban_until and token in row.banned_ids:
        token = (token + 1) % vocab_size
    return token


def expected_tokens(prompt: Sequence[int], num_tokens: int, vocab_size: int, *,
                    greedy: bool = True, seed: int = 0, min_tokens: int = 0,
                    banned: Sequence[int] = (), window: Optional[int] = None) -> list[int]:
    """The first `num_tokens` output tokens the fake model gives after `prompt` (attending to
    the last `window` tokens, or all)."""
    from jinfer.api.sampling_params import SamplingParams
    params = SamplingParams(temperature=0 if greedy else 1.0, min_tokens=min_tokens,
                            max_tokens=max(num_tokens, min_tokens, 1))
    tokens = list(prompt)
    for step in range(num_tokens):
        row = SamplingRow(params, seed, step, banned_ids=tuple(banned))
        tokens.append(next_token(tokens[-window:] if window else tokens, row, vocab_size))
    return tokens[len(prompt):]


class FakeTokenizer:
    """Each id decodes to " <id>": token ids [3, 6, 12] read " 3 6 12"."""

    def __init__(self, special_ids: Sequence[int] = ()):
        self.all_special_ids = list(special_ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return "".join(f" {int(i)}" for i in ids if int(i) not in skipped)


@dataclasses.dataclass(frozen=True)
class FakeModelConfig:
    vocab_size: int


@dataclasses.dataclass
class FakeRow:
    """One row of a fake call: where its tokens go and how it samples."""

    seq_id: int
    block_table: np.ndarray  # [blocks], as it was when the call was prepared
    start: int               # position of its first new token
    tokens: list[int]        # [num_new] its new tokens; a decode row's may come from the device
    next_tokens: list[int]   # [num_new] the token after each (0 past the last): scored ones
    sampling: SamplingRow


@dataclasses.dataclass(frozen=True)
class FakeDecodeMetadata:
    block_tables: np.ndarray  # [rows, 1]: only the row count (decode rows, padded) is read


@dataclasses.dataclass(frozen=True)
class FakeAttention:
    decode: Optional[FakeDecodeMetadata]


@dataclasses.dataclass
class FakeStep:
    """The StepInput stand-in. The engine reads two fields of it, as of a real StepInput: the
    decode rows' input tokens at the head of `token_ids` (0 where the token is still on the
    device) and their padded row count, `attention.decode.block_tables.shape[0]`."""

    token_ids: np.ndarray  # [rows] decode rows' input tokens, padded with 0
    attention: FakeAttention
    rows: list[FakeRow]    # decode rows, then prompt chunks
    num_decode: int
    num_logprobs: int
    num_prompt_logprobs: int


@dataclasses.dataclass(frozen=True)
class CallRecord:
    """What one dispatched call ran."""

    seq_ids: tuple[int, ...]  # its rows' sequences: decodes, then prompt chunks
    num_decode: int
    num_steps: int            # decode steps (1: a single, maybe mixed, step)
    device_tokens: bool       # its decode inputs were (partly) gathered on the device


def _pad(n: int) -> int:
    """Rows padded to a power of two, as the real runner's buckets do."""
    return 1 << max(0, (n - 1).bit_length())


def _padded(tokens: list[int], n: int) -> list[int]:
    return tokens + [0] * (n - len(tokens))


class FakeRunner:
    """The runner interface of LLMEngine over a pool of token ids; see the module docstring."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int = 1000,
                 sliding_window: Optional[int] = None, any_step_count: bool = False):
        self.model_config = FakeModelConfig(vocab_size)
        self.any_step_count = any_step_count  # multi-step calls of any count (a "while" loop)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.pool_tokens = np.full((num_blocks, block_size), -1, np.int64)     # [blocks, bs]
        self.pool_positions = np.full((num_blocks, block_size), -1, np.int64)  # [blocks, bs]
        self.calls: list[CallRecord] = []
        self.num_copies = 0

    # -- host side -------------------------------------------------------------------------------
    def prepare(self, decode: list[ScheduledSequence], prefill: list[ScheduledSequence],
                sampling_rows: list[SamplingRow], num_logprobs: int,
                num_prompt_logprobs: int = 0, num_steps: int = 1):
        assert len(sampling_rows) == len(decode) + len(prefill)
        rows = []
        for item, sampling in zip(decode + prefill, sampling_rows):
            seq, n = item.seq, item.num_new_tokens
            tokens, next_tokens = (  # 0 for a sample still in flight, and past the last token
                _padded(seq.token_ids_slice(start, min(start + n, seq.num_tokens)), n)
                for start in (item.start, item.start + 1))
            rows.append(FakeRow(seq.seq_id, np.array(seq.block_table), item.start, tokens,
                                next_tokens, sampling))
        num_rows = _pad(len(decode)) if decode else 0
        head = np.zeros(num_rows, np.int32)
        head[:len(decode)] = [row.tokens[0] for row in rows[:len(decode)]]
        meta = FakeDecodeMetadata(np.zeros((num_rows, 1), np.int32)) if decode else None
        return FakeStep(head, FakeAttention(meta), rows, len(decode), num_logprobs,
                        num_prompt_logprobs), num_logprobs

    # -- device side -------------------------------------------------------------------------------
    def launch_step(self, step: FakeStep, flags, token_ids=None) -> tuple:
        self._take_head(step, token_ids)
        self._record(step, 1, token_ids)
        tokens = [self._run_row(row) for row in step.rows]
        samples = self._output(tokens, [LOGPROB] * len(tokens), step.num_logprobs,
                               _pad(len(step.rows)))
        return samples, self._prompt_scores(step) if step.num_prompt_logprobs else None

    def execute(self, step: FakeStep, flags) -> tuple:
        return self.launch_step(step, flags)

    def launch_decode_steps(self, step: FakeStep, flags, num_steps: int,
                            token_ids=None) -> tuple:
        assert step.num_decode == len(step.rows), "multi-step calls are decode-only"
        self._take_head(step, token_ids)
        self._record(step, num_steps, token_ids)
        outputs = []
        for _ in range(num_steps):
            tokens = [self._run_row(row) for row in step.rows]
            outputs.append(self._output(tokens, [LOGPROB] * len(tokens), step.num_logprobs,
                                        len(step.token_ids)))
            for row, token in zip(step.rows, tokens):  # each sample is the next step's input
                row.start, row.tokens = row.start + 1, [token]
                row.sampling = dataclasses.replace(row.sampling, step=row.sampling.step + 1)
        stacked = SamplerOutput(*(np.stack([getattr(o, f.name) for o in outputs])
                                  for f in dataclasses.fields(SamplerOutput)))
        last = np.zeros(len(step.token_ids), np.int32)
        last[:len(step.rows)] = outputs[-1].tokens[:len(step.rows)]
        return stacked, last

    def takes_any_step_count(self, num_seqs: int) -> bool:
        return self.any_step_count

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:
            self.pool_tokens[dst] = self.pool_tokens[src]
            self.pool_positions[dst] = self.pool_positions[src]
        self.num_copies += len(copies)

    # -- the fake model ----------------------------------------------------------------------------
    def _take_head(self, step: FakeStep, token_ids) -> None:
        """Decode rows' input tokens gathered on the device by the engine replace the host's."""
        if token_ids is None:
            return
        head = np.asarray(token_ids)
        for i, row in enumerate(step.rows[:step.num_decode]):
            row.tokens = [int(head[i])]

    def _run_row(self, row: FakeRow) -> int:
        """Writes the row's tokens into its slots, reads back what its queries attend to (the
        window of each, or everything), samples after the last one's."""
        bs = self.block_size
        for i, token in enumerate(row.tokens):
            pos = row.start + i
            block = row.block_table[pos // bs]
            self.pool_tokens[block, pos % bs] = token
            self.pool_positions[block, pos % bs] = pos
        end, window = row.start + len(row.tokens), self.sliding_window
        positions = np.arange(0 if window is None else max(0, row.start - window + 1), end)
        blocks = row.block_table[positions // bs]
        held = self.pool_positions[blocks, positions % bs]
        assert (held == positions).all(), (
            f"sequence {row.seq_id} reads positions {held.tolist()} as its context")
        context = self.pool_tokens[blocks, positions % bs]
        if window is not None:
            context = context[-window:]
        return next_token(context, row.sampling, self.model_config.vocab_size)

    def _prompt_scores(self, step: FakeStep) -> SamplerOutput:
        """The prompt chunks' tokens, back to back, scored: the token after each position p
        at `prompt_logprob(p + 1, token)`."""
        tokens, logprobs = [], []
        for row in step.rows[step.num_decode:]:
            for position, token in enumerate(row.next_tokens, row.start + 1):
                tokens.append(token)
                logprobs.append(prompt_logprob(position, token))
        return self._output(tokens, logprobs, step.num_prompt_logprobs, _pad(len(tokens)))

    def _output(self, tokens: list[int], logprobs: list[float], num_logprobs: int,
                num_rows: int) -> SamplerOutput:
        """[num_rows] rows: each token with its logprob (rank 1), then the next ids at the
        logprob - 1, - 2, ... as its top-N."""
        vocab = self.model_config.vocab_size
        chosen, chosen_logprobs = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.float32)
        chosen[:len(tokens)], chosen_logprobs[:len(tokens)] = tokens, logprobs
        top_ids = (chosen[:, None] + np.arange(num_logprobs)[None, :]) % vocab
        top_logprobs = chosen_logprobs[:, None] - np.arange(num_logprobs, dtype=np.float32)
        return SamplerOutput(tokens=chosen, logprobs=chosen_logprobs,
                             ranks=np.ones(num_rows, np.int32), top_ids=top_ids.astype(np.int32),
                             top_logprobs=top_logprobs.astype(np.float32))

    def _record(self, step: FakeStep, num_steps: int, token_ids) -> None:
        self.calls.append(CallRecord(tuple(row.seq_id for row in step.rows), step.num_decode,
                                     num_steps, token_ids is not None))
