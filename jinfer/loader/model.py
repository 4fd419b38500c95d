"""Loading is one way to get what an `LLM` is built from: a model config, a params pytree and a
tokenizer (`LLM.from_params` takes them from anywhere else)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jinfer.loader import load_generation_eos, load_hf_config, load_weights, resolve_model_path
from jinfer.model.config import ModelConfig
from jinfer.model.decoder import prepare_params
from jinfer.text.gguf_tokenizer import load_gguf_tokenizer
from jinfer.text.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: dict                  # on the device, in the run layout (jinfer.model.decoder)
    tokenizer: Optional[Tokenizer]
    eos_token_ids: tuple          # the checkpoint's end-of-sequence ids
    source: str                   # what was loaded, for the log


def load_model(model, dtype: str, load_format: str = "auto", skip_tokenizer_init: bool = False,
               *, seed: int = 0, tensor_parallel_size: int = 1,
               enable_expert_parallel: bool = False) -> LoadedModel:
    """A model from a path (None: the default model), or random weights of its shape
    (load_format="dummy": a folder with config.json or a MODEL_SHAPES name), with the weights
    on the device in the run layout; with tensor_parallel_size > 1 in its sharded layout on the
    first N devices, each receiving only its shards (jinfer.runner.sharding)."""
    from jinfer.runner.memory import check_weights_fit
    from jinfer.runner.sharding import tensor_parallel
    if load_format == "dummy":
        from jinfer.model.shapes import MODEL_SHAPES, random_run_params
        if isinstance(model, str) and model in MODEL_SHAPES:
            config, folder = MODEL_SHAPES[model], None
        else:
            folder = resolve_model_path(model)
            if not folder.is_dir():
                raise ValueError(f"load_format='dummy' needs a model folder with config.json or "
                                 f"one of {sorted(MODEL_SHAPES)}, got {model!r}")
            config = load_hf_config(folder)
        # checked before any allocation
        tp = tensor_parallel(config, tensor_parallel_size, enable_expert_parallel)
        check_weights_fit(config, DTYPES[dtype], tensor_parallel_size)
        params = (random_run_params(config, dtype, seed) if tp is None
                  else tp.random_params(config, dtype, seed))
        has_tokenizer = folder is not None and any(
            (folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
        tokenizer = (load_tokenizer(folder) if has_tokenizer and not skip_tokenizer_init
                     else None)
        eos = load_generation_eos(folder) if folder is not None else ()
        return LoadedModel(config, params, tokenizer, tuple(eos), f"random weights of {model}")
    path = resolve_model_path(model)
    config, params, info = load_weights(path, dtype)
    tp = tensor_parallel(config, tensor_parallel_size, enable_expert_parallel)
    check_weights_fit(config, DTYPES[dtype], tensor_parallel_size)
    tokenizer = None
    if not skip_tokenizer_init:
        tokenizer = (load_gguf_tokenizer(path, reader=info.get("gguf_reader"))
                     if info["format"] == "gguf" else load_tokenizer(path))
    params = prepare_params(params)
    device_params = jax.device_put(params) if tp is None else tp.place_params(params)
    return LoadedModel(config, device_params, tokenizer, tuple(info["eos_token_ids"]), str(path))
