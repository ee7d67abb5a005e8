"""VAE decode / encode time, memory and accuracy: full-size Wan2.1 VAE (random fp32 weights).

Memory modes (``--modes``, 448x832, 20 latents): ``plain`` (one sample), ``tiled`` (spatial tiles
with overlap + blending), ``sliced`` (batch 2 decoded one sample at a time, against ``plain_b2``:
both samples at once; slicing only changes anything for batch > 1). Peak memory is
``torch.cuda.max_memory_allocated`` during the decode minus the memory held before it (weights +
input), reported as ``peak_mem_gb`` (total) and ``decode_extra_gb``. ``max_abs_diff_vs_plain`` is
the tiled/sliced output against plain, on smooth unit-variance latents
(``s2v_fast.testing.latents``).

Fast VAE (mode ``fast``, issue 25; ``s2v_fast.fast.vae.apply_fast_vae``): for each of
``--fast-shapes`` (448x832, 704x384, 704x1280) the fp32 reference and the fast path: decode ms per
latent frame (whole clip of ``--latents``, and the streaming decoder in blocks of 3 latents),
encode ms per pixel frame (the 73-frame motion re-encode), peak memory (``peak_mem_gb``: above
what was allocated before the timed calls: both models' weights and the kept outputs), accuracy of the fast rows
against fp32 (decode: PSNR / max-abs of the clamped video; encode: max-abs / rel L2 of mu) and the
floor computed from the VAE's FLOPs and bytes (``vae_floor``: each conv / attention / norm /
upsample at max(FLOPs / 790 TFLOP/s, bytes / 3.0 TB/s), the H100 ceilings of
../shared/ENVIRONMENT.md; bf16 activations, norm + SiLU fused).

    python bench/bench_vae.py                   # the H100 call (~3-5 min)
    python bench/bench_vae.py --modes fast      # the fast-VAE rows only
    python bench/bench_vae.py --smoke           # small VAE on CPU (every mode)
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

from s2v_fast.models.vae import AttentionBlock, RMSNorm, WanVAE, _Upsample  # noqa: E402
from s2v_fast.fast.vae import apply_fast_vae, decode_accuracy  # noqa: E402
from s2v_fast.testing.latents import smooth_latents  # noqa: E402

GB = 1e9
# H100 ceilings (../shared/ENVIRONMENT.md): bf16 GEMM 787-789 TFLOP/s (the convs are implicit
# GEMMs; cuDNN's bf16 conv kernels are held to the GEMM ceiling), device copy ~3.0 TB/s
PEAK_FLOPS = 790e12
PEAK_BYTES = 3.0e12
FAST_SHAPES = "448x832,704x384,704x1280"
STREAM_BLOCK = 3  # latents per streaming block (LiveAvatar)
ENCODE_FRAMES = 73  # the clip loop's motion re-encode


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


def vae_floor(height: int, width: int, latents: int = 0, frames: int = 0, dim: int = 96,
              act_bytes: int = 2) -> dict:
    """FLOPs, bytes and the floor (ms) of a decode of ``latents`` latent frames or an encode of
    ``frames`` pixel frames at ``height x width``, counted op by op on a meta-device VAE.

    Per op: conv / linear / attention FLOPs (2 per MAC; attention 4*hw^2*c per frame), bytes =
    its input + output activations at ``act_bytes`` (bf16) + weights; RMS_norm (+ SiLU) one read
    and one write (fused); the x2 upsample one read, four writes. Floor = sum over ops of
    max(FLOPs / PEAK_FLOPS, bytes / PEAK_BYTES): every op at the better of its two ceilings."""
    with torch.device("meta"):
        vae = WanVAE(dim=dim)
    tot = dict(flops=0.0, bytes=0.0, floor_s=0.0)

    def add(flops, nbytes):
        tot["flops"] += flops
        tot["bytes"] += nbytes
        tot["floor_s"] += max(flops / PEAK_FLOPS, nbytes / PEAK_BYTES)

    def hook(m, inp, out):
        x = inp[0]
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
            k = m.weight[0].numel()  # in_channels * kernel volume
            add(2.0 * out.numel() * k, (x.numel() + out.numel() + m.weight.numel()) * act_bytes)
        elif isinstance(m, RMSNorm):
            add(0.0, 2 * x.numel() * act_bytes)
        elif isinstance(m, _Upsample):
            add(0.0, (x.numel() + out.numel()) * act_bytes)
        elif isinstance(m, AttentionBlock):  # the two matmuls of SDPA (the convs hook themselves)
            b, c, t, h, w = x.shape
            add(4.0 * b * t * (h * w) ** 2 * c, 4 * x.numel() * act_bytes)

    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d, RMSNorm, _Upsample, AttentionBlock)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        if latents:
            vae._decode_untiled(torch.empty(1, 16, latents, height // 8, width // 8, device="meta"))
        else:
            vae._encode_untiled(torch.empty(1, 3, frames, height, width, device="meta"))
    return dict(tflop=tot["flops"] / 1e12, gbytes=tot["bytes"] / 1e9, floor_ms=tot["floor_s"] * 1e3)


def _timed(fn, iters: int, dev) -> tuple:
    """(median ms, peak GB over the calls above what was allocated before them, last output):
    CUDA-event timing after a warm-up call."""
    fn()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    ts, out = [], None
    for _ in range(iters):
        del out
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    peak = round((torch.cuda.max_memory_allocated() - base) / GB, 3) if cuda else None
    return sorted(ts)[len(ts) // 2], peak, out


def fast_rows(ref: WanVAE, shapes, latents: int, frames: int, iters: int, dev) -> list:
    """fp32 vs fast decode (whole clip, streaming blocks of 3) and encode, per shape."""
    import copy

    fast = apply_fast_vae(copy.deepcopy(ref))
    dim = ref.config["dim"]
    rows = []
    for h, w in shapes:
        tag = f"{h}x{w}"
        z = smooth_latents((1, 16, latents, h // 8, w // 8), seed=7, device=dev)
        n_blk = STREAM_BLOCK * 5  # the stream's first block, then 4 timed blocks
        zs = smooth_latents((1, 16, n_blk, h // 8, w // 8), seed=8, device=dev)
        stream_ref = None
        dec_floor = vae_floor(h, w, latents=latents, dim=dim)
        blk_floor = vae_floor(h, w, latents=STREAM_BLOCK + 1, dim=dim)  # a block after the first
        first = vae_floor(h, w, latents=1, dim=dim)
        blk_floor = {k: blk_floor[k] - first[k] for k in blk_floor}
        enc_floor = vae_floor(h, w, frames=frames, dim=dim)
        video = None
        outs = {}
        for name, vae in (("fp32", ref), ("fast", fast)):
            ms, peak, out = _timed(lambda: vae.decode(z), iters, dev)
            outs[name] = out.float()
            row = dict(name=f"vae_fast_decode_{tag}_{name}", path=name, op="decode", height=h,
                       width=w, latents=latents, frames=out.shape[2], median_ms=ms,
                       ms_per_latent=ms / latents, peak_mem_gb=peak, runs=iters,
                       floor_ms_per_latent=dec_floor["floor_ms"] / latents,
                       tflop_per_latent=dec_floor["tflop"] / latents,
                       tf32=torch.backends.cudnn.allow_tf32 if dev.type == "cuda" else None)
            if name == "fast":
                row.update(decode_accuracy(out, outs["fp32"]))
                row["x_floor"] = row["ms_per_latent"] / row["floor_ms_per_latent"]
            rows.append(row)
            del out
            # streaming: blocks of STREAM_BLOCK latents after the stream's first block
            dec = vae.stream_decoder()
            state = dict(i=n_blk)  # next block's first latent; n_blk: restart the stream

            def one_block():
                if state["i"] >= n_blk:
                    dec.reset()
                    dec.decode(zs[:, :, :STREAM_BLOCK])
                    state["i"] = STREAM_BLOCK
                i = state["i"]
                state["i"] += STREAM_BLOCK
                return dec.decode(zs[:, :, i:i + STREAM_BLOCK])

            ms, peak, _ = _timed(one_block, iters, dev)
            state["i"] = n_blk
            blk = one_block().float()  # latents [3, 6) of a fresh stream
            row = dict(name=f"vae_fast_stream_{tag}_{name}", path=name, op="stream_decode",
                       height=h, width=w, latents_per_block=STREAM_BLOCK, median_ms=ms,
                       ms_per_latent=ms / STREAM_BLOCK, peak_mem_gb=peak, runs=iters,
                       floor_ms_per_block=blk_floor["floor_ms"],
                       floor_ms_per_latent=blk_floor["floor_ms"] / STREAM_BLOCK)
            if name == "fast":  # against the fp32 whole-clip decode of the same latents
                row.update(decode_accuracy(blk, stream_ref))
                row["x_floor"] = row["ms_per_latent"] / row["floor_ms_per_latent"]
            else:
                stream_ref = ref.decode(zs[:, :, :2 * STREAM_BLOCK])[:, :, 1 + 4 * (STREAM_BLOCK - 1):]
            del blk
            rows.append(row)
            if video is None:  # encode input: the fp32 decode's frames (natural-looking video)
                video = outs["fp32"][:, :, :frames]
                if video.shape[2] < frames:
                    reps = -(-frames // video.shape[2])
                    video = video.repeat(1, 1, reps, 1, 1)[:, :, :frames]
                video = video.contiguous()
            ms, peak, mu = _timed(lambda: vae.encode(video), iters, dev)
            outs[name + "_mu"] = mu
            row = dict(name=f"vae_fast_encode_{tag}_{name}", path=name, op="encode", height=h,
                       width=w, frames=frames, median_ms=ms, ms_per_frame=ms / frames,
                       peak_mem_gb=peak, runs=iters,
                       floor_ms_per_frame=enc_floor["floor_ms"] / frames,
                       tflop_per_frame=enc_floor["tflop"] / frames)
            if name == "fast":
                ref_mu = outs["fp32_mu"].double()
                d = mu.double() - ref_mu
                row.update(max_abs=float(d.abs().max()), rel_l2=float(d.norm() / ref_mu.norm()))
                row["x_floor"] = row["ms_per_frame"] / row["floor_ms_per_frame"]
            rows.append(row)
        for r in rows[-6:]:
            acc = (f" PSNR {r['psnr_db']:.1f} dB max-abs {r['max_abs']:.4f}" if "psnr_db" in r
                   else f" max-abs {r['max_abs']:.4f} rel {r['rel_l2']:.2e}" if "rel_l2" in r else "")
            per = (f"{r['ms_per_latent']:.1f} ms/latent" if "ms_per_latent" in r
                   else f"{r['ms_per_frame']:.1f} ms/frame")
            fl = r.get("floor_ms_per_latent", r.get("floor_ms_per_frame"))
            print(f"[vae] {r['name']}: {per} (floor {fl:.3g}), peak {r['peak_mem_gb']} GB{acc}",
                  flush=True)
        outs = video = stream_ref = None  # free before the next shape
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--height", type=int, default=448)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--latents", type=int, default=20)
    ap.add_argument("--modes", default="plain,tiled,plain_b2,sliced,fast")
    ap.add_argument("--fast-shapes", default=FAST_SHAPES, help="HxW list for the fast mode")
    ap.add_argument("--encode-frames", type=int, default=ENCODE_FRAMES)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.smoke:
        args.height, args.width, args.latents, args.iters = 64, 64, 3, 1
        args.fast_shapes, args.encode_frames = "16x24", 5
    elif dev.type != "cuda":
        ap.error("needs a CUDA device (use --smoke)")
    vae = random_vae(dev, dim=8 if args.smoke else 96)
    # smooth unit-variance latents, like real ones (white noise exaggerates tiling error)
    z2 = smooth_latents((2, 16, args.latents, args.height // 8, args.width // 8), device=dev)
    z1 = z2[:1].clone()
    rows, ref = [], {}
    tag = f"{args.height}x{args.width}"
    modes = args.modes.split(",")
    for mode in (m for m in modes if m != "fast"):
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
    if "fast" in modes:
        del z1, z2, ref
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.fast_shapes.split(",")]
        rows += fast_rows(vae, shapes, args.latents if args.smoke else 20, args.encode_frames,
                          args.iters, dev)
    if not args.smoke:
        print("[vae] wrote", write_results("vae", rows))
    return rows


if __name__ == "__main__":
    main()
