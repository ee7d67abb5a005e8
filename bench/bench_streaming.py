"""The streaming mode (LiveAvatar: 4 steps per block of 3 latent frames) on one GPU.

    python bench/bench_streaming.py                         # 704x384: bf16 reference, fused bf16, fused fp8
    python bench/bench_streaming.py --sizes 704x384,720x400,448x832 --blocks 10
    python bench/bench_streaming.py --smoke                 # tiny model on the CPU (CI)

Sizes are HxW (704x384 = LiveAvatar's 9:16 portrait). Full-size random bf16 DiT weights
(bench/dit_common.py) and a random full-size Wan2.1 VAE; the clip/block/step loop is the package's
``StreamingRunner`` (prefill, per-step ring caches, rd, audio windows) with the streaming VAE
decode after every block, as ``generate --mode liveavatar`` runs it. Per block, CUDA events
around the 4 DiT forwards (+ Euler) and around the decode; steady state = the blocks after the
rolling cache is full (block index >= 4), median. FPS = 12 frames / (DiT + decode) per block,
serial on one GPU. Time to first frame: from the prefill to the first block's frames (inputs
encoded and the model loaded before). The floor is the FLOP count of one forward
(``profiling.flops.streaming_forward_flops``) at the measured H100 ceilings
(../shared/ENVIRONMENT.md: GEMM 790 / fp8 1,330, attention 627 / fp8 ~880 TFLOP/s), DiT only.
Modes: ``bf16_reference`` (the reference block-causal forward, models/causal.py), ``bf16`` and
``fp8`` (the fused forward, fast/causal.py, as ``--precision fast`` runs it). Accuracy per row:
cosine and relative L2 of the last block's latents against the first mode's run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402

from s2v_fast.fast import set_precision  # noqa: E402

from s2v_fast.profiling.flops import streaming_forward_flops  # noqa: E402
from s2v_fast.streaming.preset import StreamingSettings  # noqa: E402
from s2v_fast.streaming.runner import StreamingRunner  # noqa: E402

CEILINGS = {"bf16": (790e12, 627e12), "fp8": (1330e12, 880e12)}  # (GEMM, attention) FLOP/s
STEADY_FROM = 4  # blocks: the 12-frame ring holds 4 blocks


def floor_ms(config, block_tokens, key_tokens, mode) -> float:
    f = streaming_forward_flops(config, block_tokens=block_tokens, key_tokens=key_tokens,
                                num_layers=config.num_layers,
                                num_audio_injections=len(config.audio_inject_layers))
    gemm, attn = CEILINGS["fp8" if mode == "fp8" else "bf16"]
    return 1e3 * (f.gemm / gemm + (f.attention + f._cross_core) / attn)


def make_inputs(model, height, width, clips, settings, seed=3):
    c = model.config
    dev = model.device
    g = torch.Generator(device=dev).manual_seed(seed)
    lh, lw = height // 8, width // 8

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    return dict(context=rnd(40, c.text_dim).to(model.compute_dtype),
                ref_latents=rnd(1, 16, 1, lh, lw), motion_latents=rnd(1, 16, 19, lh, lw),
                audio=rnd(1, 25, c.audio_dim, settings.frames_per_clip * clips).to(model.compute_dtype),
                num_clips=clips)


def run_stream(model, vae, height, width, blocks, settings):
    """Per-block DiT / decode ms (CUDA events, or the host clock on a CPU), the first frame's
    seconds, the last block's latents and the peak memory."""
    cuda = model.device.type == "cuda"
    clips = -(-blocks // settings.blocks_per_clip)
    inputs = make_inputs(model, height, width, clips, settings)
    runner = StreamingRunner(model, settings)
    decoder = vae.stream_decoder() if vae is not None else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if decoder is not None:
        decoder.warmup(inputs["motion_latents"][:, :, :settings.warmup_latents])

    def event():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(a, b):
        return a.elapsed_time(b) if cuda else 1e3 * (b - a)

    marks, first_frame, last = [], None, None
    it = runner.stream(**inputs)
    for _ in range(blocks):
        a = event()
        blk = next(it)
        b = event()
        if decoder is not None:
            decoder.decode(blk.latents.float())
        c = event()
        if first_frame is None:
            if cuda:
                torch.cuda.synchronize()
            first_frame = time.perf_counter() - t0
        marks.append((a, b, c))
        last = blk.latents
    if cuda:
        torch.cuda.synchronize()
    dit = [ms(a, b) for a, b, _ in marks]
    dec = [ms(b, c) for _, b, c in marks]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    key_tokens = runner.caches[0].capacity + runner.cond.num_tokens
    del runner, it
    return dict(dit_ms=dit, decode_ms=dec, first_frame_s=first_frame, peak=peak,
                latents=last.float().cpu(), key_tokens=key_tokens)


def summarize(size, mode, res, model, settings, ref_latents=None) -> dict:
    h, w = size
    steady = slice(STEADY_FROM, None) if len(res["dit_ms"]) > STEADY_FROM else slice(None)
    dit = statistics.median(res["dit_ms"][steady])
    dec = statistics.median(res["decode_ms"][steady])
    frames = settings.video_frames_per_block
    block_tokens = settings.block_frames * (h // 16) * (w // 16)
    floor = floor_ms(model.config, block_tokens, res["key_tokens"], mode) * settings.steps
    row = dict(size=f"{h}x{w}", mode=mode, layers=model.config.num_layers,
               block_tokens=block_tokens, key_tokens=res["key_tokens"],
               blocks=len(res["dit_ms"]), dit_ms_per_block=dit, ms_per_forward=dit / settings.steps,
               decode_ms_per_block=dec, fps=1e3 * frames / (dit + dec), fps_dit_only=1e3 * frames / dit,
               first_frame_s=res["first_frame_s"], dit_floor_ms_per_block=floor,
               ratio_to_floor=dit / floor,
               peak_gb=None if res["peak"] is None else res["peak"] / 1e9,
               dit_ms_all_blocks=res["dit_ms"], decode_ms_all_blocks=res["decode_ms"])
    if ref_latents is not None:
        a, b = res["latents"].flatten().double(), ref_latents.flatten().double()
        row["cos_vs_bf16"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        row["rel_l2_vs_bf16"] = float((a - b).norm() / b.norm())
    return row


def build(smoke: bool, layers):
    if smoke:
        from s2v_fast.config import DiTConfig
        from s2v_fast.models.dit import S2VTransformer
        from s2v_fast.models.vae import WanVAE

        torch.manual_seed(0)
        model = S2VTransformer(DiTConfig.preset("tiny")).eval()
        return model, WanVAE.tiny(dim=4, seed=1)
    from bench_vae import random_vae
    from dit_common import build_random_dit

    model = build_random_dit(device="cuda")
    if layers:  # a section of the full-width model (quick tier / smaller GPUs)
        model.blocks = model.blocks[:layers]
        model.config.num_layers = layers
        model.config.audio_inject_layers = tuple(i for i in model.config.audio_inject_layers if i < layers)
        model.audio_injector.layer_to_index = {l: j for l, j in model.audio_injector.layer_to_index.items()
                                               if l < layers}
    return model, random_vae("cuda")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="704x384", help="comma-separated HxW")
    ap.add_argument("--modes", default="bf16_reference,bf16,fp8",
                    help="bf16_reference: the reference causal forward; bf16, fp8: the fused one")
    ap.add_argument("--blocks", type=int, default=10, help="blocks per run (>= 5 for a steady state)")
    ap.add_argument("--layers", type=int, default=None, help="run only the first N DiT layers")
    ap.add_argument("--no-vae", action="store_true", help="skip the decode")
    ap.add_argument("--topic", default="streaming")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (plumbing only)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --smoke)")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.smoke:
        sizes, args.blocks = [(64, 64)], min(args.blocks, 2)
    settings = StreamingSettings()
    model, vae = build(args.smoke, args.layers)
    if args.no_vae:
        vae = None
    rows, refs = [], {}
    for mode in args.modes.split(","):
        if mode == "bf16_reference":  # the reference block-causal forward, for contrast
            set_precision(model, "reference")
        elif mode in ("bf16", "fp8"):  # the fused forward (s2v_fast/fast/causal.py)
            set_precision(model, "fast")
        if mode == "fp8":
            from s2v_fast.quantization import quantize_dit

            quantize_dit(model, "fp8", attention=not args.smoke)
        for size in sizes:
            with torch.no_grad():
                res = run_stream(model, vae, size[0], size[1], args.blocks, settings)
            row = summarize(size, mode, res, model, settings, refs.get(size))
            refs.setdefault(size, res["latents"])
            rows.append(row)
            print(f"{row['size']} {mode}: {row['ms_per_forward']:.1f} ms/forward, DiT "
                  f"{row['dit_ms_per_block']:.0f} + decode {row['decode_ms_per_block']:.0f} ms "
                  f"per block -> {row['fps']:.1f} FPS (DiT only {row['fps_dit_only']:.1f}; floor "
                  f"{row['dit_floor_ms_per_block']:.0f} ms, x{row['ratio_to_floor']:.2f}), first "
                  f"frame {row['first_frame_s']:.2f} s, peak {row['peak_gb'] or 0:.1f} GB"
                  + (f", cos {row['cos_vs_bf16']:.5f}" if "cos_vs_bf16" in row else ""), flush=True)
            if "cos_vs_bf16" in row and row["cos_vs_bf16"] < 0.95:
                print(f"FAIL {row['size']} {mode}: cosine {row['cos_vs_bf16']:.4f} < 0.95 vs bf16")
                return 1
            if not torch.isfinite(res["latents"]).all():
                print(f"FAIL {row['size']} {mode}: non-finite latents")
                return 1
    if not args.smoke:
        print(write_results(args.topic, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
