"""Does cuDNN attention's speed depend on the batch / layout the DiT hands it?

In the 14B step, cuDNN self-attention takes ~41 ms per 32,760-token item, against ~37 ms in
bench_kernels.py (batch 1, q/k/v views of one QKV buffer). This times, at 32,760 tokens, 40 x 128,
bf16: batch 1 vs batch 2 (the CFG batch), q/k/v as separate contiguous [B, L, H, D] tensors (as
the fast path makes them) vs views of one QKV buffer, and batch 2 run as two batch-1 calls.

    python bench/bench_attention_layout.py
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.kernels.attention import _BACKENDS  # noqa: E402

L, H, D = 32760, 40, 128


def main():
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    cudnn = _BACKENDS["cudnn"]
    rows = []

    def run(name, fn, batch):
        t = time_ms(fn, warmup=3, iters=10)
        fl = 4 * batch * H * D * L * L
        rows.append(dict(name=name, batch=batch, tokens=L, **t,
                         tflops=round(fl / (t["median_ms"] * 1e-3) / 1e12, 1)))
        print(f"{name:40s} {t['median_ms']:8.2f} ms  {rows[-1]['tflops']:6.1f} TFLOP/s", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    for B in (1, 2):
        qkv = torch.randn(B, L, 3, H, D, device="cuda", generator=g).to(torch.bfloat16)
        q, k, v = qkv.unbind(2)
        run(f"cudnn_qkv_views_b{B}", lambda: cudnn(q, k, v), B)
        qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
        run(f"cudnn_contiguous_b{B}", lambda: cudnn(qc, kc, vc), B)
        if B == 2:
            run("cudnn_contiguous_b2_as_2x_b1",
                lambda: [cudnn(qc[i:i + 1], kc[i:i + 1], vc[i:i + 1]) for i in range(2)], 2)
        torch.cuda.empty_cache()
    print("wrote", write_results("attention_layout", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
