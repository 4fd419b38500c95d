"""`ModelConfig`: a model's shapes, constants and layer features. Static and hashable: jit treats
it as a compile-time constant, so a feature that is off adds no operation to the programs."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

# The gated MLP's activations (jinfer.model.layers.ACTIVATIONS): SwiGLU and GeGLU.
ACTIVATION_NAMES = ("silu", "gelu_tanh", "gelu")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (`rope_type: "llama3"` in config.json)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Every frequency divided by `factor` (`rope_type: "linear"`; Gemma 3's global layers)."""

    factor: float


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE (`rope_type: "longrope"`, formerly "su"; Phi-3): each frequency divided by its
    own factor, `short_factor` for contexts up to `original_max_position_embeddings` and
    `long_factor` beyond, and cos/sin multiplied by `attention_factor`.

    transformers switches sets with each forward's length, which mixes two encodings in one KV
    cache; jinfer picks one set for the engine's max_model_len (`long`, set by `for_context`),
    as vLLM does."""

    short_factor: tuple[float, ...]  # [head_dim // 2]
    long_factor: tuple[float, ...]   # [head_dim // 2]
    original_max_position_embeddings: int
    attention_factor: float
    long: bool = False

    @property
    def factors(self) -> tuple[float, ...]:
        return self.long_factor if self.long else self.short_factor


AnyRopeScaling = Union[RopeScaling, LinearRopeScaling, LongRopeScaling]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes, constants and layer features of a decoder (jinfer.model.decoder).

    The defaults are Llama's layer; each family (jinfer.model.families) turns on the features
    its checkpoints use. `model_type` names that family, for the loader and for writing the
    config back (the decoder reads only the features).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[AnyRopeScaling] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    # Layer features beyond Llama's (all off: Llama).
    qkv_bias: bool = False                 # biases on the Q, K, V projections (Qwen2)
    qk_norm: bool = False                  # per-head RMSNorm of q and k before RoPE (Qwen3)
    post_norms: bool = False               # RMSNorm of each sublayer's output (Gemma 2/3)
    activation: str = "silu"               # the gated MLP's, one of ACTIVATION_NAMES
    embed_scale: Optional[float] = None    # embeddings times this (Gemma: sqrt(hidden))
    query_pre_attn_scalar: Optional[float] = None  # attention scale its ** -0.5 (Gemma)
    attn_logit_softcap: Optional[float] = None     # cap * tanh(score / cap) (Gemma 2)
    final_logit_softcap: Optional[float] = None    # the same on the output logits (Gemma 2)
    # Per layer: its sliding window in tokens (a query sees itself and the window - 1 tokens
    # before it), or None for global attention. None: every layer global.
    layer_windows: Optional[tuple[Optional[int], ...]] = None
    local_rope_theta: Optional[float] = None  # RoPE base of the windowed layers (Gemma 3)
    # Tensor parallelism (jinfer.runner.sharding): set only on the per-device config that the
    # decoder runs with inside shard_map (num_heads, num_kv_heads, intermediate_size are then
    # one device's); the mesh axis its collectives sum and gather over. None: one device.
    tp_axis: Optional[str] = None
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is `num_experts` gated MLPs of
    # intermediate_size each, of which a router picks `num_experts_per_tok` per token, their
    # routing weights renormalised over those when `norm_topk_prob` (jinfer.model.moe).
    # 0 experts: the dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"activation {self.activation!r} is not supported; choose one of "
                             f"{', '.join(ACTIVATION_NAMES)}")
        scaling = self.rope_scaling
        if isinstance(scaling, LongRopeScaling) and not (
                len(scaling.short_factor) == len(scaling.long_factor) == self.head_dim // 2):
            raise ValueError(f"LongRoPE needs head_dim // 2 = {self.head_dim // 2} short and "
                             f"long factors, got {len(scaling.short_factor)} and "
                             f"{len(scaling.long_factor)}")
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be between 1 and num_experts "
                             f"({self.num_experts}), got {self.num_experts_per_tok}")
        if self.layer_windows is not None:
            if len(self.layer_windows) != self.num_layers:
                raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for "
                                 f"{self.num_layers} layers")
            if any(w is not None and w < 1 for w in self.layer_windows):
                raise ValueError(f"sliding windows must be at least 1 token: "
                                 f"{self.layer_windows}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by: 1 / sqrt(head_dim), or query_pre_attn_scalar ** -0.5."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    def window(self, layer: int) -> Optional[int]:
        """Layer `layer`'s sliding window in tokens, or None when it attends globally."""
        return None if self.layer_windows is None else self.layer_windows[layer]

    @property
    def kv_window(self) -> Optional[int]:
        """How many of the latest tokens any layer still reads when every layer has a window
        (Mistral, Phi-3): the largest window; blocks older than that can be released. None
        when some layer reads the whole context."""
        if self.layer_windows is None or None in self.layer_windows:
            return None
        return max(self.layer_windows)

    @property
    def kernel_layers(self) -> bool:
        """Whether the batch-1 layer kernels implement every layer (jinfer.model.layer_kernel):
        Llama's (no biases, windows, soft-caps, post norms or scaled embeddings), also with
        Qwen3's q/k head norms (the fused attention kernel applies them) and with a
        mixture-of-experts MLP (Qwen3-MoE; whether its shapes fit is the kernels' plan)."""
        return (not (self.qkv_bias or self.post_norms) and self.activation == "silu"
                and self.layer_windows is None and self.attn_logit_softcap is None
                and self.local_rope_theta is None and self.embed_scale is None)

    def for_context(self, max_model_len: int) -> "ModelConfig":
        """This config for an engine whose sequences reach max_model_len tokens: LongRoPE
        takes its long factors when that exceeds the pretraining context (see
        LongRopeScaling); every other config is returned as it is."""
        scaling = self.rope_scaling
        if not isinstance(scaling, LongRopeScaling):
            return self
        long = max_model_len > scaling.original_max_position_embeddings
        return dataclasses.replace(self, rope_scaling=dataclasses.replace(scaling, long=long))
