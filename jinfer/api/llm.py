"""`LLM`: the offline entry point, with vLLM's names (`generate`, `chat`, `SamplingParams`)."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinfer.api.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from jinfer.api.outputs import RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.config import EngineConfig, KernelConfig
from jinfer.engine.llm_engine import LLMEngine
from jinfer.loader.model import DTYPES, load_model
from jinfer.model.attention import default_attention_backend, get_attention_backend
from jinfer.model.config import ModelConfig
from jinfer.model.decoder import prepare_params
from jinfer.model.kv_cache import bytes_per_block
from jinfer.runner import compilation_cache, memory, multihost
from jinfer.runner.model_runner import ModelRunner
from jinfer.runner.sharding import tensor_parallel
from jinfer.runner.warmup import warm_up
from jinfer.text.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 512 * 1024 * 1024  # the pool's budget on CPU when nothing else is given
# Chat models end a turn with one of these (ChatML/Qwen, Llama 3, GPT-2 style, sentencepiece /
# Mistral, Gemma, Phi-3); stop there even when the checkpoint's eos differs.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>",
                      "<end_of_turn>", "<|end|>")

PromptsArg = Union[str, Sequence[str], None]
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]


class LLM:
    """Generates from a model: a loaded one (None: the embedded SmolLM2-135M-Instruct) or, via
    `LLM.from_params`, any (model config, params pytree, tokenizer) held in memory.

    Args:
      model: a Hugging Face folder, a .gguf file, or None for the default model; with
        load_format="dummy" also a shape name of `jinfer.model.shapes.MODEL_SHAPES`.
      dtype: "float32" | "bfloat16" | "float16" for weights, activations and the KV pool;
        "auto" (the default): bfloat16 on a GPU, float32 on the CPU (where bfloat16 is
        emulated and slower).
      load_format: "auto" (read the weights) or "dummy" (random weights of the model's shape,
        made on device: for benchmarks without downloads, as vLLM's load_format="dummy").
      skip_tokenizer_init: load no tokenizer; prompts must then be token ids and outputs carry
        token ids only (the default with load_format="dummy" when the model has no tokenizer).
      **engine_kwargs: the engine's options (README, "Options"): block_size, num_kv_blocks,
        kv_cache_memory_bytes, gpu_memory_utilization, max_model_len, max_num_seqs,
        max_num_batched_tokens, seed, attention_backend, enable_prefix_caching,
        num_scheduler_steps, mixed_batching, kernel_config, enable_compilation_cache,
        max_programs, shuffle_blocks_seed, tensor_parallel_size (the model split over the
        first N devices of this host, jinfer.runner.sharding; after
        `jinfer.runner.multihost.initialize`, over every device of every process),
        enable_expert_parallel (a mixture-of-experts model's experts split by expert).
    """

    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto",
                 load_format: str = "auto", skip_tokenizer_init: bool = False,
                 **engine_kwargs):
        _check_engine_kwargs(engine_kwargs)
        multihost.check_tensor_parallel_size(engine_kwargs.get("tensor_parallel_size", 1))
        dtype = _resolve_dtype(dtype)
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={load_format!r} is not supported; choose 'auto' (read "
                             f"the weights) or 'dummy' (random weights of the model's shape)")
        if engine_kwargs.get("attention_backend") is not None:
            get_attention_backend(engine_kwargs["attention_backend"])  # fail before loading
        if engine_kwargs.get("enable_compilation_cache", True):
            compilation_cache.enable()
        started = time.perf_counter()
        loaded = load_model(model, dtype, load_format, skip_tokenizer_init,
                            seed=engine_kwargs.get("seed", 0),
                            tensor_parallel_size=engine_kwargs.get("tensor_parallel_size", 1),
                            enable_expert_parallel=engine_kwargs.get("enable_expert_parallel",
                                                                     False))
        self._start(loaded.config, loaded.params, loaded.tokenizer, loaded.eos_token_ids,
                    **engine_kwargs)
        logger.info("loaded %s (%s) in %.2f s: %d KV blocks of %d tokens", loaded.source, dtype,
                    time.perf_counter() - started, self.engine.block_manager.num_usable_blocks,
                    self.config.block_size)

    @classmethod
    def from_params(cls, model_config: ModelConfig, params: dict, tokenizer=None,
                    **engine_kwargs) -> "LLM":
        """An LLM over weights held in memory (JAX research code: reinforcement-learning
        rollouts, evaluation inside a training loop), with no file read.

        Args:
          model_config: the model's shapes (`jinfer.model.config.ModelConfig`).
          params: the weights, as `get_params()` returns them (per-layer dicts with fused
            `wqkv` and `w_gate_up`) or in the loaders' stacked layout ({"layers": {name:
            [layers, ...]}}, see `jinfer.loader`); their dtype is the run's dtype.
          tokenizer: a `jinfer.text.tokenizer.Tokenizer`, or None (prompts are then token ids).
          **engine_kwargs: as for `LLM(...)`.
        """
        _check_engine_kwargs(engine_kwargs)
        multihost.check_tensor_parallel_size(engine_kwargs.get("tensor_parallel_size", 1))
        if engine_kwargs.get("enable_compilation_cache", True):
            compilation_cache.enable()
        llm = cls.__new__(cls)
        tp = tensor_parallel(model_config, engine_kwargs.get("tensor_parallel_size", 1),
                             engine_kwargs.get("enable_expert_parallel", False))
        params = _run_layout(params)
        params = jax.device_put(params) if tp is None else tp.place_params(params)
        eos = () if tokenizer is None or tokenizer.eos_token_id is None else (
            tokenizer.eos_token_id,)
        llm._start(model_config, params, tokenizer, eos, **engine_kwargs)
        return llm

    def _start(self, model_config: ModelConfig, params: dict, tokenizer, eos_ids, *,
               block_size: int = 16, num_kv_blocks: Optional[int] = None,
               kv_cache_memory_bytes: Optional[int] = None,
               gpu_memory_utilization: float = 0.9, max_model_len: Optional[int] = None,
               max_num_seqs: int = 64, max_num_batched_tokens: int = 512, seed: int = 0,
               attention_backend: Optional[str] = None, enable_prefix_caching: bool = True,
               num_scheduler_steps: int = 8, mixed_batching: Optional[bool] = None,
               kernel_config: Optional[KernelConfig] = None,
               enable_compilation_cache: bool = True, max_programs: Optional[int] = None,
               shuffle_blocks_seed: Optional[int] = None, tensor_parallel_size: int = 1,
               enable_expert_parallel: bool = False) -> None:
        """Builds the engine one way: config -> pool size -> pool -> runner -> engine."""
        del enable_compilation_cache  # acted on by the constructors
        self.model_config, self.tokenizer = model_config, tokenizer
        on_gpu = jax.default_backend() == "gpu"
        self.config = EngineConfig(
            block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or min(model_config.max_position_embeddings, 8192),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            attention_backend=attention_backend or default_attention_backend(),
            enable_prefix_caching=enable_prefix_caching,
            num_scheduler_steps=num_scheduler_steps,
            mixed_batching=on_gpu if mixed_batching is None else mixed_batching,
            kernels=kernel_config or KernelConfig(), tensor_parallel_size=tensor_parallel_size,
            enable_expert_parallel=enable_expert_parallel)
        # RoPE that depends on the longest context (LongRoPE's factor set) is fixed here.
        self.model_config = model_config = model_config.for_context(self.config.max_model_len)
        self._tp = tensor_parallel(model_config, tensor_parallel_size,  # None: one device
                                   enable_expert_parallel)
        dtype = _weights_dtype(params)
        num_blocks = self._num_blocks(params, dtype)
        kv_cache = memory.allocate_kv_cache(model_config, num_blocks, block_size, dtype,
                                            min_blocks=self._blocks_per_seq() + 1, tp=self._tp)
        runner = ModelRunner(model_config, self.config, params, kv_cache, max_programs)
        # Several processes (jinfer.runner.multihost): process 0's device calls are mirrored.
        runner = multihost.attach(runner)
        self.engine = LLMEngine(runner, tokenizer, self.config, self._eos_ids(eos_ids),
                                kv_cache.num_blocks, shuffle_blocks_seed,
                                sliding_window=model_config.kv_window)
        self._request_counter = 0

    def _blocks_per_seq(self) -> int:
        return -(-self.config.max_model_len // self.config.block_size)

    def _num_blocks(self, params: dict, dtype) -> int:
        """Pool size, counting block 0 (padding): num_kv_blocks, else kv_cache_memory_bytes,
        else what gpu_memory_utilization leaves after the weights and the largest steps'
        scratch (measured; GPU), else DEFAULT_CPU_KV_BYTES. Checks the pool holds one longest
        sequence. Under tensor parallelism every budget is one device's, and so are the bytes
        a block costs (its KV heads)."""
        config = self.config
        device_config = (self.model_config if self._tp is None
                         else self._tp.shard_config(self.model_config))
        per_block = bytes_per_block(device_config, config.block_size, dtype)
        needed = self._blocks_per_seq()
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory_bytes is not None:
            num_blocks = 1 + config.kv_cache_memory_bytes // per_block
        elif memory.device_memory() is not None:
            temp = memory.step_temp_bytes(self.model_config, config, params, dtype)
            num_blocks = 1 + memory.blocks_for_utilization(
                temp, config.gpu_memory_utilization, per_block, needed)
            num_blocks = multihost.min_over_processes(num_blocks)  # the same in every process
        else:
            num_blocks = 1 + DEFAULT_CPU_KV_BYTES // per_block
        if num_blocks - 1 < needed:
            raise ValueError(
                f"the KV pool ({num_blocks - 1} usable blocks of {config.block_size} tokens) "
                f"cannot hold even one sequence of max_model_len={config.max_model_len} tokens, "
                f"which needs {needed} blocks ({needed * per_block / 2**20:.1f} MiB); raise "
                f"num_kv_blocks or kv_cache_memory_bytes, or lower max_model_len")
        return num_blocks

    def _eos_ids(self, checkpoint_eos: Sequence[int]) -> set[int]:
        eos = set(checkpoint_eos)
        if self.tokenizer is None:
            return eos
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        for text in END_OF_TURN_TOKENS:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in self.tokenizer.all_special_ids:
                eos.add(ids[0])
        return eos

    # -- public API ----------------------------------------------------------------------------
    def get_tokenizer(self) -> Optional[Tokenizer]:
        """The model's tokenizer; None when built with skip_tokenizer_init."""
        return self.tokenizer

    def warmup(self, max_context: int = 512) -> dict:
        """Compiles the common step shapes now (prompts up to max_num_batched_tokens, decode
        batches up to max_num_seqs at contexts up to `max_context` tokens) so that requests do
        not wait on compiles; with the persistent compilation cache a later start loads them.
        Returns {"programs": compiled, "seconds": time taken}; logs the same."""
        return warm_up(self.engine.runner, max_context)

    def stats(self) -> dict:
        """Pool and scheduler statistics (blocks total / free / used, preemptions, queues) and
        `num_compiles`: the step programs built so far in this process."""
        runner = self.engine.runner
        return {**self.engine.stats(), "num_compiles": runner.num_compiles,
                "num_programs_held": runner.programs.num_programs}

    def get_params(self) -> dict:
        """The weights the engine runs, on the device, in the run layout (per-layer dicts with
        fused `wqkv` and `w_gate_up`): what `from_params` and `update_weights` take. Under
        tensor parallelism the fused and vocabulary-padded weights are held re-laid per
        device (jinfer.runner.sharding): those come back as copies in the ordinary layout.
        Under several processes (jinfer.runner.multihost), on process 0: host NumPy arrays,
        gathered from every process's devices."""
        if multihost.several():  # every process takes part; host arrays come back
            return self.engine.runner.gather_params()
        params = self.engine.runner.params
        return params if self._tp is None else self._tp.unshard_params(params)

    def update_weights(self, params: dict) -> None:
        """Swaps in new weights of the same structure, shapes and dtypes as `get_params()` (or
        the loaders' stacked layout of them), with no recompile: the compiled steps take them
        as they are. The prefix cache is dropped (its K/V came from the old weights). Call it
        between generate calls. Under several processes, on process 0: the weights go from
        its host to every process, one weight at a time (jinfer.runner.multihost)."""
        if self.engine.has_unfinished_requests():
            raise RuntimeError("update_weights was called while requests are running; call it "
                               "between generate calls (or abort them first)")
        new = _run_layout(params)
        current = self.engine.runner.params
        if self._tp is not None:  # the ordinary layout's shapes, nothing computed
            current = jax.eval_shape(self._tp.unshard_params, current)
        mismatch = _describe_mismatch(current, new)
        if mismatch is not None:
            raise ValueError(f"update_weights needs weights of the running model's structure, "
                             f"shapes and dtypes: {mismatch}; build a new LLM.from_params for "
                             f"another model or dtype")
        if multihost.several():  # process 0's host arrays to every process, leaf by leaf
            self.engine.runner.scatter_params(
                [np.asarray(jax.device_get(leaf)) for leaf in jax.tree.leaves(new)])
        elif self._tp is not None:  # re-laid and placed as the running weights are
            self.engine.runner.update_params(self._tp.place_params(new))
        else:
            shardings = jax.tree.map(lambda a: a.sharding, current)
            self.engine.runner.update_params(jax.device_put(new, shardings))
        self.engine.block_manager.reset_prefix_cache()

    def prompt_logits(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits at every position of one prompt [len, vocab], computed through the
        paged pool (for parity checks and scoring); the blocks are freed afterwards."""
        ids = [int(t) for t in prompt_token_ids]
        self.engine._validate_prompt(ids)
        return self.engine.prompt_logits(ids)

    def generate(self, prompts: PromptsArg = None, sampling_params: ParamsArg = None, *,
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for every prompt (text or token ids); returns them in order.
        Instruct models answer conversations: for them use `chat`, which applies the model's
        chat template (given raw text they may end their turn at once: an empty completion
        with finish_reason "stop")."""
        request_ids = self._add_requests(prompts, sampling_params, prompt_token_ids)
        return self._run(request_ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Steps the engine until the requests finish; their final outputs, in order."""
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        num_generated, started = 0, time.perf_counter()
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_generated += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        bar.set_postfix(tok_s=f"{num_generated / (time.perf_counter() - started):.1f}")
        except BaseException:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in request_ids]

    def beam_search(self, prompts: Sequence[Union[str, Sequence[int]]],
                    params: BeamSearchParams) -> list[BeamSearchOutput]:
        """Beam search (beam_width beams per prompt, shared blocks via the prefix cache)."""
        return beam_search(self, prompts, params)

    def chat(self, messages, sampling_params: ParamsArg = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = True, **template_kwargs):
        """Applies the model's chat template to one conversation (a list of {role, content}) or
        a list of conversations, then generates."""
        if self.tokenizer is None:
            raise ValueError("chat needs the model's tokenizer and chat template; this LLM has "
                             "none (skip_tokenizer_init)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs)
            for conv in conversations]
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        request_ids = self._add_requests(None, sampling_params, token_ids, texts=prompts)
        return self._run(request_ids, use_tqdm)

    def stream(self, prompt: Union[str, Sequence[int]],
               sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yields the text of one completion as it is decoded (deltas; stop strings held back)."""
        emitted = 0
        # Closed explicitly: closing this generator aborts the request now, not whenever the
        # garbage collector finalises the inner one.
        with contextlib.closing(self.stream_outputs(prompt, sampling_params)) as outputs:
            for output in outputs:
                text = output.outputs[0].text
                if len(text) > emitted:
                    yield text[emitted:]
                    emitted = len(text)

    def stream_outputs(self, prompt: Union[str, Sequence[int]],
                       sampling_params: Optional[SamplingParams] = None
                       ) -> Iterator[RequestOutput]:
        """Yields one request's RequestOutput (cumulative) after every engine step that
        touched it, the last one finished (its finish reasons set). Stopping the iteration
        early aborts the request."""
        ids = None if isinstance(prompt, str) else [list(prompt)]
        (request_id,) = self._add_requests(prompt if ids is None else None, sampling_params, ids)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id == request_id:
                        yield output
                        if output.finished:
                            return
        finally:
            self.engine.abort(request_id)

    def _add_requests(self, prompts: PromptsArg, sampling_params: ParamsArg,
                      prompt_token_ids, texts: Optional[list[str]] = None) -> list[str]:
        """Adds one request per prompt; `texts`: the prompt text of token-id prompts (chat's
        templated conversations), reported as RequestOutput.prompt."""
        prompt_texts, ids = self._normalize_prompts(prompts, prompt_token_ids)
        texts = prompt_texts if texts is None else texts
        params = self._normalize_params(sampling_params, len(ids))
        request_ids = []
        try:
            for text, token_ids, p in zip(texts, ids, params):
                request_id = f"{self._request_counter}-{uuid.uuid4().hex[:8]}"
                self._request_counter += 1
                self.engine.add_request(request_id, text, token_ids, p)
                request_ids.append(request_id)
        except Exception:
            for request_id in request_ids:
                self.engine.abort(request_id)
            raise
        return request_ids

    def _normalize_prompts(self, prompts: PromptsArg, prompt_token_ids):
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass either prompts (text) or prompt_token_ids, not both or neither")
        if prompt_token_ids is not None:
            ids = [list(map(int, p)) for p in prompt_token_ids]
            return [None] * len(ids), ids
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer (skip_tokenizer_init, or a dummy model "
                             "without one): pass prompt_token_ids instead of text prompts")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("prompts must be a string or a list of strings; pass token ids "
                            "through prompt_token_ids=")
        return texts, [self.tokenizer.encode(t) for t in texts]

    @staticmethod
    def _normalize_params(sampling_params: ParamsArg, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [
            sampling_params]
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(
                    f"sampling_params must be a SamplingParams or a list of them, got "
                    f"{type(p).__name__}" + (f" {p!r}; build one with SamplingParams(**{p!r})"
                                             if isinstance(p, dict) else ""))
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, "
                             f"or one per prompt")
        return params


ENGINE_KWARGS = ("block_size", "num_kv_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization",
                 "max_model_len", "max_num_seqs", "max_num_batched_tokens", "seed",
                 "attention_backend", "enable_prefix_caching", "num_scheduler_steps",
                 "mixed_batching", "kernel_config", "enable_compilation_cache", "max_programs",
                 "shuffle_blocks_seed", "tensor_parallel_size", "enable_expert_parallel")


def _check_engine_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(ENGINE_KWARGS))
    if unknown:
        raise TypeError(f"LLM got unknown options {unknown}; the engine's options are "
                        f"{', '.join(ENGINE_KWARGS)}")


def _resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "bfloat16" if jax.default_backend() == "gpu" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose 'auto' or one of "
                         f"{sorted(DTYPES)}")
    return dtype


def _run_layout(params: dict) -> dict:
    """`params` in the run layout (per-layer dicts, fused projections): converted from the
    loaders' stacked layout ({"layers": {name: [layers, ...]}}) when given that."""
    if not isinstance(params, dict) or "layers" not in params or "embed" not in params:
        raise ValueError("params must be a dict with 'embed', 'layers' and 'final_norm' (and "
                         "'lm_head' unless the embeddings are tied), as LLM.get_params() returns")
    return prepare_params(params) if isinstance(params["layers"], dict) else params


def _weights_dtype(params: dict):
    return jnp.dtype(params["embed"].dtype)


def _describe_mismatch(old: dict, new: dict) -> Optional[str]:
    """The first difference in structure, shape or dtype between two params pytrees."""
    old_leaves, old_def = jax.tree_util.tree_flatten_with_path(old)
    new_leaves, new_def = jax.tree_util.tree_flatten_with_path(new)
    if old_def != new_def:
        return (f"their structure differs: expected {jax.tree.structure(old)}, got "
                f"{jax.tree.structure(new)}")
    for (path, a), (_, b) in zip(old_leaves, new_leaves):
        if a.shape != b.shape or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            return (f"{jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)}, the running "
                    f"weights are {a.dtype}{list(a.shape)}")
    return None
