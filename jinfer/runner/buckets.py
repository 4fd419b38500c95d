"""Every padded shape of a device step, in one place.

A jitted step compiles once per distinct input shape, so the host pads each dimension up to a
bucket: few buckets mean few compiles (see `jinfer.runner.compile_budget`), coarse ones mean
padding work. Each bucket below says what it pads and why it is as coarse as it is.
"""

from __future__ import annotations

import dataclasses

MIN_PREFILL_BUCKET = 16
LOGPROB_BUCKETS = (1, 5, 20)  # top-N logprobs compiled per bucket, sliced per request


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def three_quarter_bucket(n: int) -> int:
    """The smallest of the powers of two and the 1.5x steps between them (1, 2, 3, 4, 6, 8, 12,
    16, 24, ...) that holds n: padding stays under a third for 2x the compiles of powers of two."""
    power = next_power_of_2(n)
    return power * 3 // 4 if n <= power * 3 // 4 else power


def packed_tokens_bucket(n: int) -> int:
    """Token count of a packed prefill row (16, 24, 32, 48, 64, 96, ...): the matmuls run over
    every padded token, hence the 1.5x steps."""
    return three_quarter_bucket(max(n, MIN_PREFILL_BUCKET))


def query_bucket(n: int) -> int:
    """Query length of the per-sequence prefill layout (1, or a power of two >= 16)."""
    return n if n == 1 else max(MIN_PREFILL_BUCKET, next_power_of_2(n))


def decode_steps_bucket(wanted: int, limit: int, any_count: bool = False) -> int:
    """Decode steps for one multi-step call when the rows want at most `wanted` more tokens.

    With `any_count` (the runner's "while" loop: the count is an argument of one program) as
    many as wanted, up to `limit` (num_scheduler_steps). Else `limit` when they want that many,
    and 1 otherwise: a tail of 7 tokens runs as 7 one-step calls, dispatched back to back
    (lookahead), not as 4 + 2 + 1: the GPU's loops (scan, unrolled) build one program per step
    count, and two counts per decode shape halve what a server warms (at `jinfer serve`'s GPU
    defaults 386 programs, not 750; before ready 74, not 126: jinfer.runner.warmup), at the
    price of a few more dispatches at the end of a generation, when every row is within
    `limit` of its max_tokens."""
    if any_count:
        return max(1, min(wanted, limit))
    return limit if wanted >= limit else 1


def decode_steps_buckets(limit: int) -> list[int]:
    """Every value `decode_steps_bucket` returns above 1."""
    return [limit] if limit > 1 else []


def logprobs_bucket(wanted: list[int]) -> int:
    """Top-N logprobs a step computes for rows wanting `wanted` (sliced per request on the
    host): 0 when no row wants any, else the smallest of LOGPROB_BUCKETS covering them all."""
    if not wanted:
        return 0
    return next(b for b in LOGPROB_BUCKETS if b >= max(wanted))


def token_list_bucket(n: int) -> int:
    """Columns of the sampler's per-row token lists (penalties, bans): 0, or a power of two
    >= 8."""
    return 0 if n == 0 else max(8, next_power_of_2(n))


def copies_bucket(n: int) -> int:
    """Block copies (copy-on-write) per call, padded with pad-block self-copies."""
    return next_power_of_2(n)


@dataclasses.dataclass(frozen=True)
class StepBuckets:
    """The buckets that depend on the engine's configuration.

    Attributes:
      block_size: tokens per KV block.
      max_blocks_per_seq: blocks of a max_model_len sequence (the widest block table).
      min_decode_rows: fewest rows of a decode step (2 on GPU without the layer kernel: XLA
        turns a one-row matmul into a slower multiply + reduce).
      min_context_tokens: block tables narrower than this many tokens are padded up to it.
      context_growth: "3/4" (powers of two and the 1.5x steps between) or "pow2" (coarser:
        half the compiles, more padded attention work).
      reuse_larger_prefill: a prefill may run in a larger shape used before (its program
        compiled already) with at most this many times the attention work of its own buckets;
        0: never.
      reuse_padding_tokens: how many padded tokens a prefill shape may run in larger shapes,
        summed over its steps, before it gets its own program.
    """

    block_size: int
    max_blocks_per_seq: int
    min_decode_rows: int = 1
    min_context_tokens: int = 32
    context_growth: str = "3/4"
    reuse_larger_prefill: float = 0
    reuse_padding_tokens: int = 4096

    def rows(self, n: int) -> int:
        """Sequences of a step (prompt chunks, sampled rows)."""
        return next_power_of_2(n)

    def decode_rows(self, n: int) -> int:
        """Rows of a decode step of n sequences (at least `min_decode_rows`)."""
        return next_power_of_2(max(n, self.min_decode_rows))

    def blocks(self, n: int) -> int:
        """Block-table width for a longest table of n blocks: attention reads (and a decode
        step's cost grows with) the padded width."""
        grow = three_quarter_bucket if self.context_growth == "3/4" else next_power_of_2
        minimum = -(-self.min_context_tokens // self.block_size)
        return min(max(minimum, grow(n)), grow(self.max_blocks_per_seq))
