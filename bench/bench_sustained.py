"""Burst vs sustained throughput of the step's two heavy ops, with the SM clock and board power.

The 14B step keeps the GPU busy for seconds, long enough to reach the board power limit (700 W
on the H100 SXM): the SM clock then drops from 1980 MHz to ~1.4-1.5 GHz and every op slows down
with it. Ceilings measured over a few calls after an idle period (ENVIRONMENT.md, performance.md)
are burst figures; this script measures both for each workload:

* idle ``--idle`` seconds (clocks and power settle back), then back-to-back calls for
  ``--seconds``, each call timed with CUDA events;
* burst: median of the first 3 calls; sustained: median of the calls in the second half;
* SM clock, power and temperature from ``nvidia-smi -lms 100`` sampled over the same windows.

Workloads (fresh random inputs, never zeros): the step's bf16 GEMM shapes at CFG batch 2
(M = 65,520 tokens: 5120x5120, 5120->13824, 13824->5120), and self-attention B=2 x 32,760 x 40
heads x 128 with cuDNN SDPA and our ``cuda`` kernel. The summary row gives the issue's floor
(GEMM FLOPs at the GEMM ceiling + attention FLOPs at the cuDNN ceiling) from burst and from
sustained figures. Writes ``sustained-*.json``.

    python3 bench/bench_sustained.py [--seconds 8] [--idle 4]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402

from s2v_fast.kernels import attention as attn  # noqa: E402
from s2v_fast.kernels import cuda_attention as ca  # noqa: E402
from s2v_fast.profiling.flops import dit_forward_flops, s2v_token_counts  # noqa: E402

M, C, FF, H, D, L, B = 65520, 5120, 13824, 40, 128, 32760, 2


def step_flops() -> tuple:
    """GEMM and attention FLOPs of one 14B CFG step (batch 2) at 448x832, 80 frames."""
    tc = s2v_token_counts(448, 832, 80)
    f = dit_forward_flops(None, tokens=tc["total"], video_tokens=tc["video"])
    return 2 * f.gemm, 2 * (f.total - f.gemm)


def parse_samples(lines) -> list:
    """(epoch seconds, SM MHz, W, degrees C) from ``nvidia-smi --format=csv,noheader,nounits`` lines
    of timestamp, clocks.sm, power.draw, temperature.gpu; lines that do not parse are skipped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            out.append((t, float(parts[1]), float(parts[2]), float(parts[3])))
        except (ValueError, IndexError):
            continue
    return out


def window(samples, t0: float, t1: float) -> dict:
    """Mean clock, power and temperature of the samples taken in [t0, t1]."""
    s = [x for x in samples if t0 <= x[0] <= t1]
    if not s:
        return {}
    return {"sm_clock_mhz": round(statistics.mean(x[1] for x in s)),
            "power_w": round(statistics.mean(x[2] for x in s), 1),
            "temperature_c": round(statistics.mean(x[3] for x in s), 1), "samples": len(s)}


class SmiLog:
    """``nvidia-smi`` sampling clocks.sm / power.draw / temperature every 100 ms into a file."""

    def __enter__(self):
        fd, self.path = tempfile.mkstemp(suffix=".csv")
        self.f = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
             "--format=csv,noheader,nounits", "-lms", "100"], stdout=self.f, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait()
        self.f.close()
        with open(self.path) as f:
            self.samples = parse_samples(f)
        os.unlink(self.path)

    def window(self, t0: float, t1: float) -> dict:
        return window(self.samples, t0, t1)


def run_workload(name, fn, flop, args, smi_ranges):
    torch.cuda.synchronize()
    time.sleep(args.idle)
    calls = []  # (host end time, ms)
    t_start = time.time()
    while time.time() - t_start < args.seconds:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        calls.append((time.time(), e0.elapsed_time(e1)))
    burst = statistics.median(ms for _, ms in calls[:3])
    half = t_start + args.seconds / 2
    late = [ms for t, ms in calls if t >= half]
    sustained = statistics.median(late)
    smi_ranges.append((name, t_start, t_start + min(0.3, args.seconds), half, calls[-1][0]))
    return dict(name=name, flop=flop, calls=len(calls), burst_ms=burst, sustained_ms=sustained,
                burst_TFLOPs=flop / burst / 1e9, sustained_TFLOPs=flop / sustained / 1e9)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--idle", type=float, default=4.0)
    ap.add_argument("--topic", default="sustained")
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(M, C, device=dev, dtype=torch.bfloat16)
    xf = torch.randn(M, FF, device=dev, dtype=torch.bfloat16)
    w = torch.randn(C, C, device=dev, dtype=torch.bfloat16) / C ** 0.5
    w_up = torch.randn(FF, C, device=dev, dtype=torch.bfloat16) / C ** 0.5
    w_down = torch.randn(C, FF, device=dev, dtype=torch.bfloat16) / FF ** 0.5
    bias, bias_up = torch.randn(C, device=dev, dtype=torch.bfloat16), torch.randn(FF, device=dev, dtype=torch.bfloat16)
    qkv = torch.randn(B, L, 3, H, D, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn_flop = 4.0 * B * H * D * L * L
    workloads = [
        (f"gemm_{M}x{C}x{C}", lambda: F.linear(x, w, bias), 2.0 * M * C * C),
        (f"gemm_{M}x{FF}x{C}_gelu", lambda: torch._addmm_activation(bias_up, x, w_up.t(), use_gelu=True),
         2.0 * M * FF * C),
        (f"gemm_{M}x{C}x{FF}", lambda: F.linear(xf, w_down, bias), 2.0 * M * C * FF),
        (f"attention_cudnn_{B}x{L}", lambda: attn._BACKENDS["cudnn"](q, k, v), attn_flop),
    ]
    if ca.unavailable_reason() is None:
        workloads.append((f"attention_cuda_{B}x{L}", lambda: ca.cuda_attention(q, k, v), attn_flop))
    rows, ranges = [], []
    with SmiLog() as smi:
        for name, fn, flop in workloads:
            fn()  # build / autotune outside the windows
            rows.append(run_workload(name, fn, flop, args, ranges))
            print(f"{name:34s} burst {rows[-1]['burst_TFLOPs']:6.1f}  sustained "
                  f"{rows[-1]['sustained_TFLOPs']:6.1f} TFLOP/s", flush=True)
    for row, (_, t0, t_burst, t_half, t_end) in zip(rows, ranges):
        row["burst_window"] = smi.window(t0 - 0.15, t_burst)
        row["sustained_window"] = smi.window(t_half, t_end)
        print(row["name"], "burst", row["burst_window"], "sustained", row["sustained_window"])
    gemm = [r for r in rows if r["name"].startswith("gemm")]
    cudnn = next(r for r in rows if "cudnn" in r["name"])
    ours = next((r for r in rows if "attention_cuda" in r["name"]), None)
    step_gemm, step_attn = step_flops()
    summary = {"name": "step_floor_448x832", "step_gemm_flop": step_gemm, "step_attention_flop": step_attn}
    for kind in ("burst", "sustained"):
        g = sum(r["flop"] for r in gemm) / sum(r[f"{kind}_ms"] for r in gemm) / 1e9  # FLOP-weighted rate
        summary[f"gemm_{kind}_TFLOPs"] = g
        summary[f"floor_{kind}_ms"] = (step_gemm / g + step_attn / cudnn[f"{kind}_TFLOPs"]) / 1e9
        if ours:
            summary[f"floor_{kind}_ours_ms"] = (step_gemm / g + step_attn / ours[f"{kind}_TFLOPs"]) / 1e9
    rows.append(summary)
    print(summary)
    print("wrote", write_results(args.topic, rows))


if __name__ == "__main__":
    main()
