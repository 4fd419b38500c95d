"""Phi-3 and Phi-3.5 (model_type "phi3"): Llama's layer, with Q/K/V fused into one `qkv_proj`
and gate/up into one `gate_up_proj` in the checkpoint (split here by rows), LongRoPE scaling in
the 128k-context models, and a sliding window where configured."""

from __future__ import annotations

from jinfer.model.config import LongRopeScaling, ModelConfig
from jinfer.model.families.common import (Family, Tensor, base_config, base_hf_dict,
                                          sliding_window_to_hf, with_defaults)

# transformers' Phi3Config defaults of the fields a config.json may leave out
DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096, "tie_word_embeddings": False,
            "sliding_window": None}


def config_from_hf(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, DEFAULTS)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    if rope and (rope.get("rope_type") or rope.get("type")) == "yarn":
        rope = {**rope, "rope_type": "longrope"}  # as transformers' Phi3Config reads it
        cfg = {**cfg, "rope_parameters": rope}
    window = cfg["sliding_window"]
    layers = int(cfg["num_hidden_layers"])
    return base_config(cfg, layer_windows=None if window is None else (int(window),) * layers)


def config_to_hf(config: ModelConfig) -> dict:
    out = {**base_hf_dict(config, "Phi3ForCausalLM"),
           "sliding_window": sliding_window_to_hf(config)}
    if isinstance(config.rope_scaling, LongRopeScaling):
        out["original_max_position_embeddings"] = (
            config.rope_scaling.original_max_position_embeddings)
    return out


def layer_tensors(config: ModelConfig) -> dict[str, Tensor]:
    """The fused projections' rows: qkv_proj [q | k | v], gate_up_proj [gate | up]."""
    q, kv, f = config.q_size, config.kv_size, config.intermediate_size
    return {
        "attn_norm": Tensor("input_layernorm.weight"),
        "wq": Tensor("self_attn.qkv_proj.weight", (0, q)),
        "wk": Tensor("self_attn.qkv_proj.weight", (q, q + kv)),
        "wv": Tensor("self_attn.qkv_proj.weight", (q + kv, q + 2 * kv)),
        "wo": Tensor("self_attn.o_proj.weight"),
        "mlp_norm": Tensor("post_attention_layernorm.weight"),
        "w_gate": Tensor("mlp.gate_up_proj.weight", (0, f)),
        "w_up": Tensor("mlp.gate_up_proj.weight", (f, 2 * f)),
        "w_down": Tensor("mlp.down_proj.weight"),
    }


PHI3 = Family("phi3", ("Phi3ForCausalLM",), "Phi-3, Phi-3.5 (mini, medium)", config_from_hf,
              config_to_hf, layer_tensors)
