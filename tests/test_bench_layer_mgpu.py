"""scripts/bench_layer_mgpu.py's summary of Mosaic GPU's in-kernel profiler trace, on a
synthetic trace in the profiler's format (per warpgroup: its start on the global timer plus SM
clock cycles since its first event, both / 1e3)."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent / "scripts"))
bench_layer_mgpu = pytest.importorskip("bench_layer_mgpu")


def test_profile_regions(tmp_path):
    clock_ghz = 2.0
    events = []
    for cta in range(3):
        start_us = 100.0 + 0.5 * cta  # the CTAs start 0.5 us apart
        # (name, first cycle, last cycle): matmul 4,000 cycles = 2 us; barrier 2,000 + 1,000
        # per CTA index
        for name, begin, end in [("matmul_p0", 0, 4000), ("barrier0", 4000, 6000 + 1000 * cta)]:
            for phase, cycles in (("B", begin), ("E", end)):
                events.append({"name": name, "ph": phase, "ts": start_us + cycles / 1e3,
                               "pid": 1, "tid": 1 + 2 * cta})
    trace = tmp_path / "body-trace.json"
    trace.write_text(json.dumps({"displayTimeUnit": "ns", "traceEvents": events}))
    regions = bench_layer_mgpu.profile_regions(trace, clock_ghz)
    assert regions["matmul_p0"]["ctas"] == 3
    assert regions["matmul_p0"]["mean_us"] == pytest.approx(2.0)
    assert regions["barrier0"]["mean_us"] == pytest.approx(1.5)  # 1, 1.5, 2 us
    assert regions["barrier0"]["max_us"] == pytest.approx(2.0)
    # the last CTA starts 1 us after the first and ends its barrier 4 us after its start
    assert regions["barrier0"]["span_us"] == pytest.approx(1.0 + 4.0 - 2.0)
    assert regions["kernel"]["span_us"] == pytest.approx(1.0 + 4.0)
