"""scripts/profile_decode.py's trace arithmetic: busy time, idle gaps and per-kernel totals."""

import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).parent.parent / "scripts" / "profile_decode.py"
_spec = importlib.util.spec_from_file_location("profile_decode", _path)
profile_decode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_decode)

# (name, start ns, duration ns): two overlapping kernels, a 1.5 us gap, a 50 us gap, a 2 ms gap
EVENTS = [("a", 0, 1000), ("b", 500, 1000), ("a", 3000, 1000), ("c", 54000, 2000),
          ("a", 2056000, 1000)]


def test_busy_time_is_the_union_of_the_intervals():
    assert profile_decode.busy_ns(EVENTS) == 1500 + 1000 + 2000 + 1000


def test_idle_gaps_fall_into_their_bins():
    gaps = {bound: (count, total) for bound, count, total in profile_decode.idle_gaps(EVENTS)}
    assert gaps[2] == (1, pytest.approx(1.5e-3))
    assert gaps[100] == (1, pytest.approx(50e-3))
    assert gaps[float("inf")] == (1, pytest.approx(2.0))
    assert gaps[10][0] == gaps[1000][0] == 0


def test_per_name_totals_costliest_first():
    assert profile_decode.per_name(EVENTS) == [["a", 3, 3.0], ["c", 1, 2.0], ["b", 1, 1.0]]


def test_scope_of_names_the_model_scopes_on_the_op_path():
    scope_of = profile_decode.scope_of
    assert scope_of("jit(f)/while/body/layer_3/mlp/experts/dot_general") == "mlp/experts"
    assert scope_of("jit(f)/layer_0/attention/all_reduce/psum") == "attention/all_reduce"
    assert scope_of("jit(f)/lm_head/dot_general") == "lm_head"
    assert scope_of("jit(f)/while/body/gather") == "other"
    assert scope_of("") == "no op name"


def test_per_scope_sums_each_scope_costliest_first():
    events = [("k1", 0, 3000, {"tf_op": "jit(f)/layer_0/mlp/route/top_k"}),
              ("k2", 0, 1000, {"tf_op": "jit(f)/layer_1/mlp/route/softmax"}),
              ("k3", 0, 5000, {"tf_op": "jit(f)/layer_0/attention/dot"}),
              ("memcpy", 0, 500, {})]
    assert profile_decode.per_scope(events) == [
        ["attention", 1, 5.0], ["mlp/route", 2, 4.0], ["no op name", 1, 0.5]]


HLO = """HloModule jit__packed_decode_steps, entry_computation_layout={()->()}
  %loop_add_fusion.1 = f32[8] fusion(%a), kind=kLoop, calls=%f, metadata={op_name="jit(_packed_decode_steps)/while/body/layer_0/mlp/combine/add"}
  %sort.548 = f32[8] sort(%b), metadata={op_name="jit(_packed_decode_steps)/while/body/layer_0/mlp/route/top_k"}
  %custom-call.3 = (bf16[2]) custom-call(%x), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(_packed_decode_steps)/while/body/layer_0/mlp/experts/pallas_call"}, backend_config={module = "\\00body_mosaic_gpu\\00"}
  %fusion.7 = f32[8] fusion(%c), kind=kLoop, calls=%g, metadata={op_name="jit(_packed_decode_steps)/while/body/layer_0/attention/mul"}
"""  # noqa: E501
OTHER = """HloModule jit__packed_step
  %fusion.7 = f32[8] fusion(%c), kind=kLoop, calls=%g, metadata={op_name="jit(_packed_step)/lm_head/dot"}
"""  # noqa: E501


def test_graph_kernels_take_their_scope_from_the_modules_hlo():
    """Inside a CUDA graph an event names only the command buffer (tf_op "XlaModule:"): its
    kernel name and module find the instruction's op_name in the dumped HLO."""
    modules = profile_decode.hlo_scopes([HLO, OTHER])
    graph = {"hlo_op": "command_buffer_6", "tf_op": "XlaModule:",
             "hlo_module": "jit__packed_decode_steps"}
    events = [("body_mosaic_gpu_kernel", 0, 19000, graph),
              ("sort_548", 0, 3000, graph),
              ("loop_add_fusion_1", 0, 2000, graph),
              ("fusion_7", 0, 1000, graph),
              ("fusion_7", 0, 500, {**graph, "hlo_module": "jit__packed_step"}),
              ("fusion_7", 0, 250, {"tf_op": "XlaModule:"}),  # no module: found in both
              ("MemcpyD2D", 0, 100, graph)]
    assert [profile_decode.event_scope(e, modules) for e in events] == [
        "mlp/experts", "mlp/route", "mlp/combine", "attention", "lm_head", "several", "other"]
    assert profile_decode.per_scope(events, modules)[0] == ["mlp/experts", 1, 19.0]
