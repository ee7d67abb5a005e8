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
