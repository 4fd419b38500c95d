"""Load llama.cpp GGUF files (architecture "llama") into jinfer's params pytree.

Tensors are dequantized with `gguf.quants.dequantize` one at a time and written into preallocated,
layer-stacked arrays. llama.cpp's converter permutes the rows of Q and K for its interleaved
(GPT-J style) RoPE; we undo that so the params use Hugging Face's rotate_half layout. Llama 3 RoPE
scaling is stored by llama.cpp as a `rope_freqs.weight` tensor of per-frequency factors; we fit
the RopeScaling parameters back from it (and refuse the file if no llama3 scaling reproduces it).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from typing import Any, Optional

import gguf
import numpy as np

from jinfer.model.config import ModelConfig, RopeScaling
from jinfer.loader.hf import allocate_params, numpy_dtype

logger = logging.getLogger(__name__)

_REQUIRED = object()
# params["layers"] key -> GGUF name inside `blk.{i}.`
GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def _open(path: pathlib.Path) -> gguf.GGUFReader:
    """GGUFReader on `path`; any parse failure becomes a ValueError naming the file."""
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise ValueError(f"GGUF file {path} is truncated or corrupted and cannot be read "
                         f"({type(e).__name__}: {e}); re-download or re-convert it") from e


def _meta(reader: gguf.GGUFReader, key: str, path: pathlib.Path, default: Any = _REQUIRED):
    """Value of metadata `key`, or `default`; a missing required key is a ValueError."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file {path} lacks the metadata key {key}; re-convert it with "
                             "a recent llama.cpp convert_hf_to_gguf.py")
        return default
    value = field.contents()
    if isinstance(value, float):  # GGUF floats are float32: 1e-5 reads as 9.9999997e-06
        value = float(str(np.float32(value)))
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): must be uniform here
        if len(set(value)) != 1:
            raise ValueError(f"GGUF file {path}: {key} varies per layer ({value}); unsupported")
        value = value[0]
    return value


def _llama3_factors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 scaling (convert_hf_to_gguf.py), [head_dim // 2]."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < orig / s.high_freq_factor, 1.0,
                    np.where(wavelen > orig / s.low_freq_factor, s.factor, mid))


def rope_scaling_from_freqs(factors: np.ndarray, theta: float, head_dim: int,
                            path: pathlib.Path) -> Optional[RopeScaling]:
    """Recovers RopeScaling from llama.cpp's `rope_freqs` tensor (factors: [head_dim // 2]).

    The llama3 formula depends on (original_max_position_embeddings, low, high) only up to a
    common scale, so we fix low_freq_factor = 1 (true for every released Llama 3.x) and fit the
    rest from the smoothly interpolated frequencies; the result is verified against the tensor.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"GGUF file {path}: rope_freqs.weight has {factors.size} entries, "
                         f"expected head_dim/2 = {head_dim // 2}; the file is inconsistent")
    if np.allclose(factors, 1.0):
        return None
    factor = float(factors.max())
    wavelen = 2 * math.pi / theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    mid = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    candidate = RopeScaling(round(factor, 6), 1.0, 4.0, 8192)  # Llama 3.x defaults
    if mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # = a / wavelen + b
        a, b = np.polyfit(1 / wavelen[mid], smooth, 1)
        if b < 0:
            candidate = RopeScaling(round(factor, 6), 1.0, round(1 - 1 / b, 4), round(-a / b))
    if not np.allclose(_llama3_factors(candidate, theta, head_dim), factors, rtol=1e-3):
        raise ValueError(f"GGUF file {path}: rope_freqs.weight does not match Llama 3 RoPE "
                         "scaling; this RoPE variant is unsupported")
    return candidate


def _rope(reader, arch: str, theta: float, head_dim: int, path) -> Optional[RopeScaling]:
    rope_type = _meta(reader, f"{arch}.rope.scaling.type", path, "none")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(tensors["rope_freqs.weight"], path)
        return rope_scaling_from_freqs(factors, theta, head_dim, path)
    linear_noop = rope_type == "linear" and _meta(
        reader, f"{arch}.rope.scaling.factor", path, 1.0) == 1.0
    if rope_type != "none" and not linear_noop:
        raise ValueError(f"GGUF file {path}: RoPE scaling type {rope_type!r} is unsupported; "
                         "jinfer supports plain RoPE and Llama 3 scaling (rope_freqs.weight)")
    return None


def gguf_config(reader: gguf.GGUFReader, path: pathlib.Path) -> ModelConfig:
    """ModelConfig from GGUF metadata; only general.architecture == "llama" is accepted."""
    arch = _meta(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"GGUF file {path}: unsupported architecture {arch!r}; jinfer supports "
                         "'llama' (Llama 2/3.x, SmolLM/SmolLM2)")
    m = lambda key, default=_REQUIRED: _meta(reader, f"{arch}.{key}", path, default)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", hidden // heads))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"GGUF file {path}: key_length != value_length is unsupported")
    if int(m("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"GGUF file {path}: partial rotary embeddings (rope.dimension_count "
                         f"{m('rope.dimension_count')} != head_dim {head_dim}) are unsupported")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = m("vocab_size", len(tokens.data) if tokens is not None else None)
    tensors = {t.name: t for t in reader.tensors}
    if vocab is None:
        vocab = _tensor(tensors, "token_embd.weight", path).shape[-1]
    theta = float(m("rope.freq_base", 10000.0))
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")), num_layers=int(m("block_count")),
        num_heads=heads, num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=head_dim, rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta, rope_scaling=_rope(reader, arch, theta, head_dim, path),
        max_position_embeddings=int(m("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors)


def _tensor(tensors: dict, name: str, path: pathlib.Path):
    """tensors[name] (a gguf ReaderTensor), or a ValueError saying it is missing."""
    if name in tensors:
        return tensors[name]
    raise ValueError(f"Tensor {name} is missing from GGUF file {path}; re-convert the model")


def _dequantize(t, path: pathlib.Path) -> np.ndarray:
    """Dequantized tensor in numpy order (GGUF lists dims innermost first), float32/float16."""
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.data.nbytes != t.n_bytes:
        raise ValueError(f"GGUF file {path} is truncated (tensor {t.name} is short); "
                         "re-download or re-convert it")
    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise ValueError(f"GGUF file {path}: cannot dequantize tensor {t.name} of type "
                         f"{t.tensor_type.name} ({type(e).__name__}: {e}); use a file quantized "
                         "with a type gguf-py supports (F32/F16/BF16/Q8_0/Q4_K/Q6_K...)") from e
    if w.size != math.prod(shape):
        raise ValueError(f"GGUF file {path}: tensor {t.name} dequantized to {w.size} values, "
                         f"expected {shape}; the file is corrupted")
    return w.reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [n_head * head_dim, in] -> same shape."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy(tensors: dict, name: str, out: np.ndarray, path, transpose: bool,
          n_head: int = 0) -> None:
    """Dequantizes `name` into `out`: checks shape, un-permutes Q/K, transposes to [in, out]."""
    w = _dequantize(_tensor(tensors, name, path), path)
    expected = out.shape[::-1] if transpose else out.shape
    if w.shape != expected:
        raise ValueError(f"GGUF file {path}: tensor {name} has shape {list(w.shape)}, expected "
                         f"{list(expected)} from its metadata; the file is inconsistent")
    if n_head:
        w = unpermute_qk(w, n_head)
    out[...] = w.T if transpose else w


def gguf_eos_ids(reader: gguf.GGUFReader, path: pathlib.Path) -> tuple[int, ...]:
    """End-of-generation ids: eos plus eot/eom when the file declares them (as llama.cpp does)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id")
    ids = (_meta(reader, k, path, None) for k in keys)
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def load_gguf(path: str | os.PathLike, dtype) -> tuple[ModelConfig, dict, gguf.GGUFReader]:
    """(config, params, reader) from a GGUF file; the reader is returned for the tokenizer."""
    path = pathlib.Path(path)
    np_dtype = numpy_dtype(dtype)
    reader = _open(path)
    config = gguf_config(reader, path)
    params = allocate_params(config, np_dtype)
    tensors = {t.name: t for t in reader.tensors}
    _copy(tensors, "token_embd.weight", params["embed"], path, transpose=False)
    for i in range(config.num_layers):
        for key, suffix in GGUF_LAYER_NAMES.items():
            out = params["layers"][key][i]
            n_head = {"wq": config.num_heads, "wk": config.num_kv_heads}.get(key, 0)
            _copy(tensors, f"blk.{i}.{suffix}", out, path, transpose=out.ndim == 2, n_head=n_head)
    _copy(tensors, "output_norm.weight", params["final_norm"], path, transpose=False)
    if not config.tie_word_embeddings:
        _copy(tensors, "output.weight", params["lm_head"], path, transpose=True)
    logger.info("Loaded %d-layer Llama from %s as %s", config.num_layers, path, np_dtype.name)
    return config, params, reader
