"""The engine's configuration (jinfer/config.py) and the model's (jinfer/model/config.py):
clear errors for bad values, hashable frozen objects (jit takes them as static)."""

from __future__ import annotations

import dataclasses

import pytest

from jinfer.config import EngineConfig, KernelConfig
from jinfer.model.config import ModelConfig


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 0, "block_size must be a positive integer"),
    ("max_num_seqs", 2.5, "max_num_seqs must be a positive integer"),
    ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization must be in \(0, 1\]"),
    ("kv_cache_memory_bytes", 0, "kv_cache_memory_bytes must be positive"),
    ("num_kv_blocks", 1, "num_kv_blocks must be at least 2"),
])
def test_engine_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**{field: value})


def test_configs_are_frozen_and_hashable():
    config = EngineConfig(kernels=KernelConfig(unroll_max_rows=4))
    assert hash(config) == hash(dataclasses.replace(config))
    assert config != dataclasses.replace(config, kernels=KernelConfig())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_size = 32


def test_kernel_config_defaults_are_the_measured_choices():
    kernels = KernelConfig()
    assert kernels.decode_layer_kernel is True
    assert kernels.layer_tiling.stages == 4
    assert kernels.mosaic_prefill_min_tokens == 1024
    assert kernels.unroll_max_rows is None  # 2 on GPU for models up to 4B parameters, else 0


def test_model_config_checks_grouped_query_heads():
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\).*num_key_value_heads \(4\)"):
        ModelConfig(vocab_size=10, hidden_size=48, intermediate_size=96, num_layers=1,
                    num_heads=6, num_kv_heads=4, head_dim=8)
    config = ModelConfig(vocab_size=10, hidden_size=48, intermediate_size=96, num_layers=1,
                         num_heads=6, num_kv_heads=2, head_dim=8)
    assert (config.q_size, config.kv_size) == (48, 16)
