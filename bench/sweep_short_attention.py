"""Launch-parameter sweep of the short-key attention kernel (text cross-attention over compacted
prompt keys) at the CFG batch shape: B=2, 40 heads x 128, prompt lengths (37, 118) -> 119 keys.

    python bench/sweep_short_attention.py [--tokens 32760 79200]

Prints ms and GB/s (q read + o write over the 3.0 TB/s copy ceiling) per config, cuDNN over the
512 padded keys and the flash kernel with the key bias alongside; writes
``short_attention_sweep-<device>-<date>.json``.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.kernels.attention import _BACKENDS  # noqa: E402
from s2v_fast.kernels.flash_attention import triton_attention  # noqa: E402
from s2v_fast.kernels.short_attention import short_attention  # noqa: E402
from s2v_fast.fast.text_kv import compact_text_kv  # noqa: E402

H, D, COPY_GBS = 40, 128, 3000.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="*", default=[32760, 79200])
    ap.add_argument("--lens", type=int, nargs=2, default=[37, 118])
    a = ap.parse_args(argv)
    rows = []
    for L in a.tokens:
        torch.manual_seed(L)
        q = torch.randn(2, L, H, D, device="cuda").bfloat16()
        k = torch.randn(2, 512, H, D, device="cuda").bfloat16()
        v = torch.randn(2, 512, H, D, device="cuda").bfloat16()
        for b, n in enumerate(a.lens):
            k[b, n:], v[b, n:] = k[b, -1], v[b, -1]
        kc, vc, bias = compact_text_kv(k, v, a.lens)
        ref = _BACKENDS["cudnn"](q, k, v)
        nbytes = 2 * q.numel() * 2

        def add(name, fn, **extra):
            out = fn()
            ms = time_ms(fn, 3, 20)["median_ms"]
            gbs = nbytes / (ms * 1e-3) / 1e9
            r = dict(name=f"{name}_{L}", tokens=L, keys=kc.shape[1], median_ms=ms, GBps=gbs,
                     frac_copy_ceiling=gbs / COPY_GBS,
                     max_abs_diff_vs_cudnn512=(out.float() - ref.float()).abs().max().item(), **extra)
            rows.append(r)
            print(f"{r['name']:60s} {ms:8.3f} ms {gbs:7.0f} GB/s {100 * gbs / COPY_GBS:5.1f}% "
                  f"diff {r['max_abs_diff_vs_cudnn512']:.2e}", flush=True)

        add("cudnn_512keys", lambda: _BACKENDS["cudnn"](q, k, v))
        add("flash_bias", lambda: triton_attention(q, kc, vc, key_bias=bias))
        for bm, tiles, warps, stages in itertools.product((64, 128), (2, 4, 8, 16), (4, 8), (1, 2, 3)):
            cfg = dict(BLOCK_M=bm, TILES=tiles, num_warps=warps, num_stages=stages)
            try:
                add(f"short_m{bm}_t{tiles}_w{warps}_s{stages}",
                    lambda: short_attention(q, kc, vc, bias, config=cfg), config=str(cfg))
            except Exception as e:  # does not compile (registers / shared memory)
                print(f"short {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    print("wrote", write_results("short_attention_sweep", rows))


if __name__ == "__main__":
    main()
