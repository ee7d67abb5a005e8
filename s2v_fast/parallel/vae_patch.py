"""VAE patch parallel: the spatial tiles of one encode / decode spread over a group of ranks.

The tile grid, tile passes and blend weights are the VAE's own (``WanVAE.decode_tile_boxes`` /
``decode_tile`` / ``encode_tile`` and ``vae_tiling.TileMerger``), so the result equals the
single-GPU *tiled* encode/decode (``vae.enable_tiling()`` with the same tile sizes) up to the
summation order of overlapping tiles. Tiles go to ranks by longest-processing-time (largest tile
first to the least-loaded rank; deterministic). Each rank blends its tiles into a zero canvas
(numerator) and a weight map (denominator); one all-reduce of each over the group gives every
rank the whole clip (each needs it for the next clip's motion context). With a single tile every
rank simply runs it.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from ..errors import InputError
from ..models.vae_tiling import TileBox, TileMerger


def assign_tiles(boxes: List[TileBox], world: int) -> List[List[int]]:
    """Box indices per rank, balanced by area (LPT), deterministic."""
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(boxes)), key=lambda i: (-boxes[i].height * boxes[i].width, i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += boxes[i].height * boxes[i].width
    return [sorted(x) for x in out]


class VAEPatchParallel:
    """``encode`` / ``decode`` with the WanVAE contract, tiles shared by ``group``."""

    def __init__(self, vae, group=None):
        self.vae = vae
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0

    def __getattr__(self, name):
        if name in ("vae", "group", "world", "rank"):
            raise AttributeError(name)
        return getattr(self.vae, name)

    def _run(self, fn, boxes, shape, out_scale: int, blend_h: int, blend_w: int, device):
        mine = assign_tiles(boxes, self.world)[self.rank]
        merger = TileMerger(shape[-2], shape[-1], blend_h, blend_w)
        merger.numer = torch.zeros(shape, device=device, dtype=torch.float32)
        merger.denom = torch.zeros(shape[-2], shape[-1], device=device, dtype=torch.float32)
        for i in mine:
            merger.add(fn(boxes[i]).float(), boxes[i].scaled(out_scale))
        dist.all_reduce(merger.numer, group=self.group)
        dist.all_reduce(merger.denom, group=self.group)
        return merger.result()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        vae = self.vae
        if self.world == 1:
            return vae.decode(z, clamp=clamp)
        if z.dim() != 5 or z.shape[1] != vae.z_dim or z.shape[2] < 1:
            raise InputError(f"VAE decode expects [B,{vae.z_dim},n,h,w], got {tuple(z.shape)}")
        p = vae._param
        z = z.to(device=p.device, dtype=p.dtype)
        f, tf = vae.spatial_factor, vae.temporal_factor
        B, _, n, h, w = z.shape
        boxes = vae.decode_tile_boxes(h, w)
        with torch.autocast(device_type=p.device.type, enabled=False):
            if len(boxes) == 1:
                out = vae.decode(z, clamp=False)
            else:
                shape = (B, 3, 1 + tf * (n - 1), h * f, w * f)
                stem = vae.decode_stem(z)  # whole frames, latent resolution: every rank
                out = self._run(lambda b: vae.decode_tile(z, b, stem), boxes, shape, f,
                                vae.tile_sample_overlap_height, vae.tile_sample_overlap_width,
                                p.device).to(p.dtype)
        return out.clamp_(-1, 1) if clamp else out

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        if self.world == 1:
            return vae.encode(video)
        f, tf = vae.spatial_factor, vae.temporal_factor
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < 1 or \
                video.shape[3] % f or video.shape[4] % f:
            raise InputError(f"VAE encode expects [B,3,T,H,W] with H, W multiples of {f}, got "
                             f"{tuple(video.shape)}")
        p = vae._param
        video = video.to(device=p.device, dtype=p.dtype)
        B, _, T, H, W = video.shape
        boxes = vae.encode_tile_boxes(H, W)
        with torch.autocast(device_type=p.device.type, enabled=False):
            if len(boxes) == 1:
                return vae.encode(video)
            shape = (B, vae.z_dim, 1 + (T - 1) // tf, H // f, W // f)
            return self._run(lambda b: vae.encode_tile(video, b), boxes, shape, 1,
                             vae.tile_sample_overlap_height // f,
                             vae.tile_sample_overlap_width // f, p.device).to(p.dtype)
