"""bench/bench_attention_configs.py --smoke: the per-config sweep runs end to end on the CPU
(Triton interpreter, tiny shape) and reports a time for every entry it tries."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_attention_configs_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", S2V_BENCH_OUT=str(tmp_path))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_attention_configs.py"), "--smoke"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("attention_")]
    assert len(rows) == 4 and all("ms" in line and "error" not in line for line in rows), r.stdout[-2000:]
    assert not os.listdir(tmp_path)  # --smoke writes no results file


def test_cuda_rows_plumbing(monkeypatch):
    """The CUDA-kernel rows (GPU-only) with the kernels stood in by their torch references: one bf16
    row and one fp8 row per K scale mode, timed, with their accuracy fields."""
    import argparse
    import importlib

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    bench = importlib.import_module("bench_attention_configs")
    ca, fa, fa8 = bench.ca, bench.fa, bench.fa8
    monkeypatch.setattr(bench, "H", 2)
    monkeypatch.setattr(bench, "D", 64)
    monkeypatch.setattr(bench, "_cuda_kernels_here", lambda dev: True)
    monkeypatch.setattr(ca, "cuda_attention", lambda q, k, v: fa.attention_reference(q, k, v))
    seen = {}

    def fp8_stand_in(q, k, v, quantized):
        seen.setdefault("Lkp", set()).add(quantized["Lkp"])
        return fa8.fp8_attention_reference(q, k, v, pv="fp8", k_scale=quantized["k_scale"])

    monkeypatch.setattr(ca, "cuda_fp8_attention", fp8_stand_in)
    args = argparse.Namespace(only="cuda", warmup=0, iters=1)
    rows = bench.sweep_bf16(96, args, "cpu") + bench.sweep_fp8(96, args, "cpu")
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"attention_cuda_96", "attention_cuda_fp8_channel_96", "attention_cuda_fp8_token_96"}
    assert by_name["attention_cuda_96"]["max_abs_diff_vs_reference"] == 0.0
    assert seen["Lkp"] == {96} and all(r["median_ms"] > 0 and "error" not in r for r in rows)
    for ks in fa8.K_SCALES:
        fp8_row = by_name[f"attention_cuda_fp8_{ks}_96"]
        # the fp8 emulation on this tiny random draw (96 tokens, head dim 64) measured ~5% vs fp32
        assert fp8_row["k_scale"] == ks and 0 < fp8_row["rel_l2_vs_fp32"] < 0.1
        assert fp8_row["TFLOPs"] < fp8_row["kernel_TFLOPs"]  # the quantisation pass is included
