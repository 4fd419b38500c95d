"""Batch-1 decode: a decoder layer's projections after attention in one persistent Mosaic GPU
kernel (Hopper), from the attention output to the next layer's QKV projection.

At batch 1 a decode step streams every weight once and does almost no arithmetic, so what decides
its speed is how close the weight stream runs to HBM bandwidth and how much time is lost between
kernels. XLA runs a layer as ~13 kernels (GEMMs with split-K reductions, norms, residual adds),
each with its own launch, ramp and tail. This kernel runs, as one grid of `num_ctas` resident
CTAs (one per SM), the four phases

  P0  o   = attn @ wo                                    (split-K partials)
  P1  h1  = h + sum(o);  x = rms_norm(h1) * mlp_norm;  act = silu(x @ w_gate) * (x @ w_up)
  P2  d   = act @ w_down                                 (split-K partials)
  P3  h2  = h1 + sum(d); x = rms_norm(h2) * next_norm; qkv = x @ next_wqkv   (split-K partials)

with a grid-wide barrier between phases (each phase reads what the previous one wrote). P3 is
the next layer's first projection, so per layer the step is: attention kernel, this kernel.
Without a next layer (the last one) it stops after P2, or, given the model's final norm, ends
with the phase FINAL_NORM (CTA 0 writes rms_norm(h1 + sum(d)) * final_norm, the LM head's
input). The first layer's QKV row is P3 alone on the token's embedding
(`decode_row_qkv_mgpu`). The attention output may come as its context splits' softmax states
(fused_decode's partials=True), which P0 merges as it reads its K-range (the engine's path:
jinfer.model.layer_kernel.one_row_decode), and P3's QKV partials go to the attention kernel as
they are. (The layer's attention as a phase of this kernel measured slower end to end: 919.9 vs
941.5 tok/s, BENCHMARKS.md session 12.)

A mixture-of-experts layer (Qwen3-MoE) runs as two kernels of the same body, because which
expert matrices to stream is known only after the router: `decode_moe_router_mgpu` (P0, then
ROUTER: h1 = h + sum(o), x = rms_norm(h1) * mlp_norm, logits = x @ router_w as split-K partials)
and, after the caller's top-k routing, `decode_moe_experts_mgpu` (EXPERT_GATE_UP: each routed
expert's silu(x @ gate) * (x @ up) times its routing weight, the top_k experts' columns side by
side; EXPERT_DOWN: those activations times the experts' down matrices stacked, as split-K
partials; then P3 or FINAL_NORM as above). The memory warpgroup reads each chunk's expert id
from `expert_ids` and streams that expert's matrix; only the top_k experts' weights are read.

The files: decode_layer_plan.py splits each phase's weight over the CTAs (pure Python),
decode_layer_body.py is the kernel body (warp specialised: a memory warpgroup streams weight
chunks through a shared-memory ring, a compute warpgroup builds each phase's input row and
multiplies), this file launches it and holds the jnp references.

Measured (H100, jax 0.11.2, scripts/bench_layer_mgpu.py, Llama-3.2-1B's layer: 121.6 MB of
weights per call): 48.4 us of kernel time; XLA's eleven kernels for the same math 54.3 us. In a
jitted stack of 16 layers dispatched back to back: 50.2 us per layer against XLA's 57.5 (wall).
Without barriers and input builds (timing variants that gave wrong results, since removed) the
kernel streamed in 42.2 us: each costs ~3 us in all, latency that neither more ring slots (4 to
12) nor software-pipelined wgmma waits hid.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.decode_layer_body import (BARRIER_WORDS, FINAL_NORM, INPUTS, make_body,
                                              phase_outputs, scratch_types)
from pallas_kernels.decode_layer_plan import (EXPERT_DOWN, EXPERT_GATE_UP, ROUTER, TailShape,
                                              TailTiling, plan_tail)
from pallas_kernels.mosaic_gpu_cache import stable_kernel_hashes
from pallas_kernels.paged_prefill_mgpu import interpret_params

PROFILE_EVENTS = 64  # profiler entries per warpgroup (2 per region, 3 for a header)
BARRIER_OPERAND = jax.__version_info__ >= (0, 11, 0)  # Refs as kernel operands need jax >= 0.11


def new_barrier_counter() -> jax.Array:
    """A zeroed grid-barrier counter for `decode_layer_tail_mgpu(..., barrier=)`: pass each
    call's returned "barrier" to the next call (any number of calls, any phase counts)."""
    return jnp.zeros((BARRIER_WORDS,), jnp.int16)


def decode_layer_tail_mgpu(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm=None,
                           next_wqkv=None, *, final_norm=None, eps: float,
                           tiling: TailTiling = TailTiling(), barrier: Optional[jax.Array] = None,
                           interpret: Any = None, profile_dir: Optional[str] = None) -> dict:
    """One batch-1 decode row through wo, the MLP and (given) the next layer's QKV projection.

    h [hidden] bf16 (the residual stream entering the layer), attn [q_size] bf16 (the attention
    output) or its context splits before the merge, (acc, max, sum) each float32 [splits,
    q_size] (fused_decode's partials=True: the kernel merges them as it reads them, one XLA
    kernel less); weights in the model's [in, out] layout (w_gate_up: gate then up columns).
    Returns a dict of float32/bf16 buffers: "h1" [hidden] (after attention's residual add),
    "part_d" [splits, hidden] (the MLP output's split-K partials: h2 = h1 + sum), and with a
    next layer "h2" [hidden] and "part_qkv" [splits, qkv_size] (the next QKV row's partials).
    The last layer may take the model's `final_norm` instead: "x" [hidden] is then its output
    row final-normed (rms_norm(bf16(h1 + sum)) * final_norm, the LM head's input).
    ValueError for shapes the tiling does not divide (callers fall back to XLA).

    `barrier` (`new_barrier_counter()`, or the previous call's returned "barrier"): the grid
    barrier's counter, returned updated as "barrier"; without it the kernel allocates one that
    Pallas zero-fills before every call (one small memset kernel more per call). Interpret mode
    and jax < 0.11 (no Ref operands) return it unchanged.

    `profile_dir`: Mosaic GPU's in-kernel profiler writes a Chrome trace of every call there,
    per CTA and warpgroup: the regions load_pN (the memory warpgroup's loads of phase N),
    barrierN, build_pN and matmul_pN (the compute warpgroup's).
    """
    split = isinstance(attn, (tuple, list))
    attn = _check_attn(attn)
    hidden = h.shape[-1]
    q_size = (attn[0] if split else attn).shape[-1]
    has_next = next_wqkv is not None
    if has_next and final_norm is not None:
        raise ValueError("final_norm is the last layer's: pass it without next_wqkv")
    shape = TailShape(hidden, q_size, w_down.shape[0], next_wqkv.shape[1] if has_next else 0,
                      eps)
    _check(shape, h, None if split else attn, wo=wo, mlp_norm=mlp_norm, w_gate_up=w_gate_up,
           w_down=w_down, next_norm=next_norm, next_wqkv=next_wqkv, final_norm=final_norm)
    inputs = dict(h=h.reshape(hidden), wo=wo, mlp_norm=mlp_norm, w_gate_up=w_gate_up,
                  w_down=w_down, **_attn_inputs(attn, q_size))
    if has_next:
        inputs.update(next_norm=next_norm, next_wqkv=next_wqkv)
    if final_norm is not None:
        inputs.update(final_norm=final_norm)
    phases = (0, 1, 2) + ((3,) if has_next else ()) + (
        (FINAL_NORM,) if final_norm is not None else ())
    out = _run(shape, phases, inputs, tiling, barrier, interpret, profile_dir)
    return {k: v for k, v in out.items() if k in ("h1", "part_d", "h2", "part_qkv", "x",
                                                  "barrier")}


def decode_moe_router_mgpu(h, attn, wo, mlp_norm, router_w, *, eps: float, top_k: int,
                           tiling: TailTiling = TailTiling(),
                           barrier: Optional[jax.Array] = None, interpret: Any = None) -> dict:
    """A mixture-of-experts layer's first kernel at batch 1: wo, the residual add, the MLP norm
    and the router, phases P0 and ROUTER. The caller picks the top_k experts from the logits
    (jinfer.model.moe.route, a few small XLA kernels: the experts' weights cannot be streamed
    before they are known) and passes them to `decode_moe_experts_mgpu`.

    h [hidden] bf16, attn as decode_layer_tail_mgpu takes it (a bf16 row or its context
    splits), wo [q_size, hidden], mlp_norm [hidden], router_w [hidden, num_experts] (bf16).
    Returns "h1" [hidden] bf16 (after attention's residual add), "part_logits" [splits,
    num_experts] float32 (split-K partial sums of rms_norm(h1) * mlp_norm @ router_w) and, given
    `barrier`, "barrier". top_k: the model's experts per token (it shapes the plan of the
    experts' kernel; shapes are checked for both kernels here). ValueError for shapes the
    tiling does not divide."""
    split = isinstance(attn, (tuple, list))
    attn = _check_attn(attn)
    hidden, num_experts = router_w.shape
    q_size = (attn[0] if split else attn).shape[-1]
    shape = TailShape(hidden, q_size, 0, 0, eps, num_experts, top_k)
    _check(shape, h, None if split else attn, wo=wo, mlp_norm=mlp_norm, router_w=router_w)
    inputs = dict(h=h.reshape(hidden), wo=wo, mlp_norm=mlp_norm, router_w=router_w,
                  **_attn_inputs(attn, q_size))
    out = _run(shape, (0, ROUTER), inputs, tiling, barrier, interpret)
    return {k: v for k, v in out.items() if k in ("h1", "part_logits", "barrier")}


def decode_moe_experts_mgpu(h1, mlp_norm, expert_ids, expert_weights, w_gate_up, w_down,
                            next_norm=None, next_wqkv=None, *, final_norm=None, eps: float,
                            tiling: TailTiling = TailTiling(),
                            barrier: Optional[jax.Array] = None, interpret: Any = None) -> dict:
    """A mixture-of-experts layer's second kernel at batch 1: the routed experts' SwiGLU and
    (given) the next layer's QKV projection, phases EXPERT_GATE_UP, EXPERT_DOWN and P3 (or
    FINAL_NORM).

    h1 [hidden] bf16 (decode_moe_router_mgpu's), mlp_norm [hidden]; expert_ids [top_k] int32
    and expert_weights [top_k] float32 (the routing: each expert's activation row is scaled by
    its weight before the down projection); w_gate_up [E, hidden, 2 * I] and w_down [E, I,
    hidden] (jinfer.model.moe's layout, bf16); next_norm / next_wqkv or final_norm as
    decode_layer_tail_mgpu takes them. Returns "part_d" [splits, hidden] (the experts' weighted
    sum as split-K partials: h2 = h1 + sum), with a next layer "h2" and "part_qkv", with
    final_norm "x", and given `barrier`, "barrier"."""
    hidden = h1.shape[-1]
    num_experts, _, inter2 = w_gate_up.shape
    top_k = expert_ids.shape[0]
    has_next = next_wqkv is not None
    if has_next and final_norm is not None:
        raise ValueError("final_norm is the last layer's: pass it without next_wqkv")
    shape = TailShape(hidden, 0, inter2 // 2, next_wqkv.shape[1] if has_next else 0, eps,
                      num_experts, top_k)
    _check(shape, h1, None, mlp_norm=mlp_norm, w_gate_up=w_gate_up, w_down=w_down,
           next_norm=next_norm, next_wqkv=next_wqkv, final_norm=final_norm)
    if (expert_ids.shape != (top_k,) or expert_weights.shape != (top_k,)
            or expert_ids.dtype != jnp.int32 or expert_weights.dtype != jnp.float32):
        raise ValueError(f"expert_ids must be int32 [top_k] and expert_weights float32 [top_k], "
                         f"got {expert_ids.dtype}{list(expert_ids.shape)} and "
                         f"{expert_weights.dtype}{list(expert_weights.shape)}")
    inputs = dict(h1=h1.reshape(hidden), mlp_norm=mlp_norm, expert_ids=expert_ids,
                  expert_weights=expert_weights, w_gate_up=w_gate_up, w_down=w_down)
    if has_next:
        inputs.update(next_norm=next_norm, next_wqkv=next_wqkv)
    if final_norm is not None:
        inputs.update(final_norm=final_norm)
    phases = (EXPERT_GATE_UP, EXPERT_DOWN) + ((3,) if has_next else ()) + (
        (FINAL_NORM,) if final_norm is not None else ())
    out = _run(shape, phases, inputs, tiling, barrier, interpret)
    return {k: v for k, v in out.items() if k in ("part_d", "h2", "part_qkv", "x", "barrier")}


def decode_row_qkv_mgpu(h, norm, wqkv, *, eps: float, tiling: TailTiling = TailTiling(),
                        barrier: Optional[jax.Array] = None, interpret: Any = None) -> dict:
    """The first layer's QKV row of a batch-1 decode step: rms_norm(h) * norm @ wqkv as the
    kernel's P3 alone (one launch, no grid barrier), h [hidden] bf16 (the token's embedding).
    Returns {"part_qkv": float32 [splits, qkv_size]} (split-K partial sums, as the fused
    attention kernel takes them) and, given `barrier` (see decode_layer_tail_mgpu), "barrier"."""
    hidden = h.shape[-1]
    shape = TailShape(hidden, 0, 0, wqkv.shape[1], eps)
    _check(shape, h, None, next_norm=norm, next_wqkv=wqkv)
    inputs = dict(h1=h.reshape(hidden), next_norm=norm, next_wqkv=wqkv)
    out = _run(shape, (3,), inputs, tiling, barrier, interpret)
    return {k: v for k, v in out.items() if k in ("part_qkv", "barrier")}


def _run(shape: TailShape, phases: tuple, inputs: dict, tiling: TailTiling, barrier,
         interpret, profile_dir=None) -> dict:
    """Launches `phases` over `inputs` (one kernel; in interpret mode one per phase, the launch
    boundary the grid barrier); returns every buffer the phases wrote, and "barrier"."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if interpret is True:
        interpret = interpret_params()
    plans = plan_tail(shape, tiling)
    outs = phase_outputs(shape, plans, phases)
    if barrier is not None and (barrier.shape != (BARRIER_WORDS,) or barrier.dtype != jnp.int16):
        raise ValueError(f"barrier must come from new_barrier_counter(), got "
                         f"{barrier.dtype}{list(barrier.shape)}")
    use_barrier = barrier is not None and not interpret and BARRIER_OPERAND
    inputs = dict(inputs)
    if use_barrier:
        inputs["barrier"] = jax.new_ref(barrier)  # updated in place, aliased in and out
    scratch = scratch_types(shape, tiling, plans, bool(interpret), use_barrier)
    if not interpret:
        stable_kernel_hashes()  # one compile of the kernel per process, not per step program
    launches = [phases] if not interpret else [(p,) for p in phases]
    produced: dict = {}
    for launch in launches:
        in_names = [n for n in INPUTS if n in inputs] + list(produced)
        out_specs = [o for p in launch for o in outs[p]]
        names = in_names + [o[0] for o in out_specs] + list(scratch)
        body = make_body(shape, tiling, plans, launch, names, bool(interpret))
        # The kernel's name in profiles ("<name>_mosaic_gpu_kernel"), one per kind of launch
        body.__name__ = body.__qualname__ = _kernel_name(launch)
        results = plgpu.kernel(
            body,
            out_type=tuple(jax.ShapeDtypeStruct(s, d) for _, s, d in out_specs),
            scratch_types=tuple(scratch.values()), grid=(tiling.num_ctas,),
            grid_names=("cta",), num_threads=2, thread_name="wg",
            **({"interpret": interpret} if interpret else {}),
            **({"compiler_params": plgpu.CompilerParams(profile_space=PROFILE_EVENTS,
                                                        profile_dir=profile_dir)}
               if profile_dir else {}),
        )(*[inputs[n] if n in inputs else produced[n] for n in in_names])
        produced.update({o[0]: v for o, v in zip(out_specs, results)})
    if barrier is not None:
        produced["barrier"] = jax.ref.freeze(inputs["barrier"]) if use_barrier else barrier
    return produced


def _kernel_name(phases: tuple) -> str:
    if phases[0] == ROUTER or phases[:2] == (0, ROUTER):
        return "moe_router"
    if phases[0] in (EXPERT_GATE_UP, EXPERT_DOWN):
        return "moe_experts"
    if phases == (3,):
        return "row_qkv"
    return "layer_tail"


def _check_attn(attn):
    """attn as a bf16 row, or its context splits (acc, max, sum) checked -> a tuple of them."""
    if not isinstance(attn, (tuple, list)):
        return attn
    attn = tuple(attn)
    if len(attn) != 3 or any(a.ndim != 2 or a.shape != attn[0].shape
                             or a.dtype != jnp.float32 for a in attn):
        raise ValueError("attn as context splits is (acc, max, sum), each float32 "
                         f"[splits, q_size]; got {[(a.dtype, a.shape) for a in attn]}")
    return attn


def _attn_inputs(attn, q_size: int) -> dict:
    if isinstance(attn, tuple):
        return dict(attn_acc=attn[0], attn_max=attn[1], attn_sum=attn[2])
    return dict(attn=attn.reshape(1, q_size))


def _check(shape: TailShape, h, attn, **weights):
    hid, q, inter = shape.hidden, shape.q_size, shape.intermediate
    want = {"wo": (q, hid), "mlp_norm": (hid,), "w_gate_up": (hid, 2 * inter),
            "w_down": (inter, hid), "next_norm": (hid,), "next_wqkv": (hid, shape.qkv_size),
            "final_norm": (hid,), "router_w": (hid, shape.num_experts)}
    if shape.num_experts:
        want.update(w_gate_up=(shape.num_experts, hid, 2 * inter),
                    w_down=(shape.num_experts, inter, hid))
    for name, x in weights.items():
        if x is not None and (x.shape != want[name] or x.dtype != jnp.bfloat16):
            raise ValueError(f"{name} must be bf16 of shape {want[name]}, got "
                             f"{x.dtype}{list(x.shape)}")
    if h.size != hid or h.dtype != jnp.bfloat16:
        raise ValueError(f"h must be one bf16 row of {hid} values, got {h.dtype}{list(h.shape)}")
    if attn is not None and (attn.size != q or attn.dtype != jnp.bfloat16):  # None: splits
        raise ValueError(f"attn must be one bf16 row of {q} values (or its context splits), "
                         f"got {attn.dtype}{list(attn.shape)}")


def decode_layer_tail_reference(h, attn, wo, mlp_norm, w_gate_up, w_down, next_norm=None,
                                next_wqkv=None, *, final_norm=None, eps: float) -> dict:
    """The kernel's arithmetic in jnp (float32 accumulation, the same bf16 roundings); partials
    are returned summed in slot 0 of a [1, n] array (their split is an implementation detail:
    compare sums)."""
    hidden = h.shape[-1]
    h1 = _reference_residual(h.reshape(hidden), attn, wo)
    gu = _reference_matmul(_reference_norm(h1, mlp_norm, eps), w_gate_up)
    gate, up = jnp.split(gu, 2)
    act = (gate * jax.nn.sigmoid(gate) * up).astype(jnp.bfloat16)
    d = _reference_matmul(act, w_down)
    return {"h1": h1, **_reference_layer_end(h1, d, next_norm, next_wqkv, final_norm, eps)}


def _reference_residual(h, attn, wo):
    """h1 = bf16(h + attn @ wo) (float32 sum)."""
    return (h.astype(jnp.float32) + _reference_matmul(attn.reshape(-1), wo)).astype(jnp.bfloat16)


def _reference_layer_end(h1, d, next_norm, next_wqkv, final_norm, eps: float) -> dict:
    """After the MLP's output d (float32): "part_d", and "h2" with the next layer's QKV row
    ("part_qkv") or the final-normed row ("x")."""
    out = {"part_d": d[None]}
    h2 = (h1.astype(jnp.float32) + d).astype(jnp.bfloat16)
    if next_wqkv is not None:
        out.update(h2=h2, part_qkv=_reference_matmul(_reference_norm(h2, next_norm, eps),
                                                     next_wqkv)[None])
    if final_norm is not None:
        out.update(x=_reference_norm(h2, final_norm, eps))
    return out


def decode_moe_router_reference(h, attn, wo, mlp_norm, router_w, *, eps: float) -> dict:
    """decode_moe_router_mgpu's arithmetic in jnp; the logits summed in slot 0 of [1, E]."""
    h1 = _reference_residual(h.reshape(-1), attn, wo)
    x = _reference_norm(h1, mlp_norm, eps)
    return {"h1": h1, "part_logits": _reference_matmul(x, router_w)[None]}


def decode_moe_experts_reference(h1, mlp_norm, expert_ids, expert_weights, w_gate_up, w_down,
                                 next_norm=None, next_wqkv=None, *, final_norm=None,
                                 eps: float) -> dict:
    """decode_moe_experts_mgpu's arithmetic in jnp (each expert's activation row scaled by its
    weight in float32, then rounded to bf16 for the down projection); partials summed in slot
    0 of [1, n]."""
    h1 = h1.reshape(-1)
    x = _reference_norm(h1, mlp_norm, eps)
    d = 0.0
    for slot in range(expert_ids.shape[0]):
        gate, up = jnp.split(_reference_matmul(x, w_gate_up[expert_ids[slot]]), 2)
        act = (gate * jax.nn.sigmoid(gate) * up * expert_weights[slot]).astype(jnp.bfloat16)
        d = d + _reference_matmul(act, w_down[expert_ids[slot]])
    return _reference_layer_end(h1, d, next_norm, next_wqkv, final_norm, eps)


def decode_row_qkv_reference(h, norm, wqkv, *, eps: float) -> dict:
    """decode_row_qkv_mgpu's arithmetic in jnp; the partials summed in slot 0 of [1, n]."""
    return {"part_qkv": _reference_matmul(_reference_norm(h.reshape(-1), norm, eps), wqkv)[None]}


def _reference_norm(row_bf16, weight, eps: float):
    """decode_layer_body._rms_scaled in jnp."""
    x = row_bf16.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(x * x) / x.shape[0] + eps)
    normed = (x * inv).astype(jnp.bfloat16).astype(jnp.float32)
    return (normed * weight.astype(jnp.float32)).astype(jnp.bfloat16)


def _reference_matmul(x, w):
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)


def random_tail_inputs(seed: int, hidden: int, q_size: int, intermediate: int,
                       qkv_size: int = 0) -> dict:
    """Keyword arguments of `decode_layer_tail_mgpu` with random bf16 values (weights scaled by
    1 / sqrt(fan-in), norm weights near 1), for tests and benchmarks; qkv_size 0: no next
    layer."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    bf = jnp.bfloat16

    def weight(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) / shape[0] ** 0.5).astype(bf)

    def norm(k):
        return (1 + 0.1 * jax.random.normal(k, (hidden,), jnp.float32)).astype(bf)
    inputs = dict(h=jax.random.normal(keys[0], (hidden,), bf),
                  attn=jax.random.normal(keys[1], (q_size,), bf),
                  wo=weight(keys[2], (q_size, hidden)), mlp_norm=norm(keys[3]),
                  w_gate_up=weight(keys[4], (hidden, 2 * intermediate)),
                  w_down=weight(keys[5], (intermediate, hidden)))
    if qkv_size:
        inputs.update(next_norm=norm(keys[6]), next_wqkv=weight(keys[7], (hidden, qkv_size)))
    return inputs


def random_moe_inputs(seed: int, hidden: int, q_size: int, num_experts: int, intermediate: int,
                      top_k: int, qkv_size: int = 0) -> dict:
    """Random bf16 inputs of both mixture-of-experts kernels (weights scaled by 1 / sqrt(fan-in),
    norm weights near 1), for tests and benchmarks: h, attn, wo, mlp_norm, router_w, w_gate_up
    [E, hidden, 2 * I], w_down [E, I, hidden] (and next_norm, next_wqkv with qkv_size)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 9)
    bf = jnp.bfloat16

    def weight(k, shape):
        return (jax.random.normal(k, shape, jnp.float32) / shape[-2] ** 0.5).astype(bf)

    def norm(k):
        return (1 + 0.1 * jax.random.normal(k, (hidden,), jnp.float32)).astype(bf)
    inputs = dict(h=jax.random.normal(keys[0], (hidden,), bf),
                  attn=jax.random.normal(keys[1], (q_size,), bf),
                  wo=weight(keys[2], (q_size, hidden)), mlp_norm=norm(keys[3]),
                  router_w=weight(keys[4], (hidden, num_experts)),
                  w_gate_up=weight(keys[5], (num_experts, hidden, 2 * intermediate)),
                  w_down=weight(keys[6], (num_experts, intermediate, hidden)))
    if qkv_size:
        inputs.update(next_norm=norm(keys[7]), next_wqkv=weight(keys[8], (hidden, qkv_size)))
    return inputs
