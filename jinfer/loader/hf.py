"""Load Hugging Face checkpoints (config.json + *.safetensors) into jinfer's params pytree, the
family (jinfer.model.families) saying what the config means and where each weight lies.

Safetensors files are parsed here (8-byte header length, JSON header, raw data) and memory-mapped,
rather than read through `safetensors.safe_open(framework="numpy")`, because the numpy framework
cannot represent bfloat16; parsing the header ourselves lets us view BF16 bytes as
`ml_dtypes.bfloat16` and report truncated/corrupted files precisely. Each tensor is converted and
transposed straight into a preallocated, layer-stacked array, so peak memory is about one model.

The dtype helpers and `allocate_params` are shared with the GGUF loader.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any, Optional

import ml_dtypes
import numpy as np

from jinfer.model.config import ModelConfig
from jinfer.model.decoder import param_shapes
from jinfer.model.families import Tensor, family_for_hf, family_of

logger = logging.getLogger(__name__)

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def numpy_dtype(dtype: Any) -> np.dtype:
    """Maps "float32" | "bfloat16" | "float16" (or the matching numpy dtype) to a numpy dtype."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"Unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return np.dtype(DTYPES[name])


def allocate_params(config: ModelConfig, dtype: np.dtype) -> dict:
    """Uninitialised params pytree in `dtype`, filled tensor by tensor by the loaders."""
    shapes = param_shapes(config)
    params = {k: np.empty(s, dtype) for k, s in shapes.items() if k != "layers"}
    params["layers"] = {k: np.empty(s, dtype) for k, s in shapes["layers"].items()}
    return params


# ----------------------------------------------------------------------------- config.json

def _read_json(path: pathlib.Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e


def load_hf_config(folder: str | os.PathLike) -> ModelConfig:
    """Reads `folder/config.json` into a ModelConfig through its family
    (jinfer.model.families); ValueError names an unsupported family or option."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a Hugging Face model folder needs config.json next to its "
            "*.safetensors (download the full repository, or pass a .gguf file)")
    cfg = _read_json(path)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{path}: quantized checkpoints ({method}) are unsupported; use the "
                         "unquantized bf16/fp16/fp32 safetensors or a GGUF file")
    try:
        family = family_for_hf(cfg)
        return family.config_from_hf({**cfg, "model_type": family.model_type})
    except KeyError as e:
        raise ValueError(f"{path} is missing the required field {e}") from e
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_generation_eos(folder: str | os.PathLike) -> tuple[int, ...]:
    """EOS ids from generation_config.json (int or list), else from config.json; () if none."""
    for name in ("generation_config.json", "config.json"):
        path = pathlib.Path(folder) / name
        if path.is_file():
            eos = _read_json(path).get("eos_token_id")
            if eos is not None:
                ids = eos if isinstance(eos, list) else [eos]
                return tuple(dict.fromkeys(int(i) for i in ids))
    logger.warning("No eos_token_id in %s; generation stops only at max_tokens/stop", folder)
    return ()


# ----------------------------------------------------------------------------- safetensors

class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, tensor data memory-mapped on first use."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                raise self._bad("truncated (header runs past the end of the file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._bad(f"corrupted (unreadable header: {e})") from e
        if not isinstance(header, dict):
            raise self._bad("corrupted (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.entries = header  # name -> {"dtype", "shape", "data_offsets"}
        self._data_start = 8 + n
        self._size = size
        self._mmap: Optional[np.memmap] = None

    def _bad(self, what: str) -> ValueError:
        return ValueError(f"Safetensors file {self.path} is {what}; re-download or re-convert it")

    def tensor(self, name: str) -> np.ndarray:
        """Read-only view of tensor `name` in its stored dtype and shape."""
        entry = self.entries[name]
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except KeyError as e:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype or malformed "
                             f"entry {entry!r}; jinfer reads F64/F32/F16/BF16") from e
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise self._bad(f"corrupted (tensor {name}: offsets do not match its shape)")
        if self._data_start + end > self._size:
            raise self._bad(f"truncated (tensor {name} runs past the end of the file)")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, np.uint8, mode="r", offset=self._data_start,
                                   shape=(self._size - self._data_start,))
        return self._mmap[begin:end].view(dtype).reshape(shape)


def _checkpoint_files(folder: pathlib.Path) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to the SafetensorsFile holding it (single file or sharded)."""
    if (folder / SINGLE_FILE).is_file():
        st = SafetensorsFile(folder / SINGLE_FILE)
        return {name: st for name in st.entries}
    index = folder / INDEX_FILE
    if not index.is_file():
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (found {', '.join(others)}: convert them to safetensors)" if others else "")
        raise FileNotFoundError(
            f"No weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
            f"{hint}; download the *.safetensors files of the model")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map; re-download it")
    shards: dict[str, SafetensorsFile] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"{index} names the shard {shard}, which is missing from "
                                    f"{folder}; download all shards of the model")
        shards[shard] = SafetensorsFile(folder / shard)
    return {name: shards[shard] for name, shard in weight_map.items()}


def _copy(files: dict, tensor: Tensor, out: np.ndarray, transpose: bool,
          add: float = 0.0) -> None:
    """Copies HF tensor `tensor` (its rows, where it names a range) into `out`, converting the
    dtype (after adding `add` in float32) and transposing [out, in] -> [in, out]."""
    name = tensor.name
    if name not in files:
        raise ValueError(f"Tensor {name} is missing from the checkpoint in "
                         f"{next(iter(files.values())).path.parent}; re-download the model")
    st = files[name]
    if name not in st.entries:
        raise ValueError(f"{st.path} does not contain {name}, though {INDEX_FILE} says it does; "
                         "re-download the model")
    w = st.tensor(name)
    if tensor.rows is not None:
        name = f"{name} rows {tensor.rows[0]}:{tensor.rows[1]}"
        w = w[tensor.rows[0]:tensor.rows[1]]
    expected = out.shape[::-1] if transpose else out.shape
    if w.shape != expected:
        raise ValueError(f"Tensor {name} in {st.path} has shape {list(w.shape)}, expected "
                         f"{list(expected)} from config.json; config and weights do not match")
    if add:
        w = w.astype(np.float32) + np.float32(add)
    out[...] = w.T if transpose else w


def load_hf_weights(folder: str | os.PathLike, config: ModelConfig, dtype) -> dict:
    """Reads the safetensors checkpoint in `folder` into the params pytree, in `dtype`."""
    folder = pathlib.Path(folder)
    family = family_of(config)
    params = allocate_params(config, numpy_dtype(dtype))
    files = _checkpoint_files(folder)
    if not files:
        raise ValueError(f"The checkpoint in {folder} holds no tensors; re-download the model")
    _copy(files, Tensor("model.embed_tokens.weight"), params["embed"], transpose=False)
    layer_tensors = family.layer_tensors(config)
    for i in range(config.num_layers):
        for key, tensor in layer_tensors.items():
            tensor = Tensor(f"model.layers.{i}.{tensor.name}", tensor.rows)
            out = params["layers"][key][i]
            if tensor.per_expert:  # [experts, in, out], one [out, in] tensor per expert
                for expert in range(config.num_experts):
                    _copy(files, tensor.of_expert(expert), out[expert], transpose=True)
                continue
            _copy(files, tensor, out, transpose=out.ndim == 2,
                  add=family.norm_offset if key.endswith("norm") else 0)
    _copy(files, Tensor("model.norm.weight"), params["final_norm"], transpose=False,
          add=family.norm_offset)
    if not config.tie_word_embeddings:
        if "lm_head.weight" not in files:
            raise ValueError(f"lm_head.weight is missing from the checkpoint in {folder} while "
                             "config.json says tie_word_embeddings=false; re-download the model "
                             "or set tie_word_embeddings to true if the embeddings are shared")
        _copy(files, Tensor("lm_head.weight"), params["lm_head"], transpose=True)
    logger.info("Loaded %d-layer %s from %s as %s", config.num_layers, config.model_type,
                folder, dtype)
    return params
