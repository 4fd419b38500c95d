"""Weight loaders: Hugging Face folders (config.json + safetensors) and llama.cpp GGUF files.

`load_weights` returns numpy arrays (ml_dtypes.bfloat16 for bf16) so the caller decides device
placement and sharding.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

from jinfer.model.config import ModelConfig
from jinfer.loader.default_model import default_model_path
from jinfer.loader.gguf_weights import gguf_eos_ids, load_gguf
from jinfer.loader.hf import (DTYPES, load_generation_eos, load_hf_config, load_hf_weights,
                              numpy_dtype)

__all__ = ["DTYPES", "default_model_path", "load_generation_eos", "load_gguf", "load_hf_config",
           "load_hf_weights", "load_weights", "resolve_model_path"]

_WHAT = ("pass a Hugging Face model folder (config.json + *.safetensors), a .gguf file, or None "
         "for the default SmolLM2-135M-Instruct")


def resolve_model_path(model: Optional[str | os.PathLike]) -> pathlib.Path:
    """Checks `model` names an existing HF folder or .gguf file; None -> the default model."""
    if model is None:
        return default_model_path()
    path = pathlib.Path(model).expanduser()
    if not path.exists():
        hint = (" (Hub ids are not downloaded automatically: download the repository first, "
                "e.g. `huggingface-cli download ID --local-dir DIR`, and pass DIR)"
                if isinstance(model, str) and model.count("/") == 1 and not model.startswith(".")
                else "")
        raise FileNotFoundError(f"Model path {path} does not exist; {_WHAT}{hint}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json, so it is not a Hugging Face "
                                    f"model folder; {_WHAT}")
        return path
    if path.suffix.lower() == ".gguf":
        return path
    if path.name == "config.json" or path.suffix == ".safetensors":
        raise ValueError(f"{path} is a file of a Hugging Face checkpoint; pass its folder "
                         f"{path.parent} instead")
    raise ValueError(f"Unsupported model file {path}; {_WHAT}")


def load_weights(path: Optional[str | os.PathLike],
                 dtype) -> tuple[ModelConfig, dict, dict]:
    """(config, params, extra) for a HF folder or GGUF file.

    extra = {"eos_token_ids": tuple of ints, "gguf_reader": GGUFReader or None,
             "format": "hf" | "gguf"}.
    """
    numpy_dtype(dtype)  # fail on a bad dtype before reading anything
    path = resolve_model_path(path)
    if path.is_dir():
        config = load_hf_config(path)
        params = load_hf_weights(path, config, dtype)
        extra = {"eos_token_ids": load_generation_eos(path), "gguf_reader": None, "format": "hf"}
        return config, params, extra
    config, params, reader = load_gguf(path, dtype)
    extra = {"eos_token_ids": gguf_eos_ids(reader, path), "gguf_reader": reader, "format": "gguf"}
    return config, params, extra
