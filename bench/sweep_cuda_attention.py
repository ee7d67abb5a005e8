"""Compile-time variants of the bf16 CUDA attention kernel (``csrc/flash_attention_sm90.cu``),
timed side by side in one process.

Each ``--variant NAME=FLAGS`` is the ``cuda`` backend built with FLAGS added to its nvcc flags
(``cuda_attention.cuda_attention(..., defines=FLAGS)``, e.g. ``-DS2V_LAZY_RESCALE=0``). Rounds
interleave the variants (A B C A B C ...) so slow drifts of the clock hit all of them alike; each (variant, shape) row reports the median over rounds of the per-round CUDA-event
medians, plus every round's figure. Accuracy: relative L2 and cosine against fp32 attention on
every 64th query row, on random q/k/v and on ``make_realistic_qkv`` activations (logit std 2).

    python3 bench/sweep_cuda_attention.py --variant nolazy=-DS2V_LAZY_RESCALE=0 --variant lazy8=
    python3 bench/sweep_cuda_attention.py --shapes 2x32760 1x79200 --rounds 3
Writes ``attention_cuda_variants-*.json`` and prints the fastest variant at the first shape.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import time_ms, write_results  # noqa: E402

from s2v_fast.kernels import attention as attn_registry  # noqa: E402
from s2v_fast.kernels import cuda_attention as ca  # noqa: E402
from s2v_fast.kernels import fp8_attention as fa8  # noqa: E402

H, D = 40, 128


def accuracy(out, q, k, v, stride=64):
    return fa8.accuracy(out[:, ::stride], fa8.attention_fp32(q[:, ::stride], k, v))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=None,
                    help="NAME=NVCC_FLAGS (repeatable); default: base=")
    ap.add_argument("--shapes", nargs="+", default=["2x32760", "1x79200"], help="BxL")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--topic", default="attention_cuda_variants")
    args = ap.parse_args(argv)
    variants = {name: tuple(flags.split()) for name, flags in
                (v.split("=", 1) for v in (args.variant or ["base="]))}
    with cf.ThreadPoolExecutor(len(variants)) as pool:  # the nvcc runs are independent
        list(pool.map(lambda d: ca.build("bf16", defines=d), variants.values()))
    fns = {name: (lambda q, k, v, d=d: ca.cuda_attention(q, k, v, defines=d))
           for name, d in variants.items()}
    cudnn = attn_registry._BACKENDS["cudnn"]
    rows = []
    for shape in args.shapes:
        B, L = (int(x) for x in shape.split("x"))
        torch.manual_seed(L)
        qkv = torch.randn(B, L, 3, H, D, device="cuda").to(torch.bfloat16)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        rq, rk, rv = fa8.make_realistic_qkv(1, min(L, 8192), H, D, device="cuda", seed=1)
        flops = 4.0 * B * H * D * L * L
        acc, per_round = {}, {name: [] for name in ["cudnn", *fns]}
        base_out = None
        for name, fn in fns.items():
            got = fn(q, k, v)
            base_out = got if base_out is None else base_out
            acc[name] = dict(**{f"{m}_vs_fp32": x for m, x in accuracy(got, q, k, v).items()},
                             **{f"{m}_vs_fp32_realistic": x for m, x in
                                accuracy(fn(rq, rk, rv), rq, rk, rv).items()},
                             max_abs_diff_vs_first=(got.float() - base_out.float()).abs().max().item())
            del got
        acc["cudnn"] = {f"{m}_vs_fp32": x for m, x in accuracy(cudnn(q, k, v), q, k, v).items()}
        for _ in range(args.rounds):
            per_round["cudnn"].append(time_ms(lambda: cudnn(q, k, v), args.warmup, args.iters)["median_ms"])
            for name, fn in fns.items():
                per_round[name].append(
                    time_ms(lambda: fn(q, k, v), args.warmup, args.iters)["median_ms"])
        for name, times in per_round.items():
            med = sorted(times)[len(times) // 2]
            flags = " ".join(variants[name]) if name in variants else "cudnn"
            row = dict(name=f"attention_{name}_{shape}", variant=name, flags=flags,
                       batch=B, tokens=L, keys=L, heads=H, head_dim=D, median_ms=med,
                       round_medians_ms=times, TFLOPs=flops / med / 1e9, **acc[name])
            rows.append(row)
            print(f"{row['name']:40s} {med:9.3f} ms {row['TFLOPs']:7.1f} TFLOP/s  rounds "
                  + " ".join(f"{flops / t / 1e9:.0f}" for t in times), flush=True)
        q = k = v = qkv = base_out = None  # free before the next shape
        torch.cuda.empty_cache()
    path = write_results(args.topic, rows)
    first = [r for r in rows if r["tokens"] == rows[0]["tokens"] and r["variant"] in fns]
    best = max(first, key=lambda r: r["TFLOPs"])
    print(f"wrote {path}\nbest {best['variant']} {best['flags']}")
    return best


if __name__ == "__main__":
    main()
