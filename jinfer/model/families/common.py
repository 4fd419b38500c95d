"""What a family module declares (`Family`), and the config.json fields and checkpoint names that
the families share: the shapes, RoPE (transformers 4's `rope_theta` + `rope_scaling` and 5's
`rope_parameters`), the activation, per-layer sliding windows, and Llama's tensor names."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

from jinfer.model.config import (AnyRopeScaling, LinearRopeScaling, LongRopeScaling, ModelConfig,
                                 RopeScaling)

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# transformers' activation names -> ModelConfig.activation
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu": "gelu"}
SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where one of jinfer's weights lies in a Hugging Face checkpoint: a tensor's name (a
    layer's relative to `model.layers.{i}.`), or a range of its rows (a fused projection).
    An expert-stacked weight ([experts, ...]) names one tensor per expert, the name holding
    `{expert}` for its number."""

    name: str
    rows: Optional[tuple[int, int]] = None  # [start, stop) of the [out, in] tensor

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.name

    def of_expert(self, expert: int) -> "Tensor":
        return dataclasses.replace(self, name=self.name.format(expert=expert))


@dataclasses.dataclass(frozen=True)
class Family:
    """One family of Hugging Face checkpoints: its config.json <-> ModelConfig, and where each
    weight of jinfer's params (jinfer.model.decoder.param_shapes) lies in its safetensors."""

    model_type: str                                  # config.json's model_type
    architectures: tuple[str, ...]                   # its `architectures`
    models: str                                      # which checkpoints, for messages
    config_from_hf: Callable[[dict], ModelConfig]    # raises ValueError, KeyError
    config_to_hf: Callable[[ModelConfig], dict]
    layer_tensors: Callable[[ModelConfig], dict[str, Tensor]]
    # Added to every RMSNorm weight at load, in float32: Gemma stores w of its (1 + w) norms,
    # so the runtime norm stays one function.
    norm_offset: float = 0.0


def with_defaults(cfg: dict, defaults: dict) -> dict:
    """config.json over the family's transformers config defaults (the fields a checkpoint may
    leave out)."""
    return {**defaults, **cfg}


def base_config(cfg: dict, **features) -> ModelConfig:
    """The shapes and RoPE every family's config.json holds, with the family's `features`
    (ModelConfig keywords). KeyError names a missing field."""
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    theta, scaling = rope_from_hf(cfg)
    fields = dict(
        vocab_size=int(cfg["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=cfg["model_type"],
        activation=activation_from_hf(cfg.get("hidden_activation") or cfg.get("hidden_act")
                                      or "silu"))
    return ModelConfig(**{**fields, **features})


def base_hf_dict(config: ModelConfig, architecture: str) -> dict:
    """The config.json fields of base_config (transformers 4 names, which 5 reads too)."""
    theta_and_scaling = rope_to_hf(config)
    return {
        "architectures": [architecture], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "hidden_act": activation_to_hf(config.activation), "rms_norm_eps": config.rms_norm_eps,
        **theta_and_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def activation_from_hf(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is unsupported; jinfer supports "
                         f"{', '.join(repr(a) for a in HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def activation_to_hf(activation: str) -> str:
    return {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[activation]


def reject(cfg: dict, *flags: str) -> None:
    """ValueError for each of `flags` set true in config.json (options jinfer lacks)."""
    for flag in flags:
        if cfg.get(flag):
            raise ValueError(f"{flag}=true is unsupported for model_type "
                             f"{cfg['model_type']!r}")


# ----------------------------------------------------------------------------- RoPE

def rope_from_hf(cfg: dict, rope: Optional[dict] = None
                 ) -> tuple[float, Optional[AnyRopeScaling]]:
    """(rope_theta, scaling) from `rope` (one layer type's entry of a nested rope_parameters),
    else from `rope_parameters` (transformers 5) or `rope_scaling` (4)."""
    if rope is None:
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is unsupported (jinfer rotates "
                         "the whole head)")
    kind = rope.get("rope_type") or rope.get("type") or "default"
    kind = "longrope" if kind == "su" else kind
    try:
        if kind == "default":
            return theta, None
        if kind == "linear":
            return theta, LinearRopeScaling(factor=float(rope["factor"]))
        if kind == "llama3":
            return theta, RopeScaling(
                factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        if kind == "longrope":
            return theta, _longrope(cfg, rope)
    except KeyError as e:
        raise ValueError(f"{kind} rope scaling is missing the field {e}") from e
    raise ValueError(f"rope_type {kind!r} is unsupported; jinfer supports "
                     f"{', '.join(repr(t) for t in ROPE_TYPES)} RoPE")


def _longrope(cfg: dict, rope: dict) -> LongRopeScaling:
    """As transformers' _compute_longrope_parameters: a top-level
    original_max_position_embeddings wins (Phi-3 keeps it there); the attention factor defaults
    to sqrt(1 + ln(factor) / ln(original)), factor to max_position / original."""
    original = int(cfg.get("original_max_position_embeddings")
                   or rope["original_max_position_embeddings"])
    factor = rope.get("factor") or int(cfg["max_position_embeddings"]) / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0
                            else math.sqrt(1 + math.log(factor) / math.log(original)))
    return LongRopeScaling(short_factor=tuple(float(f) for f in rope["short_factor"]),
                           long_factor=tuple(float(f) for f in rope["long_factor"]),
                           original_max_position_embeddings=original,
                           attention_factor=float(attention_factor))


def rope_to_hf(config: ModelConfig) -> dict:
    """{"rope_theta", "rope_scaling"} of config.json for the global layers' RoPE."""
    s = config.rope_scaling
    if s is None:
        scaling = None
    elif isinstance(s, LinearRopeScaling):
        scaling = {"rope_type": "linear", "factor": s.factor}
    elif isinstance(s, LongRopeScaling):
        scaling = {"rope_type": "longrope", "short_factor": list(s.short_factor),
                   "long_factor": list(s.long_factor), "attention_factor": s.attention_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    else:
        scaling = {"rope_type": "llama3", "factor": s.factor,
                   "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    return {"rope_theta": config.rope_theta, "rope_scaling": scaling}


# ----------------------------------------------------------------------------- windows

def windows_from_layer_types(layer_types: Sequence[str], window: Optional[int]
                             ) -> Optional[tuple[Optional[int], ...]]:
    """ModelConfig.layer_windows from transformers' per-layer "sliding_attention" /
    "full_attention" and the sliding layers' window; None when no layer slides."""
    unknown = sorted(set(layer_types) - {SLIDING, FULL})
    if unknown:
        raise ValueError(f"layer_types {unknown} are unsupported; jinfer supports "
                         f"{SLIDING!r} and {FULL!r}")
    if window is None:
        return None
    windows = tuple(int(window) if kind == SLIDING else None for kind in layer_types)
    return windows if any(w is not None for w in windows) else None


def layer_types_to_hf(config: ModelConfig) -> list[str]:
    return [FULL if config.window(i) is None else SLIDING for i in range(config.num_layers)]


def sliding_window_to_hf(config: ModelConfig) -> Optional[int]:
    """The sliding layers' window (families give all of them one)."""
    return next((w for w in config.layer_windows or () if w is not None), None)


# ----------------------------------------------------------------------------- tensors

def llama_layer_tensors(config: ModelConfig) -> dict[str, Tensor]:
    """Llama's names of a layer's weights, with Q/K/V biases and q/k norms where the config
    has them (Qwen2, Qwen3 and Gemma 3 name them alike)."""
    tensors = {
        "attn_norm": Tensor("input_layernorm.weight"),
        "wq": Tensor("self_attn.q_proj.weight"),
        "wk": Tensor("self_attn.k_proj.weight"),
        "wv": Tensor("self_attn.v_proj.weight"),
        "wo": Tensor("self_attn.o_proj.weight"),
        "mlp_norm": Tensor("post_attention_layernorm.weight"),
        "w_gate": Tensor("mlp.gate_proj.weight"),
        "w_up": Tensor("mlp.up_proj.weight"),
        "w_down": Tensor("mlp.down_proj.weight"),
    }
    if config.qkv_bias:
        tensors |= {"bq": Tensor("self_attn.q_proj.bias"), "bk": Tensor("self_attn.k_proj.bias"),
                    "bv": Tensor("self_attn.v_proj.bias")}
    if config.qk_norm:
        tensors |= {"q_norm": Tensor("self_attn.q_norm.weight"),
                    "k_norm": Tensor("self_attn.k_norm.weight")}
    return tensors
