"""Shared fixtures: a tiny random Llama model folder (jinfer.testing), GPU skipping, each
pytest-xdist worker's share of GPU memory, and eight virtual CPU devices (tensor parallelism).

Every JAX process takes 75% of each GPU's memory at its first use (XLA preallocates), so under
`pytest -n N` on a GPU every worker but the first would fail to allocate. Each xdist worker
therefore gets XDIST_GPU_SHARE / N of the memory (at most JAX's own 75%) through
XLA_PYTHON_CLIENT_MEM_FRACTION, set below before anything can initialise a JAX backend (XLA
reads the variable then). A fraction the user set, under either of its names, is left alone.
Tests marked big_memory are skipped where this process may use less than BIG_MEMORY_BYTES.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Mapping, Optional

MEM_FRACTION_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION")
XDIST_GPU_SHARE = 0.9  # of each GPU, split evenly between the xdist workers
JAX_DEFAULT_FRACTION = 0.75  # what one JAX process preallocates when nothing is set
# What the largest big_memory test needs of the memory JAX may use: measured on an H100 (JAX
# 0.11.2), test_paged_prefill's float32 large shapes peak at 18.9 GiB (the bf16 ones at 9.5, the
# 5 GiB pools of test_kv_write at 10.3). An 80 GB H100 lets JAX use 79.2 GiB: its big_memory
# tests run under -n 3 or fewer workers (23.8 GiB each) and are skipped under -n 4 and more.
BIG_MEMORY_BYTES = 20 * 2**30

logger = logging.getLogger(__name__)


def worker_memory_fraction(num_workers: int) -> float:
    """The fraction of each GPU's memory one of `num_workers` test processes may take."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    return min(JAX_DEFAULT_FRACTION, XDIST_GPU_SHARE / num_workers)


def xdist_memory_fraction(environ: Mapping[str, str]) -> Optional[float]:
    """This process's share when it is a pytest-xdist worker (PYTEST_XDIST_WORKER is set) and
    the user set no memory fraction; else None (JAX's defaults, or the user's setting)."""
    if any(environ.get(name) for name in MEM_FRACTION_VARS):
        return None
    if not environ.get("PYTEST_XDIST_WORKER"):
        return None
    return worker_memory_fraction(int(environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


_fraction = xdist_memory_fraction(os.environ)
if _fraction is not None:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{_fraction:.4g}"
    logger.info("xdist worker %s: XLA_PYTHON_CLIENT_MEM_FRACTION=%.4g",
                os.environ["PYTEST_XDIST_WORKER"], _fraction)

# Eight virtual CPU devices for the tensor-parallel tests (tests/test_tensor_parallel.py), set
# before JAX starts its backends, for the whole session: one-device programs are unchanged (the
# CPU time of tests/test_llm.py + test_steps.py measured equal with and without it, cold cache).
# It adds CPU devices only; a GPU stays the default backend.
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}=8".strip()

import jax  # noqa: E402  (after the memory fraction: XLA reads it at backend start)
import pytest  # noqa: E402

from jinfer.testing import write_tiny_llama  # noqa: E402

# Parity bounds (1e-4 relative) assume true float32 matmuls; GPUs default to TF32-like passes.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    """Says which GPU memory share the xdist workers get (the header is the controller's)."""
    num_workers = getattr(config.option, "numprocesses", None)
    if getattr(config.option, "maxprocesses", None) and isinstance(num_workers, int):
        num_workers = min(num_workers, config.option.maxprocesses)
    user = {name: os.environ[name] for name in MEM_FRACTION_VARS if os.environ.get(name)}
    if user:
        return f"jinfer: GPU memory fraction set by the user: {user}"
    if isinstance(num_workers, int) and num_workers > 0:
        return (f"jinfer: each of {num_workers} xdist workers may use "
                f"{worker_memory_fraction(num_workers):.4g} of each GPU's memory "
                "(XLA_PYTHON_CLIENT_MEM_FRACTION; set it to override)")
    return None


def pytest_collection_modifyitems(config, items):
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU")
    limit = (gpus[0].memory_stats() or {}).get("bytes_limit") if gpus else None
    skip_big = None
    if limit is not None and limit < BIG_MEMORY_BYTES:
        skip_big = pytest.mark.skip(reason=(
            f"needs {BIG_MEMORY_BYTES / 2**30:.0f} GiB of GPU memory, this process may use "
            f"{limit / 2**30:.1f} GiB (an xdist worker's share under -n): run "
            "`pytest -m big_memory` without -n, or with fewer workers"))
    for item in items:
        if "gpu" in item.keywords and not gpus:
            item.add_marker(skip_gpu)
        elif "big_memory" in item.keywords and skip_big is not None:
            item.add_marker(skip_big)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
