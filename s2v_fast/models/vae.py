"""Wan2.1 causal 3D VAE (z_dim 16), spec section 7.

Module attribute names equal the official ``Wan2.1_VAE.pth`` keys (spec 7.2), so the checkpoint
loads with ``strict=True`` and no remapping.

Execution mirrors the reference's chunked causal pass (spec 7.3):

* encode: input frames are processed in chunks ``[0], [1..4], [5..8], ...``; decode: one latent
  frame per chunk.
* every temporal-kernel :class:`CausalConv3d` keeps the last two frames of its own (left padded)
  input in a :class:`CausalCache` and prepends them to the next chunk (zeros before the first);
* ``downsample3d.time_conv`` is skipped on the first chunk and later runs over
  ``[last frame of the previous chunk, current frames]`` (stride 2);
* ``upsample3d.time_conv`` is skipped on the first chunk and then behaves as a causal conv with
  zero history (equivalently: frame 0 bypasses the temporal upsample).

``stream_decoder()`` (:mod:`s2v_fast.models.vae_stream`) keeps the decode's caches across calls
for block-by-block decoding.

Everything runs in the model dtype (fp32 in the reference; autocast is switched off inside
``encode``/``decode``). TF32 for the convolutions follows the global torch flags
(``torch.backends.cudnn.allow_tf32``), which the pipeline owns.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from s2v_fast.errors import CheckpointError, InputError
from s2v_fast.models.vae_tiling import TileBox, tile_boxes, tiled_apply

if TYPE_CHECKING:
    from s2v_fast.models.vae_stream import StreamingDecoder

__all__ = ["WanVAE", "CausalCache", "CausalConv3d", "per_latent_frame",
           "vae_config_from_state_dict", "LATENT_MEAN", "LATENT_STD"]

LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CACHE_T = 2  # frames of history kept per causal conv (kernel 3 in time)


class CausalCache:
    """Per-call state of the chunked pass, keyed by module (one instance per encode/decode)."""

    def __init__(self):
        self._state: Dict[int, object] = {}

    def get(self, module: nn.Module):
        return self._state.get(id(module))

    def set(self, module: nn.Module, value) -> None:
        self._state[id(module)] = value

    def nbytes(self) -> int:
        """Bytes of the cached tensors: constant once every module has run (fixed-size history)."""
        return sum(v.nbytes for v in self._state.values() if isinstance(v, torch.Tensor))


def per_latent_frame(fn, x: torch.Tensor, cache: CausalCache, tf: int) -> torch.Tensor:
    """``fn(x[:, :, i:i+1], cache)`` for every latent frame ``i``, concatenated along time.

    The first frame of a fresh cache yields 1 output frame, every other frame ``tf``; the output
    is written in place into one tensor (no list + cat copy of the whole clip)."""
    first = fn(x[:, :, :1], cache)
    n = x.shape[2]
    if n == 1:
        return first
    t0 = first.shape[2]
    out = first.new_empty(*first.shape[:2], t0 + tf * (n - 1), *first.shape[3:])
    out[:, :, :t0] = first
    del first
    for i in range(1, n):
        out[:, :, t0 + tf * (i - 1):t0 + tf * i] = fn(x[:, :, i:i + 1], cache)
    return out


class CausalConv3d(nn.Conv3d):
    """Conv3d with symmetric spatial zero padding and ``2*p_t`` frames of left (causal) padding.

    With a cache, the left padding is taken from the cached previous frames (zeros only where no
    history exists yet), and the last ``CACHE_T`` frames of the padded input are cached.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, k, stride=stride, padding=(0, p[1], p[2]))
        self.time_pad = 2 * p[0]

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        tp = self.time_pad
        if tp == 0:
            return super().forward(x)
        prev = cache.get(self) if cache is not None else None
        n_prev = 0 if prev is None else prev.shape[2]
        parts = []
        if tp > n_prev:
            b, c, _, h, w = x.shape
            parts.append(x.new_zeros(b, c, tp - n_prev, h, w))
        if prev is not None:
            parts.append(prev)
        parts.append(x)
        x = torch.cat(parts, dim=2)
        if cache is not None:
            cache.set(self, x[:, :, -CACHE_T:].clone())
        return super().forward(x)


class RMSNorm(nn.Module):
    """``F.normalize(x, dim=1) * sqrt(C) * gamma`` (no bias); gamma [C,1,1,1] or [C,1,1]."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # indices match the official keys: residual.{0,2,3,6}; 1/4 SiLU, 5 dropout(0)
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        r = self.residual
        h = x if self.shortcut is None else self.shortcut(x)
        y = F.silu(r[0](x), inplace=True)
        y = r[2](y, cache)
        y = F.silu(r[3](y), inplace=True)
        y = r[6](y, cache)
        return y.add_(h)


class AttentionBlock(nn.Module):
    """Per-frame single-head self-attention over h*w tokens (head dim C), plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.to_qkv(self.norm(y))
        q, k, v = y.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous().chunk(3, -1)
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        y = self.proj(y)
        return y.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x


class _Upsample(nn.Module):
    """Nearest-exact x2 (computed in fp32); no parameters (key slot ``resample.0``)."""

    def forward(self, x):
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(_Upsample(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)),
                                          nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            if cache.get(self) is None:  # first chunk: no temporal upsample
                cache.set(self, True)
            else:  # later chunks: causal conv, zero history at chunk 1; c -> 2c, then t -> 2t
                x = self.time_conv(x, cache)
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
                t = 2 * t
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self.resample(y)
        y = y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache.set(self, y[:, :, -1:].clone())
            if prev is not None:  # first chunk passes through
                y = self.time_conv(torch.cat([prev, y], dim=2))
        return y


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_downsample):
        super().__init__()
        dims = [dim * u for u in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i]
                                       else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples:
            x = layer(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        x = F.silu(self.head[0](x), inplace=True)
        return self.head[2](x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temperal_upsample):
        super().__init__()
        dim_mult = list(dim_mult)
        dims = [dim * u for u in [dim_mult[-1]] + dim_mult[::-1]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        layers: List[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous upsample halved the channels
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i]
                                       else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        return self.tail(self.stem(x, cache), cache)

    def stem(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """conv1 and the middle block (with the per-frame attention), at latent resolution."""
        x = self.conv1(x, cache)
        for layer in self.middle:
            x = layer(x, cache)
        return x

    def tail(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Upsampling stages and head: local (convolutions only), so they can run on tiles."""
        for layer in self.upsamples:
            x = layer(x, cache)
        x = F.silu(self.head[0](x), inplace=True)
        return self.head[2](x, cache)


def vae_config_from_state_dict(sd: Dict[str, torch.Tensor]) -> dict:
    """Infer ``WanVAE`` constructor arguments from an official-layout state dict."""
    try:
        dim = int(sd["encoder.conv1.weight"].shape[0])
        z_dim = int(sd["conv2.weight"].shape[0])
        kinds = []  # ('R', out_channels) or ('D', temporal?) in encoder.downsamples order
        i = 0
        while True:
            p = f"encoder.downsamples.{i}."
            if p + "residual.0.gamma" in sd:
                kinds.append(("R", int(sd[p + "residual.2.weight"].shape[0])))
            elif p + "resample.1.weight" in sd:
                kinds.append(("D", p + "time_conv.weight" in sd))
            else:
                break
            i += 1
    except KeyError as e:
        raise CheckpointError(f"VAE state dict lacks tensor {e.args[0]!r}; expected the official "
                              "Wan2.1_VAE.pth key layout") from None
    stages, cur, temporal = [], [], []
    for kind, val in kinds:
        if kind == "R":
            cur.append(val)
        else:
            stages.append(cur)
            cur = []
            temporal.append(bool(val))
    stages.append(cur)
    if not stages or not stages[0] or any(len(s) != len(stages[0]) for s in stages):
        raise CheckpointError("VAE state dict has an unexpected encoder.downsamples layout; "
                              "expected the official Wan2.1_VAE.pth structure")
    dim_mult = tuple(s[-1] // dim for s in stages)
    return dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=len(stages[0]),
                temperal_downsample=tuple(temporal))


def _load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """``Wan2.1_VAE.pth`` through ``torch.load(weights_only=True)`` (never the full unpickler:
    a file that needs it is refused, naming the file) or a ``.safetensors`` with the same keys."""
    from s2v_fast.checkpoint import load_tensor_file
    from s2v_fast.hub import repair_hint

    if not os.path.isfile(path):
        raise CheckpointError(f"VAE checkpoint not found: {path}; download Wan2.1_VAE.pth into "
                              "the checkpoint directory")
    sd = load_tensor_file(path, "VAE checkpoint")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"VAE checkpoint {path} is not a tensor state dict; "
                              f"{repair_hint(path)}")
    return sd


class WanVAE(nn.Module):
    """Wan2.1 VAE: ``encode(video) -> normalised mu``, ``decode(z) -> video in [-1, 1]``."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2,
                 temperal_downsample: Sequence[bool] = (False, True, True)):
        super().__init__()
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)} (latent mean/std constants)")
        self.config = dict(dim=dim, z_dim=z_dim, dim_mult=tuple(dim_mult),
                           num_res_blocks=num_res_blocks,
                           temperal_downsample=tuple(bool(t) for t in temperal_downsample))
        self.z_dim = z_dim
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(t) for t in temperal_downsample)
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks,
                                 tuple(temperal_downsample)[::-1])
        # memory savers
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_height = 256
        self.tile_sample_min_width = 256
        self.tile_sample_overlap_height = 64
        self.tile_sample_overlap_width = 64
        # context decoded (encoded) around each tile and cropped away: the decoder's convolutions
        # see the neighbours a whole-frame pass would show them instead of zero padding
        self.tile_sample_halo = 64

    # ------------------------------------------------------------------ construction / loading
    @classmethod
    def from_state_dict(cls, sd: Dict[str, torch.Tensor], device="cpu", dtype=torch.float32,
                        source: str = "state dict") -> "WanVAE":
        cfg = vae_config_from_state_dict(sd)
        with torch.device("meta"):
            model = cls(**cfg)
        expected = model.state_dict()
        missing = [k for k in expected if k not in sd]
        unexpected = [k for k in sd if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]!r}")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[0]!r}")
            raise CheckpointError(f"VAE checkpoint {source} does not match the Wan2.1 VAE: "
                                  f"{'; '.join(parts)}")
        for k, v in expected.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise CheckpointError(f"VAE checkpoint {source}: tensor {k!r} has shape "
                                      f"{tuple(sd[k].shape)}, expected {tuple(v.shape)}")
        sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    @classmethod
    def from_file(cls, path: str, device="cpu", dtype=torch.float32) -> "WanVAE":
        """Load ``Wan2.1_VAE.pth`` (or a .safetensors with the same keys); base dim inferred."""
        return cls.from_state_dict(_load_state_dict_file(str(path)), device=device, dtype=dtype,
                                   source=str(path))

    @classmethod
    def tiny(cls, dim: int = 4, seed: int = 0, device="cpu",
             dtype=torch.float32) -> "WanVAE":
        """Small random-weight VAE (same structure, base ``dim``) for tests and the offline demo."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(dim=dim)
            with torch.no_grad():  # non-trivial gammas / biases so every tensor matters
                for name, p in model.named_parameters():
                    if name.endswith("gamma"):
                        p.uniform_(0.5, 1.5)
                    elif name.endswith("bias"):
                        p.uniform_(-0.1, 0.1)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    # ------------------------------------------------------------------ memory-saver switches
    def enable_slicing(self, enabled: bool = True) -> None:
        self.use_slicing = enabled

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_height: Optional[int] = None,
                      tile_sample_min_width: Optional[int] = None,
                      tile_sample_overlap_height: Optional[int] = None,
                      tile_sample_overlap_width: Optional[int] = None,
                      tile_sample_halo: Optional[int] = None) -> None:
        """Spatial tiling (pixels; multiples of the spatial factor 8, 0 <= overlap < tile).

        Each tile is decoded (encoded) with ``tile_sample_halo`` extra pixels of context on every
        side that is not the frame border, which are cropped before blending; 0 decodes the bare
        tile (zero padding at its edges). Tiles blend over ``overlap`` with linear ramps."""
        vals = dict(tile_sample_min_height=tile_sample_min_height,
                    tile_sample_min_width=tile_sample_min_width,
                    tile_sample_overlap_height=tile_sample_overlap_height,
                    tile_sample_overlap_width=tile_sample_overlap_width,
                    tile_sample_halo=tile_sample_halo)
        new = {k: (getattr(self, k) if v is None else int(v)) for k, v in vals.items()}
        f = self.spatial_factor
        for k, v in new.items():
            if v < 0 or v % f:
                raise InputError(f"VAE tiling: {k}={v} must be a non-negative multiple of {f}")
        for ax in ("height", "width"):
            t, o = new[f"tile_sample_min_{ax}"], new[f"tile_sample_overlap_{ax}"]
            if t <= 0 or o >= t:
                raise InputError(f"VAE tiling: need 0 <= overlap < tile for {ax}, got tile {t}, "
                                 f"overlap {o}")
        for k, v in new.items():
            setattr(self, k, v)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def stream_decoder(self, clamp: bool = True) -> "StreamingDecoder":
        """A block-by-block decoder whose outputs, concatenated, equal ``decode`` of the whole
        latent sequence (see :mod:`s2v_fast.models.vae_stream`)."""
        from s2v_fast.models.vae_stream import StreamingDecoder
        return StreamingDecoder(self, clamp=clamp)

    # ------------------------------------------------------------------ latent normalisation
    def _scale(self, ref: torch.Tensor):
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(LATENT_MEAN, dtype=ref.dtype, device=ref.device).view(shape)
        std = torch.tensor(LATENT_STD, dtype=ref.dtype, device=ref.device)
        return mean, (1.0 / std).view(shape)

    @property
    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    # ------------------------------------------------------------------ untiled chunked passes
    def _encode_untiled(self, x: torch.Tensor) -> torch.Tensor:
        """Chunked causal encode of [B,3,T,H,W] -> normalised mu [B,16,1+(T-1)//4,H/8,W/8]."""
        cache = CausalCache()
        tf = self.temporal_factor
        n = 1 + (x.shape[2] - 1) // tf
        outs = [self.encoder(x[:, :, :1], cache)]
        for i in range(1, n):
            outs.append(self.encoder(x[:, :, 1 + tf * (i - 1):1 + tf * i], cache))
        out = outs[0] if n == 1 else torch.cat(outs, dim=2)
        del outs, cache
        mu = self.conv1(out)[:, :self.z_dim]
        mean, inv_std = self._scale(mu)
        return (mu - mean) * inv_std

    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised z -> the decoder's input: un-normalise, then ``conv2`` (1x1x1)."""
        mean, inv_std = self._scale(z)
        return self.conv2(z / inv_std + mean)

    def _decode_untiled(self, z: torch.Tensor) -> torch.Tensor:
        """Chunked causal decode of normalised z [B,16,n,h,w] -> [B,3,1+4(n-1),8h,8w] unclamped."""
        return per_latent_frame(self.decoder, self._decoder_input(z), CausalCache(),
                                self.temporal_factor)

    # ------------------------------------------------------------------ tiles (patch-parallel API)
    def _tile_grid(self, h_lat: int, w_lat: int) -> List[TileBox]:
        f = self.spatial_factor
        return tile_boxes(h_lat, w_lat, self.tile_sample_min_height // f,
                          self.tile_sample_min_width // f, self.tile_sample_overlap_height // f,
                          self.tile_sample_overlap_width // f)

    def decode_tile_boxes(self, h_lat: int, w_lat: int) -> List[TileBox]:
        """Tile boxes in latent units for a latent of spatial size ``h_lat x w_lat``."""
        return self._tile_grid(h_lat, w_lat)

    def encode_tile_boxes(self, height: int, width: int) -> List[TileBox]:
        """Tile boxes in *latent* units for a video of ``height x width`` pixels."""
        f = self.spatial_factor
        return self._tile_grid(height // f, width // f)

    def _with_halo(self, box: TileBox, h_lat: int, w_lat: int) -> TileBox:
        """``box`` (latent units) grown by the halo, clipped to the ``h_lat x w_lat`` frame."""
        m = self.tile_sample_halo // self.spatial_factor
        return TileBox(max(0, box.y0 - m), min(h_lat, box.y1 + m),
                       max(0, box.x0 - m), min(w_lat, box.x1 + m))

    @torch.no_grad()
    def decode_stem(self, z: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        """The decoder's stem (``Decoder3d.stem``) over whole latent frames: what tiles share.

        Its middle block attends over every position of a frame, which no tile can reproduce, and
        it runs at latent resolution (a few % of the decode's time and memory), so tiled decoding
        runs it once on the whole frame and tiles only the upsampling tail. ``cache`` carries a
        stream's history across calls (a fresh one when not given)."""
        x = self._decoder_input(z)
        cache = CausalCache() if cache is None else cache
        return torch.cat([self.decoder.stem(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], 2)

    @torch.no_grad()
    def decode_tile(self, z: torch.Tensor, box: TileBox, stem: Optional[torch.Tensor] = None,
                    cache: Optional[CausalCache] = None) -> torch.Tensor:
        """Unclamped pixels of latent ``box`` (pixel box = ``box.scaled(8)``): the upsampling
        tail over the box and its halo of the whole-frame stem features (``decode_stem(z)``,
        computed here when not given), cropped to the box. ``cache``: this tile's history in a
        stream (a fresh one when not given)."""
        f = self.spatial_factor
        if stem is None:
            stem = self.decode_stem(z)
        g = self._with_halo(box, *z.shape[-2:])
        out = per_latent_frame(self.decoder.tail, stem[..., g.y0:g.y1, g.x0:g.x1],
                               CausalCache() if cache is None else cache, self.temporal_factor)
        y0, x0 = (box.y0 - g.y0) * f, (box.x0 - g.x0) * f
        return out[..., y0:y0 + box.height * f, x0:x0 + box.width * f]

    @torch.no_grad()
    def encode_tile(self, video: torch.Tensor, box: TileBox) -> torch.Tensor:
        """Normalised mu of the pixels under latent ``box``, encoded with the halo around it."""
        f = self.spatial_factor
        g = self._with_halo(box, video.shape[-2] // f, video.shape[-1] // f)
        p = g.scaled(f)
        out = self._encode_untiled(video[..., p.y0:p.y1, p.x0:p.x1])
        y0, x0 = box.y0 - g.y0, box.x0 - g.x0
        return out[..., y0:y0 + box.height, x0:x0 + box.width]

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.spatial_factor
        h, w = z.shape[-2:]
        boxes = self.decode_tile_boxes(h, w)
        if len(boxes) == 1:
            return self._decode_untiled(z)
        stem = self.decode_stem(z)
        return tiled_apply(lambda b: self.decode_tile(z, b, stem), boxes, h * f, w * f, (f, 1),
                           self.tile_sample_overlap_height, self.tile_sample_overlap_width)

    def tiled_encode(self, video: torch.Tensor) -> torch.Tensor:
        f = self.spatial_factor
        H, W = video.shape[-2:]
        boxes = self.encode_tile_boxes(H, W)
        return tiled_apply(lambda b: self.encode_tile(video, b), boxes, H // f, W // f, (1, 1),
                           self.tile_sample_overlap_height // f,
                           self.tile_sample_overlap_width // f)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B,3,T,H,W]`` in [-1,1] -> normalised mu ``[B,16,1+(T-1)//4,H/8,W/8]``."""
        f = self.spatial_factor
        if video.dim() != 5 or video.shape[1] != 3:
            raise InputError(f"VAE encode expects [B,3,T,H,W], got {tuple(video.shape)}")
        if video.shape[2] < 1 or video.shape[3] % f or video.shape[4] % f:
            raise InputError(f"VAE encode: height and width must be multiples of {f} and T >= 1, "
                             f"got {tuple(video.shape)}")
        p = self._param
        video = video.to(device=p.device, dtype=p.dtype)
        run = self.tiled_encode if self.use_tiling else self._encode_untiled
        with torch.autocast(device_type=p.device.type, enabled=False):
            if self.use_slicing and video.shape[0] > 1:
                return torch.cat([run(v) for v in video.split(1)], dim=0)
            return run(video)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised ``z [B,16,n,h,w]`` -> video ``[B,3,1+4(n-1),8h,8w]`` (clamped to [-1,1])."""
        if z.dim() != 5 or z.shape[1] != self.z_dim or z.shape[2] < 1:
            raise InputError(f"VAE decode expects [B,{self.z_dim},n,h,w], got {tuple(z.shape)}")
        p = self._param
        z = z.to(device=p.device, dtype=p.dtype)
        run = self.tiled_decode if self.use_tiling else self._decode_untiled
        with torch.autocast(device_type=p.device.type, enabled=False):
            if self.use_slicing and z.shape[0] > 1:
                out = torch.cat([run(v) for v in z.split(1)], dim=0)
            else:
                out = run(z)
        return out.clamp_(-1, 1) if clamp else out
