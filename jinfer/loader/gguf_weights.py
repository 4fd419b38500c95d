"""Load llama.cpp GGUF files into jinfer's params pytree (the architectures of
jinfer.loader.gguf_config: llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3).

Tensors are dequantized with `gguf.quants.dequantize` one at a time and written into preallocated,
layer-stacked arrays, transposed to [in, out] (an expert-stacked tensor per expert). Where the
converter changed a weight it is undone here: the Q/K row permutation of the `llama` architecture
(llama.cpp's interleaved RoPE; jinfer keeps Hugging Face's rotate_half layout) and Phi-3's fused
projections (split by rows). Gemma's norm weights are stored as 1 + w, which is what jinfer's
norm multiplies by, so they load as they are.
"""

from __future__ import annotations

import logging
import os
import pathlib

import gguf
import numpy as np

from jinfer.loader.gguf_config import GGUFFile, gguf_config, open_reader, read_config
from jinfer.loader.hf import allocate_params, numpy_dtype
from jinfer.model.config import ModelConfig
from jinfer.model.families import Tensor

__all__ = ["gguf_config", "gguf_eos_ids", "load_gguf", "unpermute_qk"]

logger = logging.getLogger(__name__)

_open = open_reader  # the name scripts/bench_serving.py imports

# llama.cpp's end-of-generation tokens, recognised by their text (llama-vocab.cpp): besides the
# eos/eot/eom ids of the metadata, the file's chat turns may end with one of these.
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                           "<|endoftext|>", "<|eom_id|>", "<EOT>", "<|end_of_text|>")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [n_head * head_dim, ...] -> same shape."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy(f: GGUFFile, tensor: Tensor, out: np.ndarray, transpose: bool,
          n_head: int = 0) -> None:
    """Dequantizes `tensor` (its rows, where it names a range) into `out`: checks the shape,
    un-permutes Q/K rows over `n_head` heads (when given), and swaps the last two axes
    ([out, in] -> [in, out]) when `transpose`."""
    w, name = f.dequantize(tensor.name), tensor.name
    if tensor.rows is not None:
        name = f"{name} rows {tensor.rows[0]}:{tensor.rows[1]}"
        w = w[tensor.rows[0]:tensor.rows[1]]
    expected = (*out.shape[:-2], out.shape[-1], out.shape[-2]) if transpose else out.shape
    if w.shape != expected:
        raise ValueError(f"{f}: tensor {name} has shape {list(w.shape)}, expected "
                         f"{list(expected)} from its metadata; the file is inconsistent")
    if n_head:
        w = unpermute_qk(w, n_head)
    out[...] = np.swapaxes(w, -1, -2) if transpose else w


def gguf_eos_ids(reader: gguf.GGUFReader, path: str | os.PathLike) -> tuple[int, ...]:
    """End-of-generation ids: eos, eot and eom where the file declares them, and (as llama.cpp
    recognises them by their text) the end-of-turn tokens its chat template writes, e.g.
    Gemma's <end_of_turn> or Phi-3's <|end|>, which the converter does not mark. Tokens the
    template does not write (a ChatML vocabulary's <|endoftext|>) are left out, as the model's
    generation_config leaves them out."""
    f = GGUFFile(path, reader)
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id")
    ids = [int(i) for i in (f.get(k, None) for k in keys) if i is not None]
    template = f.get("tokenizer.chat_template", None)
    ends_of_turn = {text for text in END_OF_GENERATION_TEXTS
                    if isinstance(template, str) and text in template}
    if ends_of_turn:
        tokens = f.get("tokenizer.ggml.tokens", [])
        ids += [i for i, token in enumerate(tokens) if token in ends_of_turn]
    return tuple(dict.fromkeys(ids))


def load_gguf(path: str | os.PathLike, dtype) -> tuple[ModelConfig, dict, gguf.GGUFReader]:
    """(config, params, reader) from a GGUF file; the reader is returned for the tokenizer."""
    np_dtype = numpy_dtype(dtype)
    f = GGUFFile(pathlib.Path(path))
    config, arch = read_config(f)
    params = allocate_params(config, np_dtype)
    _copy(f, Tensor("token_embd.weight"), params["embed"], transpose=False)
    heads: dict[str, int] = ({"wq": config.num_heads, "wk": config.num_kv_heads}
                             if arch.permuted_qk else {})
    layer_tensors = arch.layer_tensors(config, f.tensors)
    for i in range(config.num_layers):
        for key, tensor in layer_tensors.items():
            out = params["layers"][key][i]
            _copy(f, Tensor(f"blk.{i}.{tensor.name}", tensor.rows), out,
                  transpose=out.ndim >= 2, n_head=heads.get(key, 0))
    _copy(f, Tensor("output_norm.weight"), params["final_norm"], transpose=False)
    if not config.tie_word_embeddings:
        _copy(f, Tensor("output.weight"), params["lm_head"], transpose=True)
    logger.info("Loaded %d-layer %s (GGUF architecture %r) from %s as %s", config.num_layers,
                config.model_type, arch.name, path, np_dtype.name)
    return config, params, f.reader
