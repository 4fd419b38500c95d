"""scripts/bench_tp.py's arithmetic: speedup and efficiency over the TP=1 row."""

import importlib.util
import pathlib

import pytest

_path = pathlib.Path(__file__).parent.parent / "scripts" / "bench_tp.py"
_spec = importlib.util.spec_from_file_location("bench_tp", _path)
bench_tp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_tp)


def test_speedup_and_efficiency_are_over_the_tp1_row():
    rows = [{"tp": 1, "latency": {"decode_tok_s": 100.0}},
            {"tp": 2, "latency": {"decode_tok_s": 170.0}},
            {"tp": 4, "note": "skipped: 2 devices visible"}]
    bench_tp.add_scaling(rows, "latency", "decode_tok_s")
    assert rows[1]["latency"]["speedup"] == pytest.approx(1.7)
    assert rows[1]["latency"]["efficiency"] == pytest.approx(0.85)
    assert rows[0]["latency"]["efficiency"] == pytest.approx(1.0)
    assert "latency" not in rows[2]


def test_no_tp1_row_means_no_scaling():
    rows = [{"tp": 2, "throughput": {"output_tok_s": 5.0}}]
    bench_tp.add_scaling(rows, "throughput", "output_tok_s")
    assert "speedup" not in rows[0]["throughput"]


def test_cpu_children_see_eight_virtual_devices_and_nvls_off(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    env = bench_tp.child_env(cpu=True)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"


def test_each_concurrency_is_a_throughput_run_and_startup_is_asked_for():
    """--concurrency 64 256: two throughput runs (max_num_seqs 64 and 256, no sweep), each
    scaled over its own TP=1 run; --startup adds bench_startup on the model's shape."""
    args = bench_tp.argparse.Namespace(
        cpu_smoke=False, model_shape="llama3-70b", full=False, dtype=None, latency=True,
        throughput=True, concurrency=[64, 256], startup=True)
    runs = {key: (script, script_args) for key, script, script_args, _ in
            bench_tp.benchmarks(args)}
    assert list(runs) == ["latency", "throughput@64", "throughput@256", "startup"]
    assert runs["throughput@64"] == ("bench_throughput.py", [
        "--model-shape", "llama3-70b", "--skip-hf", "--quick", "--max-num-seqs", "64",
        "--sweep"])
    assert runs["startup"] == ("bench_startup.py", [
        "--model-shape", "llama3-70b", "--dtype", "bfloat16", "--warm-runs", "1"])
    rows = [{"tp": 4, "throughput@64": {"output_tok_s": 100.0}},
            {"tp": 8, "throughput@64": {"output_tok_s": 150.0}}]
    bench_tp.add_scaling(rows, "throughput@64", "output_tok_s")
    assert "speedup" not in rows[1]["throughput@64"]  # no TP=1 row: nothing to scale by
