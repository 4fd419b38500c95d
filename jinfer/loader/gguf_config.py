"""What a llama.cpp GGUF file means in jinfer's terms: its metadata as a ModelConfig, and where
each of jinfer's weights lies among its tensors.

llama.cpp's converter (convert_hf_to_gguf.py) writes a Hugging Face config.json as metadata keys
of its architecture (`general.architecture`; `{arch}.embedding_length`, `{arch}.rope.freq_base`,
...) and leaves out what llama.cpp hard-codes for that architecture. This module turns the
metadata back into the config.json of the matching family and builds the ModelConfig with that
family's own parser (jinfer.model.families), so a GGUF file and the folder it was converted
from give the same config. The architectures, with what each file stores differently:

  llama     Llama 2/3.x, SmolLM/SmolLM2, Mistral 7B, and Mixtral (`llama.expert_count` set).
            Q and K rows permuted for llama.cpp's interleaved RoPE (undone at load); Llama 3
            RoPE scaling as per-frequency factors (`rope_freqs.weight`), fitted back to its four
            parameters. No sliding window: the converter writes none and llama.cpp runs
            Mistral without one (v0.1's 4096-token window only matters past 4096 tokens).
  qwen2     Qwen2, Qwen2.5 (Q/K/V biases).
  qwen3     Qwen3 dense (per-head q/k norms).
  qwen3moe  Qwen3-MoE: each layer's experts stacked in `ffn_{gate,up,down}_exps`, the router in
            `ffn_gate_inp`; llama.cpp always renormalises the top-k routing weights, so
            norm_topk_prob is true.
  gemma2    Norm weights stored as 1 + w, which is what jinfer runs (no offset at load); no
            `output.weight` (tied). Windows on alternate layers (`attention.sliding_window`,
            else 4096); soft-caps default to 50 and 30 where absent; RoPE base 10000.
  gemma3    Gemma 2's norms and tied output, no attention soft-cap (a final one where
            `final_logit_softcapping` is set); windows on five layers of six (llama.cpp's
            period) unless `attention.sliding_window_pattern` says otherwise (a period, or one
            flag per layer), none without `attention.sliding_window`; the global layers' RoPE
            from `rope.freq_base` and `rope.scaling.*` (linear), the windowed layers' base from
            `rope.freq_base_swa`, else 10000 as llama.cpp takes it.
  phi3      Q/K/V fused in `attn_qkv` [q | k | v] and gate/up in `ffn_up` [gate | up] (split
            by rows at load); LongRoPE factors as the `rope_factors_long` / `rope_factors_short`
            tensors with `rope.scaling.original_context_length` and `rope.scaling.attn_factor`;
            `attention.sliding_window` (0: none) applied as transformers applies it (llama.cpp
            currently ignores Phi-3's window).

Every architecture: RoPE base 10000 where `rope.freq_base` is absent (llama.cpp's default),
linear RoPE scaling from `rope.scaling.type` / `rope.scaling.factor`, the vocabulary size from
the embedding's rows, tied embeddings where there is no `output.weight`; an unsupported scaling
type (YaRN...) or partial rotary embeddings are refused. Gemma's attention scale is not stored:
llama.cpp takes 1/sqrt(hidden / heads) for the 27B models (46 layers for Gemma 2, 62 for Gemma 3)
and 1/sqrt(head_dim) for the others, and so does jinfer (query_pre_attn_scalar). Metadata the
converter writes as float32 is read back as the shortest decimal that rounds to it (1e-06, not
9.99999997e-07).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Callable, Collection, Optional

import gguf
import numpy as np

from jinfer.model.config import ModelConfig, RopeScaling
from jinfer.model.families import Tensor, family_for_hf
from jinfer.model.families.common import FULL, SLIDING
from jinfer.model.layers import llama3_scaled

_REQUIRED = object()


def _shortest_float(value) -> float:
    """A float32 as the shortest decimal that rounds to it: what the converter was given."""
    return float(str(np.float32(value)))


class GGUFFile:
    """An open GGUF file: metadata lookups and dequantized tensors, every error naming the file
    and saying what to do."""

    def __init__(self, path: str | os.PathLike, reader: Optional[gguf.GGUFReader] = None):
        self.path = pathlib.Path(path)
        self.reader = reader if reader is not None else open_reader(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.get("general.architecture"))

    def __str__(self) -> str:
        return f"GGUF file {self.path}"

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """Metadata `key` as stored (floats as the converter's decimals, arrays as lists), or
        `default`; a missing required key is a ValueError."""
        field = self.reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"{self} lacks the metadata key {key}; re-convert it with a "
                                 "recent llama.cpp convert_hf_to_gguf.py")
            return default
        value = field.contents()
        if isinstance(value, float):
            return _shortest_float(value)
        if isinstance(value, list):
            return [_shortest_float(v) if isinstance(v, float) else v for v in value]
        return value

    def scalar(self, key: str, default: Any = _REQUIRED) -> Any:
        """As `get`, for a value jinfer needs the same on every layer: a per-layer array (e.g.
        head_count_kv) must be uniform."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"{self}: {key} varies per layer ({value}); jinfer needs one "
                                 "value for every layer")
            value = value[0]
        return value

    def arch_key(self, key: str, default: Any = _REQUIRED) -> Any:
        """`scalar` of the architecture's key `{arch}.{key}`."""
        return self.scalar(f"{self.arch}.{key}", default)

    def tensor(self, name: str):
        """The tensor `name` (a gguf ReaderTensor), or a ValueError saying it is missing."""
        if name in self.tensors:
            return self.tensors[name]
        raise ValueError(f"Tensor {name} is missing from {self} (architecture {self.arch!r}); "
                         "re-convert the model with llama.cpp's convert_hf_to_gguf.py")

    def shape(self, name: str) -> tuple[int, ...]:
        """Tensor `name`'s shape in numpy order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensor(name).shape))

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` dequantized (float32 or float16) in numpy order."""
        t, shape = self.tensor(name), self.shape(name)
        if t.data.nbytes != t.n_bytes:
            raise ValueError(f"{self} is truncated (tensor {name} is short); re-download or "
                             "re-convert it")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{self}: cannot dequantize tensor {name} of type "
                             f"{t.tensor_type.name} ({type(e).__name__}: {e}); use a file "
                             "quantized with a type gguf-py supports (F32/F16/BF16/Q8_0/Q4_K/"
                             "Q6_K...)") from e
        if w.size != math.prod(shape):
            raise ValueError(f"{self}: tensor {name} dequantized to {w.size} values, expected "
                             f"{shape}; the file is corrupted")
        return w.reshape(shape)


def open_reader(path: pathlib.Path) -> gguf.GGUFReader:
    """GGUFReader on `path`; any parse failure becomes a ValueError naming the file."""
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise ValueError(f"GGUF file {path} is truncated or corrupted and cannot be read "
                         f"({type(e).__name__}: {e}); re-download or re-convert it") from e


# ----------------------------------------------------------------------------- architectures

@dataclasses.dataclass(frozen=True)
class GGUFArch:
    """One llama.cpp architecture jinfer loads: its metadata -> the family's config.json, and
    where each of jinfer's layer weights lies in `blk.{i}.`."""

    name: str                                            # general.architecture
    models: str                                          # which models, for messages
    # (file, the fields every architecture stores alike) -> the family's config.json
    config_json: Callable[[GGUFFile, dict], dict]
    # (config, the file's tensor names) -> params["layers"] key -> tensor (rows of a fused one)
    layer_tensors: Callable[[ModelConfig, Collection[str]], dict[str, Tensor]]
    # Q/K rows permuted by the converter for llama.cpp's interleaved RoPE ("llama" only)
    permuted_qk: bool = False


def layer_tensors(config: ModelConfig, names: Collection[str] = ()) -> dict[str, Tensor]:
    """The converter's names of a layer's weights (the same in every architecture but Phi-3's
    fused ones), with the optional ones where the config has them: Q/K/V biases, q/k norms,
    Gemma's post-sublayer norms (its pre-feedforward norm is `ffn_norm`), and the router and
    stacked experts of a mixture-of-experts layer."""
    names = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
             "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight"}
    if config.num_experts:
        names |= {"router_w": "ffn_gate_inp.weight", "w_gate": "ffn_gate_exps.weight",
                  "w_up": "ffn_up_exps.weight", "w_down": "ffn_down_exps.weight"}
    else:
        names |= {"w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
                  "w_down": "ffn_down.weight"}
    if config.qkv_bias:
        names |= {"bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}
    if config.qk_norm:
        names |= {"q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight"}
    if config.post_norms:
        names |= {"attn_post_norm": "post_attention_norm.weight",
                  "mlp_post_norm": "post_ffw_norm.weight"}
    return {key: Tensor(name) for key, name in names.items()}


def phi3_layer_tensors(config: ModelConfig, names: Collection[str]) -> dict[str, Tensor]:
    """Phi-3's fused projections split by rows: `ffn_up` [gate | up], and `attn_qkv` [q | k | v]
    where the file fuses them (llama.cpp also reads separate attn_q/k/v)."""
    q, kv, f = config.q_size, config.kv_size, config.intermediate_size
    tensors = {**layer_tensors(config), "w_gate": Tensor("ffn_up.weight", (0, f)),
               "w_up": Tensor("ffn_up.weight", (f, 2 * f))}
    if "blk.0.attn_qkv.weight" in names:
        tensors |= {"wq": Tensor("attn_qkv.weight", (0, q)),
                    "wk": Tensor("attn_qkv.weight", (q, q + kv)),
                    "wv": Tensor("attn_qkv.weight", (q + kv, q + 2 * kv))}
    return tensors


def _llama(f: GGUFFile, fields: dict) -> dict:
    experts = int(f.arch_key("expert_count", 0))
    if not experts:
        return {**fields, "model_type": "llama"}
    return {**fields, "model_type": "mixtral", "num_local_experts": experts,
            "num_experts_per_tok": int(f.arch_key("expert_used_count"))}


def _qwen3moe(f: GGUFFile, fields: dict) -> dict:
    return {**fields, "model_type": "qwen3_moe", "num_experts": int(f.arch_key("expert_count")),
            "num_experts_per_tok": int(f.arch_key("expert_used_count")),
            "moe_intermediate_size": int(f.arch_key("expert_feed_forward_length")),
            "norm_topk_prob": True}


def _gemma_query_scalar(fields: dict, layers_of_27b: int) -> int:
    """llama.cpp's Gemma attention scale, as query_pre_attn_scalar: hidden / heads for the 27B
    model (told apart by its layer count), head_dim for the others."""
    if fields["num_hidden_layers"] == layers_of_27b:
        return fields["hidden_size"] // fields["num_attention_heads"]
    return fields["head_dim"]


def _gemma2(f: GGUFFile, fields: dict) -> dict:
    return {**fields, "model_type": "gemma2",
            "query_pre_attn_scalar": _gemma_query_scalar(fields, 46),
            "sliding_window": int(f.arch_key("attention.sliding_window", 4096)),
            "attn_logit_softcapping": float(f.arch_key("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(f.arch_key("final_logit_softcapping", 30.0))}


def _gemma3(f: GGUFFile, fields: dict) -> dict:
    layers = fields["num_hidden_layers"]
    window = int(f.arch_key("attention.sliding_window", 0))
    pattern = f.get(f"{f.arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: True where it slides
        if len(pattern) != layers:
            raise ValueError(f"{f}: attention.sliding_window_pattern has {len(pattern)} "
                             f"entries for {layers} layers; the file is inconsistent")
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's period n: layer i slides where i % n < n - 1 (every layer for 0)
        period = int(pattern)
        sliding = [period == 0 or i % period < period - 1 for i in range(layers)]
    cap = f.arch_key("final_logit_softcapping", None)
    return {**fields, "model_type": "gemma3_text",
            "layer_types": [SLIDING if window and s else FULL for s in sliding],
            "sliding_window": window or None,
            "rope_local_base_freq": float(f.arch_key("rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": _gemma_query_scalar(fields, 62),
            "final_logit_softcapping": None if cap is None else float(cap),
            "attn_logit_softcapping": None}


def _phi3(f: GGUFFile, fields: dict) -> dict:
    return {**fields, "model_type": "phi3",
            "sliding_window": int(f.arch_key("attention.sliding_window", 0)) or None}


ARCHS: dict[str, GGUFArch] = {a.name: a for a in (
    GGUFArch("llama", "Llama 2/3.x, SmolLM/SmolLM2, Mistral, Mixtral", _llama, layer_tensors,
             permuted_qk=True),
    GGUFArch("qwen2", "Qwen2, Qwen2.5", lambda f, fields: {**fields, "model_type": "qwen2"},
             layer_tensors),
    GGUFArch("qwen3", "Qwen3", lambda f, fields: {**fields, "model_type": "qwen3"},
             layer_tensors),
    GGUFArch("qwen3moe", "Qwen3-MoE", _qwen3moe, layer_tensors),
    GGUFArch("gemma2", "Gemma 2", _gemma2, layer_tensors),
    GGUFArch("gemma3", "Gemma 3 text", _gemma3, layer_tensors),
    GGUFArch("phi3", "Phi-3, Phi-3.5", _phi3, phi3_layer_tensors),
)}


def supported() -> str:
    """The architectures, for messages: "'llama' (Llama 2/3.x, ...), 'qwen2' (...), ..."."""
    return ", ".join(f"{name!r} ({arch.models})" for name, arch in ARCHS.items())


# ----------------------------------------------------------------------------- config

def read_config(f: GGUFFile) -> tuple[ModelConfig, GGUFArch]:
    """The file's ModelConfig and architecture; ValueError names an unsupported architecture
    (with the supported ones) or option."""
    arch = ARCHS.get(f.arch)
    if arch is None:
        raise ValueError(f"{f}: unsupported architecture {f.arch!r} (general.architecture); "
                         f"jinfer loads the GGUF architectures {supported()}; use a model "
                         "of one of these, or its Hugging Face folder if jinfer supports its "
                         "family")
    cfg = arch.config_json(f, _shared_fields(f))
    try:
        return family_for_hf(cfg).config_from_hf(cfg), arch
    except (KeyError, ValueError) as e:
        raise ValueError(f"{f} (architecture {f.arch!r}): {e}") from e


def gguf_config(reader: gguf.GGUFReader, path: str | os.PathLike) -> ModelConfig:
    """ModelConfig of an open GGUF file."""
    return read_config(GGUFFile(path, reader))[0]


def _shared_fields(f: GGUFFile) -> dict:
    """The config.json fields every architecture stores under the same keys. The vocabulary is
    the embedding's rows (the converter may drop unused rows, as it does for Gemma 3)."""
    hidden, heads = int(f.arch_key("embedding_length")), int(f.arch_key("attention.head_count"))
    head_dim = int(f.arch_key("attention.key_length", hidden // heads))
    if int(f.arch_key("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{f}: attention.key_length != attention.value_length is unsupported")
    rotated = int(f.arch_key("rope.dimension_count", head_dim))
    if rotated != head_dim:
        raise ValueError(f"{f}: partial rotary embeddings (rope.dimension_count {rotated} != "
                         f"head_dim {head_dim}) are unsupported")
    theta = float(f.arch_key("rope.freq_base", 10000.0))  # llama.cpp's default
    fields = {
        "hidden_size": hidden, "intermediate_size": int(f.arch_key("feed_forward_length")),
        "num_hidden_layers": int(f.arch_key("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(f.arch_key("attention.head_count_kv", heads)),
        "head_dim": head_dim, "vocab_size": f.shape("token_embd.weight")[0],
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "rope_theta": theta, **_rope_scaling(f, theta, head_dim)}
    optional = {"rms_norm_eps": "attention.layer_norm_rms_epsilon",
                "max_position_embeddings": "context_length"}
    for field, key in optional.items():  # absent: the family's transformers default
        value = f.arch_key(key, None)
        if value is not None:
            fields[field] = value
    return fields


def _rope_scaling(f: GGUFFile, theta: float, head_dim: int) -> dict:
    """config.json's rope_scaling (and Phi-3's original_max_position_embeddings) from what the
    converter wrote: Llama 3's `rope_freqs` factors, Phi-3's LongRoPE factor tensors, or a
    linear factor; {} for plain RoPE."""
    kind = f.arch_key("rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        scaling = rope_scaling_from_freqs(f.dequantize("rope_freqs.weight"), theta, head_dim,
                                          f.path)
        return {} if scaling is None else {"rope_scaling": {
            "rope_type": "llama3", **dataclasses.asdict(scaling)}}
    if "rope_factors_long.weight" in f.tensors:
        factors = {k: [_shortest_float(v) for v in f.dequantize(f"rope_factors_{k}.weight")]
                   for k in ("long", "short")}
        rope = {"rope_type": "longrope", "long_factor": factors["long"],
                "short_factor": factors["short"]}
        attention_factor = f.arch_key("rope.scaling.attn_factor", None)
        if attention_factor is not None:
            rope["attention_factor"] = float(attention_factor)
        return {"rope_scaling": rope, "original_max_position_embeddings": int(
            f.arch_key("rope.scaling.original_context_length"))}
    factor = float(f.arch_key("rope.scaling.factor", 1.0))
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    raise ValueError(f"{f}: RoPE scaling type {kind!r} is unsupported; jinfer supports plain "
                     "RoPE, linear scaling, Llama 3 scaling (rope_freqs.weight) and LongRoPE "
                     "(rope_factors_long/short.weight)")


def _llama3_factors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs for Llama 3 scaling (convert_hf_to_gguf.py), [head_dim // 2]:
    how much the scaling divides each inverse frequency by."""
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return inv_freq / llama3_scaled(inv_freq, s)


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
