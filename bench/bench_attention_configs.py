"""Every tuning entry of our two attention kernels, timed one by one (not just the tuner's winner).

For each token count and each entry of ``flash_attention.FLASH_CONFIGS`` (bf16) and
``fp8_attention.FP8_CONFIGS`` (fp8 e4m3, P.V in fp8), plus the CUDA C++ kernels of
``cuda_attention`` (bf16 and fp8; when nvcc and an sm_90 GPU are there), one self-attention over
[1, L, 40, 128] (the 14B's heads), next to cuDNN SDPA on the same inputs:

* bf16: random q/k/v (views of one QKV buffer, as in the model); the row reports TFLOP/s and the
  max abs difference to cuDNN's output;
* fp8: :func:`fp8_attention.make_realistic_qkv` activations; the row reports the kernel alone
  (inputs quantised once outside the timing) and with the quantisation pass, and the max abs
  difference to the first entry that ran (same numerics, different tiling); the first entry also
  reports its accuracy against fp32 attention (every 64th query row).

CUDA-event medians after warm-up (``results_io.time_ms``). Writes ``attention_configs-*.json``.
Usage: python3 bench/bench_attention_configs.py [--sizes 32760 79200] [--only bf16|cuda|fp8] [--smoke]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.kernels import attention as attn_registry  # noqa: E402
from s2v_fast.kernels import cuda_attention as ca  # noqa: E402
from s2v_fast.kernels import flash_attention as fa  # noqa: E402
from s2v_fast.kernels import fp8_attention as fa8  # noqa: E402

H, D = 40, 128


def _flops(L, Lk):
    return 4.0 * H * D * L * Lk


def _row(name, L, **kw):
    return dict(name=name, tokens=L, keys=L, batch=1, heads=H, head_dim=D, **kw)


def _time(fn, args):
    return time_ms(fn, args.warmup, args.iters)["median_ms"]


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def _measure(row, run, check, args, quant_ms=None):
    """Run once and add ``check(output)`` to the row, then time ``run``: TFLOP/s of the call, or
    for fp8 (``quant_ms`` given) of the kernel alone and with the quantisation pass. An entry that
    fails (e.g. does not compile here) records its error, as the tuners skip it."""
    try:
        row.update(check(run()))
        ms = _time(run, args)
        flops = _flops(row["tokens"], row["keys"])
        if quant_ms is None:
            row.update(median_ms=ms, TFLOPs=flops / ms / 1e9)
        else:
            row.update(kernel_ms=ms, kernel_TFLOPs=flops / ms / 1e9, median_ms=ms + quant_ms,
                       TFLOPs=flops / (ms + quant_ms) / 1e9)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(row, flush=True)
    return row


def _cuda_kernels_here(dev) -> bool:
    return dev == "cuda" and ca.unavailable_reason() is None


def sweep_bf16(L, args, dev):
    torch.manual_seed(L)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    qkv = torch.randn(1, L, 3, H, D, device=dev).to(dt)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    rows = []
    if dev == "cuda":
        cudnn = attn_registry._BACKENDS["cudnn"]
        ref = cudnn(q, k, v)
        ms = _time(lambda: cudnn(q, k, v), args)
        rows.append(_row(f"attention_cudnn_{L}", L, backend="cudnn", median_ms=ms,
                         TFLOPs=_flops(L, L) / ms / 1e9))
    else:
        ref = fa.attention_reference(q, k, v)
    vs_ref = lambda got: dict(max_abs_diff_vs_reference=_maxdiff(got, ref))  # noqa: E731
    out = torch.empty_like(q)
    for i, cfg in enumerate(fa.FLASH_CONFIGS if args.only != "cuda" else []):
        row = _row(f"attention_triton_cfg{i}_{L}", L, backend="triton", config_index=i, config=repr(cfg))
        rows.append(_measure(row, lambda: fa.triton_attention(q, k, v, out=out, config=cfg), vs_ref, args))
    if _cuda_kernels_here(dev):
        row = _row(f"attention_cuda_{L}", L, backend="cuda")
        rows.append(_measure(row, lambda: ca.cuda_attention(q, k, v), vs_ref, args))
    return rows


def _accuracy_vs_fp32(out, q, k, v, stride=64):
    """rel L2 / cosine of every stride-th query row against fp32 attention (all keys)."""
    acc = fa8.accuracy(out[:, ::stride], fa8.attention_fp32(q[:, ::stride], k, v))
    return {f"{name}_vs_fp32": value for name, value in acc.items()}


def sweep_fp8(L, args, dev):
    q, k, v = fa8.make_realistic_qkv(1, L, H, D, L, seed=L, device=dev,
                                     dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
    scale = 1.0 / math.sqrt(D)
    qz = fa8.quantize_qkv(q, k, v, scale, "fp8")
    qms = _time(lambda: fa8.quantize_qkv(q, k, v, scale, "fp8"), args)
    rows, first = [], []
    out = torch.empty_like(q)

    def vs_first(got):  # the first entry that ran: its accuracy; the others: agreement with it
        if not first:
            first.append(got.clone())
            return dict(_accuracy_vs_fp32(got, q, k, v), max_abs_diff_vs_first=0.0)
        return dict(max_abs_diff_vs_first=_maxdiff(got, first[0]))

    for i, cfg in enumerate(fa8.FP8_CONFIGS if args.only != "cuda" else []):
        row = _row(f"attention_fp8_cfg{i}_{L}", L, backend="fp8", pv="fp8", config_index=i,
                   config=repr(cfg), quant_ms=qms)
        run = lambda: fa8.fp8_attention(q, k, v, pv="fp8", out=out, config=cfg, quantized=qz)  # noqa: E731
        rows.append(_measure(row, run, vs_first, args, quant_ms=qms))
    # the CUDA kernel: its own quantisation layout (k_perm32), timed with it; both K scale modes
    for ks in (fa8.K_SCALES if _cuda_kernels_here(dev) else ()):
        quant = lambda: fa8.quantize_qkv(q, k, v, scale, "fp8", k_perm32=True, k_scale=ks)  # noqa: E731
        qzp, pms = quant(), _time(quant, args)
        row = _row(f"attention_cuda_fp8_{ks}_{L}", L, backend="cuda_fp8", pv="fp8", k_scale=ks, quant_ms=pms)
        check = lambda got: dict(_accuracy_vs_fp32(got, q, k, v),  # noqa: E731
                                 **({"max_abs_diff_vs_triton_fp8": _maxdiff(got, first[0])} if first else {}))
        rows.append(_measure(row, lambda: ca.cuda_fp8_attention(q, k, v, quantized=qzp), check, args,
                             quant_ms=pms))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[32760, 79200])
    ap.add_argument("--only", choices=("bf16", "cuda", "fp8"), default=None,
                    help="bf16: Triton + CUDA bf16 entries; fp8: Triton + CUDA fp8 entries; cuda: the CUDA "
                         "kernels only (with cuDNN)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter plumbing check on a tiny shape (no JSON)")
    ap.add_argument("--topic", default="attention_configs")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        global H, D
        H, D = 2, 64
        args.sizes, args.warmup, args.iters = [192], 0, 1
        fa.FLASH_CONFIGS[:] = [c for c in fa.FLASH_CONFIGS if not c.get("TMA")][:2]
        fa8.FP8_CONFIGS[:] = [c for c in fa8.FP8_CONFIGS if not c.get("TMA")][:2]
    elif dev != "cuda":
        sys.exit("needs a CUDA GPU (or --smoke)")
    rows = []
    for L in args.sizes:
        try:
            if args.only in (None, "bf16", "cuda"):
                rows += sweep_bf16(L, args, dev)
            if args.only in (None, "fp8", "cuda"):
                rows += sweep_fp8(L, args, dev)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache() if dev == "cuda" else None
    if not args.smoke:
        print(write_results(args.topic, rows, extra=dict(shape=dict(heads=H, head_dim=D))))
    for r in rows:
        if "TFLOPs" in r:
            print(f"{r['name']:34s} {r['median_ms']:9.2f} ms {r['TFLOPs']:6.0f} TFLOP/s"
                  + (f"  kernel {r['kernel_TFLOPs']:.0f}" if "kernel_TFLOPs" in r else "")
                  + (f"  rel L2 {100 * r['rel_l2_vs_fp32']:.2f}%" if "rel_l2_vs_fp32" in r else ""))
        elif "error" in r:
            print(f"{r['name']:34s} error {r['error'][:80]}")


if __name__ == "__main__":
    main()
