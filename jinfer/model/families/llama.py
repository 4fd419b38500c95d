"""Llama 2, Llama 3/3.1/3.2 and SmolLM/SmolLM2 (model_type "llama"): the decoder's defaults."""

from __future__ import annotations

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import (Family, base_config, base_hf_dict, llama_layer_tensors,
                                          reject, with_defaults)

# transformers' LlamaConfig defaults of the fields a config.json may leave out
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def config_from_hf(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, DEFAULTS)
    reject(cfg, "attention_bias", "mlp_bias")
    return base_config(cfg)


def config_to_hf(config: ModelConfig) -> dict:
    return {**base_hf_dict(config, "LlamaForCausalLM"), "attention_bias": False,
            "mlp_bias": False}


LLAMA = Family("llama", ("LlamaForCausalLM",), "Llama 2, Llama 3/3.1/3.2, SmolLM/SmolLM2",
               config_from_hf, config_to_hf, llama_layer_tensors)
