"""Start-up compilation: runs the step programs of the common shape buckets once, before the
first request, so that no request waits on a compile (and JAX's persistent cache holds them for
the next start).

Everything runs on the pad block (block 0: every table entry and slot points there), so the
real pool's contents are untouched. Covered: one prompt per prefill step, every decode batch,
greedy and default sampling (WARMUP_PARAMS) without logprobs. Steps that prefill several
prompts at once, mixed steps, prompt-logprobs steps and other sampler variants build on first
use (on the CPU a prefill may run in a larger shape built before: see
StepBuckets.reuse_larger_prefill).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional, Sequence

from jinfer.model.kv_cache import PAD_BLOCK
from jinfer.model.sampler import SamplingRow
from jinfer.api.sampling_params import SamplingParams
from jinfer.runner.buckets import decode_steps_buckets, packed_tokens_bucket
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence

logger = logging.getLogger(__name__)


# The sampler variants warm-up builds: greedy (generate.py's default) and SamplingParams()'s
# (temperature 1, no truncation: vLLM's and the OpenAI API's defaults).
WARMUP_PARAMS = (SamplingParams(temperature=0), SamplingParams())


def pad_block_items(num_seqs: int, num_tokens: int, num_new: int, block_size: int,
                    params: SamplingParams = WARMUP_PARAMS[0]):
    """num_seqs stand-in sequences of num_tokens tokens whose last num_new are this step's,
    every block the pad block (for compiling or measuring a step shape without touching the
    pool)."""
    items = []
    for i in range(num_seqs):
        seq = Sequence(-1 - i, "warmup", 0, [0] * num_tokens, params, 0, detokenizer=None)
        seq.block_table = [PAD_BLOCK] * -(-num_tokens // block_size)
        seq.num_computed_tokens = num_tokens - num_new
        items.append(ScheduledSequence(seq, num_new))
    return items


def _buckets(first: int, last: int, bucket) -> list[int]:
    """The distinct buckets of every n in [first, last]."""
    values, n = [], first
    while n <= last:
        values.append(bucket(n))
        n = values[-1] + 1
    return values


@dataclasses.dataclass(frozen=True)
class WarmupShape:
    """One shape warm-up builds: the prefill of one prompt of `prompt_tokens` tokens, or (when
    that is 0) a decode of `rows` rows at `context` tokens, once per step count of
    `step_counts` (each its own program); with sampler variant `params`."""

    params: SamplingParams
    prompt_tokens: int = 0
    rows: int = 0
    context: int = 0
    step_counts: tuple[int, ...] = ()

    @property
    def num_programs(self) -> int:
        return 1 if self.prompt_tokens else len(self.step_counts)

    def run(self, runner) -> None:
        """Runs the shape's steps on the pad block (compiling them where new)."""
        block_size = runner.block_size
        if self.prompt_tokens:
            items = pad_block_items(1, self.prompt_tokens, self.prompt_tokens, block_size,
                                    self.params)
            runner.execute(*runner.prepare([], items, greedy_rows(items), 0))
            return
        items = pad_block_items(self.rows, self.context, 1, block_size, self.params)
        step_input, flags = runner.prepare(items, [], greedy_rows(items), 0)
        for num_steps in self.step_counts:
            runner.execute_decode_steps(step_input, flags, num_steps)


def warm_up(runner, max_context: int, shapes: Optional[Sequence[WarmupShape]] = None) -> dict:
    """Runs, on the pad block, `shapes` (default: every one of `warmup_shapes(runner,
    max_context)`): for each sampler variant of WARMUP_PARAMS, the prefill of one prompt for
    every packed token bucket up to max_num_batched_tokens, and the decode program for every
    batch bucket up to max_num_seqs and every block-table width up to max_context tokens (with
    the "while" decode loop, one program for every step count; unrolled calls and the "scan"
    loop, the GPU's, have one per step count, and each is built: jinfer.runner.steps).
    Returns {"programs": programs built, "seconds": time taken}."""
    config = runner.config
    started, before = time.perf_counter(), runner.num_compiles
    max_context = min(max_context, config.max_model_len)
    for shape in warmup_shapes(runner, max_context) if shapes is None else shapes:
        shape.run(runner)
    result = {"programs": runner.num_compiles - before, "seconds": time.perf_counter() - started}
    logger.info("warm-up: built %d step programs (prompts up to %d tokens, batches up to %d, "
                "contexts up to %d) in %.1f s", result["programs"],
                config.max_num_batched_tokens, config.max_num_seqs, max_context,
                result["seconds"])
    return result


def warmup_shapes(runner, max_context: int) -> list[WarmupShape]:
    """The shapes warm_up builds, in order (see warm_up)."""
    config, block_size, buckets = runner.config, runner.block_size, runner.buckets
    max_context = min(max_context, config.max_model_len)
    widths = _buckets(1, -(-max_context // block_size), buckets.blocks)
    step_counts = (1, *decode_steps_buckets(config.num_scheduler_steps))
    shapes = []
    for params in WARMUP_PARAMS:
        shapes += [WarmupShape(params, prompt_tokens=tokens) for tokens in _buckets(
            1, min(config.max_num_batched_tokens, max_context - 1), packed_tokens_bucket)]
        for rows in _buckets(1, config.max_num_seqs, buckets.decode_rows):
            counts = step_counts if runner.programs.loop(rows) != "while" else (1,)
            shapes += [WarmupShape(params, rows=rows, step_counts=counts,
                                   context=min(width * block_size, max_context))
                       for width in widths]
    return shapes


def context_within_budget(runner, max_context: int, budget: int) -> int:
    """The largest of max_context, max_context / 2, ... (down to one block) whose warm-up
    builds at most `budget` programs: warming past a capped process's compile budget would
    drop the programs it just built (jinfer.runner.steps)."""
    while (max_context > runner.block_size
           and warmup_program_count(runner, max_context) > budget):
        max_context //= 2
    return max_context


def warmup_program_count(runner, max_context: int) -> int:
    """The programs warm_up(runner, max_context) builds in a process that has none yet."""
    return sum(shape.num_programs for shape in warmup_shapes(runner, max_context))


def greedy_rows(items: list[ScheduledSequence]) -> list[SamplingRow]:
    """Sampling rows (see `make_sampling_metadata`) for stand-in sequences, with their
    params."""
    return [SamplingRow(item.seq.params, seed=0, step=0) for item in items]
