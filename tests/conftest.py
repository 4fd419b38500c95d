"""Shared fixtures: a tiny random Llama model folder (jinfer.testing), and GPU skipping."""

from __future__ import annotations

import pathlib

import jax
import pytest

from jinfer.testing import write_tiny_llama

# Parity bounds (1e-4 relative) assume true float32 matmuls; GPUs default to TF32-like passes.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    has_gpu = any(d.platform == "gpu" for d in jax.devices())
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
