"""Causal audio conditioning encoder (`CausalAudioEncoder` + `MotionEncoder_tc`, spec §4.4).

Input: wav2vec2 features [B, 25, audio_dim, T] of one clip (T = 4F video frames).
1. Prepend `motion_frames[0]` (73) copies of the first frame (not the previous clip's audio).
2. Layer mixing in cdt (bf16 in production): w = SiLU(weights); mixed = sum_l(a_l * w_l / sum(w)).
3. `MotionEncoder_tc` in fp32 (weights upcast): causal convs (left replicate padding by k-1),
   per-token LayerNorm (eps 1e-6, no affine) + SiLU, shared conv2/conv3 for the local
   (num_token tokens, channel = n*C' + c) and global branches; padding token appended to local;
   final_linear on global.
4. Drop the first `motion_frames[1]` (19) output frames -> local [B, F, n+1, dim], global
   [B, F, 1, dim], both fp32.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import linear_fp32

MOTION_PIXEL_FRAMES = 73
MOTION_LATENT_FRAMES = 19


class CausalConv1d(nn.Module):
    """Conv1d over time with left replicate padding of kernel-1 (attribute `conv` = Conv1d)."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> fp32 [B, C', T'] (fp32 math, as in the reference autocast region)."""
        x = F.pad(x.float(), (self.pad, 0), mode="replicate")
        c = self.conv
        b = None if c.bias is None else c.bias.float()
        return F.conv1d(x, c.weight.float(), b, stride=c.stride)


def _ln_silu(x: torch.Tensor, eps: float) -> torch.Tensor:
    """SiLU(LayerNorm(x)) over the last dim, fp32, no affine."""
    return F.silu(F.layer_norm(x, (x.shape[-1],), eps=eps))


class MotionEncoderTC(nn.Module):
    """`MotionEncoder_tc(in_dim, hidden_dim, num_heads=num_token, need_global=True)`."""

    def __init__(self, in_dim: int, hidden_dim: int, num_token: int = 4, eps: float = 1e-6):
        super().__init__()
        self.num_token = num_token
        self.eps = eps
        c1 = hidden_dim // num_token
        self.conv1_local = CausalConv1d(in_dim, c1 * num_token, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, c1, 3, stride=1)
        self.conv2 = CausalConv1d(c1, c1 * 2, 3, stride=2)
        self.conv3 = CausalConv1d(c1 * 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _trunk(self, h: torch.Tensor) -> torch.Tensor:
        """[N, T, c1] -> SiLU(LN) -> conv2 -> SiLU(LN) -> conv3 -> SiLU(LN): [N, T3, hidden]."""
        h = _ln_silu(h, self.eps)
        h = self.conv2(h.transpose(1, 2)).transpose(1, 2)
        h = _ln_silu(h, self.eps)
        h = self.conv3(h.transpose(1, 2)).transpose(1, 2)
        return _ln_silu(h, self.eps)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, in_dim] -> (global [B, T3, 1, hidden], local [B, T3, num_token+1, hidden])."""
        B = x.shape[0]
        xc = x.transpose(1, 2)  # [B, in, T]
        h = self.conv1_local(xc)  # [B, n*c1, T]
        n = self.num_token
        h = h.unflatten(1, (n, -1)).permute(0, 1, 3, 2).flatten(0, 1)  # [(B n), T, c1]
        h = self._trunk(h)
        h = h.unflatten(0, (B, n)).permute(0, 2, 1, 3)  # [B, T3, n, hidden]
        pad = self.padding_tokens.float().expand(B, h.shape[1], 1, h.shape[3])
        local = torch.cat([h, pad], dim=2)

        g = self.conv1_global(xc).transpose(1, 2)  # [B, T, c1]
        g = self._trunk(g)
        g = linear_fp32(g, self.final_linear)
        return g.unsqueeze(2), local


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder` (sic): learned layer mixing + `MotionEncoderTC` (`encoder`)."""

    def __init__(self, dim: int, audio_dim: int, num_layers: int = 25, num_token: int = 4,
                 eps: float = 1e-6):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, num_layers, 1, 1) * 0.01)
        self.encoder = MotionEncoderTC(audio_dim, dim, num_token, eps)

    def mix_layers(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, 25, D, T] -> [B, T, D]: sum_l(a_l * w_l / sum w), w = SiLU(weights), in cdt."""
        w = F.silu(self.weights)
        a = feats.to(w.dtype)
        mixed = ((a * w) / w.sum(dim=1, keepdim=True)).sum(dim=1)
        return mixed.transpose(1, 2)

    def forward(self, audio_input: torch.Tensor,
                motion_frames: Tuple[int, int] = (MOTION_PIXEL_FRAMES, MOTION_LATENT_FRAMES)
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """audio_input [B, 25, D, 4F] -> (local [B, F, n+1, dim], global [B, F, 1, dim]) fp32."""
        first = audio_input[..., :1].expand(*audio_input.shape[:-1], motion_frames[0])
        a = torch.cat([first, audio_input], dim=-1)
        glb, loc = self.encoder(self.mix_layers(a))
        return loc[:, motion_frames[1]:], glb[:, motion_frames[1]:]
