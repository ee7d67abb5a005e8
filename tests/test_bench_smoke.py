"""The GPU regression stage's CPU form (bench/gpu_smoke.py --smoke) so the stage cannot rot.

Runs the VAE rows (plain / tiled / sliced on smooth latents) and the tiny-model rows (clip loop,
CLI to a playable MP4) in-process; the DiT rows' code paths are the fast path and fp8 tests
(tests/test_fast_path.py, test_fp8.py, test_bench_fp8_recorder.py), which are too slow under the
Triton interpreter to repeat here. A FAIL row makes main() return 1.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import gpu_smoke  # noqa: E402


def test_gpu_smoke_cpu_form(capsys):
    assert gpu_smoke.main(["--smoke", "--only", "vae", "cli"]) == 0
    out = capsys.readouterr().out
    for row in ("vae_tiled_vs_plain", "vae_sliced_vs_plain", "pipeline_tiny_run_clips", "cli_tiny_generate"):
        assert f"ok   {row}" in out, out


def test_gpu_smoke_marks_a_missed_bound():
    r = gpu_smoke.check(dict(rel_l2=0.5, cosine=0.9, finite=True), 1e-2, 0.9999)
    assert r["ok"] is False and "rel_l2 <= 0.01" in r["bound"]
    assert gpu_smoke.check(dict(rel_l2=1e-3, cosine=1.0, finite=False), 1e-2, 0.9)["ok"] is False


def test_bench_streaming_cpu_form(capsys):
    """bench/bench_streaming.py on the tiny model: the runner + streaming decode + the fp8
    quantised model, the row fields and the fp8-vs-bf16 accuracy check."""
    import bench_streaming

    assert bench_streaming.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "64x64 bf16:" in out and "64x64 fp8:" in out and "cos " in out, out


def test_bench_regression_suite_cpu_form():
    """``pytest bench/ --benchmark-disable -m "not full"``: every benchmark of the pytest-benchmark
    regression suite (bench/test_bench_quick.py) runs its CPU smoke form (tiny shapes, Triton
    interpreter) and its accuracy bound, so the suite cannot rot; the full tier skips (GPU only).
    CUDA is hidden from the child so a GPU machine runs the smoke forms too (~30 s on 2 cores)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-disable", "-q",
                        "-m", "not full", "-p", "no:cacheprovider"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert " passed" in p.stdout and "failed" not in p.stdout, p.stdout[-2000:]
