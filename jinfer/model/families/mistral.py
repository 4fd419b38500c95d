"""Mistral 7B and its fine-tunes (model_type "mistral"): Llama's layer, with every layer's
attention limited to a `sliding_window` (4096 in v0.1; null from v0.2 on)."""

from __future__ import annotations

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import (Family, base_config, base_hf_dict, llama_layer_tensors,
                                          sliding_window_to_hf, with_defaults)

# transformers' MistralConfig defaults of the fields a config.json may leave out
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32,
            "tie_word_embeddings": False, "sliding_window": 4096}


def config_from_hf(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, DEFAULTS)
    window = cfg["sliding_window"]
    layers = int(cfg["num_hidden_layers"])
    return base_config(cfg, layer_windows=None if window is None else (int(window),) * layers)


def config_to_hf(config: ModelConfig) -> dict:
    return {**base_hf_dict(config, "MistralForCausalLM"),
            "sliding_window": sliding_window_to_hf(config)}


MISTRAL = Family("mistral", ("MistralForCausalLM",), "Mistral 7B v0.1-v0.3", config_from_hf,
                 config_to_hf, llama_layer_tensors)
