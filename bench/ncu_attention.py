"""Driver for Nsight Compute: runs the CUDA bf16 and fp8 attention kernels at the 14B shape.

Each kernel runs twice (the first call builds the library and warms up); profile the second:
    ncu --kernel-name regex:"flash_fwd_sm90|fp8_fwd_sm90" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
        python3 bench/ncu_attention.py [--tokens 32760]
(bench/gpu_run.sh stage ``ncuattn``). Prints nothing of its own but the shapes.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from s2v_fast.kernels import cuda_attention as ca  # noqa: E402
from s2v_fast.kernels import fp8_attention as fa8  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=40)
    a = ap.parse_args()
    L, H, D = a.tokens, a.heads, 128
    q, k, v = fa8.make_realistic_qkv(1, L, H, D, seed=0, device="cuda")
    qz = fa8.quantize_qkv(q, k, v, 1 / math.sqrt(D), "fp8", k_perm32=True)
    print(f"[ncu] L={L} H={H} D={D}", flush=True)
    for _ in range(2):
        ca.cuda_attention(q, k, v)
    for _ in range(2):
        ca.cuda_fp8_attention(q, k, v, quantized=qz)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
