"""3-axis interleaved RoPE of the S2V DiT (spec §4.7, §10.4-5).

Head dim D gives c = D/2 rotation pairs, split [time | height | width] =
[c - 2*(c//3), c//3, c//3] (22/21/21 for D=128). Axis with n pairs uses
inv_freq_j = 1 / 10000^(2j / 2n) (float64). A token at (t, h, w) rotates pair k by
angle = pos_axis(k) * inv_freq; negative times rotate by -|t| (the reference's conjugate).

Positions follow the reference exactly: a segment (start, end, range) gets per-axis positions
``trunc(numpy.linspace(start, start + range - 1, n))`` (and for a negative time start,
``-trunc(linspace(-start, -start - range + 1, n))``), flattened in (f, h, w) order.

The per-token table (cos, sin [L, c]) depends only on the sequence layout, so it is cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

ROPE_THETA = 10000.0
REF_TIME_POSITION = 30  # reference-frame time position (independent of F)

# (start (f0,h0,w0), end (f1,h1,w1), range (tf,th,tw)) as in the reference grid_sizes.
Segment = Tuple[Tuple[int, int, int], Tuple[int, int, int], Tuple[int, int, int]]


def rope_axis_pairs(head_dim: int) -> Tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _inv_freq(pairs: int) -> torch.Tensor:
    dim = 2 * pairs
    return 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float64).div(dim))


def _axis_positions(start: int, count: int, rng: int) -> np.ndarray:
    if start >= 0:
        return np.linspace(start, start + rng - 1, count).astype(np.int64)
    return -np.linspace(-start, -start - rng + 1, count).astype(np.int64)


def segment_positions(seg: Segment) -> torch.Tensor:
    """Integer (t, h, w) positions [n, 3] of one segment, (f, h, w) flatten order."""
    (f0, h0, w0), (f1, h1, w1), (tf, th, tw) = seg
    nf, nh, nw = f1 - f0, h1 - h0, w1 - w0
    if nf * nh * nw <= 0:
        return torch.zeros(0, 3, dtype=torch.int64)
    pf = torch.from_numpy(_axis_positions(f0, nf, tf))
    ph = torch.from_numpy(_axis_positions(h0, nh, th))
    pw = torch.from_numpy(_axis_positions(w0, nw, tw))
    grid = torch.stack(torch.meshgrid(pf, ph, pw, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def video_segment(F: int, th: int, tw: int) -> Segment:
    return (0, 0, 0), (F, th, tw), (F, th, tw)


def reference_segment(th: int, tw: int) -> Segment:
    t = REF_TIME_POSITION
    return (t, 0, 0), (t + 1, th, tw), (1, th, tw)


def framepack_segments(lh: int, lw: int, buckets: Sequence[int] = (1, 2, 16)) -> list:
    """Segments of the FramePack motion tokens: post (1x), 2x, 4x (spec §4.7 table)."""
    b = list(buckets)
    s1, s2, s3 = -sum(b[:1]), -sum(b[:2]), -sum(b[:3])
    rng_h, rng_w = lh // 2, lw // 2
    return [
        ((s1, 0, 0), (s1 + b[0], lh // 2, lw // 2), (b[0], rng_h, rng_w)),
        ((s2, 0, 0), (s2 + b[1] // 2, lh // 4, lw // 4), (b[1], rng_h, rng_w)),
        ((s3, 0, 0), (s3 + b[2] // 4, lh // 8, lw // 8), (b[2], rng_h, rng_w)),
    ]


def sequence_positions(segments: Sequence[Segment]) -> torch.Tensor:
    """Concatenated positions [L, 3] int64 of all segments in sequence order."""
    return torch.cat([segment_positions(s) for s in segments], dim=0)


def rope_angles(pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Angles [L, c] float64: [time pairs | height pairs | width pairs]."""
    nt, nh, nw = rope_axis_pairs(head_dim)
    p = pos.to(torch.float64)
    return torch.cat([p[:, 0:1] * _inv_freq(nt), p[:, 1:2] * _inv_freq(nh),
                      p[:, 2:3] * _inv_freq(nw)], dim=1)


@dataclass
class RopeTable:
    """Per-token rotation table of one sequence layout (shared by all heads, q and k)."""

    pos: torch.Tensor  # [L, 3] int64 (CPU)
    cos: torch.Tensor  # [L, c] on the model device, float64 or float32
    sin: torch.Tensor

    @property
    def length(self) -> int:
        return self.pos.shape[0]


_CACHE: Dict[tuple, RopeTable] = {}
_CACHE_MAX = 16


def build_rope_table(segments: Sequence[Segment], head_dim: int, device=None,
                     dtype: torch.dtype = torch.float64,
                     round_to: Optional[torch.dtype] = None) -> RopeTable:
    """Cached per-token (cos, sin) for a sequence made of `segments`.

    ``round_to``: round cos and sin to this dtype first (LiveAvatar's ``rope_precompute`` stores
    its table as complex32, i.e. fp16 cos/sin, and multiplies in complex128)."""
    key = (tuple(segments), head_dim, str(torch.device(device or "cpu")), dtype, round_to)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    pos = sequence_positions(segments)
    ang = rope_angles(pos, head_dim)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if round_to is not None:
        cos, sin = cos.to(round_to), sin.to(round_to)
    table = RopeTable(pos=pos, cos=cos.to(device=device, dtype=dtype),
                      sin=sin.to(device=device, dtype=dtype))
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = table
    return table


def apply_rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by the table; math in the table's dtype.

    (x0, x1) -> (x0*cos - x1*sin, x0*sin + x1*cos). Returns float32 (the reference stores the
    float64 result as fp32; the attention call then casts to the compute dtype).
    """
    B, L, H, D = x.shape
    xp = x.to(table.cos.dtype).reshape(B, L, H, D // 2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    cos = table.cos[None, :, None, :]
    sin = table.sin[None, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.reshape(B, L, H, D).float()
