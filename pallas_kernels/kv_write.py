"""Writes new tokens' K/V rows into the paged pool in place, as a Pallas kernel.

Triton lowering on NVIDIA GPUs; `interpret=True` runs the same kernel code on the CPU (CI).
`write_kv_reference` is the plain-jnp oracle (an XLA scatter, as the "reference" attention backend
writes K/V: `jinfer.model.attention`) with the same semantics.

Design:
- Grid (cdiv(num_tokens, tokens_per_program),). A program copies its tokens' [kv_heads,
  head_dim] rows of K and V to pool[layer, slot // block_size, slot % block_size]. It loads all
  its slots and rows first and then stores, so a program keeps every load in flight at once.
- The pools go in whole (a whole-array BlockSpec, as in paged_decode.py: the kernel gets a
  pointer, nothing is sliced or reshaped outside it) and come out through `input_output_aliases`:
  the outputs are the input buffers. Under `jax.jit(..., donate_argnums=...)` of the pools XLA
  then updates them in place; without donation XLA must keep the caller's pools and copies them
  once before the kernel.
- Triton tiles must have a power-of-two size, so a row whose kv_heads or head_dim is not one
  (SmolLM's 3 or 5 KV heads) is copied as a few power-of-two tiles (3 heads: 2 + 1).
- The new rows are cast to the pool dtype before the kernel (a no-op when they already match),
  so the copy is bitwise.

Semantics, shared with the reference:
- Skipped tokens: a slot < 0 (use -1) or >= num_blocks * block_size writes nothing, and so does
  every token when a traced `layer` is outside [0, layers). Nothing is ever written out of bounds.
- Duplicate slots (the engine's padding tokens all target the pad block 0, offset 0): the row
  ends up holding one of the duplicates' values, element by element; which one is unspecified,
  and on the GPU different elements of the row may come from different tokens (programs run
  concurrently). Only write duplicates to a slot whose contents nobody reads unmasked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

VECTOR_BYTES = 16  # one 128-bit store per thread
MAX_WARPS = 4


def _pow2_chunks(n: int) -> tuple[tuple[int, int], ...]:
    """(start, size) pieces of range(n), each size a power of two, largest first: 6 -> (0, 4),
    (4, 2)."""
    chunks, start = [], 0
    for bit in reversed(range(n.bit_length())):
        if n & (1 << bit):
            chunks.append((start, 1 << bit))
            start += 1 << bit
    return tuple(chunks)


def _write_kernel(layer_ref, slots_ref, k_new_ref, v_new_ref, k_pool_ref, v_pool_ref,
                  k_out_ref, v_out_ref, *, tokens_per_program: int, num_tokens: int):
    """One program: tokens [pid * tokens_per_program, ...) of the batch.

    layer_ref [1] int32; slots_ref [num_tokens] int32; k_new_ref, v_new_ref [num_tokens,
    kv_heads, head_dim]; k_pool_ref, v_pool_ref: the whole pools, aliased to
    k_out_ref, v_out_ref (the kernel only writes through the outputs).
    """
    del k_pool_ref, v_pool_ref
    layers, num_blocks, block_size, kv_heads, head_dim = k_out_ref.shape
    layer = layer_ref[0]
    layer_ok = (layer >= 0) & (layer < layers)
    tiles = [(pl.ds(h0, hs), pl.ds(d0, ds)) for h0, hs in _pow2_chunks(kv_heads)
             for d0, ds in _pow2_chunks(head_dim)]
    first = pl.program_id(0) * tokens_per_program
    # Loads first, so that they are all in flight together; the stores come after.
    rows = []
    for i in range(tokens_per_program):
        token = jnp.minimum(first + i, num_tokens - 1)  # the ragged last program's extra
        slot = slots_ref[token]                          # tokens re-read the last token
        k_tiles = [k_new_ref[token, heads, dims] for heads, dims in tiles]
        v_tiles = [v_new_ref[token, heads, dims] for heads, dims in tiles]
        ok = layer_ok & (slot >= 0) & (slot < num_blocks * block_size)
        if num_tokens % tokens_per_program:
            ok = ok & (first + i < num_tokens)
        rows.append((ok, slot, k_tiles, v_tiles))
    for ok, slot, k_tiles, v_tiles in rows:

        @pl.when(ok)
        def _store(slot=slot, k_tiles=k_tiles, v_tiles=v_tiles):
            block, offset = lax.div(slot, block_size), lax.rem(slot, block_size)  # slot >= 0
            for (heads, dims), k, v in zip(tiles, k_tiles, v_tiles):
                k_out_ref[layer, block, offset, heads, dims] = k
                v_out_ref[layer, block, offset, heads, dims] = v


def _validate(k_pool, v_pool, slot_mapping, k_new, v_new) -> None:
    if k_pool.ndim != 5 or k_pool.shape != v_pool.shape:
        raise ValueError(
            "k_pool and v_pool must both be [layers, num_blocks, block_size, kv_heads, "
            f"head_dim]; got {k_pool.shape} and {v_pool.shape}")
    if k_pool.dtype != v_pool.dtype or not jnp.issubdtype(k_pool.dtype, jnp.floating):
        raise TypeError(f"k_pool and v_pool must share one floating dtype, got {k_pool.dtype} "
                        f"and {v_pool.dtype}")
    if slot_mapping.ndim != 1 or not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be a 1-D integer array [num_tokens], got "
                         f"{slot_mapping.dtype}{list(slot_mapping.shape)}; flatten a "
                         "[batch, q_len] mapping with .reshape(-1)")
    want = (slot_mapping.shape[0], *k_pool.shape[3:])
    if k_new.shape != want or v_new.shape != want:
        raise ValueError(f"k_new and v_new must be [num_tokens, kv_heads, head_dim] = {want} "
                         f"(slot_mapping and pool), got {k_new.shape} and {v_new.shape}")
    for name, new in (("k_new", k_new), ("v_new", v_new)):
        if not jnp.issubdtype(new.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating (it is cast to {k_pool.dtype}), got "
                            f"{new.dtype}")


def _check_layer(layer, layers: int) -> jax.Array:
    """A Python int must be in range (ValueError); a traced one out of range writes nothing."""
    if isinstance(layer, (int, np.integer)) and not 0 <= layer < layers:
        raise ValueError(f"layer={layer} is out of range for a pool of {layers} layers")
    return jnp.asarray(layer, jnp.int32)


def write_kv_reference(
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                    # int or int32 scalar array
    slot_mapping: jax.Array,  # [num_tokens] int, slot = block * block_size + offset; < 0: skip
    k_new: jax.Array,         # [num_tokens, kv_heads, head_dim]
    v_new: jax.Array,         # [num_tokens, kv_heads, head_dim]
) -> tuple[jax.Array, jax.Array]:
    """The XLA-scatter oracle of `write_kv_pallas`, with the same semantics (module docstring).
    In place only under a jit that donates the pools, like the kernel."""
    _validate(k_pool, v_pool, slot_mapping, k_new, v_new)
    layer = _check_layer(layer, k_pool.shape[0])
    return _scatter_rows(k_pool, layer, slot_mapping, k_new), _scatter_rows(
        v_pool, layer, slot_mapping, v_new)


@jax.jit
def _scatter_rows(pool, layer, slots, new):
    layers, num_blocks, block_size = pool.shape[:3]
    ok = (slots >= 0) & (slots < num_blocks * block_size) & (layer >= 0) & (layer < layers)
    # jnp wraps negative indices before mode="drop" applies: send skipped rows past the end.
    blocks = jnp.where(ok, slots // block_size, num_blocks)
    return pool.at[layer, blocks, slots % block_size].set(new.astype(pool.dtype), mode="drop")


def write_kv_pallas(
    k_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    v_pool: jax.Array,        # [layers, num_blocks, block_size, kv_heads, head_dim]
    layer,                    # int or int32 scalar array: which layer of the pools to write
    slot_mapping: jax.Array,  # [num_tokens] int, slot = block * block_size + offset; < 0: skip
    k_new: jax.Array,         # [num_tokens, kv_heads, head_dim], cast to the pool dtype
    v_new: jax.Array,         # [num_tokens, kv_heads, head_dim], cast to the pool dtype
    *,
    interpret: bool | None = None,
    tokens_per_program: int | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array]:  # the updated (k_pool, v_pool)
    """Stores token t's K/V rows at pool[layer, slot // block_size, slot % block_size] for
    slot = slot_mapping[t]; every other element of the pools is unchanged.

    The outputs alias the input pools: call it inside a jit that donates them (or that carries
    them through a loop) and the pools are updated in place, never copied. Skipped and
    duplicate slots: see the module docstring.

    interpret defaults to True on a CPU backend; tokens_per_program (default: 1 for up to
    2,048 tokens, else 4) and num_warps tune the GPU launch.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _validate(k_pool, v_pool, slot_mapping, k_new, v_new)
    if tokens_per_program is not None and tokens_per_program < 1:
        raise ValueError(f"tokens_per_program must be >= 1 or None, got {tokens_per_program}")
    if num_warps is not None and (num_warps < 1 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two (Triton's requirement) or None, got "
                         f"{num_warps}")
    layer = _check_layer(layer, k_pool.shape[0]).reshape(1)
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return k_pool, v_pool
    if tokens_per_program is None:
        tokens_per_program = 1 if num_tokens <= 2048 else 4
    return _write_kv(k_pool, v_pool, layer, slot_mapping.astype(jnp.int32),
                     k_new.astype(k_pool.dtype), v_new.astype(v_pool.dtype),
                     tokens_per_program=int(tokens_per_program), interpret=bool(interpret),
                     num_warps=num_warps)


@functools.partial(jax.jit, static_argnames=("tokens_per_program", "interpret", "num_warps"))
def _write_kv(k_pool, v_pool, layer, slots, k_new, v_new, *, tokens_per_program: int,
              interpret: bool, num_warps):
    """Launches the kernel: the pools in whole and aliased to the outputs."""
    num_tokens = slots.shape[0]
    grid = pl.cdiv(num_tokens, tokens_per_program)
    whole = lambda arr: pl.BlockSpec(arr.shape, lambda i: (0,) * arr.ndim)  # noqa: E731
    kernel = functools.partial(_write_kernel, tokens_per_program=tokens_per_program,
                               num_tokens=num_tokens)
    row_bytes = k_new.shape[1] * k_new.shape[2] * k_new.dtype.itemsize
    return pl.pallas_call(
        kernel, grid=(grid,),
        in_specs=[whole(layer), whole(slots), whole(k_new), whole(v_new), whole(k_pool),
                  whole(v_pool)],
        out_specs=[whole(k_pool), whole(v_pool)],
        out_shape=[jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype),
                   jax.ShapeDtypeStruct(v_pool.shape, v_pool.dtype)],
        input_output_aliases={4: 0, 5: 1}, interpret=interpret,
        compiler_params=_triton_params(num_warps, row_bytes),
        name=f"write_kv_t{tokens_per_program}",
    )(layer, slots, k_new, v_new, k_pool, v_pool)


def _triton_params(num_warps, row_bytes: int):
    """Triton compiler parameters (this also selects the Triton lowering over Mosaic GPU).
    Default warps: about one 16-byte store per thread per row, rounded down to a power of two
    (Triton needs one: 3 warps, e.g. for 5 float32 heads of dim 96, crashed its compile), 1 to
    MAX_WARPS."""
    from jax.experimental.pallas import triton as plgpu  # GPU-only module, CPU-importable
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    if num_warps is None:
        wanted = min(MAX_WARPS, max(1, row_bytes // (32 * VECTOR_BYTES)))
        num_warps = 1 << (wanted.bit_length() - 1)
    return params_cls(num_warps=num_warps, num_stages=1)
