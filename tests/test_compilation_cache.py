"""JAX's persistent compilation cache (jinfer/runner/compilation_cache.py): where it goes, and
that a cache the user configured is left alone."""

from __future__ import annotations

import jax

from jinfer.runner import compilation_cache


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("JINFER_CACHE_DIR", str(tmp_path / "c"))
    assert compilation_cache.default_cache_dir() == tmp_path / "c" / "jax_compilation_cache"
    monkeypatch.delenv("JINFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert compilation_cache.default_cache_dir() == (tmp_path / "x" / "jinfer"
                                                     / "jax_compilation_cache")


def test_enable_sets_the_cache_once_and_keeps_a_users_choice(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.enable(tmp_path / "ours")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ours")
        assert (tmp_path / "ours").is_dir()
        compilation_cache.enable(tmp_path / "other")  # already configured: unchanged
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "ours")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
