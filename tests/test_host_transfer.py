"""Packing a step's host arrays into one int32 buffer (one host-to-device copy) and back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.runner.host_transfer import pack, unpack


def test_round_trip_every_dtype_inside_jit():
    rng = np.random.default_rng(0)
    tree = {
        "ids": rng.integers(-2**31, 2**31 - 1, (3, 5), dtype=np.int64).astype(np.int32),
        "seeds": rng.integers(0, 2**32, (4,), dtype=np.uint64).astype(np.uint32),
        "temps": np.array([0.0, -1.5, np.inf, np.nan, 1e-30], np.float32),
        "mask": rng.random((2, 3)) < 0.5,
        "empty": np.zeros((4, 0), np.int32),
        "nested": [np.arange(7, dtype=np.int32).reshape(7, 1), None],
    }
    buffer, layout = pack(tree)
    assert buffer.dtype == np.int32 and buffer.shape == (layout.size,) == (15 + 4 + 5 + 6 + 7,)
    got = jax.jit(unpack, static_argnums=1)(jnp.asarray(buffer), layout)
    want_leaves, want_def = jax.tree.flatten(tree)
    got_leaves, got_def = jax.tree.flatten(got)
    assert got_def == want_def
    for want, have in zip(want_leaves, got_leaves):
        have = np.asarray(have)
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_array_equal(have.view(np.uint8), want.view(np.uint8))  # bitwise


def test_equal_shapes_give_equal_layouts_and_other_shapes_do_not():
    a = pack({"x": np.zeros(3, np.int32), "y": np.ones(2, np.float32)})[1]
    b = pack({"x": np.ones(3, np.int32), "y": np.zeros(2, np.float32)})[1]
    c = pack({"x": np.ones(4, np.int32), "y": np.zeros(2, np.float32)})[1]
    assert a == b and hash(a) == hash(b) and a != c


def test_unsupported_dtype_says_what_to_use():
    with pytest.raises(TypeError, match="float64.*int32, uint32, float32, bool"):
        pack([np.zeros(2, np.float64)])
