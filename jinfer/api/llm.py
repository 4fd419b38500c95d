"""`LLM`: the offline entry point, with vLLM's names (`generate`, `chat`, `SamplingParams`)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jinfer.runner import compilation_cache, memory
from jinfer.model.attention import default_attention_backend, get_attention_backend
from jinfer.api.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from jinfer.config import EngineConfig, KernelConfig
from jinfer.engine.llm_engine import LLMEngine
from jinfer.model.kv_cache import bytes_per_block, init_kv_cache
from jinfer.loader import load_generation_eos, load_hf_config, load_weights, resolve_model_path
from jinfer.model.llama import prepare_params
from jinfer.runner.model_runner import ModelRunner
from jinfer.api.outputs import RequestOutput
from jinfer.api.sampling_params import SamplingParams
from jinfer.text.gguf_tokenizer import load_gguf_tokenizer
from jinfer.text.tokenizer import Tokenizer, load_tokenizer
from jinfer.runner.warmup import warm_up

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_CPU_KV_BYTES = 512 * 1024 * 1024  # the pool's budget on CPU when nothing else is given
# Chat models end a turn with one of these; stop there even when the checkpoint's eos differs.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>",
                      "<end_of_turn>")

PromptsArg = Union[str, Sequence[str], None]
ParamsArg = Union[SamplingParams, Sequence[SamplingParams], None]


class LLM:
    """Loads a model (None: the embedded SmolLM2-135M-Instruct) and generates from it.

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
      block_size, num_kv_blocks, kv_cache_memory_bytes, gpu_memory_utilization, max_model_len,
      max_num_seqs, max_num_batched_tokens, seed, attention_backend, enable_prefix_caching,
      num_scheduler_steps, mixed_batching (None: on GPU): engine knobs (see `EngineConfig`).
      kernel_config: which kernel runs where (`KernelConfig`; None: the measured defaults).
      enable_compilation_cache: keep compiled steps on disk across runs (JAX's persistent cache).
    """

    def __init__(self, model: Optional[str] = None, *, dtype: str = "auto",
                 load_format: str = "auto", skip_tokenizer_init: bool = False,
                 block_size: int = 16, num_kv_blocks: Optional[int] = None,
                 kv_cache_memory_bytes: Optional[int] = None,
                 gpu_memory_utilization: float = 0.9,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, seed: int = 0,
                 attention_backend: Optional[str] = None, enable_prefix_caching: bool = True,
                 num_scheduler_steps: int = 8,
                 mixed_batching: Optional[bool] = None,
                 kernel_config: Optional[KernelConfig] = None,
                 enable_compilation_cache: bool = True,
                 shuffle_blocks_seed: Optional[int] = None):
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose 'auto' or one of "
                             f"{sorted(DTYPES)}")
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={load_format!r} is not supported; choose 'auto' (read "
                             f"the weights) or 'dummy' (random weights of the model's shape)")
        if attention_backend is not None:
            get_attention_backend(attention_backend)  # a clear error before any loading
        if enable_compilation_cache:
            compilation_cache.enable()
        started = time.perf_counter()
        model_config, device_params, self.tokenizer, eos_ids, source = _load(
            model, dtype, load_format, skip_tokenizer_init, seed)
        self.model_config = model_config
        self.config = EngineConfig(
            block_size=block_size, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len or min(model_config.max_position_embeddings, 8192),
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            attention_backend=attention_backend or default_attention_backend(),
            enable_prefix_caching=enable_prefix_caching,
            num_scheduler_steps=num_scheduler_steps,
            mixed_batching=(jax.default_backend() == "gpu" if mixed_batching is None
                            else mixed_batching),
            kernels=kernel_config or KernelConfig())
        runner = ModelRunner(model_config, self.config, device_params, 2, DTYPES[dtype])
        num_blocks = self._num_blocks(runner, DTYPES[dtype])
        runner.kv_cache = _allocate_pool(model_config, num_blocks, block_size, DTYPES[dtype])
        self.engine = LLMEngine(runner, self.tokenizer, self.config,
                                self._eos_ids(eos_ids), num_blocks, shuffle_blocks_seed)
        self._request_counter = 0
        logger.info("loaded %s (%s) in %.2f s: %d KV blocks of %d tokens", source, dtype,
                    time.perf_counter() - started, num_blocks - 1, block_size)

    def _num_blocks(self, runner: ModelRunner, dtype) -> int:
        """Pool size, counting block 0 (padding): num_kv_blocks, else kv_cache_memory_bytes,
        else what gpu_memory_utilization leaves (measured; GPU), else DEFAULT_CPU_KV_BYTES.
        Checks the pool holds one longest sequence."""
        config = self.config
        per_block = bytes_per_block(self.model_config, config.block_size, dtype)
        needed = -(-config.max_model_len // config.block_size)
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        elif config.kv_cache_memory_bytes is not None:
            num_blocks = 1 + config.kv_cache_memory_bytes // per_block
        elif memory.device_memory() is not None:
            num_blocks = 1 + memory.blocks_for_utilization(
                runner, config.gpu_memory_utilization, per_block, needed)
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
        """Pool and scheduler statistics (blocks total / free / used, preemptions, queues)."""
        return self.engine.stats()

    def prompt_logits(self, prompt_token_ids: Sequence[int]) -> np.ndarray:
        """Float32 logits at every position of one prompt [len, vocab], computed through the
        paged pool (for parity checks and scoring); the blocks are freed afterwards."""
        ids = [int(t) for t in prompt_token_ids]
        self.engine._validate_prompt(ids)
        return self.engine.prompt_logits(ids)

    def generate(self, prompts: PromptsArg = None, sampling_params: ParamsArg = None, *,
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for every prompt (text or token ids); returns them in order."""
        request_ids = self._add_requests(prompts, sampling_params, prompt_token_ids)
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
        return self.generate(sampling_params=sampling_params, prompt_token_ids=token_ids,
                             use_tqdm=use_tqdm)

    def stream(self, prompt: Union[str, Sequence[int]],
               sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yields the text of one completion as it is decoded (deltas; stop strings held back)."""
        ids = None if isinstance(prompt, str) else [list(prompt)]
        (request_id,) = self._add_requests(prompt if ids is None else None, sampling_params, ids)
        emitted = 0
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    text = output.outputs[0].text
                    if len(text) > emitted:
                        yield text[emitted:]
                        emitted = len(text)
                    if output.finished:
                        return
        finally:
            self.engine.abort(request_id)

    def _add_requests(self, prompts: PromptsArg, sampling_params: ParamsArg,
                      prompt_token_ids) -> list[str]:
        texts, ids = self._normalize_prompts(prompts, prompt_token_ids)
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
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, "
                             f"or one per prompt")
        return params


def _allocate_pool(model_config, num_blocks: int, block_size: int, dtype):
    """The KV pool, allocated now: an allocation that fails does so here, with what to change,
    rather than inside the first request's step."""
    try:
        return jax.block_until_ready(init_kv_cache(model_config, num_blocks, block_size, dtype))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        size = (num_blocks * bytes_per_block(model_config, block_size, dtype)) / 2**30
        raise ValueError(
            f"the KV pool ({num_blocks - 1} blocks of {block_size} tokens, {size:.2f} GiB) could "
            f"not be allocated on the device ({e}); lower gpu_memory_utilization, or give "
            f"kv_cache_memory_bytes or num_kv_blocks") from e


def _load(model, dtype: str, load_format: str, skip_tokenizer_init: bool, seed: int):
    """-> (ModelConfig, device params in the run layout, tokenizer or None, checkpoint eos ids,
    a description of the source for the log)."""
    if load_format == "dummy":
        from jinfer.model.shapes import MODEL_SHAPES, random_params
        if isinstance(model, str) and model in MODEL_SHAPES:
            config, folder = MODEL_SHAPES[model], None
        else:
            folder = resolve_model_path(model)
            if not folder.is_dir():
                raise ValueError(f"load_format='dummy' needs a model folder with config.json or "
                                 f"one of {sorted(MODEL_SHAPES)}, got {model!r}")
            config = load_hf_config(folder)
        params = prepare_params(random_params(config, dtype, seed))
        has_tokenizer = folder is not None and any(
            (folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        tokenizer = (load_tokenizer(folder) if has_tokenizer and not skip_tokenizer_init
                     else None)
        eos = load_generation_eos(folder) if folder is not None else ()
        return config, params, tokenizer, eos, f"random weights of {model}"
    path = resolve_model_path(model)
    config, params, info = load_weights(path, dtype)
    tokenizer = None
    if not skip_tokenizer_init:
        tokenizer = (load_gguf_tokenizer(path, reader=info.get("gguf_reader"))
                     if info["format"] == "gguf" else load_tokenizer(path))
    device_params = jax.device_put(prepare_params(params))
    return config, device_params, tokenizer, info["eos_token_ids"], str(path)
