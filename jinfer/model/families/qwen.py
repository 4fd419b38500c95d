"""Qwen2 / Qwen2.5 (biases on the Q/K/V projections) and Qwen3 (per-head RMSNorm of q and k
before RoPE; head_dim its own field). Both may slide a window over the layers from
`max_window_layers` on, where `use_sliding_window` says so (the released checkpoints do not)."""

from __future__ import annotations

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import (SLIDING, FULL, Family, base_config, base_hf_dict,
                                          layer_types_to_hf, llama_layer_tensors, reject,
                                          sliding_window_to_hf, windows_from_layer_types,
                                          with_defaults)

# transformers' Qwen2Config / Qwen3Config defaults of the fields a config.json may leave out
QWEN2_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                  "tie_word_embeddings": False, "use_sliding_window": False,
                  "sliding_window": 4096, "max_window_layers": 28}
QWEN3_DEFAULTS = {**QWEN2_DEFAULTS, "head_dim": 128}


def _windows(cfg: dict):
    """As transformers: a window only with use_sliding_window, on the layers layer_types marks
    (else those from max_window_layers on)."""
    window = cfg["sliding_window"] if cfg["use_sliding_window"] else None
    types = cfg.get("layer_types") or [
        SLIDING if window is not None and i >= cfg["max_window_layers"] else FULL
        for i in range(int(cfg["num_hidden_layers"]))]
    return windows_from_layer_types(types, window)


def qwen2_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, QWEN2_DEFAULTS)
    return base_config(cfg, qkv_bias=True, layer_windows=_windows(cfg))


def qwen3_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, QWEN3_DEFAULTS)
    reject(cfg, "attention_bias")
    return base_config(cfg, qk_norm=True, layer_windows=_windows(cfg))


def _hf_dict(config: ModelConfig, architecture: str) -> dict:
    window = sliding_window_to_hf(config)
    return {**base_hf_dict(config, architecture), "use_sliding_window": window is not None,
            "sliding_window": window, "max_window_layers": config.num_layers,
            "layer_types": layer_types_to_hf(config)}


QWEN2 = Family("qwen2", ("Qwen2ForCausalLM",), "Qwen2, Qwen2.5", qwen2_config,
               lambda config: _hf_dict(config, "Qwen2ForCausalLM"), llama_layer_tensors)
QWEN3 = Family("qwen3", ("Qwen3ForCausalLM",), "Qwen3 (dense)", qwen3_config,
               lambda config: {**_hf_dict(config, "Qwen3ForCausalLM"), "attention_bias": False},
               llama_layer_tensors)
