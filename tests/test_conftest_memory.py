"""The GPU memory share conftest.py gives each pytest-xdist worker (see its docstring)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

try:
    import conftest as C  # tests/ is on sys.path (pytest's default import mode)
except ImportError:
    from tests import conftest as C

WORKER = {"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "6"}


def test_each_worker_gets_its_share_of_the_gpu():
    assert C.xdist_memory_fraction(WORKER) == pytest.approx(0.15)
    assert C.xdist_memory_fraction({**WORKER, "PYTEST_XDIST_WORKER_COUNT": "8"}) == (
        pytest.approx(0.1125))
    # The shares of all workers stay within XDIST_GPU_SHARE of the GPU.
    for n in range(1, 33):
        assert n * C.worker_memory_fraction(n) <= C.XDIST_GPU_SHARE + 1e-12


def test_few_workers_take_no_more_than_jax_default():
    assert C.worker_memory_fraction(1) == C.JAX_DEFAULT_FRACTION == 0.75
    assert C.worker_memory_fraction(2) == pytest.approx(0.45)


def test_no_share_outside_xdist_or_when_the_user_set_one():
    assert C.xdist_memory_fraction({}) is None
    assert C.xdist_memory_fraction({"PYTEST_XDIST_WORKER_COUNT": "6"}) is None
    for name in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION"):
        assert C.xdist_memory_fraction({**WORKER, name: "0.3"}) is None
    # A worker count missing from the environment counts as one worker.
    assert C.xdist_memory_fraction({"PYTEST_XDIST_WORKER": "gw0"}) == 0.75


def test_bad_worker_count():
    with pytest.raises(ValueError, match="at least 1"):
        C.worker_memory_fraction(0)


def test_big_memory_tests_run_beside_three_workers_on_an_h100():
    h100 = 79.2 * 2**30  # what JAX may use of an 80 GB H100 (bytes_limit / fraction, measured)
    assert C.worker_memory_fraction(3) * h100 >= C.BIG_MEMORY_BYTES
    assert C.worker_memory_fraction(4) * h100 < C.BIG_MEMORY_BYTES  # skipped, not failed
    assert C.JAX_DEFAULT_FRACTION * h100 >= C.BIG_MEMORY_BYTES  # alone (no -n) they run


def test_worker_process_sets_the_variable_before_jax_starts():
    """A fresh interpreter importing conftest as an xdist worker does: the variable is set and
    the JAX backend it then starts runs (on the CPU here, where the variable is harmless)."""
    tests_dir = pathlib.Path(C.__file__).parent
    env = {k: v for k, v in os.environ.items() if k not in C.MEM_FRACTION_VARS}
    env.update(WORKER, PYTHONPATH=os.pathsep.join([str(tests_dir), str(tests_dir.parent)]),
               JAX_PLATFORMS="cpu")
    code = ("import os, conftest, jax; jax.devices(); "
            "print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "0.15"
    env["XLA_CLIENT_MEM_FRACTION"] = "0.5"  # the user's setting wins (and is not doubled up)
    code = "import os, conftest; print(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.strip() == "None"


def test_header_names_the_share(monkeypatch):
    class Config:
        class option:
            numprocesses, maxprocesses = 6, None

    for name in C.MEM_FRACTION_VARS:
        monkeypatch.delenv(name, raising=False)
    assert "each of 6 xdist workers may use 0.15 of each GPU" in C.pytest_report_header(Config)
    Config.option.numprocesses, Config.option.maxprocesses = 12, 8  # -n 12 --maxprocesses 8
    assert "each of 8 xdist workers may use 0.1125" in C.pytest_report_header(Config)
    Config.option.numprocesses = 0  # -n 0, or no xdist: nothing to say
    assert C.pytest_report_header(Config) is None
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    assert "set by the user" in C.pytest_report_header(Config)
