"""Sizing the KV pool from device memory (vLLM's `gpu_memory_utilization`), measured.

The pool takes what is left of the memory JAX may use once the weights and the scratch
(activations) of the largest steps are accounted for. Both are measured, not guessed: the
weights from the allocator's bytes in use, the scratch from XLA's buffer assignment of the
compiled biggest prefill (max_num_batched_tokens tokens) and biggest decode (max_num_seqs rows
at max_model_len).
"""

from __future__ import annotations

import logging

import jax

from jinfer.runner.warmup import greedy_rows, pad_block_items

logger = logging.getLogger(__name__)

GiB = 2**30


def device_memory() -> tuple[int, int] | None:
    """(bytes JAX may allocate, bytes in use) on the first device; None where the backend
    reports no allocator statistics (the CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def step_temp_bytes(runner) -> int:
    """Scratch memory of the largest steps, from XLA's buffer assignment of their compiled
    programs: a prefill of max_num_batched_tokens tokens and a decode of max_num_seqs rows at
    max_model_len. Stand-in sequences on the pad block (the data is irrelevant, the shapes are
    not); nothing runs."""
    config, block_size = runner.config, runner.block_size
    prefill_tokens = min(config.max_num_batched_tokens, config.max_model_len - 1)
    steps = [([], pad_block_items(1, prefill_tokens, prefill_tokens, block_size)),
             (pad_block_items(config.max_num_seqs, config.max_model_len, 1, block_size), [])]
    temp = 0
    for decode, prefill in steps:
        step_input, flags = runner.prepare(decode, prefill, greedy_rows(decode + prefill), 0)
        analysis = runner.compile_step(step_input, flags).memory_analysis()
        temp = max(temp, int(analysis.temp_size_in_bytes) if analysis else 0)
    return temp


def blocks_for_utilization(runner, utilization: float, bytes_per_block: int,
                           min_blocks: int) -> int:
    """Usable blocks (block 0 not counted) that fit in `utilization` of the memory JAX may use,
    besides what is allocated now (the weights; the runner's pool should be minimal) and the
    scratch of the largest steps. Raises a ValueError that says what is needed when not even
    `min_blocks` fit."""
    limit, in_use = device_memory()
    used = in_use + step_temp_bytes(runner)
    budget = int(utilization * limit) - used
    blocks = max(0, budget // bytes_per_block - 1)
    logger.info("KV pool sizing: %.2f GiB allowed (gpu_memory_utilization=%.2f of %.2f GiB), "
                "weights %.2f GiB + step scratch %.2f GiB -> %d blocks (%.2f GiB)",
                utilization * limit / GiB, utilization, limit / GiB, in_use / GiB,
                (used - in_use) / GiB, blocks, blocks * bytes_per_block / GiB)
    stats = jax.devices()[0].memory_stats() or {}
    if stats.get("pool_bytes", limit) < limit and blocks * bytes_per_block > limit // 4:
        # Seen on an H100: float32 pools of 2 x 26 GiB under a 53 GiB budget; the allocator
        # reserved 34 GiB for the first and had no room left for the second at the first step.
        logger.warning(
            "the device allocator grows on demand (XLA_PYTHON_CLIENT_PREALLOCATE=false): its "
            "regions may leave no room for a %.1f GiB pool buffer within the budget; if a step "
            "runs out of memory, lower gpu_memory_utilization or leave preallocation on",
            blocks * bytes_per_block / 2 / GiB)
    if blocks < min_blocks:
        needed = used + (min_blocks + 1) * bytes_per_block
        raise ValueError(
            f"the model does not fit: weights and step scratch take {used / GiB:.2f} GiB and "
            f"the smallest useful KV pool ({min_blocks} blocks, one max_model_len sequence) "
            f"{(min_blocks + 1) * bytes_per_block / GiB:.2f} GiB, {needed / GiB:.2f} GiB in all, "
            f"but gpu_memory_utilization={utilization} allows {utilization * limit / GiB:.2f} "
            f"GiB of {limit / GiB:.2f} GiB; raise gpu_memory_utilization (or "
            f"XLA_PYTHON_CLIENT_MEM_FRACTION), lower max_model_len, max_num_seqs or "
            f"max_num_batched_tokens, or use a smaller dtype")
    return blocks
