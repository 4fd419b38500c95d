"""Gemma 2 and Gemma 3 (text): RMSNorm of (1 + w) (jinfer folds the 1 into the weights at
load), embeddings times sqrt(hidden), GeGLU, a norm after each sublayer as well as before
(post-attention, pre- and post-feedforward), sliding-window layers among global ones, and the
attention scale query_pre_attn_scalar ** -0.5.

Gemma 2 alternates windowed and global layers and soft-caps the attention and output logits.
Gemma 3 has five windowed layers to one global (`layer_types`, else `sliding_window_pattern`),
per-head q/k norms, and RoPE of its own base on the windowed layers (`rope_local_base_freq`)
while the global ones keep `rope_theta` with its scaling.
"""

from __future__ import annotations

import math

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import (FULL, SLIDING, Family, Tensor, base_config,
                                          base_hf_dict, layer_types_to_hf, llama_layer_tensors,
                                          reject, rope_from_hf, sliding_window_to_hf,
                                          windows_from_layer_types, with_defaults)

# transformers' Gemma2Config / Gemma3TextConfig defaults of the fields a config.json may leave
# out (Gemma 3's multimodal checkpoints leave out most of their text_config).
GEMMA2_DEFAULTS = {
    "vocab_size": 256000, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0}
GEMMA3_DEFAULTS = {
    "vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "final_logit_softcapping": None,
    "attn_logit_softcapping": None}


def _features(cfg: dict, default_types: list[str]) -> dict:
    """What Gemma 2 and 3 share, as ModelConfig keywords."""
    reject(cfg, "attention_bias", "use_bidirectional_attention")
    cap = cfg.get("attn_logit_softcapping")
    final_cap = cfg.get("final_logit_softcapping")
    return dict(
        post_norms=True, embed_scale=math.sqrt(int(cfg["hidden_size"])),
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"]),
        attn_logit_softcap=None if cap is None else float(cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        layer_windows=windows_from_layer_types(cfg.get("layer_types") or default_types,
                                               cfg["sliding_window"]))


def gemma2_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, GEMMA2_DEFAULTS)
    alternating = [SLIDING if (i + 1) % 2 else FULL for i in range(int(cfg["num_hidden_layers"]))]
    return base_config(cfg, **_features(cfg, alternating))


def gemma3_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, GEMMA3_DEFAULTS)
    pattern = int(cfg["sliding_window_pattern"])
    types = [SLIDING if (i + 1) % pattern else FULL for i in range(int(cfg["num_hidden_layers"]))]
    nested = cfg.get("rope_parameters") or {}
    if FULL in nested:  # transformers 5: one entry per layer type
        theta, scaling = rope_from_hf(cfg, nested[FULL])
        local_theta, local_scaling = rope_from_hf(cfg, nested[SLIDING])
        if local_scaling is not None:
            raise ValueError("RoPE scaling on Gemma 3's sliding layers is unsupported")
    else:
        theta, scaling = rope_from_hf(cfg)
        local_theta = float(cfg["rope_local_base_freq"])
    return base_config(cfg, **_features(cfg, types), rope_theta=theta, rope_scaling=scaling,
                       qk_norm=True, local_rope_theta=local_theta)


def _hf_dict(config: ModelConfig, architecture: str) -> dict:
    out = base_hf_dict(config, architecture)
    out["hidden_activation"] = out.pop("hidden_act")
    scalar = config.query_pre_attn_scalar
    return {**out, "query_pre_attn_scalar": int(scalar) if scalar.is_integer() else scalar,
            "attn_logit_softcapping": config.attn_logit_softcap,
            "final_logit_softcapping": config.final_logit_softcap,
            "sliding_window": sliding_window_to_hf(config),
            "layer_types": layer_types_to_hf(config)}


def gemma3_hf_dict(config: ModelConfig) -> dict:
    return {**_hf_dict(config, "Gemma3ForCausalLM"),
            "rope_local_base_freq": config.local_rope_theta}


def layer_tensors(config: ModelConfig) -> dict[str, Tensor]:
    """A Gemma layer's weights: Llama's names, but four sublayer norms (post-attention,
    pre- and post-feedforward have names of their own)."""
    return {**llama_layer_tensors(config),
            "attn_post_norm": Tensor("post_attention_layernorm.weight"),
            "mlp_norm": Tensor("pre_feedforward_layernorm.weight"),
            "mlp_post_norm": Tensor("post_feedforward_layernorm.weight")}


GEMMA2 = Family("gemma2", ("Gemma2ForCausalLM",), "Gemma 2", gemma2_config,
                lambda config: _hf_dict(config, "Gemma2ForCausalLM"), layer_tensors,
                norm_offset=1.0)
GEMMA3 = Family("gemma3_text", ("Gemma3ForCausalLM",), "Gemma 3 text models (Gemma3ForCausalLM)",
                gemma3_config, gemma3_hf_dict, layer_tensors, norm_offset=1.0)
