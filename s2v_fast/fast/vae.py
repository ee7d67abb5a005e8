"""Fast Wan2.1 VAE (issue 25): a transform of the plain fp32 :class:`~s2v_fast.models.vae.WanVAE`.

    from s2v_fast.fast.vae import apply_fast_vae
    vae = apply_fast_vae(WanVAE.from_file(path, device="cuda"))   # in place; returns ``vae``
    video = vae.decode(z)            # float32 [B,3,T,H,W] in [-1, 1], as before
    mu = vae.encode(video)           # float32 normalised mu
    dec = vae.stream_decoder()       # streaming, tiled, sliced and patch-parallel decode as before

The plain model stays the reference math (and ``--precision reference``); this module changes how
it runs, not what it computes. It swaps the classes of the VAE's modules for subclasses that
override ``forward`` only, so parameter names, the chunked causal drivers of ``vae.py`` (per
latent frame decode, ``[0],[1..4],...`` encode), tiling (``vae_tiling.py``) and streaming
(``vae_stream.py``) are shared with the reference unchanged:

* **dtype** (``dtype``, default bf16): the encoder and decoder bodies (every conv, the middle
  attention) have ``dtype`` weights and activations; convs and matmuls accumulate in fp32 (cuDNN /
  cuBLAS for bf16 inputs). Kept in fp32: every RMS_norm's statistics and gamma (the norm runs in
  fp32 and rounds its output once), the latent-distribution head (``encoder.head`` and the top
  ``conv1``), the decoder's input ``conv2`` and its output head (``decoder.head``: the norm feeds
  the fp32 output conv unrounded). ``decode`` and ``encode`` return fp32.
* **channels-last 3D**: conv weights and activations are ``torch.channels_last_3d`` (NDHWC: the
  layout of cuDNN's fastest bf16 kernels); the per-frame 2D paths (resample convs, attention) are
  views of it (``[B*T, C, H, W]`` channels-last, or ``[B*T, H*W, C]`` tokens), not copies.
* **preallocated causal histories**: each temporal conv keeps one buffer ``[hist | current
  frames]`` in its :class:`~s2v_fast.models.vae.CausalCache` slot, writes the new frames into it,
  convolves the buffer and moves the last two frames to its front; the reference concatenates
  (and allocates) ``[history, x]`` and clones the history on every call. Same math, same cache
  semantics (``cache_nbytes`` stays flat), fixed addresses (what a CUDA graph needs).
* **fused RMS_norm + SiLU**: one pass over channels-last rows
  (:mod:`s2v_fast.kernels.channel_norm`, Triton on CUDA; its torch reference elsewhere).
* **upsample**: the temporal interleave of ``upsample3d`` and the nearest-exact x2 (an exact pixel
  repeat) are one copy; the reference permutes, upcasts to fp32, interpolates and casts back.

Accuracy against the fp32 model (tests/test_vae_fast.py; bench/bench_vae.py on the full-size
VAE): see :func:`decode_accuracy` for the metrics and the tests for the bounds and measured values.
``dtype=torch.float32`` applies the layout and buffer changes alone (equal to the reference up to
the conv algorithms' summation order). Not implemented here: CUDA graphs / ``torch.compile`` of
the per-latent-frame step (the histories' fixed addresses are the prerequisite).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.channel_norm import channel_norm
from ..models.vae import (CACHE_T, AttentionBlock, CausalCache, CausalConv3d, Resample,
                          ResidualBlock, RMSNorm, WanVAE)

__all__ = ["apply_fast_vae", "is_fast_vae", "decode_accuracy"]

CL3 = torch.channels_last_3d
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _prep(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` [B,C,T,H,W] in ``dtype`` and channels-last 3D (no copy when it already is)."""
    return x.to(dtype=dtype, memory_format=CL3)


def _feed(cache: CausalCache, key: nn.Module, x: torch.Tensor, n_hist: int) -> torch.Tensor:
    """The history buffer of ``key``: ``[n_hist frames of history | x]`` (zeros before the first
    call), with ``x`` written into it. Re-allocated (history carried) when ``x``'s frame count
    changes, which happens once per stream (the first chunk has fewer frames)."""
    b, c, t, h, w = x.shape
    buf = cache.get(key)
    if buf is None or buf.shape[2] != n_hist + t or buf.dtype != x.dtype:
        new = torch.empty((b, c, n_hist + t, h, w), dtype=x.dtype, device=x.device,
                          memory_format=CL3).zero_()
        if buf is not None:
            if (buf.shape[:2], buf.shape[3:]) != ((b, c), (h, w)):
                raise RuntimeError(f"causal history {tuple(buf.shape)} does not fit input "
                                   f"{tuple(x.shape)}")
            new[:, :, :n_hist] = buf[:, :, :n_hist]
        buf = new
        cache.set(key, buf)
    buf[:, :, n_hist:] = x
    return buf


def _roll(buf: torch.Tensor, n_hist: int) -> None:
    """Move the last ``n_hist`` frames of ``buf`` to its front (the next call's history)."""
    t = buf.shape[2] - n_hist
    src = buf[:, :, t:]
    if t < n_hist or buf.shape[0] > 1:  # the two slices would share memory ranges
        src = src.clone()
    buf[:, :, :n_hist] = src


class _FastCausalConv3d(CausalConv3d):
    """CausalConv3d over a preallocated history buffer (``fast_dtype`` weights and input)."""

    fast_dtype: torch.dtype

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        x = _prep(x, self.fast_dtype)
        tp = self.time_pad
        if tp == 0:
            return self._conv_forward(x, self.weight, self.bias)
        if cache is None:
            return self._conv_forward(F.pad(x, (0, 0, 0, 0, tp, 0)), self.weight, self.bias)
        buf = _feed(cache, self, x, tp)
        y = self._conv_forward(buf, self.weight, self.bias)
        _roll(buf, tp)
        return y


class _FastRMSNorm(RMSNorm):
    """RMSNorm (+ SiLU) in fp32 over channels-last rows, output rounded once to ``out_dtype``."""

    out_dtype: torch.dtype
    use_kernel: Optional[bool]

    def rows(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """Norm over the last dim of ``x [..., C]``."""
        return channel_norm(x, self.gamma, silu, self.out_dtype, self.use_kernel)

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """Norm over the channels of a video ``[B, C, T, H, W]`` (channels-last out)."""
        x = x.to(memory_format=CL3)
        return self.rows(x.permute(0, 2, 3, 4, 1), silu).permute(0, 4, 1, 2, 3)


class _FastResidualBlock(ResidualBlock):
    fast_dtype: torch.dtype

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        r = self.residual
        x = _prep(x, self.fast_dtype)
        h = x if self.shortcut is None else self.shortcut(x)
        y = r[2](r[0](x, silu=True), cache)
        y = r[6](r[3](y, silu=True), cache)
        return y.add_(h)


class _FastAttentionBlock(AttentionBlock):
    """Per-frame attention on the channels-last tokens ``[B*T, H*W, C]`` (a view of the input)."""

    fast_dtype: torch.dtype

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        x = _prep(x, self.fast_dtype)
        b, c, t, h, w = x.shape
        tok = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
        qkv = F.linear(self.norm.rows(tok), self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = F.linear(y, self.proj.weight.flatten(1), self.proj.bias).add_(tok)
        return y.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class _FastResample(Resample):
    fast_dtype: torch.dtype

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = _prep(x, self.fast_dtype)
        if self.mode.startswith("upsample"):
            return self._upsample(x, cache)
        b, c, t, h, w = x.shape
        y = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # channels-last 2D view
        y = self.resample[1](F.pad(y, (0, 1, 0, 1)))
        y = y.permute(0, 2, 3, 1).reshape(b, t, *y.shape[2:], c).permute(0, 4, 1, 2, 3)
        if self.mode == "downsample3d":
            first = cache.get(self) is None
            buf = _feed(cache, self, y, 1)  # [last frame of the previous chunk | y]
            if not first:  # the first chunk passes through
                y = self.time_conv(buf)
            _roll(buf, 1)
        return y

    def _upsample(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        v = x.permute(0, 2, 3, 4, 1)[:, :, None]  # [b, t, 1, h, w, c]
        if self.mode == "upsample3d":
            if cache.get(self) is None:  # first chunk: no temporal upsample
                cache.set(self, True)
            else:  # time_conv c -> 2c; output frame 2*tau + j takes channels j*c..(j+1)*c-1
                y = self.time_conv(x, cache)
                v = y.permute(0, 2, 3, 4, 1).unflatten(-1, (2, c)).permute(0, 1, 4, 2, 3, 5)
        k = v.shape[2]
        # nearest-exact x2 is an exact 2x2 pixel repeat: one copy does it and the interleave
        u = v[:, :, :, :, None, :, None, :].expand(b, t, k, h, 2, w, 2, c)
        u = u.reshape(b * t * k, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
        y = self.resample[1](u)
        c2 = y.shape[1]
        return y.permute(0, 2, 3, 1).reshape(b, t * k, 2 * h, 2 * w, c2).permute(0, 4, 1, 2, 3)


_SWAPS = ((CausalConv3d, _FastCausalConv3d), (RMSNorm, _FastRMSNorm),
          (ResidualBlock, _FastResidualBlock), (AttentionBlock, _FastAttentionBlock),
          (Resample, _FastResample))


def is_fast_vae(vae: WanVAE) -> bool:
    return getattr(vae, "fast_dtype", None) is not None


@torch.no_grad()
def apply_fast_vae(vae: WanVAE, dtype: torch.dtype = torch.bfloat16,
                   norm_kernel: Optional[bool] = None) -> WanVAE:
    """Turn ``vae`` (a plain fp32 :class:`WanVAE`) into the fast path, in place; returns it.

    ``dtype``: bf16 (the fast path), fp16 (same tensor-core rate, ~8x smaller rounding error;
    whether the trained VAE's activations stay in fp16's range is unverified) or fp32 (layout
    and buffers only, for checking).
    ``norm_kernel``: the fused RMS_norm + SiLU Triton kernel — None: on CUDA tensors, True:
    wherever Triton runs (the interpreter on a CPU: slow, for tests), False: never."""
    if dtype not in DTYPES:
        raise ValueError(f"fast VAE dtype must be one of {DTYPES}, got {dtype}")
    if is_fast_vae(vae):
        raise ValueError("apply_fast_vae: the VAE is already on the fast path")
    if vae._param.dtype != torch.float32:
        raise ValueError(f"apply_fast_vae expects the fp32 VAE, got {vae._param.dtype}")
    fp32 = {id(m) for m in (vae.conv1, vae.conv2, *vae.encoder.head, *vae.decoder.head)}
    for m in vae.modules():
        for plain, fast in _SWAPS:
            if type(m) is plain:
                m.__class__ = fast
        keep = id(m) in fp32
        if isinstance(m, CausalConv3d) and m.time_pad not in (0, CACHE_T):
            raise ValueError(f"causal conv with time padding {m.time_pad} != {CACHE_T}")
        if isinstance(m, RMSNorm):
            m.out_dtype = torch.float32 if keep else dtype
            m.use_kernel = norm_kernel
        elif isinstance(m, (nn.Conv3d, nn.Conv2d)):
            fmt = CL3 if isinstance(m, nn.Conv3d) else torch.channels_last
            m.fast_dtype = torch.float32 if keep else dtype
            m.weight.data = m.weight.data.to(m.fast_dtype, memory_format=fmt)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(m.fast_dtype)
        elif isinstance(m, (ResidualBlock, AttentionBlock, Resample)):
            m.fast_dtype = dtype
    vae.fast_dtype = dtype
    return vae


def decode_accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``psnr_db`` (peak-to-peak 2: videos in [-1, 1]; 10*log10(4 / MSE)) and ``max_abs`` of
    ``out`` against ``ref``, in fp64."""
    d = out.detach().double().cpu() - ref.detach().double().cpu()
    mse = float(d.square().mean())
    return dict(psnr_db=10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-30))).item(),
                max_abs=float(d.abs().max()))
