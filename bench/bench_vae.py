"""VAE decode memory and time: full-size Wan2.1 VAE (random fp32 weights), 448x832, 20 latents.

Modes: ``plain`` (one sample), ``tiled`` (spatial tiles with overlap + blending), ``sliced``
(batch 2 decoded one sample at a time, against ``plain_b2``: both samples at once; slicing only
changes anything for batch > 1). Peak memory is ``torch.cuda.max_memory_allocated`` during the
decode minus the memory held before it (weights + input), reported as ``peak_mem_gb`` (total) and
``decode_extra_gb``. ``max_abs_diff_vs_plain`` is the tiled/sliced output against plain, on
smooth unit-variance latents (``s2v_fast.testing.latents``).

    python bench/bench_vae.py                   # the H100 call (~1-2 min)
    python bench/bench_vae.py --smoke           # tiny VAE on CPU
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402

from s2v_fast.models.vae import WanVAE  # noqa: E402
from s2v_fast.testing.latents import smooth_latents  # noqa: E402

GB = 1e9


@torch.no_grad()
def random_vae(device, dim: int = 96, seed: int = 0) -> WanVAE:
    with torch.device("meta"):
        vae = WanVAE(dim=dim)
    vae = vae.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in vae.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device))
        elif name.endswith("bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=g, device=device))
        else:
            p.copy_(torch.randn(p.shape, generator=g, device=device) / math.sqrt(max(1, p[0].numel())))
    return vae.eval().requires_grad_(False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--latents", type=int, default=20)
    ap.add_argument("--modes", default="plain,tiled,plain_b2,sliced")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.smoke:
        args.height, args.width, args.latents, args.iters = 64, 64, 3, 1
    elif dev.type != "cuda":
        ap.error("needs a CUDA device (use --smoke)")
    vae = random_vae(dev, dim=8 if args.smoke else 96)
    # smooth unit-variance latents, like real ones (white noise exaggerates tiling error)
    z2 = smooth_latents((2, 16, args.latents, args.height // 8, args.width // 8), device=dev)
    z1 = z2[:1].clone()
    rows, ref = [], {}
    tag = f"{args.height}x{args.width}"
    for mode in args.modes.split(","):
        z = z2 if mode in ("plain_b2", "sliced") else z1
        vae.disable_tiling() if hasattr(vae, "disable_tiling") else None
        vae.use_slicing = mode == "sliced"
        if mode == "tiled":
            vae.enable_tiling()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = vae.decode(z)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
        key = "b2" if z is z2 else "b1"
        diff = None
        if mode in ("plain", "plain_b2"):
            ref[key] = out
        elif key in ref:
            diff = float((out - ref[key]).abs().max())
        row = dict(name=f"vae_decode_{tag}_{mode}", mode=mode, batch=z.shape[0], latents=args.latents,
                   frames=out.shape[2], height=args.height, width=args.width, dtype="float32",
                   median_ms=sorted(ts)[len(ts) // 2], runs=len(ts),
                   peak_mem_gb=round(peak / GB, 3), decode_extra_gb=round((peak - base) / GB, 3) if dev.type == "cuda" else None,
                   max_abs_diff_vs_plain=diff)
        rows.append(row)
        print(f"[vae] {row['name']}: {row['median_ms']:.0f} ms, peak {row['peak_mem_gb']} GB "
              f"(+{row['decode_extra_gb']} GB over weights+input), diff {diff}", flush=True)
        del out
    if not args.smoke:
        print("[vae] wrote", write_results("vae", rows))
    return rows


if __name__ == "__main__":
    main()
