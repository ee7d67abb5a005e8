"""Spatial tiling for the Wan2.1 VAE: tile boxes, blend weights and an accumulating merger.

Tiles are laid out on the *latent* grid (so pixel boxes are always multiples of the spatial
compression factor). Each tile runs through the full temporal chunked pass on its own; the
results are merged with separable linear ramps over the overlaps:

    out = sum_k w_k * tile_k / sum_k w_k

where ``w_k(y, x) = ramp_y(y) * ramp_x(x)`` rises linearly from the tile's edge over ``blend``
output pixels (no ramp on an edge that is also the image border). With regular tiles whose overlap
equals ``blend`` the weights of two neighbours sum to one (classic linear cross-fade); irregular
overlaps (the last tile is shifted to end at the border) are handled by the normalisation. Single
tile coverage keeps weight 1, so those pixels are exactly the tile's values.

The three pieces are independent so the tile loop can be distributed over ranks (VAE patch
parallel): each rank takes ``boxes[rank::world]``, calls the model's ``decode_tile``/``encode_tile``
and :meth:`TileMerger.add`; the ranks then all-reduce ``merger.numer`` and ``merger.denom`` (or
gather tiles) and call :meth:`TileMerger.result`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

__all__ = ["TileBox", "tile_starts", "tile_boxes", "ramp_1d", "tile_weight", "TileMerger",
           "tiled_apply"]


@dataclass(frozen=True)
class TileBox:
    """A half-open spatial box ``[y0, y1) x [x0, x1)`` (units chosen by the caller)."""

    y0: int
    y1: int
    x0: int
    x1: int

    def scaled(self, num: int, den: int = 1) -> "TileBox":
        vals = [v * num for v in (self.y0, self.y1, self.x0, self.x1)]
        if any(v % den for v in vals):
            raise ValueError(f"tile box {self} cannot be scaled by {num}/{den} exactly")
        return TileBox(*(v // den for v in vals))

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


def tile_starts(size: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of 1-D tiles of length ``tile`` covering ``[0, size)``.

    Uses the fewest tiles whose overlaps are at least ``overlap``; starts are spread evenly so
    the first tile starts at 0 and the last ends at ``size``.
    """
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile} overlap={overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    span = size - tile
    return [round(k * span / (n - 1)) for k in range(n)]


def tile_boxes(height: int, width: int, tile_h: int, tile_w: int, overlap_h: int,
               overlap_w: int) -> List[TileBox]:
    """Row-major list of tile boxes covering a ``height x width`` grid."""
    ys = tile_starts(height, tile_h, overlap_h)
    xs = tile_starts(width, tile_w, overlap_w)
    return [TileBox(y, min(y + tile_h, height), x, min(x + tile_w, width)) for y in ys for x in xs]


def ramp_1d(start: int, end: int, size: int, blend: int, device=None,
            dtype=torch.float32) -> torch.Tensor:
    """Weights of positions ``start..end-1``: linear ramps of ``blend`` samples at inner edges."""
    n = end - start
    w = torch.ones(n, device=device, dtype=dtype)
    if blend <= 0:
        return w
    pos = torch.arange(n, device=device, dtype=dtype) + 0.5
    if start > 0:
        w = torch.minimum(w, pos / blend)
    if end < size:
        w = torch.minimum(w, pos.flip(0) / blend)
    return w


def tile_weight(box: TileBox, height: int, width: int, blend_h: int, blend_w: int, device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Separable blend weight ``[box.height, box.width]`` of a tile in an output canvas."""
    wy = ramp_1d(box.y0, box.y1, height, blend_h, device, dtype)
    wx = ramp_1d(box.x0, box.x1, width, blend_w, device, dtype)
    return wy[:, None] * wx[None, :]


class TileMerger:
    """Accumulates weighted tiles ``[..., h, w]`` into a ``[..., height, width]`` canvas."""

    def __init__(self, height: int, width: int, blend_h: int, blend_w: int):
        self.height, self.width = height, width
        self.blend_h, self.blend_w = blend_h, blend_w
        self.numer: Optional[torch.Tensor] = None
        self.denom: Optional[torch.Tensor] = None

    def add(self, tile: torch.Tensor, box: TileBox) -> None:
        if tile.shape[-2:] != (box.height, box.width):
            raise ValueError(f"tile shape {tuple(tile.shape)} does not match box {box}")
        if self.numer is None:
            self.numer = tile.new_zeros(*tile.shape[:-2], self.height, self.width)
            self.denom = torch.zeros(self.height, self.width, device=tile.device,
                                     dtype=torch.float32)
        w = tile_weight(box, self.height, self.width, self.blend_h, self.blend_w, tile.device)
        self.numer[..., box.y0:box.y1, box.x0:box.x1].add_(tile * w.to(tile.dtype))
        self.denom[box.y0:box.y1, box.x0:box.x1].add_(w)

    def result(self) -> torch.Tensor:
        if self.numer is None:
            raise ValueError("no tiles were added")
        return self.numer.div_(self.denom.to(self.numer.dtype))


def tiled_apply(fn: Callable[[TileBox], torch.Tensor], boxes: List[TileBox],
                out_height: int, out_width: int, out_scale: tuple, blend_h: int,
                blend_w: int) -> torch.Tensor:
    """Run ``fn(box)`` for every box (boxes in the tiling grid units) and merge the results.

    ``out_scale = (num, den)`` maps a grid box to output units. A single box is returned as is.
    """
    if len(boxes) == 1:
        return fn(boxes[0])
    merger = TileMerger(out_height, out_width, blend_h, blend_w)
    for box in boxes:
        merger.add(fn(box), box.scaled(*out_scale))
    return merger.result()
