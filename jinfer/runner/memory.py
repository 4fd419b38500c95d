"""Sizing the KV pool from device memory (vLLM's `gpu_memory_utilization`), measured.

The pool takes what is left of the memory JAX may use once the weights and the scratch
(activations) of the largest steps are accounted for. Both are measured, not guessed: the
weights from the allocator's bytes in use, the scratch from XLA's buffer assignment of the
compiled biggest prefill (max_num_batched_tokens tokens) and biggest decode (max_num_seqs rows
at max_model_len).

Under tensor parallelism every number is one device's: `gpu_memory_utilization` is a fraction of
each device, the weights in use are that device's shard, XLA's scratch is per device, and a
block costs the bytes of the device's KV heads (`bytes_per_block` of the per-device config), so
the block count comes out the same on every device (jinfer.runner.sharding).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

from jinfer.model.kv_cache import KVCache, bytes_per_block, init_kv_cache
from jinfer.runner.warmup import greedy_rows, pad_block_items

logger = logging.getLogger(__name__)

GiB = 2**30


def device_memory() -> tuple[int, int] | None:
    """(bytes JAX may allocate, bytes in use) on the first device; None where the backend
    reports no allocator statistics (the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))


def check_weights_fit(model_config, dtype, num_devices: int = 1) -> None:
    """ValueError, before any weight is placed, when one device's share of the weights
    (num_params x the dtype's size / num_devices) exceeds what JAX may still allocate there;
    says what to change. No check where the backend reports no allocator limit (the CPU).
    The common case: JAX takes 75% of a GPU by default, 59.7 GiB of an 80 GB H100, less than
    Qwen3-30B-A3B's 56.9 GiB of bf16 weights leave room for."""
    from jinfer.model.decoder import num_params
    memory = device_memory()
    if memory is None:
        return
    limit, in_use = memory
    weights = num_params(model_config) * jnp.dtype(dtype).itemsize // num_devices
    if weights <= limit - in_use:
        return
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75 (JAX's default)")
    raise ValueError(
        f"the weights do not fit: {weights / GiB:.2f} GiB a device, where JAX may allocate "
        f"{(limit - in_use) / GiB:.2f} GiB more of its {limit / GiB:.2f} GiB "
        f"(XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}); set XLA_PYTHON_CLIENT_MEM_FRACTION "
        f"higher (0.95, say) before JAX starts, spread the model over several devices "
        f"(tensor_parallel_size), or load it in a smaller dtype")


def step_temp_bytes(model_config, config, params, dtype) -> int:
    """Scratch memory of the largest steps, from XLA's buffer assignment of their programs: a
    prefill of max_num_batched_tokens tokens and a decode of max_num_seqs rows at max_model_len
    (the decode-steps program of one step: the steps of a longer call run one after another
    on the same buffers, while an unrolled 8-step program of a large model is slow to compile:
    on an H100, sizing Qwen3-30B-A3B's pool with it took 122 s, its 256-token prefill program
    13.7 s of that). Lowered on abstract pool shapes and
    stand-in sequences on the pad block (the data is irrelevant, the shapes are not); nothing
    runs and nothing is allocated."""
    from jinfer.runner.batch import BatchBuilder
    from jinfer.runner.model_runner import layer_tiling_for, step_buckets
    from jinfer.runner.steps import StepPrograms
    tiling = layer_tiling_for(model_config, config, dtype)
    builder = BatchBuilder(step_buckets(model_config, config, tiling))
    programs = StepPrograms(model_config, config, tiling, max_programs=None)
    if programs.tp is None:
        pool = jax.eval_shape(lambda: init_kv_cache(model_config, 2, config.block_size, dtype))
    else:
        pool = programs.tp.abstract_kv_cache(model_config, 2, config.block_size, dtype)
    block_size = config.block_size
    prefill_tokens = min(config.max_num_batched_tokens, config.max_model_len - 1)
    prefill = pad_block_items(1, prefill_tokens, prefill_tokens, block_size)
    decode = pad_block_items(config.max_num_seqs, config.max_model_len, 1, block_size)
    temp = 0
    lower_decode = functools.partial(programs.lower_decode_steps, num_steps=1)
    for lower, items, is_decode in ((programs.lower_step, prefill, False),
                                    (lower_decode, decode, True)):
        step_input, flags = builder.prepare(items if is_decode else [],
                                            [] if is_decode else items, greedy_rows(items), 0)
        analysis = lower(params, pool, step_input, flags).compile().memory_analysis()
        temp = max(temp, int(analysis.temp_size_in_bytes) if analysis else 0)
    return temp


def blocks_for_utilization(temp_bytes: int, utilization: float, bytes_per_block: int,
                           min_blocks: int) -> int:
    """Usable blocks (block 0 not counted) that fit in `utilization` of the memory JAX may use,
    besides what is allocated now (the weights) and `temp_bytes`, the scratch of the largest
    steps. Raises a ValueError that says what is needed when not even `min_blocks` fit."""
    limit, in_use = device_memory()
    used = in_use + temp_bytes
    budget = int(utilization * limit) - used
    blocks = max(0, budget // bytes_per_block - 1)
    logger.info("KV pool sizing: %.2f GiB allowed (gpu_memory_utilization=%.2f of %.2f GiB), "
                "weights %.2f GiB + step scratch %.2f GiB -> %d blocks (%.2f GiB)",
                utilization * limit / GiB, utilization, limit / GiB, in_use / GiB,
                (used - in_use) / GiB, blocks, blocks * bytes_per_block / GiB)
    stats = jax.local_devices()[0].memory_stats() or {}
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


def allocate_kv_cache(model_config, num_blocks: int, block_size: int, dtype,
                      min_blocks: int, tp=None) -> KVCache:
    """The KV pool, allocated now (`tp`, a TensorParallel: sharded over its KV heads, each
    device allocating its own), as large as can actually be placed: where the device
    allocator cannot place `num_blocks` (its free memory may be split by holes that the
    weights' creation left, seen with the Llama-3-8B shape on an H100: 2 x 24 GiB failed where
    48 GiB were free in all), the pool shrinks by a tenth until it fits, down to `min_blocks`.
    An allocation that cannot succeed fails here, with what to change, rather than inside the
    first request's step."""
    wanted = num_blocks
    init = init_kv_cache if tp is None else tp.init_kv_cache
    if tp is not None:
        model_config = tp.shard_config(model_config)  # one device's bytes in the messages
    while True:
        try:
            kv_cache = jax.block_until_ready(init(model_config, num_blocks, block_size, dtype))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            smaller = max(min_blocks, num_blocks * 9 // 10)
            if smaller == num_blocks:
                size = num_blocks * bytes_per_block(model_config, block_size, dtype) / GiB
                raise ValueError(
                    f"the KV pool ({num_blocks - 1} blocks of {block_size} tokens, {size:.2f} "
                    f"GiB) could not be allocated on the device ({e}); lower "
                    f"gpu_memory_utilization or max_model_len, or give kv_cache_memory_bytes "
                    f"or num_kv_blocks") from e
            num_blocks = smaller
            continue
        if num_blocks < wanted:
            logger.warning("the KV pool of %d blocks could not be placed in one piece; "
                           "allocated %d blocks (%.2f GiB) instead", wanted - 1, num_blocks - 1,
                           num_blocks * bytes_per_block(model_config, block_size, dtype) / GiB)
        return kv_cache
