"""Triton flash-attention forward for Hopper: non-causal, unmasked, layout [B, L, H, D] (spec §10.6).

    o[b, s, h] = softmax_j( q[b, s, h] . k[b, j, h] * scale ) @ v[b, :, h],  scale = 1/sqrt(D) default

Numerics (as FlashAttention-2/3): bf16/fp16 q, k, v; QK^T accumulated in fp32; online softmax in
fp32 with exp2 and the scale folded into one FMA (logit*scale*log2e - m); p rounded to the input
dtype before the PV product (fp32 accumulate); output in the input dtype. Lq != Lk is allowed
(cross-attention); any L (tail key blocks are masked with -inf, tail query rows are not stored).
Strided inputs are read in place (no transposes/copies): any batch/token/head strides, last dim
contiguous.

Two load paths, picked per config: plain pointer arithmetic, or on-device TMA tensor descriptors
(`tl.make_tensor_descriptor`, triton >= 3.4). `FLASH_CONFIGS` is the tuning list; the first call per
(D, dtype, Lq/Lk bucket) times every config (configs that fail to compile are skipped) and keeps
the fastest. Env: S2V_FLASH_CONFIG=<index> forces one config; S2V_FLASH_AUTOTUNE=0 uses the first
config that compiles, without timing.

CPU: under TRITON_INTERPRET=1 the kernel upcasts its dot operands to fp32 (the triton 3.9
interpreter computes garbage for bf16 x bf16 `tl.dot`); fp32 inputs are accepted there for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..options import env_options
from ._utils import (
    dot_upcast,
    ensure_tma_allocator,
    forced_config,
    has_tensor_descriptor,
    is_interpreter,
    kernels_usable,
    load_rows,
    outputs_agree,
    shape_bucket,
    to_dtype,
    triton,
    tl,
)

# bf16 output vs an fp32-softmax reference: p is rounded to bf16 before PV (FA-style) and the output
# once more, so errors are a few bf16 ulps of the output scale.
TOLERANCES = {
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}

# Tuning list: BLOCK_M, BLOCK_N, num_warps, num_stages, TMA (on-device tensor descriptors). The
# first entry is the H100's fastest; the others win on other shapes or GPUs by a few percent (all
# >= 450 TFLOP/s on the H100 at 32,760 / 79,200 tokens, results/attention_configs-*: entries under
# 80% of the best were dropped, among them every warp-specialised `tl.range` loop of triton 3.6,
# 230-428 TFLOP/s).
# Entry 0 holds one warpgroup per CTA in <= ~113 KB of shared memory, so two independent CTAs share
# an SM and one's softmax overlaps the other's MMAs; a two-warpgroup CTA (entries 1-4) runs
# QK^T -> wait -> CTA barrier -> softmax -> PV in lockstep and leaves the tensor cores idle during
# the softmax (sm_90 SASS of triton 3.6). Entry 0: 254 registers (spills only in the masked tail
# loop); 545-556 / 519-533 TFLOP/s over three H100 sweeps (cuDNN 587-590 / 560-565).
FLASH_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2, TMA=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=False),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=False),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, TMA=True),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, TMA=True),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=False),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True),
    # single-buffered, 168 registers and 50 KB: three CTAs per SM hide each other's loads
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=1, TMA=True),
]
_SUPPORTED_D = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634

if triton is not None:

    @triton.jit
    def _attn_inner(
        acc, l_i, m_i, q,
        k_src, v_src, offs_n, offs_d, skl, svl, Lk, qk_scale, bias_row,
        lo, hi,
        BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, TMA: tl.constexpr,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        for start_n in tl.range(lo, hi, BLOCK_N):
            if TMA:
                k = k_src.load([start_n, 0])
            else:
                k = load_rows(k_src, start_n + offs_n, offs_d, skl, Lk, MASK_N)
            qk = dot_upcast(q, tl.trans(k), None, UPCAST)
            if MASK_N:
                qk = tl.where((start_n + offs_n)[None, :] < Lk, qk, float("-inf"))
            if HAS_BIAS:  # per-key logit bias, pre-scaled by log2(e): s = qk*scale*log2e + bias
                kb = tl.load(bias_row + start_n + offs_n, mask=(start_n + offs_n) < Lk, other=0.0)
                qk = qk * qk_scale + kb[None, :]
                m_ij = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.math.exp2(qk - m_ij[:, None])
            else:
                m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
                p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if TMA:
                v = v_src.load([start_n, 0])
            else:
                v = load_rows(v_src, start_n + offs_n, offs_d, svl, Lk, MASK_N)
            acc = dot_upcast(to_dtype(p, v.dtype, INTERPRET), v, acc, UPCAST)
            m_i = m_ij
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, BIAS,
        qk_scale, H, Lq, Lk,
        sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh, sbb,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        TMA: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q_base = Q + b * sqb + h * sqh
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        o_base = O + b * sob + h * soh
        bias_row = BIAS + b * sbb
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[Lq, D], strides=[sql, 1], block_shape=[BLOCK_M, D])
            k_src = tl.make_tensor_descriptor(k_base, shape=[Lk, D], strides=[skl, 1], block_shape=[BLOCK_N, D])
            v_src = tl.make_tensor_descriptor(v_base, shape=[Lk, D], strides=[svl, 1], block_shape=[BLOCK_N, D])
            q = q_desc.load([start_m * BLOCK_M, 0])
        else:
            k_src = k_base
            v_src = v_base
            q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :], mask=offs_m[:, None] < Lq, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n_full = (Lk // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q, k_src, v_src, offs_n, offs_d, skl, svl, Lk, qk_scale, bias_row, 0, n_full,
            BLOCK_N, False, TMA, HAS_BIAS, UPCAST, INTERPRET)
        if n_full < Lk:
            acc, l_i, m_i = _attn_inner(
                acc, l_i, m_i, q, k_src, v_src, offs_n, offs_d, skl, svl, Lk, qk_scale, bias_row,
                n_full, Lk, BLOCK_N, True, TMA, HAS_BIAS, UPCAST, INTERPRET)
        out = to_dtype(acc / l_i[:, None], O.dtype.element_ty, INTERPRET)
        if TMA:
            o_desc = tl.make_tensor_descriptor(o_base, shape=[Lq, D], strides=[sol, 1], block_shape=[BLOCK_M, D])
            o_desc.store([start_m * BLOCK_M, 0], out)
        else:
            tl.store(o_base + offs_m[:, None] * sol + offs_d[None, :], out, mask=offs_m[:, None] < Lq)


def attention_reference(q, k, v, softmax_scale=None, key_bias=None):
    """fp32 softmax attention, [B, L, H, D] layout, output in q.dtype; ``key_bias`` [B, Lk] is
    added to every logit of key j (natural-log units, after the scale; -inf drops the key)."""
    D = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    mask = None if key_bias is None else key_bias.float()[:, None, None, :]
    o = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def _tma_ok(*tensors):
    if not has_tensor_descriptor():
        return False
    for t in tensors:
        es = t.element_size()
        if t.data_ptr() % 16 or any((t.stride(i) * es) % 16 for i in range(3)):
            return False
    return True


def _config_usable(cfg, tma_ok):
    return tma_ok or not cfg.get("TMA")


_TUNED: dict = {}


def _launch(cfg, q, k, v, out, scale, bias=None):
    """``bias``: [B, Lk] fp32 in log2 units (key_bias * log2(e)), or None."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    interp = is_interpreter()
    if cfg.get("TMA"):
        ensure_tma_allocator()
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, bias if bias is not None else out,
        scale * _LOG2E, H, Lq, Lk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        bias.stride(0) if bias is not None else 0,
        D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        TMA=bool(cfg.get("TMA")), HAS_BIAS=bias is not None, UPCAST=interp, INTERPRET=interp,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _pick_config(q, k, v, out, scale, bias=None):
    B, Lq, H, D = q.shape
    tma_ok = _tma_ok(q, k, v, out)
    tuning = env_options().kernels
    forced = forced_config(FLASH_CONFIGS, tuning.flash_config, "S2V_FLASH_CONFIG")
    if forced is not None:
        return forced
    key = (D, q.dtype, shape_bucket(Lq), shape_bucket(k.shape[1]), tma_ok, bias is not None)
    if key in _TUNED:
        return _TUNED[key]
    cands = [c for c in FLASH_CONFIGS if _config_usable(c, tma_ok)]
    if is_interpreter():
        cands = [c for c in cands if not c.get("TMA")] or cands
        _TUNED[key] = cands[0]
        return cands[0]
    tune = tuning.flash_autotune
    from triton.testing import do_bench

    best, best_t, baseline = None, float("inf"), None
    for cfg in cands:
        try:
            _launch(cfg, q, k, v, out, scale, bias)
            if baseline is None:
                baseline = out.clone()
            elif not outputs_agree(out, baseline):  # a miscompiled variant must never win
                continue
            if tune:
                t = do_bench(lambda: _launch(cfg, q, k, v, out, scale, bias), warmup=10, rep=40)
            else:
                t = 0.0
        except Exception:  # config does not compile / run on this triton or GPU: skip it
            continue
        if t < best_t:
            best, best_t = cfg, t
        if not tune:
            break
    if best is None:
        raise RuntimeError("no FLASH_CONFIGS entry compiled for this GPU / triton version")
    _TUNED[key] = best
    return best


def triton_attention(q, k, v, softmax_scale=None, *, out=None, config=None, key_bias=None):
    """q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16/fp16, last dim contiguous) -> [B, Lq, H, D] q.dtype.

    ``key_bias`` [B, Lk] (fp32, natural-log units): added to the logit of key j in batch b after
    the scale, -inf drops the key (compacted text keys, ``fast/text_kv.py``); every row must keep
    a finite key in the first BLOCK_N keys. `config` (a dict like the FLASH_CONFIGS entries)
    bypasses the tuner (benchmarks, tests)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    if out is None:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    dtypes = (torch.bfloat16, torch.float16) + ((torch.float32,) if is_interpreter() else ())
    bias_ok = key_bias is None or (key_bias.shape == (B, Lk) and kernels_usable(key_bias))
    ok = (
        kernels_usable(q, k, v, out) and bias_ok
        and q.dim() == 4 and k.shape == (B, Lk, H, D) and v.shape == k.shape
        and D in _SUPPORTED_D and q.dtype in dtypes
        and k.dtype == q.dtype and v.dtype == q.dtype and out.dtype == q.dtype
        and all(t.stride(-1) == 1 for t in (q, k, v, out))
    )
    if not ok:
        out.copy_(attention_reference(q, k, v, scale, key_bias))
        return out
    if B * H * Lq == 0:
        return out
    if Lk == 0:
        return out.zero_()
    bias = None if key_bias is None else (key_bias.float() * _LOG2E).contiguous()
    cfg = config if config is not None else _pick_config(q, k, v, out, scale, bias)
    if config is not None and cfg.get("TMA") and not _tma_ok(q, k, v, out):
        cfg = dict(cfg, TMA=False)
    _launch(cfg, q, k, v, out, scale, bias)
    return out
