"""pytest-benchmark regression suite of bench/ (test_bench_quick.py, test_bench_full.py).

Tiers (markers, registered in pyproject.toml): ``quick`` and ``full``; see bench/README.md.
Here: the Triton interpreter on a CPU machine, the session's calibration (a bf16 GEMM and an
SDPA call, so runs on different machines compare by ratio), the timing helper every benchmark
uses (``measure``: pytest-benchmark's pedantic mode, synchronised, with CUDA-event medians in
``extra_info``), the accuracy assertion (``check``), and the commit/device stamp of the JSON.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from s2v_fast.testing.interpreter import use_interpreter_without_cuda

# the Triton interpreter must be on before triton is imported anywhere (CPU smoke forms)
CUDA = use_interpreter_without_cuda()

import pytest  # noqa: E402
import torch  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
for p in (BENCH, os.path.dirname(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from results_io import device_tag, environment, time_ms  # noqa: E402

_CALIBRATION: dict = {}


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked benchmarks (no CPU smoke form) skip without CUDA."""
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (no CPU smoke form: the quick tier's "
                                   "smoke forms cover its code path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def calibration() -> dict:
    """Medians (ms) of a bf16 8192x8192x8192 GEMM and of SDPA over 40 heads x 128, 8192 tokens
    (bf16), timed in this session (CUDA events, after warm-up); tiny fp32 stand-ins on a CPU."""
    if not _CALIBRATION:
        torch.manual_seed(0)
        dev = "cuda" if CUDA else "cpu"
        dt = torch.bfloat16 if CUDA else torch.float32
        n, (h, L, d) = (8192, (40, 8192, 128)) if CUDA else (256, (2, 256, 32))
        a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
        q, k, v = (torch.randn(1, h, L, d, device=dev, dtype=dt) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        gemm_ms = time_ms(lambda: a @ b, 5, 20)["median_ms"]
        attn_ms = time_ms(lambda: sdpa(q, k, v), 5, 20)["median_ms"]
        _CALIBRATION.update(
            calib_gemm_ms=gemm_ms, calib_gemm_tflops=2 * n ** 3 / (gemm_ms * 1e-3) / 1e12,
            calib_attention_ms=attn_ms,
            calib_attention_tflops=4 * h * d * L * L / (attn_ms * 1e-3) / 1e12,
            calib_shapes=f"GEMM {n}^3 {dt}; SDPA 1x{h}x{L}x{d} {dt}")
        del a, b, q, k, v
    return dict(_CALIBRATION)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def measure(benchmark, calibration):
    """``measure(fn, rounds=5, warmup_rounds=1, **info)`` -> fn's last output.

    pytest-benchmark's pedantic mode: ``setup`` synchronises before each round and the timed
    call synchronises after ``fn``, so its (host) times are whole GPU executions; CUDA events
    around each call give ``extra_info['cuda_median_ms']`` (warm-up rounds dropped). Also stored:
    the time relative to the session's calibration GEMM and attention, and ``info``. Under
    ``--benchmark-disable`` ``fn`` runs once (the CPU smoke form)."""

    def run(fn, rounds: int = 5, warmup_rounds: int = 1, **info):
        times, last = [], [None]

        def timed():
            last[0] = None  # let the previous output go before this call allocates
            if CUDA:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            last[0] = out
            return out

        _sync()
        benchmark.pedantic(timed, setup=_sync, rounds=rounds, warmup_rounds=warmup_rounds,
                           iterations=1)
        ev = sorted(times[warmup_rounds:] or times)
        med = ev[len(ev) // 2]
        benchmark.extra_info.update(
            cuda_median_ms=med if CUDA else None, host_median_ms=None if CUDA else med,
            timed_rounds=len(ev),
            ratio_to_calib_gemm=med / calibration["calib_gemm_ms"],
            ratio_to_calib_attention=med / calibration["calib_attention_ms"],
            device=device_tag(), **info)
        return last[0]

    return run


def compare(out, ref) -> dict:
    """Relative L2 and cosine of ``out`` against ``ref`` (float64), and whether out is finite."""
    if isinstance(out, (tuple, list)):
        rows = [compare(o, r) for o, r in zip(out, ref)]
        return dict(rel_l2=max(r["rel_l2"] for r in rows), cosine=min(r["cosine"] for r in rows),
                    finite=all(r["finite"] for r in rows))
    o, r = out.detach().double().flatten(), ref.detach().to(out.device).double().flatten()
    rel = float((o - r).norm() / r.norm().clamp_min(1e-300))
    cos = float(torch.nn.functional.cosine_similarity(o, r, dim=0)) if r.norm() > 0 else float(o.norm() == 0)
    return dict(rel_l2=rel, cosine=cos, finite=bool(torch.isfinite(o).all()))


@pytest.fixture
def check(benchmark):
    """``check(out, ref, rel_l2=, cosine=, against='...')``: record the accuracy of ``out``
    against its exact path ``ref`` in ``extra_info`` and assert the stated bound."""

    def run(out, ref, rel_l2: float, cosine: float, against: str = "exact"):
        row = compare(out, ref)
        benchmark.extra_info.update({f"rel_l2_vs_{against}": row["rel_l2"],
                                     f"cosine_vs_{against}": row["cosine"],
                                     f"bound_vs_{against}": f"rel_l2 <= {rel_l2:g}, cos >= {cosine:g}"})
        assert row["finite"], f"non-finite output ({against})"
        assert row["rel_l2"] <= rel_l2 and row["cosine"] >= cosine, \
            f"accuracy vs {against}: rel_l2 {row['rel_l2']:.3g} (<= {rel_l2:g}), cosine {row['cosine']:.6f} (>= {cosine:g})"
        return row

    return run


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Stamp the JSON with the commit (S2V_GIT_COMMIT first: the device machine's .git may be
    stale), the device tag (bench/baselines/<device>/), the versions and the calibration."""
    env = environment()
    output_json["s2v"] = dict(env, device_tag=device_tag(), calibration=dict(_CALIBRATION))
    info = output_json.setdefault("commit_info", {})
    if os.environ.get("S2V_GIT_COMMIT"):
        info["id"] = os.environ["S2V_GIT_COMMIT"]
    elif not info.get("id"):
        try:
            info["id"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                        text=True, cwd=BENCH).stdout.strip() or None
        except Exception:  # pragma: no cover
            pass
