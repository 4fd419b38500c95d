"""JAX's persistent compilation cache, on by default so a warm start skips compiling."""

from __future__ import annotations

import logging
import os
import pathlib

import jax

logger = logging.getLogger(__name__)


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("JINFER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jinfer")
    return pathlib.Path(root) / "jax_compilation_cache"


def enable(cache_dir: "str | os.PathLike | None" = None) -> None:
    """Points JAX's persistent cache at `cache_dir` unless the user configured one already."""
    if jax.config.jax_compilation_cache_dir:
        return
    path = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    logger.info("JAX persistent compilation cache at %s", path)
