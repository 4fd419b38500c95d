"""The mixture-of-experts families: Mixtral (model_type "mixtral": Mistral's layer with a
router over `num_local_experts` SwiGLU experts, two per token, their weights renormalised) and
Qwen3-MoE ("qwen3_moe": Qwen3's layer with `num_experts` experts of `moe_intermediate_size`,
`num_experts_per_tok` per token, renormalised where `norm_topk_prob`).

For these configs ModelConfig.intermediate_size is each expert's. The experts' weights are
stacked over experts at load (jinfer.model.decoder.param_shapes): checkpoints hold one tensor
per expert, `...experts.{expert}.w1.weight` and the like. Qwen3-MoE's dense layers
(`mlp_only_layers`, `decoder_sparse_step` > 1) are refused: no released checkpoint has them.
"""

from __future__ import annotations

import dataclasses

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import (Family, Tensor, base_config, base_hf_dict,
                                          llama_layer_tensors, sliding_window_to_hf,
                                          with_defaults)
from jinfer.model.families.qwen import QWEN3_DEFAULTS, qwen3_config

# transformers' MixtralConfig / Qwen3MoeConfig defaults of the fields a config.json may leave out
MIXTRAL_DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
                    "tie_word_embeddings": False, "sliding_window": None,
                    "num_local_experts": 8, "num_experts_per_tok": 2}
# (its head_dim defaults to hidden / heads, unlike dense Qwen3's 128)
QWEN3_MOE_DEFAULTS = {**QWEN3_DEFAULTS, "head_dim": None, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": False, "moe_intermediate_size": 768,
                      "decoder_sparse_step": 1, "mlp_only_layers": []}


def mixtral_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, MIXTRAL_DEFAULTS)
    window, layers = cfg["sliding_window"], int(cfg["num_hidden_layers"])
    return base_config(cfg, layer_windows=None if window is None else (int(window),) * layers,
                       num_experts=int(cfg["num_local_experts"]),
                       num_experts_per_tok=int(cfg["num_experts_per_tok"]), norm_topk_prob=True)


def mixtral_to_hf(config: ModelConfig) -> dict:
    return {**base_hf_dict(config, "MixtralForCausalLM"),
            "sliding_window": sliding_window_to_hf(config),
            "num_local_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok}


def mixtral_tensors(config: ModelConfig) -> dict[str, Tensor]:
    experts = "block_sparse_moe.experts.{expert}"
    return {**_attention_tensors(config), "router_w": Tensor("block_sparse_moe.gate.weight"),
            "w_gate": Tensor(f"{experts}.w1.weight"), "w_up": Tensor(f"{experts}.w3.weight"),
            "w_down": Tensor(f"{experts}.w2.weight")}


def qwen3_moe_config(cfg: dict) -> ModelConfig:
    cfg = with_defaults(cfg, QWEN3_MOE_DEFAULTS)
    if cfg["mlp_only_layers"] or int(cfg["decoder_sparse_step"]) != 1:
        raise ValueError(
            f"dense layers among the expert layers (mlp_only_layers={cfg['mlp_only_layers']}, "
            f"decoder_sparse_step={cfg['decoder_sparse_step']}) are unsupported; jinfer runs "
            "Qwen3-MoE with experts on every layer (mlp_only_layers=[], decoder_sparse_step=1)")
    # transformers 5 writes num_local_experts; the Hub's configs say num_experts
    num_experts = int(cfg.get("num_local_experts") or cfg["num_experts"])
    head_dim = cfg["head_dim"] or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    dense = qwen3_config({**cfg, "intermediate_size": cfg["moe_intermediate_size"],
                          "head_dim": head_dim})
    return dataclasses.replace(dense, num_experts=num_experts,
                               num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                               norm_topk_prob=bool(cfg["norm_topk_prob"]))


def qwen3_moe_to_hf(config: ModelConfig) -> dict:
    window = sliding_window_to_hf(config)
    return {**base_hf_dict(config, "Qwen3MoeForCausalLM"), "attention_bias": False,
            "use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": config.num_layers,
            "moe_intermediate_size": config.intermediate_size,
            "num_experts": config.num_experts, "num_experts_per_tok": config.num_experts_per_tok,
            "norm_topk_prob": config.norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": []}


def qwen3_moe_tensors(config: ModelConfig) -> dict[str, Tensor]:
    experts = "mlp.experts.{expert}"
    return {**_attention_tensors(config), "router_w": Tensor("mlp.gate.weight"),
            "w_gate": Tensor(f"{experts}.gate_proj.weight"),
            "w_up": Tensor(f"{experts}.up_proj.weight"),
            "w_down": Tensor(f"{experts}.down_proj.weight")}


def _attention_tensors(config: ModelConfig) -> dict[str, Tensor]:
    """Llama's names of everything but the MLP (q/k norms where the config has them)."""
    return {key: tensor for key, tensor in llama_layer_tensors(config).items()
            if key not in ("w_gate", "w_up", "w_down")}


MIXTRAL = Family("mixtral", ("MixtralForCausalLM",), "Mixtral 8x7B, 8x22B", mixtral_config,
                 mixtral_to_hf, mixtral_tensors)
QWEN3_MOE = Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "Qwen3-MoE (30B-A3B, 235B-A22B)",
                   qwen3_moe_config, qwen3_moe_to_hf, qwen3_moe_tensors)
