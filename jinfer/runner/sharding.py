"""Tensor parallelism over the devices of one host (`LLM(..., tensor_parallel_size=N)`), on
`jax.sharding`: a 1-D `Mesh` of the first N of `jax.devices()`, axis "tp".

Design: explicit, as Megatron-LM and vLLM do it, not GSPMD. The jitted step (jinfer.runner.steps)
calls the decoder stack and the LM head through `TensorParallel.forward_hidden` and
`TensorParallel.compute_logits`, which run jinfer.model.decoder's own functions inside
`jax.shard_map` over "tp": every device runs the unchanged decoder on its own attention heads,
its slice of the MLP and its slice of the vocabulary, with a per-device ModelConfig
(`shard_config`: num_heads / N, its KV heads, intermediate_size / N, and `tp_axis="tp"`, which
switches on the decoder's four collectives):

  embedding        each device holds V/N rows; it looks up the tokens in its rows (zeros for the
                   others) and a psum assembles [T, hidden]                 (decoder._embed)
  attention        QKV projection by output columns (the device's heads), RoPE, KV write and
                   paged attention on its heads and its KV heads (the Pallas kernels need
                   nothing special: they see an ordinary, smaller model), output projection by
                   input rows, then psum                                    (decoder._tp_sum)
  MLP              gate/up by output columns, down projection by input rows, then psum
  logits           [T, V/N] per device, all-gathered on the device (tiled) to [T, V_padded],
                   the padding columns dropped: the sampler sees exactly the vocabulary, and
                   nothing goes to the host
Two all-reduces per layer, as in Megatron. Everything outside the shard_map (unpacking the
step's inputs, the sampler, prompt-logprob scoring, the multi-step loop) runs under jit on
replicated arrays, the same on every device; the step's outputs are replicated. Block copies
(copy-on-write) are a jit over the sharded pool that XLA partitions by KV head, with no
communication. Why explicit rather than GSPMD: the collectives are exactly the ones written
above, wherever XLA's propagation would have put them; the attention kernels (Pallas, Mosaic
GPU, Triton) need no partitioning rules; and the TP=1 programs are untouched.

The run layout under TP (global arrays, each with a NamedSharding over "tp"; `param_spec`):
  wqkv [hidden, N * (Hl + 2 Kl) * D], bqkv [N * (Hl + 2 Kl) * D]   columns, re-laid per shard
        as [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...]: a plain column split of [q | k | v] would
        give device 0 only q heads. Device i's slice is its Hl = H / N q heads and the Kl KV
        heads they read.
  w_gate_up [hidden, 2 I]                 columns, re-laid as [gate_0 | up_0 | gate_1 | ...]
  wo [H * D, hidden], w_down [I, hidden]  rows (already in head / MLP-slice order)
  embed [V_padded, hidden]                rows (the vocabulary), padded with zero rows to a
                                          multiple of N
  lm_head [hidden, V_padded]              columns (the vocabulary), padded with zero columns
  norms, q_norm / k_norm [D], final_norm  replicated
  MoE: router_w [hidden, E]               replicated (every device routes every token alike)
       w_gate_up [E, hidden, 2 I]         each expert's columns, re-laid as the dense ones
       w_down [E, I, hidden]              each expert's rows
MoE layers are sharded, by default, over each expert's intermediate dimension, not by expert:
every device holds every expert's 1/N slice, routes all tokens the same way and runs the
unchanged `moe_mlp` on its slices; the combine is linear, so the MLP's one psum sums it exactly
as for a dense MLP. No load imbalance, no all-to-all, E need not divide by N (the trade-off:
each device runs every expert's grouped matmul on 1/N of its width). This is vLLM's default
too, and the better one for decode latency: a batch-1 token's k experts are read by all N
devices at 1/N each, where split by expert they may all sit on one device.

Expert parallelism (`enable_expert_parallel=True`, vLLM's `--enable-expert-parallel`; E must
divide by N): device i holds whole experts i * E/N .. (i + 1) * E/N - 1,
  w_gate_up [E, hidden, 2 I], w_down [E, I, hidden]   split over the expert axis, not re-laid
and, inside the shard_map, routes every token over all E experts (the router is replicated)
and runs `moe_mlp` on its own experts' pairs only (`expert_offset`: the other pairs' rows come
out zero); the same one psum per MLP then adds the devices' parts. The tokens are replicated
on every device under TP, so no all-to-all is needed: each device reads only its experts'
weights and computes only its experts' pairs. Wider grouped matmuls per expert (whole I), at
the price of load imbalance when the routing favours one device's experts. Dense models ignore
the option.

KV heads: where N exceeds the model's KV heads (Kl = max(1, K / N)), devices share them as vLLM
does: device i holds KV head i * K // N (N must be a multiple of K), its copy of wk / wv
included, and its q heads (all of one group) read it. The KV pool [layers, blocks, block_size,
N * Kl, D] is sharded over its KV-head axis: each device holds all blocks of its Kl heads, and
block tables, slots and copy-on-write are the same on every device.

Memory: `gpu_memory_utilization`, `kv_cache_memory_bytes` and the CPU default are per device;
the block count comes from one device's bytes per block (`bytes_per_block(shard_config(...))`),
its share of the weights and its step scratch (jinfer.runner.memory).

Loading: a loader's host (NumPy) arrays are re-laid on the host and placed leaf by leaf with
`jax.device_put(array, NamedSharding)`, which sends each device only its slice; device arrays
(LLM.from_params, update_weights) are re-laid by a jit with out_shardings; random weights
(load_format="dummy") are made sharded, one jitted program per weight name. `get_params()`
under TP returns the ordinary run layout (a re-laid copy of the fused and padded weights).

TP=1 builds no mesh and no shard_map: `tensor_parallel(config, 1)` is None and the runner's code
path is the one-device one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jinfer.model import decoder
from jinfer.model.config import ModelConfig
from jinfer.model.kv_cache import KVCache

AXIS = "tp"

# Run-layout weight names (jinfer.model.decoder) by how they are split over "tp".
REPLICATED = frozenset({"attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm",
                        "k_norm", "final_norm", "router_w"})
BY_COLUMNS = frozenset({"wqkv", "bqkv", "w_gate_up", "lm_head"})  # the last axis
BY_ROWS = frozenset({"wo", "w_down", "embed"})                     # the second to last axis


EXPERT_WEIGHTS = frozenset({"w_gate_up", "w_down"})  # [E, ...] in mixture-of-experts layers


def param_spec(name: str, ndim: int, expert_parallel: bool = False) -> P:
    """The PartitionSpec of the run-layout weight `name` of rank `ndim` (module docstring);
    with `expert_parallel`, experts' weights (rank 3) are split by expert."""
    if expert_parallel and name in EXPERT_WEIGHTS and ndim == 3:
        return P(AXIS, None, None)
    if name in REPLICATED:
        return P()
    if name in BY_COLUMNS:
        return P(*[None] * (ndim - 1), AXIS)
    if name in BY_ROWS:
        return P(*[None] * (ndim - 2), AXIS, None)
    raise ValueError(f"tensor parallelism has no sharding rule for the weight {name!r}; add "
                     f"one to jinfer.runner.sharding")


KV_SPEC = P(None, None, None, AXIS, None)  # [layers, blocks, block_size, kv_heads, head_dim]


def _expert_parallel(config: ModelConfig, expert_parallel: bool) -> bool:
    """Whether the experts are split by expert: asked for, and the model has experts (dense
    models ignore the option, as vLLM's --enable-expert-parallel does)."""
    return bool(expert_parallel and config.num_experts)


def _fits(config: ModelConfig, n: int, expert_parallel: bool = False) -> bool:
    kv = config.num_kv_heads
    split = (config.num_experts if _expert_parallel(config, expert_parallel)
             else config.intermediate_size)
    return config.num_heads % n == 0 and (kv % n == 0 or n % kv == 0) and split % n == 0


def valid_sizes(config: ModelConfig, num_devices: int, expert_parallel: bool = False
                ) -> list[int]:
    """The tensor_parallel_size values this model takes on `num_devices` devices: those that
    divide its attention heads and its (expert) intermediate size (with expert parallelism:
    its number of experts), and that its KV heads divide or are a multiple of."""
    return [n for n in range(1, num_devices + 1) if _fits(config, n, expert_parallel)]


def check_size(config: ModelConfig, n: int, expert_parallel: bool = False) -> None:
    """ValueError, listing the sizes that work, unless `n` devices can run this model."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {n!r}")
    devices = jax.devices()
    if n <= len(devices) and _fits(config, n, expert_parallel):
        return
    works = ", ".join(map(str, valid_sizes(config, len(devices), expert_parallel)))
    if n > len(devices):
        why = (f"this host has only {len(devices)} {devices[0].platform.upper()} "
               f"device{'s' if len(devices) > 1 else ''}")
    else:
        split = (f"its {config.num_experts} experts (expert parallelism)"
                 if _expert_parallel(config, expert_parallel)
                 else f"its intermediate size {config.intermediate_size}")
        why = (f"it must divide the model's {config.num_heads} attention heads and {split}, "
               f"and its {config.num_kv_heads} KV heads must be a multiple of it or divide it")
    raise ValueError(f"tensor_parallel_size={n} does not work: {why}; on this host the model "
                     f"runs with tensor_parallel_size one of {works}")


def tensor_parallel(config: ModelConfig, size: int, expert_parallel: bool = False
                    ) -> Optional["TensorParallel"]:
    """The TensorParallel of this model's shapes over the first `size` devices (checked:
    `check_size`), or None for size 1 (the one-device code path). `expert_parallel`: split a
    mixture-of-experts model's experts by expert (module docstring)."""
    if size == 1:
        return None
    check_size(config, size, expert_parallel)
    return _tensor_parallel(size, config.num_heads, config.num_kv_heads, config.head_dim,
                            config.intermediate_size, config.vocab_size,
                            _expert_parallel(config, expert_parallel))


@functools.lru_cache(maxsize=None)
def _tensor_parallel(size, heads, kv_heads, head_dim, intermediate, vocab,
                     expert_parallel) -> "TensorParallel":
    return TensorParallel(size, heads, kv_heads, head_dim, intermediate, vocab, expert_parallel)


class TensorParallel:
    """One model's layout over a mesh of `size` devices: the weights' and the pool's shardings,
    the fused-column re-layout (to and from the ordinary run layout), and the shard_map
    wrappers of the decoder that the step programs call."""

    def __init__(self, size: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                 vocab: int, expert_parallel: bool = False):
        self.size, self.expert_parallel = size, expert_parallel
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.intermediate, self.vocab = intermediate, vocab
        self.mesh = Mesh(np.array(jax.devices()[:size]), (AXIS,))
        self.local_heads = heads // size
        self.local_kv_heads = max(1, kv_heads // size)
        self.padded_vocab = -(-vocab // size) * size
        self.kv_sharding = NamedSharding(self.mesh, KV_SPEC)
        self._jits: dict = {}

    # -- per-device config and the re-layout ------------------------------------------------
    def shard_config(self, config: ModelConfig) -> ModelConfig:
        """`config` as one device runs it inside the shard_map: its heads, KV heads and MLP
        slice (with expert parallelism: whole experts, the router's number of them), and the
        mesh axis that turns on the decoder's collectives."""
        inter = self.intermediate if self.expert_parallel else self.intermediate // self.size
        return dataclasses.replace(config, num_heads=self.local_heads,
                                   num_kv_heads=self.local_kv_heads, intermediate_size=inter,
                                   tp_axis=AXIS)

    def kv_head_ids(self) -> np.ndarray:
        """[size, Kl] the model's KV heads that each device holds (shared where K < size)."""
        n, kv = self.size, self.kv_heads
        if kv % n == 0:
            return np.arange(kv).reshape(n, kv // n)
        return (np.arange(n) * kv // n)[:, None]

    @functools.cached_property
    def _qkv_columns(self) -> np.ndarray:
        """Index into the ordinary [q | k | v] columns of each TP-layout column."""
        n, d = self.size, self.head_dim
        q = np.arange(self.heads * d).reshape(n, self.local_heads * d)
        k = (self.heads * d + self.kv_head_ids()[:, :, None] * d + np.arange(d)).reshape(n, -1)
        v = k + self.kv_heads * d
        return np.concatenate([q, k, v], axis=1).reshape(-1)

    @functools.cached_property
    def _gate_up_columns(self) -> np.ndarray:
        """Index into the ordinary [gate | up] columns of each TP-layout column."""
        gate = np.arange(self.intermediate).reshape(self.size, -1)
        return np.concatenate([gate, gate + self.intermediate], axis=1).reshape(-1)

    def _columns(self, name: str, ndim: int) -> Optional[np.ndarray]:
        if name == "w_gate_up" and ndim == 3 and self.expert_parallel:
            return None  # whole experts: no column split
        return {"wqkv": self._qkv_columns, "bqkv": self._qkv_columns,
                "w_gate_up": self._gate_up_columns}.get(name)

    def spec(self, name: str, ndim: int) -> P:
        return param_spec(name, ndim, self.expert_parallel)

    def to_layout(self, name: str, x):
        """An ordinary run-layout weight (NumPy or jax) -> its TP layout (same kind)."""
        xp = np if isinstance(x, np.ndarray) else jnp
        columns = self._columns(name, np.ndim(x))
        if columns is not None:
            return xp.take(x, columns, axis=-1)
        pad = self.padded_vocab - self.vocab
        if pad and name == "embed":
            return xp.pad(x, [(0, pad), (0, 0)])
        if pad and name == "lm_head":
            return xp.pad(x, [(0, 0), (0, pad)])
        return x

    def from_layout(self, name: str, x):
        """A TP-layout weight -> the ordinary run layout (the first copy of a shared KV
        head)."""
        columns = self._columns(name, np.ndim(x))
        if columns is not None:
            first = np.unique(columns, return_index=True)[1]
            return jnp.take(x, first, axis=-1)
        if name == "embed":
            return x[:self.vocab]
        if name == "lm_head":
            return x[:, :self.vocab]
        return x

    def _relaid(self, name: str, ndim: int) -> bool:
        return self._columns(name, ndim) is not None or (
            self.padded_vocab != self.vocab and name in ("embed", "lm_head"))

    # -- the weights --------------------------------------------------------------------------
    def param_specs(self, params: dict):
        """The PartitionSpec of every leaf of TP-layout params (any pytree of named leaves)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, x: self.spec(_leaf_name(path), len(x.shape)), params)

    def param_shardings(self, params: dict):
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec),
                            self.param_specs(params), is_leaf=lambda x: isinstance(x, P))

    def place_params(self, params: dict) -> dict:
        """Ordinary run-layout params (NumPy or jax leaves) -> TP layout on the mesh. A host
        array goes through `jax.device_put` with its NamedSharding (each device receives its
        slice only); a device array is re-laid by a jit whose output is sharded."""
        def place(path, x):
            name = _leaf_name(path)
            sharding = NamedSharding(self.mesh, self.spec(name, np.ndim(x)))
            if isinstance(x, np.ndarray) or not self._relaid(name, np.ndim(x)):
                return jax.device_put(self.to_layout(name, x), sharding)
            key = ("to", name, sharding.spec)
            if key not in self._jits:
                self._jits[key] = jax.jit(functools.partial(self.to_layout, name),
                                          out_shardings=sharding)
            return self._jits[key](x)
        return jax.tree_util.tree_map_with_path(place, params)

    def place_host_leaf(self, path, value: np.ndarray) -> jax.Array:
        """One ordinary-layout weight held whole on the host of every process (the same
        values) -> its TP layout on the mesh, each process placing only its devices' shards
        (also where the mesh spans several processes)."""
        name = _leaf_name(path)
        value = self.to_layout(name, value)
        sharding = NamedSharding(self.mesh, self.spec(name, value.ndim))
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    def unshard_params(self, params: dict) -> dict:
        """TP-layout params -> the ordinary run layout (what get_params returns): the re-laid
        weights copied back on the devices, the others as they are."""
        def back(path, x):
            name = _leaf_name(path)
            if not self._relaid(name, np.ndim(x)):
                return x
            key = ("from", name)
            if key not in self._jits:
                self._jits[key] = jax.jit(functools.partial(self.from_layout, name))
            return self._jits[key](x)
        return jax.tree_util.tree_map_with_path(back, params)

    def random_params(self, config: ModelConfig, dtype, seed: int = 0) -> dict:
        """`jinfer.model.shapes.random_params` (the same values) in the TP layout, made on the
        mesh by one jitted program per weight name with sharded outputs (every layer's leaf of
        that name at once; XLA drops the other names' work): the weights never pass through
        one device whole, and the scratch live at a time is one name's."""
        from jinfer.model.shapes import random_run_params

        def make():
            run = random_run_params(config, dtype, seed)
            return jax.tree_util.tree_map_with_path(
                lambda path, x: self.to_layout(_leaf_name(path), x), run)

        shapes = jax.eval_shape(make)
        shardings = self.param_shardings(shapes)
        out = {name: jax.jit(lambda name=name: make()[name],
                             out_shardings=shardings[name])()
               for name in shapes if name != "layers"}
        layers = [dict() for _ in shapes["layers"]]
        for name in shapes["layers"][0]:
            values = jax.jit(lambda name=name: [lp[name] for lp in make()["layers"]],
                             out_shardings=[s[name] for s in shardings["layers"]])()
            for layer, value in zip(layers, values):
                layer[name] = value
        return {**out, "layers": layers}

    # -- the KV pool --------------------------------------------------------------------------
    def kv_shape(self, config: ModelConfig, num_blocks: int, block_size: int) -> tuple:
        return (config.num_layers, num_blocks, block_size, self.size * self.local_kv_heads,
                config.head_dim)

    def init_kv_cache(self, config: ModelConfig, num_blocks: int, block_size: int,
                      dtype) -> KVCache:
        """The zeroed pool, made sharded over its KV-head axis (each device allocates its
        heads only)."""
        shape = self.kv_shape(config, num_blocks, block_size)
        return jax.jit(lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
                       out_shardings=KVCache(k=self.kv_sharding, v=self.kv_sharding))()

    def abstract_kv_cache(self, config: ModelConfig, num_blocks: int, block_size: int,
                          dtype) -> KVCache:
        """The pool's shapes and shardings, nothing allocated (for lowering)."""
        leaf = jax.ShapeDtypeStruct(self.kv_shape(config, num_blocks, block_size),
                                    jnp.dtype(dtype), sharding=self.kv_sharding)
        return KVCache(k=leaf, v=leaf)

    # -- the decoder, per device ----------------------------------------------------------------
    def forward_hidden(self, params: dict, kv_cache: KVCache, token_ids, meta, *,
                       config: ModelConfig, backend, layer_tiling=None,
                       moe_impl: str = "ragged_dot", rope=None):
        """decoder.forward_hidden on every device's shard (module docstring): the final-normed
        hidden states [T, hidden] (replicated) and the pool (sharded)."""
        assert layer_tiling is None, "the layer kernel runs whole weights: not under TP"
        kv_specs = KVCache(k=KV_SPEC, v=KV_SPEC)
        if rope is None:
            rope = decoder.rope_tables(config, meta.positions)
        shard_config = self.shard_config(config)

        def fn(p, kv, t, m, rope):
            return decoder.forward_hidden(p, kv, t, m, config=shard_config, backend=backend,
                                          moe_impl=moe_impl, rope=rope)
        return jax.shard_map(fn, mesh=self.mesh,
                             in_specs=(self.param_specs(params), kv_specs, P(), P(), P()),
                             out_specs=(P(), kv_specs), check_vma=False)(
            params, kv_cache, token_ids, meta, rope)

    def compute_logits(self, params: dict, hidden, config: ModelConfig):
        """decoder.compute_logits on every device's vocabulary slice, all-gathered: float32
        logits [..., vocab] (replicated)."""
        name = "embed" if config.tie_word_embeddings else "lm_head"
        head = {name: params[name]}
        fn = functools.partial(decoder.compute_logits, config=self.shard_config(config))
        return jax.shard_map(lambda head, hidden: fn(head, hidden), mesh=self.mesh,
                             in_specs=(self.param_specs(head), P()), out_specs=P(),
                             check_vma=False)(head, hidden)


def _leaf_name(path) -> str:
    """A params leaf's weight name: the last dict key of its path."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return entry.key
    raise ValueError(f"a params leaf without a name: {jax.tree_util.keystr(path)}")
