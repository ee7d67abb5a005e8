"""Synthetic VAE latents that look like real ones: smooth in space and time, unit variance.

Latents of natural video are strongly correlated between neighbouring positions (a 1/8-scale
image of the scene) and roughly unit-variance per channel after the VAE's normalisation. White
noise is neither: through the decoder's per-frame global attention and its 3x3 convolutions it
produces high-contrast texture everywhere, which exaggerates every approximation whose error
grows with local contrast (tiled decoding, bf16). Benchmarks and accuracy tests of the VAE use
these instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _gauss(sigma: float, device) -> torch.Tensor:
    r = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _blur_axis(x: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D blur of [N, T, H, W] along ``dim`` (1, 2 or 3) with replicate padding."""
    x = x.movedim(dim, -1)
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    r = (w.numel() - 1) // 2
    flat = F.conv1d(F.pad(flat, (r, r), mode="replicate"), w.view(1, 1, -1))
    return flat.reshape(shape).movedim(-1, dim)


def smooth_latents(shape: Sequence[int], sigma_hw: float = 2.0, sigma_t: float = 1.0,
                   seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian-blurred white noise ``[B, C, T, H, W]``, each (sample, channel) standardised to
    zero mean and unit variance. ``sigma_hw`` / ``sigma_t``: correlation lengths in latent
    positions / latent frames (0 = no blur along that axis)."""
    B, C, T, H, W = shape
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B * C, T, H, W, generator=g, device=device, dtype=torch.float32)
    for dim, sigma, n in ((1, sigma_t, T), (2, sigma_hw, H), (3, sigma_hw, W)):
        if sigma > 0 and n > 1:
            x = _blur_axis(x, _gauss(sigma, device), dim)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    x = x / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    return x.view(B, C, T, H, W).to(dtype)
