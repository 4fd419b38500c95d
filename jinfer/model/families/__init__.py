"""The decoder families jinfer loads from Hugging Face folders, keyed by config.json's
`model_type`. Each module declares its `Family`s (jinfer.model.families.common): config.json ->
ModelConfig (the decoder's features) and back, and checkpoint names -> jinfer's weights with the
load-time transforms (Gemma's +1 on norms, Phi-3's fused projections split by rows). The decoder
itself (jinfer.model.decoder) is shared."""

from __future__ import annotations

from jinfer.model.config import ModelConfig
from jinfer.model.families.common import Family, Tensor
from jinfer.model.families.gemma import GEMMA2, GEMMA3
from jinfer.model.families.llama import LLAMA
from jinfer.model.families.mistral import MISTRAL
from jinfer.model.families.moe import MIXTRAL, QWEN3_MOE
from jinfer.model.families.phi3 import PHI3
from jinfer.model.families.qwen import QWEN2, QWEN3

__all__ = ["FAMILIES", "Family", "Tensor", "family_for_hf", "family_of", "supported"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, QWEN3, MISTRAL, GEMMA2,
                                                        GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)}


def supported() -> str:
    """The families, for messages: "'llama' (Llama 2, ...), 'qwen2' (Qwen2, Qwen2.5), ..."."""
    return ", ".join(f"{name!r} ({family.models})" for name, family in FAMILIES.items())


def family_for_hf(cfg: dict) -> Family:
    """The family of a config.json: by its model_type (else by its architectures). ValueError
    names what it found and lists the supported families."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type") or next(
        (f.model_type for f in FAMILIES.values() for a in archs if a in f.architectures), None)
    family = FAMILIES.get(model_type)
    if family is None:
        found = f"model_type {model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        raise ValueError(f"unsupported architecture: {found}. jinfer supports model_type "
                         f"{supported()}; convert the model or pick a checkpoint of these")
    if archs and not any(a in family.architectures or a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"unsupported architecture {', '.join(archs)} for model_type "
                         f"{model_type!r}; jinfer runs {', '.join(family.architectures)}")
    return family


def family_of(config: ModelConfig) -> Family:
    """The family a ModelConfig came from (its model_type)."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"ModelConfig.model_type {config.model_type!r} is not a family jinfer "
                         f"loads; choose one of {', '.join(map(repr, FAMILIES))}")
    return FAMILIES[config.model_type]
