"""Owns the device state (weights, KV pool) and runs scheduled work on it: the batch step
(`jinfer.runner.batch`) lays the rows out, the device step (`jinfer.runner.steps`) runs them.
The pool is donated to every call and replaced by the one it returns. Under tensor parallelism
the weights and the pool are sharded over the devices' mesh (jinfer.runner.sharding) and every
call runs on all of them; the host side is the same."""

from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.config import EngineConfig
from jinfer.engine.scheduler import ScheduledSequence
from jinfer.engine.sequence import Sequence
from jinfer.model import sampler as sampler_lib
from jinfer.model.attention import StepAttention
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache, copy_blocks
from jinfer.model.layer_kernel import layer_kernel_tiling
from jinfer.runner.batch import BatchBuilder, StepInput
from jinfer.runner.buckets import StepBuckets
from jinfer.runner.steps import StepPrograms
from pallas_kernels import paged_prefill_mgpu
from pallas_kernels.decode_layer_plan import TailTiling

logger = logging.getLogger(__name__)


def layer_tiling_for(model_config: ModelConfig, config: EngineConfig,
                     dtype) -> Optional[TailTiling]:
    """The layer kernel's tiling where one-row decode steps use it (KernelConfig's
    decode_layer_kernel, the "pallas" backend, a Hopper GPU, shapes and dtype it takes, one
    device: it runs whole weights), else None."""
    wanted = config.kernels.decode_layer_kernel
    if (not wanted or config.attention_backend != "pallas" or config.tensor_parallel_size > 1
            or (wanted != "always" and not paged_prefill_mgpu.hopper_gpu())):
        return None
    if (model_config.num_experts or model_config.qk_norm) and wanted != "always":
        # Qwen3's layers in the kernels (q/k norms in the attention kernel, the experts' two
        # kernels): each kernel passes its GPU tests, the decode step against the XLA layers
        # not yet on a GPU, so they run where asked for ("always") until it does.
        logger.info("decode steps of one row run the layers in XLA: Qwen3's layers run in the "
                    "layer kernels with KernelConfig(decode_layer_kernel='always') only")
        return None
    tiling = layer_kernel_tiling(model_config, dtype, config.kernels.layer_tiling)
    if tiling is None:
        logger.info("decode steps of one row run the layers in XLA: the layer kernel does not "
                    "take this model's shapes or dtype")
    return tiling


def step_buckets(model_config: ModelConfig, config: EngineConfig,
                 layer_tiling: Optional[TailTiling]) -> StepBuckets:
    """The shape buckets of this engine on this backend.

    GPU: block tables from 32 tokens in 1.5x steps (decode attention costs in proportion to
    the padded context). XLA on GPU turns a one-row matmul of a small weight into a multiply +
    reduce that ran 2-3x slower than a GEMM on an H100, so decode steps carry at least two rows
    there (a padding row is nearly free), unless one row goes through the layer kernel.
    CPU: block tables from 128 tokens in powers of two, and a prefill may run in a larger
    shape built before (within a budget of padded tokens: BatchBuilder._prefill_shape): each
    program costs 1.5-10 s to compile and ~1 s to load from the cache there. Padded attention
    is not free on the CPU (a batch-16 decode step of the default model took 87.8 ms at 128
    tokens of table, 103 ms at 256, for a 100-token context), hence 128 rather than coarser."""
    max_blocks = -(-config.max_model_len // config.block_size)
    if jax.default_backend() == "gpu":
        return StepBuckets(config.block_size, max_blocks,
                           min_decode_rows=1 if layer_tiling is not None else 2,
                           min_context_tokens=32, context_growth="3/4")
    return StepBuckets(config.block_size, max_blocks, min_decode_rows=1,
                       min_context_tokens=128, context_growth="pow2", reuse_larger_prefill=4)


class ModelRunner:
    """The weights and the KV pool on the device, and the compiled steps that run on them."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, params: dict,
                 kv_cache: KVCache, max_programs: Optional[int] = None):
        self.model_config = model_config
        self.config = config
        self.params = params
        self.kv_cache = kv_cache
        self.block_size = config.block_size
        self.layer_tiling = layer_tiling_for(model_config, config, _weights_dtype(params))
        self.buckets = step_buckets(model_config, config, self.layer_tiling)
        self.batch = BatchBuilder(self.buckets)
        self.programs = StepPrograms(model_config, config, self.layer_tiling, max_programs)
        self.tp = self.programs.tp  # jinfer.runner.sharding.TensorParallel, or None

    @property
    def num_compiles(self) -> int:
        """Step programs this runner has built (compiled, or loaded from the disk cache)."""
        return self.programs.num_compiles

    def prepare(self, decode: list[ScheduledSequence], prefill: list[ScheduledSequence],
                sampling_rows, num_logprobs: int, num_prompt_logprobs: int = 0,
                num_steps: int = 1):
        """One call's rows -> (StepInput of NumPy arrays, sampler flags); see BatchBuilder."""
        return self.batch.prepare(decode, prefill, sampling_rows, num_logprobs,
                                  num_prompt_logprobs, num_steps=num_steps)

    def execute(self, step_input: StepInput, flags) -> tuple:
        """Runs one step; returns `launch_step`'s outputs as NumPy (the only device->host
        copy)."""
        return jax.device_get(self.launch_step(step_input, flags))

    def launch_step(self, step_input: StepInput, flags, token_ids=None) -> tuple:
        """Dispatches one step and returns at once, before the device is done: (the sampler's
        output [S], the prompt tokens' scores [P] where the step input asks for prompt logprobs
        else None), still on the device. `token_ids` (device or host, [n]) replace the step
        input's first n token ids (its decode rows) on the device: a call planned while another
        is in flight passes that call's samples without reading them back. A decode-only step
        runs as one step of the decode-steps program (one program for both)."""
        if step_input.attention.prefill is None:
            results, _ = self.launch_decode_steps(step_input, flags, 1, token_ids)
            return jax.tree.map(lambda a: a[0], results), None
        samples, scores, self.kv_cache = self.programs.step(self.params, self.kv_cache,
                                                            step_input, flags, token_ids)
        return samples, scores

    def launch_decode_steps(self, step_input: StepInput, flags, num_steps: int,
                            token_ids=None) -> tuple:
        """Dispatches `num_steps` decode steps of a decode-only StepInput in one call and
        returns at once: (the sampler outputs [steps >= num_steps, S], the last sampled tokens
        [rows]), both still on the device. `token_ids` (device or host, [rows]) replaces the
        step input's first tokens: a call that continues the previous one passes that call's
        last tokens without reading them."""
        results, self.kv_cache, last_tokens = self.programs.decode_steps(
            self.params, self.kv_cache, step_input, flags, num_steps, token_ids)
        return results, last_tokens

    def takes_any_step_count(self, num_seqs: int) -> bool:
        """Whether one program runs a decode-steps call of `num_seqs` sequences for any number
        of steps up to num_scheduler_steps (the "while" loop, the CPU's default), rather than
        one program per count (jinfer.runner.steps)."""
        return self.programs.loop(self.buckets.decode_rows(num_seqs)) == "while"

    def execute_decode_steps(self, step_input: StepInput, flags,
                             num_steps: int) -> sampler_lib.SamplerOutput:
        """`launch_decode_steps` and wait: the sampler outputs [num_steps, S] as NumPy."""
        results, _ = self.launch_decode_steps(step_input, flags, num_steps)
        return jax.tree.map(lambda a: a[:num_steps], jax.device_get(results))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write on the device: each (src, dst) block duplicated in every layer. Runs
        after every call dispatched before it, as every call on the pool does."""
        self.kv_cache = copy_blocks(self.kv_cache, copies)

    def update_params(self, params: dict) -> None:
        """New weights of exactly the current structure, shapes and dtypes (checked by the
        caller): the compiled programs take them as they are."""
        self.params = params

    def gather_params(self) -> dict:
        """The weights in the ordinary run layout as host NumPy arrays, each leaf gathered
        from the devices of every process (under several processes every process calls this,
        jinfer.runner.multihost)."""
        from jax.experimental import multihost_utils
        tp = self.programs.tp
        params = self.params if tp is None else tp.unshard_params(self.params)
        return jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)

    def scatter_params(self, leaves: Optional[list]) -> None:
        """New weights from process 0's host: `leaves` (the ordinary run layout's leaves in
        tree order, NumPy; None on the other processes) broadcast leaf by leaf, then placed as
        the running weights are, each process its shards (every process calls this under
        several processes, jinfer.runner.multihost). One leaf at a time is whole on a host."""
        from jax.experimental import multihost_utils
        tp = self.programs.tp
        structure = self.params if tp is None else jax.eval_shape(tp.unshard_params,
                                                                  self.params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(structure)
        placed = []
        for i, (path, spec) in enumerate(flat):
            value = (leaves[i] if leaves is not None
                     else np.zeros(spec.shape, jnp.dtype(spec.dtype)))
            if jax.process_count() > 1:
                value = np.asarray(multihost_utils.broadcast_one_to_all(value))
            placed.append(jax.device_put(value, spec.sharding) if tp is None
                          else tp.place_host_leaf(path, value))
        self.update_params(jax.tree_util.tree_unflatten(treedef, placed))

    def prompt_logits(self, seq: Sequence) -> np.ndarray:
        """Logits at every prompt position [len, vocab], computed through the paged pool.

        For parity tests and scoring: one sequence, prefilled in a single step into the blocks
        of its block table (which the caller owns).
        """
        return self.run_prompt_logits(*self.prompt_logits_inputs(seq))

    def prompt_logits_inputs(self, seq: Sequence) -> tuple:
        """`prompt_logits`' host inputs: (token ids, StepAttention, prompt length)."""
        n = seq.num_prompt_tokens
        token_ids, positions, slots, meta, _ = self.batch._prefill_arrays(
            [ScheduledSequence(seq, n)])
        return token_ids, StepAttention(positions=positions, slot_mapping=slots,
                                        prefill=meta), n

    def run_prompt_logits(self, token_ids, attention: StepAttention, n: int) -> np.ndarray:
        """`prompt_logits` on its host inputs (`prompt_logits_inputs`)."""
        logits, self.kv_cache = self.programs.logits(self.params, self.kv_cache, token_ids,
                                                     attention)
        return np.asarray(logits[:n])


def _weights_dtype(params: dict):
    """The dtype of the layers' matmul weights."""
    return jnp.dtype(params["layers"][0]["wo"].dtype)
