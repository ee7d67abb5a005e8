"""Attention over a short key set (<= 256 keys) with a per-key logit bias: the text cross-attention
over compacted prompt keys (``fast/text_kv.py``, spec §10.7).

    o[b, s, h] = softmax_j( q[b, s, h] . k[b, j, h] * scale + bias[b, j] ) @ v[b, :, h]

With all keys in one tile there is no online softmax: each program loads its head's K, V and
bias once, then streams TILES query tiles through QK^T -> exp2 -> PV (the loop prefetches the next
q tile). The op is bound by reading q and writing o (the keys come from L2), so the point is to
keep DRAM busy: the flash kernel with the bias spends most of its time per CTA on prologue /
epilogue at this shape (34-38 % of the copy bandwidth, kernels_text_attention-*).

Numerics as the flash kernels: QK^T in fp32, exp2 with the scale folded in (bias pre-multiplied
by log2 e), p rounded to the input dtype before PV, fp32 row sum, one rounding of the output.
CPU: under TRITON_INTERPRET=1 the dot operands are upcast (see flash_attention.py).

``short_attention_probs`` runs the same kernel up to the softmax and writes the normalised
probabilities P [B, Lq, H, Lk] instead of P.V: the text cross-attention folded into its output
projection (``fast/folded_output.py``) multiplies them by Wo.V in one GEMM.
"""
from __future__ import annotations

import math

import torch

from ._utils import dot_upcast, is_interpreter, kernels_usable, next_pow2, to_dtype, triton, tl
from .flash_attention import attention_reference

MAX_KEYS = 256
_LOG2E = 1.4426950408889634
TILES = 8  # query tiles per program: K/V/bias loads amortised over 8 x BLOCK_M rows

if triton is not None:

    @triton.jit
    def _short_attention_kernel(
        Q, K, V, O, BIAS,
        qk_scale, H, Lq, Lk,
        sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sbb,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr,
        STAGES: tl.constexpr, HAS_BIAS: tl.constexpr, PROBS: tl.constexpr, UPCAST: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        # PROBS: O is P [B, Lq, H, Lk] (key index contiguous) and V is not read
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        nmask = offs_n < Lk
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :],
                    mask=nmask[:, None], other=0.0)
        if not PROBS:
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :],
                        mask=nmask[:, None], other=0.0)
        if HAS_BIAS:
            kb = tl.load(BIAS + b * sbb + offs_n, mask=nmask, other=float("-inf"))
        else:
            kb = tl.where(nmask, 0.0, float("-inf"))
        q_base = Q + b * sqb + h * sqh
        o_base = O + b * sob + h * soh
        for i in tl.range(0, TILES, num_stages=STAGES):
            rows = (pid * TILES + i) * BLOCK_M + offs_m
            rmask = (rows < Lq)[:, None]
            q = tl.load(q_base + rows[:, None] * sql + offs_d[None, :], mask=rmask, other=0.0)
            s = dot_upcast(q, tl.trans(k), None, UPCAST) * qk_scale + kb[None, :]
            p = tl.math.exp2(s - tl.max(s, 1)[:, None])
            l = tl.sum(p, 1)
            if PROBS:
                tl.store(o_base + rows[:, None] * sol + offs_n[None, :],
                         to_dtype(p / l[:, None], O.dtype.element_ty, INTERPRET), mask=rmask & nmask[None, :])
            else:
                o = dot_upcast(to_dtype(p, v.dtype, INTERPRET), v, None, UPCAST) / l[:, None]
                tl.store(o_base + rows[:, None] * sol + offs_d[None, :],
                         to_dtype(o, O.dtype.element_ty, INTERPRET), mask=rmask)


def short_attention_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Shapes this kernel takes (else use the flash kernel): <= MAX_KEYS keys, head dim 16-128."""
    D = q.shape[-1]
    return 0 < k.shape[1] <= MAX_KEYS and D in (16, 32, 64, 128)


def default_config(Lk: int) -> dict:
    """Launch parameters. Up to 128 keys: the fastest of 48 configs at 2 x 32,760 tokens x 119
    keys on the H100 (0.66 ms, 68 % of the copy bandwidth; cuDNN over the 512 padded keys 1.30 ms;
    short_attention_sweep-*). 129-256 keys: half the rows per tile for the wider score tile."""
    if max(16, next_pow2(Lk)) <= 128:
        return dict(BLOCK_M=128, TILES=TILES, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, TILES=TILES, num_warps=4, num_stages=2)


def short_attention_probs_reference(q, k, key_bias=None, softmax_scale=None):
    """softmax_j(q . k_j * scale + bias_j) in fp32 -> [B, Lq, H, Lk] in q's dtype."""
    D = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    s = torch.einsum("bqhd,bkhd->bqhk", q.float(), k.float()) * scale
    if key_bias is not None:
        s = s + key_bias.float()[:, None, None, :]
    return torch.softmax(s, dim=-1).to(q.dtype)


def short_attention(q, k, v, key_bias=None, softmax_scale=None, *, out=None, config=None):
    """q [B, Lq, H, D] (any strides, batch stride 0 allowed), k/v [B, Lk <= 256, H, D], key_bias
    [B, Lk] fp32 in natural-log units (-inf drops a key; every row needs one finite key) ->
    [B, Lq, H, D] in q's dtype. ``config``: launch parameters as ``default_config`` (sweeps)."""
    B, Lq, H, D = q.shape
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if not _launch(q, k, v, key_bias, softmax_scale, out, config):
        scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
        out.copy_(attention_reference(q, k, v, scale, key_bias))
    return out


def short_attention_probs(q, k, key_bias=None, softmax_scale=None, *, out=None, config=None):
    """The attention probabilities of ``short_attention``: [B, Lq, H, Lk] in q's dtype (each
    row normalised in fp32, then rounded once)."""
    B, Lq, H, D = q.shape
    if out is None:
        out = torch.empty((B, Lq, H, k.shape[1]), dtype=q.dtype, device=q.device)
    if not _launch(q, k, None, key_bias, softmax_scale, out, config):
        out.copy_(short_attention_probs_reference(q, k, key_bias, softmax_scale))
    return out


def _launch(q, k, v, key_bias, softmax_scale, out, config) -> bool:
    """Run the kernel (v None: probabilities into out); False when it cannot take these inputs."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    probs = v is None
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if is_interpreter() else ())
    vv = k if probs else v
    ok = (
        kernels_usable(q, k, vv, out, *(() if key_bias is None else (key_bias,)))
        and short_attention_supported(q, k)
        and k.shape == (B, Lk, H, D) and vv.shape == k.shape
        and out.shape == ((B, Lq, H, Lk) if probs else (B, Lq, H, D))
        and (key_bias is None or key_bias.shape == (B, Lk))
        and q.dtype in dtypes and k.dtype == q.dtype and vv.dtype == q.dtype and out.dtype == q.dtype
        and all(t.stride(-1) == 1 for t in (q, k, vv, out))
    )
    if not ok:
        return False
    if B * H * Lq == 0:
        return True
    cfg = config or default_config(Lk)
    BLOCK_M, T = cfg["BLOCK_M"], cfg["TILES"]
    interp = is_interpreter()
    bias = None if key_bias is None else (key_bias.float() * _LOG2E).contiguous()
    grid = (triton.cdiv(triton.cdiv(Lq, BLOCK_M), T), B * H)
    _short_attention_kernel[grid](
        q, k, vv, out, bias if bias is not None else out,
        scale * _LOG2E, H, Lq, Lk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        vv.stride(0), vv.stride(1), vv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bias.stride(0) if bias is not None else 0,
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=max(16, next_pow2(Lk)), TILES=T, STAGES=cfg["num_stages"],
        HAS_BIAS=bias is not None, PROBS=probs, UPCAST=interp, INTERPRET=interp,
        num_warps=cfg["num_warps"],
    )
    return True
