"""The engine's configuration, static and hashable: `EngineConfig` (block size, pool size,
limits: the `LLM(...)` keywords) and `KernelConfig` (which kernel runs where)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from pallas_kernels.decode_layer_plan import TailTiling


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which kernel runs where: choices measured on an H100 (BENCHMARKS.md), passed down to the
    runner, the model and the attention backends. Tests and benchmarks set them here.

    Attributes:
      decode_layer_kernel: on a Hopper GPU with the "pallas" backend and bf16 weights, a decode
        step of one sequence runs each layer's projections after attention (output projection,
        MLP, next layer's QKV) in one persistent Mosaic GPU kernel
        (pallas_kernels/decode_layer_mgpu.py; a mixture-of-experts layer in two, the routing
        between them) where the model's layers (ModelConfig.kernel_layers: Llama's, Qwen3's)
        and shapes fit it (Qwen3's layers with "always" only, until their decode step
        matches the XLA layers on a GPU); False: XLA's
        matmuls, as at every other batch size; "always": also off Hopper (in Mosaic GPU's
        interpreter on the CPU: for tests).
      layer_tiling: that kernel's tiling. 4 ring slots measured best (48.4 us per Llama-3.2-1B
        layer on an H100; 49.2 with 8).
      mosaic_prefill_min_tokens: prefill steps of at least this many prompt tokens use the
        Mosaic GPU prefill kernel on Hopper, shorter ones the Triton-lowered kernel. Mosaic GPU
        kernels compile in every process (~2 s per step shape), and below ~1k tokens the gain
        per call is tens of us (1 x 1024: 49 vs 76 us; 1 x 8192: 1.16 vs 1.67 ms).
      unroll_max_rows: multi-step decode calls of at most this many rows run their steps as
        straight-line code instead of a loop (on an H100 at batch 1: 956.5 vs 937.8 tok/s, no
        per-step graph launch); None: 2 on GPU for models of at most 4B parameters, else 0
        (jinfer.runner.steps.default_unroll_max_rows: the unrolled program's compile grows with
        layers x steps; the CPU has no launches to save).
      decode_loop: how multi-step decode calls of more rows loop over their steps
        (jinfer.runner.steps): "scan" (a static step count, one program per count) or "while"
        (a dynamic trip count, one program for every count); None: "scan" on GPU (there a
        dynamic while loop waits for the host each step; offline throughput on an H100 fell
        from 36,087 to 26,851 tok/s after the engine moved to "while"), "while" elsewhere.
      moe_impl: how mixture-of-experts layers run their experts (jinfer.model.moe): "pallas"
        (the grouped-matmul kernel, pallas_kernels/grouped_matmul.py, Triton-lowered),
        "pallas_mgpu" (its Mosaic GPU twin, grouped_matmul_mgpu.py, Hopper, bf16 / f16),
        "pallas_pairs" / "pallas_mgpu_pairs" (the same kernels by (token, expert) pair,
        unsorted: for decode steps), "ragged_dot" (XLA's jax.lax.ragged_dot), "gather", or
        "auto"; None: "auto", which on a Hopper GPU is "pallas_mgpu_pairs" for steps of at
        most 2 tokens and "pallas_mgpu" above (on an H100, one Qwen3-30B-A3B layer: 65 / 77
        us for one token, against ragged_dot's 439; 0.92 vs 27.6 ms for 2,048 tokens), on
        another GPU "pallas_pairs" / "pallas", and on the CPU gather at decode sizes, else
        ragged_dot (jinfer.model.moe.auto_impl).
    """

    decode_layer_kernel: Union[bool, str] = True
    layer_tiling: TailTiling = TailTiling(stages=4)
    mosaic_prefill_min_tokens: int = 1024
    unroll_max_rows: Optional[int] = None
    decode_loop: Optional[str] = None
    moe_impl: Optional[str] = None

    def __post_init__(self):
        if self.decode_loop not in (None, "scan", "while"):
            raise ValueError(f"decode_loop must be 'scan', 'while' or None (the device's "
                             f"default), got {self.decode_loop!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine knobs, exposed as `LLM(...)` keywords.

    Attributes:
      block_size: tokens per KV block.
      num_kv_blocks: blocks in the KV pool (block 0 is reserved as the padding block). None sizes
        the pool from `kv_cache_memory_bytes`, else from `gpu_memory_utilization` on a GPU, else
        (CPU) from DEFAULT_CPU_KV_BYTES.
      kv_cache_memory_bytes: memory budget for the pool when `num_kv_blocks` is None.
      gpu_memory_utilization: fraction of the device memory JAX may use that weights, step
        scratch and the pool may take together (vLLM's knob); GPU only.
      max_model_len: longest sequence (prompt + output) a request may reach.
      max_num_seqs: most sequences in one decode batch.
      max_num_batched_tokens: most prompt tokens prefilled in one step (longer prompts are
        prefilled in chunks).
      seed: seeds requests that carry no seed of their own.
      attention_backend: "pallas" (the kernels; the default on GPU), "triton" or "reference"
        (jnp; the default on CPU); see jinfer.model.attention.
      enable_prefix_caching: share the blocks of equal prompt prefixes (hash chain over full
        blocks) and skip their prefill.
      num_scheduler_steps: decode steps one device call may run back to back when only decodes
        run (vLLM's multi-step scheduling): the host syncs, schedules and detokenizes once per
        call instead of once per token. Above 1 the engine also looks ahead: every step
        (mixed prefill + decode steps too) is dispatched before the one in flight is read back
        (jinfer.engine). 1 switches both off: every step runs synchronously.
      mixed_batching: run a step's decode rows and prompt chunks in one device call (else
        two calls: the prompt chunks, then the decodes; fewer shapes to compile).
      preemption_grace_steps: a sequence that resumed after a preemption is not chosen as a
        victim again for this many steps while another sequence could give way.
      kernels: which kernel runs where (`KernelConfig`).
      tensor_parallel_size: devices the model is split over (tensor parallelism over the first
        N of `jax.devices()`, jinfer.runner.sharding); 1: one device, no mesh.
      enable_expert_parallel: under tensor parallelism, split a mixture-of-experts model's
        experts by expert (each device whole experts) instead of each expert's intermediate
        dimension; dense models ignore it (jinfer.runner.sharding).
    """

    block_size: int = 16
    num_kv_blocks: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    seed: int = 0
    attention_backend: str = "reference"
    preemption_grace_steps: int = 8
    num_scheduler_steps: int = 8
    mixed_batching: bool = True
    enable_prefix_caching: bool = True
    kernels: KernelConfig = KernelConfig()
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False

    def __post_init__(self):
        for name in ("block_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                     "num_scheduler_steps", "tensor_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be positive or None, got "
                             f"{self.kv_cache_memory_bytes}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(
                f"num_kv_blocks must be at least 2 (block 0 is the padding block), "
                f"got {self.num_kv_blocks}")
