"""One host-to-device copy per step: a pytree of small NumPy arrays packed into one int32 buffer.

A step's inputs are some twenty small arrays (token ids, positions, slots, block tables, the
sampler's per-row parameters). Passed to a jitted function one by one, each is its own
host-to-device transfer, and on a GPU those add up to a large share of a small step. `pack` lays
every leaf end to end in one int32 buffer (float32 and uint32 by their bits, bool as 0/1) and
returns the `PackedLayout` to rebuild them; inside the jitted function `unpack` slices the leaves
back out (free: XLA fuses the slices into their consumers). The layout is static: it holds the
pytree structure and every leaf's dtype and shape, so equal layouts share one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# dtype name -> how it travels in the int32 buffer
_PACKABLE = ("int32", "uint32", "float32", "bool")


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each leaf of a packed pytree lies in the buffer (hashable: a static jit argument)."""

    treedef: Any
    leaves: tuple[tuple[str, int, tuple[int, ...]], ...]  # (dtype name, offset, shape)

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, _, shape in self.leaves)


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """A pytree of NumPy arrays (int32, uint32, float32 or bool) -> (int32 buffer, layout)."""
    arrays, treedef = jax.tree.flatten(tree)
    parts, leaves, offset = [], [], 0
    for array in arrays:
        array = np.asarray(array)
        name = array.dtype.name
        if name not in _PACKABLE:
            raise TypeError(f"cannot pack a {name} array into the step buffer; use one of "
                            f"{', '.join(_PACKABLE)}")
        flat = array.reshape(-1)
        parts.append(flat.astype(np.int32) if name == "bool" else flat.view(np.int32))
        leaves.append((name, offset, array.shape))
        offset += flat.size
    buffer = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
    return buffer, PackedLayout(treedef=treedef, leaves=tuple(leaves))


def unpack(buffer: jax.Array, layout: PackedLayout):
    """The inverse of `pack`, traced inside a jitted function: the pytree of device arrays."""
    arrays = []
    for name, offset, shape in layout.leaves:
        flat = buffer[offset:offset + math.prod(shape)]
        if name == "bool":
            flat = flat != 0
        elif name != "int32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.dtype(name))
        arrays.append(flat.reshape(shape))
    return jax.tree.unflatten(layout.treedef, arrays)
