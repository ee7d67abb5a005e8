"""Attention inputs that look like the DiT's, for the fp8 attention's accuracy tests and benchmarks.

Random q/k/v hide what makes fp8 attention hard: heavy-tailed channels from the norm weights, a
common offset on the keys, peaked attention. :func:`make_realistic_qkv` builds them the DiT's way
(RMSNorm, outlier norm weights, the model's 3-axis RoPE). It lives here, not next to the kernels,
because it needs ``models/rope.py`` and the kernels package imports nothing from ``models/``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.rope import build_rope_table, video_segment


def make_realistic_qkv(B: int, Lq: int, H: int, D: int, Lk: int = None, *, seed: int = 0,
                       device="cpu", dtype=torch.bfloat16, logit_std: float = 2.0,
                       outliers: int = 4, outlier_scale=(10.0, 30.0), key_offset: float = 4.0,
                       grid_hw=(16, 16)):
    """Attention inputs shaped like the DiT's: q/k = RoPE(RMSNorm(x) * w) with structured tokens.

    * tokens: a smooth (along the sequence) rank-24 latent mixed into H*D channels + noise, k's
      mixing correlated with q's (so attention has structure, not uniform noise);
    * full-width RMSNorm, then norm weights 1 + N(0, 0.1^2) with ``outliers`` channels per head
      scaled by U(10, 30) (independently for q and k): heavy-tailed channels;
    * the project's 3-axis RoPE over a (frames, h, w) grid of ``grid_hw`` tokens per frame;
    * q rescaled per head so the logits q.k/sqrt(D) (of the centred keys) have std ``logit_std``
      (natural-log units; 2 = moderately peaked attention, the error grows with it);
    * keys + a common offset per head (``key_offset`` x the key RMS, constant over tokens);
    * v: noise + per-head offset + a structured part from the same latent.
    Generated in fp32 on ``device`` with its own generator (CPU and CUDA draw different numbers),
    returned in ``dtype``."""
    Lk = Lq if Lk is None else Lk
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    C, r = H * D, 24

    def rnd(*s):
        return torch.randn(*s, generator=g, device=dev)

    def latent(L):
        z = rnd(B, L + 32, r).transpose(1, 2)
        z = F.avg_pool1d(z, 33, 1).transpose(1, 2)[:, :L]
        return z * 5.0

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def rope(x, L):
        th, tw = grid_hw
        frames = -(-L // (th * tw))
        t = build_rope_table([video_segment(frames, th, tw)], D, "cpu", torch.float32)
        cos, sin = (c[:L].to(dev)[None, :, None] for c in (t.cos, t.sin))
        xp = x.reshape(B, L, H, D // 2, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(B, L, H, D)

    zq = latent(Lq)
    zk = zq if Lk == Lq else latent(Lk)
    aq = rnd(r, C) / math.sqrt(r)
    ak = aq + 0.5 * rnd(r, C) / math.sqrt(r)
    wq, wk = 1 + 0.1 * rnd(C), 1 + 0.1 * rnd(C)
    lo, hi = outlier_scale
    for h in range(H):
        for w in (wq, wk):
            idx = torch.randperm(D, generator=g, device=dev)[:outliers] + h * D
            w[idx] *= lo + (hi - lo) * torch.rand(outliers, generator=g, device=dev)
    q = rope((rms(zq @ aq + 0.7 * rnd(B, Lq, C)) * wq).view(B, Lq, H, D), Lq)
    k = rope((rms(zk @ ak + 0.7 * rnd(B, Lk, C)) * wk).view(B, Lk, H, D), Lk)
    n = min(Lq, Lk, 512)
    kc = k - k.mean(1, keepdim=True)
    std = (torch.einsum("blhd,bmhd->bhlm", q[:, :n], kc[:, :n]) / math.sqrt(D)).std(dim=(0, 2, 3))
    q = q * (logit_std / std)[None, None, :, None]
    krms = k.pow(2).mean(dim=(0, 1, 3), keepdim=True).sqrt()
    k = k + key_offset * krms * rnd(1, 1, H, D)
    v = rnd(B, Lk, H, D) + 0.5 * rnd(1, 1, H, D) + 0.5 * (zk @ (rnd(r, C) / math.sqrt(r))).view(B, Lk, H, D)
    return tuple(t.to(dtype=dtype) for t in (q, k, v))
