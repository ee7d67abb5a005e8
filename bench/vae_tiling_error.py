"""How far tiled VAE decode lands from the plain decode, and why: a sweep over the tile halo.

Full-size Wan2.1 VAE with random fp32 weights (``bench_vae.random_vae``), 448x832, 3 latents,
default tiles (256 px, 64 px overlap). Latents: white noise and smooth unit-variance ones
(``s2v_fast.testing.latents.smooth_latents``, correlation length 2 and 4 latent positions).
``halo`` is the context decoded around each tile and cropped before blending (0 = bare tiles,
zero padding at their edges). ``no_attention`` repeats the sweep with the decoder's per-frame
attention block bypassed in both decodes, which separates the convolutions' receptive field
(a halo removes it) from the global attention (no spatial tiling can see past its tile).

    python bench/vae_tiling_error.py            # on the GPU (~1 min)
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_vae import random_vae  # noqa: E402
from results_io import write_results  # noqa: E402

import s2v_fast.models.vae as vae_mod  # noqa: E402
from s2v_fast.testing.latents import smooth_latents  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    vae = random_vae(dev, dim=96)
    shape = (1, 16, 3, 448 // 8, 832 // 8)
    lat = {"white": torch.randn(shape, device=dev, generator=torch.Generator(dev).manual_seed(3)),
           "smooth2": smooth_latents(shape, 2.0, seed=3, device=dev),
           "smooth4": smooth_latents(shape, 4.0, seed=3, device=dev)}
    rows = []
    attn_forward = vae_mod.AttentionBlock.forward
    for attention in (True, False):
        if not attention:
            vae_mod.AttentionBlock.forward = lambda self, x, *a, **k: x
        for name, z in lat.items():
            vae.disable_tiling()
            plain = vae.decode(z, clamp=False).clamp(-1, 1)
            for halo in (0, 32, 64, 128):
                vae.enable_tiling(256, 256, 64, 64, halo)
                d = vae.decode(z, clamp=False).clamp(-1, 1) - plain
                mse = (d ** 2).mean().item()
                rows.append(dict(latents=name, attention=attention, halo=halo,
                                 max_abs=d.abs().max().item(), mean_abs=d.abs().mean().item(),
                                 psnr_db=10 * math.log10(4.0 / max(mse, 1e-20))))
                r = rows[-1]
                print(f"{name:8} attention={str(attention):5} halo {halo:3}: max {r['max_abs']:.4f} "
                      f"mean {r['mean_abs']:.5f} PSNR {r['psnr_db']:.1f} dB", flush=True)
    vae_mod.AttentionBlock.forward = attn_forward
    write_results("vae_tiling_error", rows, extra=dict(size="448x832", latents=3, tile=256, overlap=64))


if __name__ == "__main__":
    main()
