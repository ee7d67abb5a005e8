"""FramePack motion tokens (`FramePackMotioner`, drop_mode 'padd', spec §4.5 item 3).

motion_latents m [B, 16, T_m, lh, lw]: the last min(19, T_m) frames are copied into the tail of a
zero buffer P of 19 frames; P splits (oldest first) into [16 | 2 | 1] frames:
  post = proj(P[-1:])      (k=s=(1,2,2)) -> 1 x lh/2 x lw/2 tokens
  t2x  = proj_2x(P[16:18]) (k=s=(2,4,4)) -> 1 x lh/4 x lw/4
  t4x  = proj_4x(P[:16])   (k=s=(4,8,8)) -> 4 x lh/8 x lw/8
tokens = concat(post, t2x, t4x) each flattened (f, h, w); convs in cdt (bf16 output).
RoPE segments: see `rope.framepack_segments`. When motion is dropped (clip 0) nothing is computed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import framepack_segments

ZIP_FRAME_BUCKETS = (1, 2, 16)


def conv_tokens(x: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """Patchify conv in the weight dtype, flattened to tokens [B, N, C] in (f, h, w) order."""
    y = F.conv3d(x.to(conv.weight.dtype), conv.weight, conv.bias, stride=conv.stride)
    return y.flatten(2).transpose(1, 2)


class FramePackMotioner(nn.Module):
    def __init__(self, dim: int, in_dim: int = 16, buckets=ZIP_FRAME_BUCKETS):
        super().__init__()
        self.buckets = tuple(buckets)
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def segments(self, lh: int, lw: int) -> list:
        return framepack_segments(lh, lw, self.buckets)

    def num_tokens(self, lh: int, lw: int) -> int:
        return (lh // 2) * (lw // 2) + (lh // 4) * (lw // 4) + 4 * (lh // 8) * (lw // 8)

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T_m, lh, lw] -> motion tokens [B, Lm, dim] (cdt)."""
        B, C, T, lh, lw = motion_latents.shape
        total = sum(self.buckets)
        buf = motion_latents.new_zeros(B, C, total, lh, lw)
        n = min(total, T)
        if n > 0:
            buf[:, :, total - n:] = motion_latents[:, :, T - n:]
        p4x, p2x, post = buf.split(list(self.buckets)[::-1], dim=2)
        return torch.cat([conv_tokens(post, self.proj), conv_tokens(p2x, self.proj_2x),
                          conv_tokens(p4x, self.proj_4x)], dim=1)
