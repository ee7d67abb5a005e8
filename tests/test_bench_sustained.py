"""Plumbing of bench/bench_sustained.py that runs without a GPU: parsing nvidia-smi samples and
averaging them over a time window."""
import datetime as dt
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import bench_sustained as bs  # noqa: E402


def test_samples_parse_and_average_over_a_window():
    lines = ["2026/11/25 03:05:10.100, 1635, 703.46, 62",
             "2026/11/25 03:05:10.350, 1500, 700.00, 63",
             "[N/A], garbage",  # nvidia-smi prints these when a field is unavailable
             "2026/11/25 03:05:11.600, 1980, 80.00, 40"]
    s = bs.parse_samples(lines)
    assert [x[1] for x in s] == [1635.0, 1500.0, 1980.0]
    t0 = dt.datetime(2026, 11, 25, 3, 5, 10).timestamp()
    w = bs.window(s, t0, t0 + 1.0)  # the first two samples only
    assert w == {"sm_clock_mhz": 1568, "power_w": 701.7, "temperature_c": 62.5, "samples": 2}
    assert bs.window(s, t0 + 5, t0 + 6) == {}


def test_step_flops_give_the_readme_floor():
    """The floor uses the step's analytic FLOPs split as bench_dit.py splits them (GEMMs; the
    attention cores): at the burst ceilings, 790 and 627 TFLOP/s, that is the README's 4.93 s."""
    gemm, attn = bs.step_flops()
    assert abs(gemm + attn - 3.4298e15) < 1e11
    assert abs(gemm / 790e12 + attn / 627e12 - 4.93) < 0.005
