"""Streaming (block-by-block) decode for the Wan2.1 VAE: ``WanVAE.stream_decoder()``.

A real-time path hands the VAE a few latent frames at a time. Decoding each block with
``WanVAE.decode`` would restart every causal convolution with zero history (a seam at each block,
and each block would start with a single pixel frame). The reference decode already walks one
latent frame at a time, carrying each causal conv's last ``CACHE_T`` input frames in a
:class:`CausalCache`; :class:`StreamingDecoder` keeps those caches alive between calls, so the
concatenated outputs of the blocks equal ``decode`` of the concatenated latents (bit-identical
when the un-normalisation and ``conv2`` round the same for every chunk length; see the tests).

Why chunking cannot change the result: every decoder stage sees only the current latent frame
plus cached history. ``conv1``, the residual blocks and the head are causal convs, the middle
block's attention is per frame (over ``h*w`` tokens), the temporal upsample's state is a
"first frame seen" flag plus its conv's cache; nothing is global over time. Tiled decoding's
``decode_stem`` runs on whole frames, but still one latent frame after another with a causal
cache, so it streams the same way.

Memory is flat in stream length: each cache entry is replaced (never appended to) by the last
``CACHE_T`` frames of its conv's input.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from s2v_fast.errors import InputError
from s2v_fast.models.vae import CausalCache, WanVAE
from s2v_fast.models.vae_tiling import TileBox, tiled_apply

__all__ = ["StreamingDecoder"]

_SETTINGS = ("use_tiling", "use_slicing", "tile_sample_min_height", "tile_sample_min_width",
             "tile_sample_overlap_height", "tile_sample_overlap_width", "tile_sample_halo")


class _Lane:
    """History of one independently decoded stream: the stem's cache and one upsampling-tail
    cache per tile (a single whole-frame tile when untiled), as ``decode`` keeps them for one
    call (one lane per batch item under slicing, since ``decode`` then runs items one by one)."""

    def __init__(self, vae: WanVAE, boxes: List[TileBox]):
        self.vae = vae
        self.boxes = boxes
        self.stem_cache = CausalCache()
        self.tile_caches = [CausalCache() for _ in boxes]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unclamped pixels of chunk ``z``, tiles blended per chunk (the blend is per pixel and
        the same for every frame, so per-chunk blending equals blending the whole clip)."""
        vae, f = self.vae, self.vae.spatial_factor
        stem = vae.decode_stem(z, self.stem_cache)
        caches = dict(zip(self.boxes, self.tile_caches))
        h, w = z.shape[-2:]
        return tiled_apply(lambda b: vae.decode_tile(z, b, stem, caches[b]), self.boxes,
                           h * f, w * f, (f, 1), vae.tile_sample_overlap_height,
                           vae.tile_sample_overlap_width)

    def nbytes(self) -> int:
        return self.stem_cache.nbytes() + sum(c.nbytes() for c in self.tile_caches)


class StreamingDecoder:
    """Decodes a latent stream block by block: ``decode(z_chunk)`` for any number (>= 1) of
    normalised latent frames ``[B,16,t,h,w]`` returns their pixels ``[B,3,t',8h,8w]`` (float32,
    clamped to [-1,1] when ``clamp``): ``t' = 1 + 4(t-1)`` for the stream's first chunk, ``4t``
    after it. ``reset()`` starts a new stream.

    The VAE's tiling and slicing settings and the chunk's batch and spatial size are fixed by
    the stream's first chunk; a chunk that differs raises :class:`InputError` (call ``reset()``).
    """

    def __init__(self, vae: WanVAE, clamp: bool = True):
        self.vae = vae
        self.clamp = clamp
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next latent frame is decoded as a stream's first."""
        self._lanes: List[_Lane] = []
        self._key: Optional[Tuple] = None  # (batch, h, w, VAE settings) of the stream

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self._prepare(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            if len(self._lanes) > 1:
                out = torch.cat([lane.decode(v) for lane, v in zip(self._lanes, z.split(1))], 0)
            else:
                out = self._lanes[0].decode(z)
        out = out.float()
        return out.clamp_(-1, 1) if self.clamp else out

    def warmup(self, z: torch.Tensor) -> None:
        """Decode ``z`` and drop the pixels, to prime the history (e.g. with the motion latents
        before a real-time stream's first block). One latent frame per call, so at most one
        frame's pixels are alive at a time."""
        for i in range(z.shape[2]):
            self.decode(z[:, :, i:i + 1])

    def cache_nbytes(self) -> int:
        """Bytes of history held: constant after the stream's second latent frame."""
        return sum(lane.nbytes() for lane in self._lanes)

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Check ``z`` against the stream (starting one if needed); cast to the VAE's dtype."""
        vae = self.vae
        if z.dim() != 5 or z.shape[1] != vae.z_dim or z.shape[2] < 1:
            raise InputError(f"streaming VAE decode expects [B,{vae.z_dim},t>=1,h,w], "
                             f"got {tuple(z.shape)}")
        key = (z.shape[0], z.shape[3], z.shape[4]) + tuple(getattr(vae, k) for k in _SETTINGS)
        if self._key is None:
            self._start(key)
        elif key != self._key:
            raise InputError(f"streaming VAE decode: chunk {tuple(z.shape)} or the VAE's "
                             f"tiling/slicing settings differ from the stream's first chunk "
                             f"(batch, h, w, {', '.join(_SETTINGS)}) = {self._key}; "
                             "call reset() to start a new stream")
        p = vae._param
        return z.to(device=p.device, dtype=p.dtype)

    def _start(self, key: Tuple) -> None:
        vae = self.vae
        b, h, w = key[:3]
        boxes = vae.decode_tile_boxes(h, w) if vae.use_tiling else [TileBox(0, h, 0, w)]
        n = b if vae.use_slicing and b > 1 else 1
        self._lanes = [_Lane(vae, boxes) for _ in range(n)]
        self._key = key
