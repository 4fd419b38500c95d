"""scripts/bench_common.py's device-time accounting: which profiler events belong to the code
under a named scope (the kernel being benchmarked) and which to the timing loop around it."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
from jax import lax

_scripts = pathlib.Path(__file__).parent.parent / "scripts"
_spec = importlib.util.spec_from_file_location("bench_common", _scripts / "bench_common.py")
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)

SCOPE = "kernel_under_test"
HLO = """
  %loop_add_fusion.2 = f32[8] fusion(%a), kind=kLoop, calls=%f, metadata={op_name="jit(run)/while/body/add"}
  %loop_slice_fusion = f32[8] fusion(%b), kind=kLoop, calls=%g, metadata={op_name="jit(run)/while/body/kernel_under_test/slice" deduplicated_name="loop_slice_fusion.4"}
  %custom-call.3 = (bf16[2]) custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(run)/while/body/kernel_under_test/pallas_call"}, backend_config={name = "paged_decode_bh16_pp4_s4", grid_x = 1 : i32}
  %custom-call.4 = (bf16[2]) custom-call(%y), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(run)/while/body/kernel_under_test/mpmd_map"}, backend_config={module = "\\00llvm.emit_c_interface\\00ragged_prefill_mgpu_mosaic_gpu\\00ordering\\00"}
  ROOT %tuple.1 = (f32[8]) tuple(%loop_add_fusion.2)
"""  # noqa: E501


def test_scoped_kernels_split_the_instructions_by_scope():
    inside, outside = bench_common.scoped_kernels(HLO, SCOPE)
    assert {"loop_slice_fusion", "loop_slice_fusion_4", "custom-call.3",
            "paged_decode_bh16_pp4_s4", "ragged_prefill_mgpu_mosaic_gpu_kernel"} <= inside
    assert {"loop_add_fusion.2", "loop_add_fusion_2"} <= outside
    assert not inside & outside


def test_events_are_attributed_by_op_name_instruction_or_kernel_name():
    inside, outside = bench_common.scoped_kernels(HLO, SCOPE)
    graph = {"hlo_op": "command_buffer_6", "tf_op": "XlaModule:"}  # a CUDA-graph kernel
    events = [
        ("paged_decode_bh16_pp4_s4", 0, 10, graph),         # kernel name under the scope
        ("loop_slice_fusion", 10, 2, graph),
        ("loop_add_fusion_2", 12, 3, graph),                # the loop's own accumulate
        ("decode_split", 15, 7, {"hlo_op": "custom-call.3", "tf_op": "XlaModule:"}),
        ("some_kernel", 22, 5, {"hlo_op": "x", "tf_op": f"jit(run)/{SCOPE}/dot"}),
        ("MemcpyD2D", 27, 1, {"hlo_op": "copy.10", "tf_op": "XlaModule:"}),
        ("ragged_prefill_mgpu_mosaic_gpu_kernel", 28, 9, graph),  # Mosaic GPU kernel
    ]
    mine = bench_common.events_under_scope(events, inside, outside, SCOPE)
    assert [e[0] for e in mine] == ["paged_decode_bh16_pp4_s4", "loop_slice_fusion",
                                    "decode_split", "some_kernel",
                                    "ragged_prefill_mgpu_mosaic_gpu_kernel"]


def test_measure_reports_device_time_of_the_scoped_code():
    """End to end on the CPU backend (host thunks stand in for kernels): a loop whose scoped
    body is a matmul reports scoped kernels, and fewer than all the loop's kernels."""
    calls = 3

    def run(x):
        def body(_, carry):
            acc, _ = carry
            with jax.named_scope(SCOPE):
                out = lax.optimization_barrier(jnp.tanh(x @ x))
            return acc + out, out
        return lax.fori_loop(0, calls, body, (jnp.zeros_like(x), x))

    x = jnp.ones((64, 64), jnp.float32)
    result = bench_common.measure(jax.jit(run), (x,), calls, 1, scope=SCOPE)
    assert result["device_us"] is not None and result["device_us"] > 0
    assert result["device_kernels_per_call"] > 0
    assert result["device_us"] <= result["device_all_us"]
