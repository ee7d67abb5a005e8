"""FP8 (e4m3) quantisation of attention inputs: the work :func:`quantize_qkv` does before the fp8
attention kernels run (``fp8_attention.py`` explains the scheme, its module docstring 1.-2.).

Q per (token, head), K mean-centred per channel or per key, V per channel (transposed, keys
contiguous), as Triton kernels (a column-statistics pass over K and V, then one quantise pass
each) and as plain torch (the ``*_reference`` functions: the exact emulation). Both attention
implementations consume it: the Triton kernel (``fp8_attention.py``) and the CUDA kernel
(``cuda_attention.cuda_fp8_attention``, ``k_perm32=True`` layout). A module of its own so that the
CUDA kernel's launcher does not import the fp8 attention module, which imports it.
"""
from __future__ import annotations

import warnings

import torch

from ..options import FP8_K_SCALES, env_options
from ._utils import is_interpreter, kernels_usable, next_pow2, triton, tl
from .fp8_gemm import AMAX_FLOOR, FP8_DTYPE, FP8_MAX, _inv_and_scale

LOG2E = 1.4426950408889634
K_SCALES = FP8_K_SCALES  # K's scale granularity (fp8_attention's docstring, 2.); default_k_scale()
_STATS_CHUNK = 256  # rows per partial-sum program of the K-mean / V-amax pass
# "quantize" (here), "attention" and "cuda" (fp8_attention) -> why a kernel path was given up;
# one dict for the whole fp8 attention path (benchmarks report it)
FALLBACKS: dict = {}

if triton is not None:
    from .fp8_gemm import _rdiv, e4m3_round

    @triton.jit
    def _col_stats_kernel(
        X, SUM, MAX, MIN, AMAX, L, C, D, sxb, sxl, sxh, n_chunks,
        CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
        DO_SUM: tl.constexpr, DO_MINMAX: tl.constexpr, DO_AMAX: tl.constexpr,
    ):
        """Partial column sum / max / min / abs-max of X [B, L, H, D] over CHUNK rows -> [B, n_chunks, H*D]."""
        chunk = tl.program_id(0)
        cb = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        coff = (cols // D).to(tl.int64) * sxh + (cols % D)
        base = X + b * sxb
        acc_s = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_a = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        acc_hi = tl.full([BLOCK_R, BLOCK_C], float("-inf"), tl.float32)
        acc_lo = tl.full([BLOCK_R, BLOCK_C], float("inf"), tl.float32)
        r0 = chunk * CHUNK
        for r in range(0, CHUNK, BLOCK_R):
            rows = r0 + r + tl.arange(0, BLOCK_R)
            m = (rows < L)[:, None] & cmask[None, :]
            x = tl.load(base + rows.to(tl.int64)[:, None] * sxl + coff[None, :], mask=m, other=0.0).to(tl.float32)
            if DO_SUM:
                acc_s += x
            if DO_MINMAX:
                acc_hi = tl.maximum(acc_hi, tl.where(m, x, float("-inf")))
                acc_lo = tl.minimum(acc_lo, tl.where(m, x, float("inf")))
            if DO_AMAX:
                acc_a = tl.maximum(acc_a, tl.abs(x))
        out = (b * n_chunks + chunk) * C + cols
        if DO_SUM:
            tl.store(SUM + out, tl.sum(acc_s, axis=0), mask=cmask)
        if DO_MINMAX:
            tl.store(MAX + out, tl.max(acc_hi, axis=0), mask=cmask)
            tl.store(MIN + out, tl.min(acc_lo, axis=0), mask=cmask)
        if DO_AMAX:
            tl.store(AMAX + out, tl.max(acc_a, axis=0), mask=cmask)

    @triton.jit
    def _quant_rows_hd_kernel(
        X, Y, S, MEAN, POW, CVEC, L, LY, LS, H, sxb, sxl, sxh, post,
        D: tl.constexpr, BLOCK_R: tl.constexpr, IS_K: tl.constexpr, KCHAN: tl.constexpr,
        PERM32: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Per-(token, head) e4m3 quantisation of X [B, L, H, D] -> Y [B*H, LY, D] fp8 contiguous.

        IS_K: X minus MEAN [B*H, D]; S [B*H, LS] fp16 = amax / 448 * POW[bh] (1 / k_pow); PERM32: row i goes
        to row :func:`perm32_rows` (i) and its scale to :func:`ks_cuda_index` (i) (the CUDA kernel's
        layout). Else (Q): S [B*H, LS] fp32 = amax / 448 * post * POW[bh].
        KCHAN (K's per-channel scales): K is x - MEAN times CVEC [B*H, D] (448 / channel abs-max),
        no S; Q is x times CVEC (the channel scales, amax / 448) before its per-token quantisation."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < L
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, D)
        x = tl.load(X + b * sxb + h * sxh + rows64[:, None] * sxl + offs_d[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        if IS_K:
            mean = tl.load(MEAN + bh.to(tl.int64) * D + offs_d)
            x = x - mean[None, :]
        if KCHAN:
            x = x * tl.load(CVEC + bh.to(tl.int64) * D + offs_d)[None, :]
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)
        inv = _rdiv(tl.full([BLOCK_R], 448.0, tl.float32), amax)
        if IS_K and KCHAN:
            y = tl.minimum(tl.maximum(x, -448.0), 448.0)
        else:
            y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
        if PERM32:
            rows64 = (rows64 & ~31) | (rows64 & 0x11) | ((rows64 & 0xC) >> 1) | ((rows64 & 0x2) << 2)
            srow = (rows64 & ~127) | (((rows64 >> 1) & 3) << 5) | (((rows64 >> 3) & 15) << 1) | (rows64 & 1)
        else:
            srow = rows64
        ybase = bh.to(tl.int64) * LY * D
        tl.store(Y + ybase + rows64[:, None] * D + offs_d[None, :], e4m3_round(y, INTERPRET),
                 mask=rmask[:, None])
        scale = _rdiv(amax, tl.full([BLOCK_R], 448.0, tl.float32))
        if IS_K:
            if not KCHAN:
                scale = (scale * tl.load(POW + bh)).to(tl.float16)  # POW holds 1 / k_pow here
                tl.store(S + bh.to(tl.int64) * LS + srow, scale, mask=rmask)
        else:
            scale = scale * post * tl.load(POW + bh)
            tl.store(S + bh.to(tl.int64) * LS + srow, scale, mask=rmask)

    @triton.jit
    def _quant_v_kernel(
        V, VT, INV, L, H, Lp, svb, svl, svh,
        D: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Per-channel e4m3 quantisation of V [B, L, H, D] -> VT [B*H, D, Lp] (keys contiguous).

        The tile is transposed in registers before the store, so each channel's BLOCK_R keys go
        out as whole 16-byte vectors (Lp is a multiple of 16; keys L..Lp get zeros): the untransposed
        store wrote single bytes and ran at ~1/6 of the copy bandwidth (H100 profile)."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, D)
        x = tl.load(V + b * svb + h * svh + rows64[:, None] * svl + offs_d[None, :],
                    mask=(rows < L)[:, None], other=0.0).to(tl.float32)
        inv = tl.load(INV + bh.to(tl.int64) * D + offs_d)
        y = tl.minimum(tl.maximum(x * inv[None, :], -448.0), 448.0)
        vt = VT + bh.to(tl.int64) * D * Lp
        tl.store(vt + offs_d.to(tl.int64)[:, None] * Lp + rows64[None, :], tl.trans(e4m3_round(y, INTERPRET)),
                 mask=(rows < Lp)[None, :])

# ----------------------------------------------------------------------------- torch reference
def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _bhld(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D] (view)


def quantize_q_reference(q: torch.Tensor, softmax_scale: float, k_pow: torch.Tensor = None,
                         k_chan: torch.Tensor = None):
    """q [B, L, H, D] -> (e4m3 [B, H, L, D], fp32 scale [B, H, L] incl. softmax scale * log2 e).

    ``k_pow`` [B, H]: K's per-head power of two (k_scale "token"), folded into the scale;
    ``k_chan`` [B, H, D]: K's channel scales (k_scale "channel"), multiplied into q first."""
    x = _bhld(q).float()
    if k_chan is not None:
        x = x * k_chan.float()[:, :, None, :]
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    inv, scale = _inv_and_scale(amax)
    scale = scale * (softmax_scale * LOG2E)
    if k_pow is not None:
        scale = scale * k_pow.float()[..., None]
    return _e4m3(x * inv[..., None]).contiguous(), scale


def k_mean_reference(k: torch.Tensor) -> torch.Tensor:
    """fp32 mean of k [B, L, H, D] over the sequence -> [B, H, D]."""
    return k.float().mean(dim=1)


def k_pow_of(head_amax: torch.Tensor) -> torch.Tensor:
    """A power of two >= (about) head_amax / 448, the largest key scale of the head: the per-key
    scales are stored in fp16 relative to it (<= ~1, fp16's precise range)."""
    return torch.exp2(torch.ceil(torch.log2(head_amax.clamp_min(AMAX_FLOOR) / FP8_MAX)))


def quantize_k_reference(k: torch.Tensor, k_mean: torch.Tensor = None, k_scale: str = "token"):
    """k [B, L, H, D] -> (e4m3 [B, H, L, D] of k - mean, ks, mean [B, H, D], q_factor).

    k_scale "token": ks fp16 [B, H, L] relative to q_factor = k_pow [B, H] fp32 (a power of two,
    :func:`k_pow_of` of the head's abs-max). "channel": ks None, q_factor = the channel scales
    [B, H, D] (channel abs-max over the sequence / 448), which Q takes on (q . k is unchanged)."""
    km = k_mean_reference(k) if k_mean is None else k_mean.float()
    x = _bhld(k).float() - km[:, :, None, :]
    if k_scale == "channel":
        inv, chan = _inv_and_scale(x.abs().amax(2).clamp_min(AMAX_FLOOR))
        return _e4m3(x * inv[:, :, None, :]).contiguous(), None, km, chan
    amax = x.abs().amax(-1).clamp_min(AMAX_FLOOR)
    k_pow = k_pow_of(amax.amax(-1))
    inv, scale = _inv_and_scale(amax)
    return _e4m3(x * inv[..., None]).contiguous(), (scale / k_pow[..., None]).half(), km, k_pow


def quantize_v_reference(v: torch.Tensor, v_amax: torch.Tensor = None):
    """v [B, L, H, D] -> (e4m3 [B, H, L, D], fp32 per-channel scale [B, H, D])."""
    x = _bhld(v).float()
    amax = (x.abs().amax(2) if v_amax is None else v_amax.float()).clamp_min(AMAX_FLOOR)
    inv, scale = _inv_and_scale(amax)
    return _e4m3(x * inv[:, :, None, :]).contiguous(), scale


# ----------------------------------------------------------------------------- quantisation launch
def default_k_scale() -> str:
    """K's scale granularity when the caller gives none (``S2V_FP8_ATTN_K``, default "channel")."""
    return env_options().kernels.fp8_attn_k

def _padded_len(L: int) -> int:
    return max(16, -(-L // 16) * 16)


def perm32_rows(n: torch.Tensor) -> torch.Tensor:
    """Storage row of key ``n`` in the CUDA fp8 kernel's K layout: inside each group of 32 keys,
    key 16h + 4t + 2c + b is stored at row 16h + 8c + 2t + b (csrc/fp8_attention_sm90.cu explains
    why: its score fragment then is the P.V operand without shuffles)."""
    return (n & ~31) | (n & 0x11) | ((n & 0xC) >> 1) | ((n & 0x2) << 2)


def ks_cuda_index(n: torch.Tensor) -> torch.Tensor:
    """Position of key ``n``'s scale in the CUDA layout: the scale of storage row r = 8i + 2t + b of
    a 128-key tile (:func:`perm32_rows`) goes to 32t + 2i + b, so that thread t of a quad finds the
    32 scales of its score columns in 64 contiguous bytes (four 16-byte loads)."""
    r = perm32_rows(n)
    return (r & ~127) | (((r >> 1) & 3) << 5) | (((r >> 3) & 15) << 1) | (r & 1)


def quantize_qkv(q, k, v, softmax_scale: float, pv: str, use_kernels: bool = None,
                 k_perm32: bool = False, k_scale: str = None) -> dict:
    """All quantisation work of one attention call (what the benchmark must include).

    Returns q8/k8 [B*H, L, D] e4m3, qs [B*H, Lq] fp32 (softmax scale, log2 e and k_pow folded in),
    km [B, H, D], k_scale; for k_scale "token" ks [B*H, Lk] fp16 (per key, relative to k_pow) and
    k_pow [B*H], for "channel" ks None and k_chan [B*H, D] (taken on by q); for pv="fp8" also
    vt [B*H, D, Lp] e4m3 (keys contiguous, Lp = Lk padded to 16) and vs [B*H, D] fp32.
    ``k_perm32`` (the CUDA kernel's layout): k8 holds Lkp = Lk padded to 32 rows, key n at row
    :func:`perm32_rows` (n); ks holds Lk padded to 128, key n's scale at :func:`ks_cuda_index`
    (n); zeros elsewhere; ``Lkp`` is in the result."""
    k_scale = k_scale or default_k_scale()
    if k_scale not in K_SCALES:
        raise ValueError(f"k_scale={k_scale!r}; use one of {K_SCALES}")
    if use_kernels is None:
        use_kernels = kernels_usable(q, k, v)
    if use_kernels and not FALLBACKS.get("quantize"):
        try:
            return _quantize_qkv_kernels(q, k, v, softmax_scale, pv, k_perm32, k_scale)
        except Exception as e:  # a kernel that does not compile here: the torch path, same numbers
            FALLBACKS["quantize"] = f"{type(e).__name__}: {str(e)[:200]}"
            warnings.warn(f"fp8 attention quantisation kernels failed ({FALLBACKS['quantize']}); using torch")
    return _quantize_qkv_torch(q, k, v, softmax_scale, pv, k_perm32, k_scale)


def _k_rows(Lk: int, k_perm32: bool, multiple: int = 32) -> int:
    return -(-Lk // multiple) * multiple if k_perm32 else Lk


def _quantize_qkv_torch(q, k, v, softmax_scale, pv, k_perm32=False, k_scale="token"):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    k8, ks, km, qf = quantize_k_reference(k, k_scale=k_scale)
    chan = k_scale == "channel"
    q8, qs = quantize_q_reference(q, softmax_scale, None if chan else qf, qf if chan else None)
    k8 = k8.view(B * H, Lk, D)
    ks = None if chan else ks.reshape(B * H, Lk)
    if k_perm32:
        n = torch.arange(Lk, device=dev)
        k8p = torch.zeros((B * H, _k_rows(Lk, True), D), dtype=FP8_DTYPE, device=dev)
        k8p.view(torch.uint8)[:, perm32_rows(n)] = k8.view(torch.uint8)
        k8 = k8p
        if not chan:
            ksp = torch.zeros((B * H, _k_rows(Lk, True, 128)), dtype=torch.float16, device=dev)
            ksp[:, ks_cuda_index(n)] = ks
            ks = ksp
    res = dict(q8=q8.view(B * H, Lq, D), qs=qs.reshape(B * H, Lq), k8=k8, ks=ks, km=km,
               k_scale=k_scale, Lkp=_k_rows(Lk, k_perm32))
    res["k_chan" if chan else "k_pow"] = qf.reshape(B * H, D) if chan else qf.reshape(B * H)
    if pv == "fp8":
        v8, vs = quantize_v_reference(v)
        Lp = _padded_len(Lk)
        vt = torch.zeros((B * H, D, Lp), dtype=FP8_DTYPE, device=dev)
        vt[:, :, :Lk] = v8.view(B * H, Lk, D).transpose(1, 2)
        res.update(vt=vt, vs=vs.reshape(B * H, D).contiguous(), Lp=Lp)
    return res


def _quantize_qkv_kernels(q, k, v, softmax_scale, pv, k_perm32=False, k_scale="token"):
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    res = {}
    interp = is_interpreter()
    C = H * D
    # 1. column statistics over the keys: K sum (-> mean), max and min (-> the head's centred
    # abs-max, max(max - mean, mean - min): rounding is monotonic, so exactly the torch path's) and,
    # for fp8 P.V, V abs-max; the interpreter runs programs one after another: few large ones there
    chunk = min(next_pow2(Lk), 1024) if interp else _STATS_CHUNK
    stats_r = chunk if interp else 16
    br = min(next_pow2(max(Lq, Lk)), 1024) if interp else 64
    n_chunks = triton.cdiv(Lk, chunk)
    block_c = min(512, next_pow2(C))
    grid = (n_chunks, triton.cdiv(C, block_c), B)
    kst = torch.empty((3, B, n_chunks, C), dtype=torch.float32, device=dev)
    _col_stats_kernel[grid](k, kst[0], kst[1], kst[2], kst[0], Lk, C, D, k.stride(0), k.stride(1),
                            k.stride(2), n_chunks, CHUNK=chunk, BLOCK_R=stats_r, BLOCK_C=block_c,
                            DO_SUM=True, DO_MINMAX=True, DO_AMAX=False, num_warps=4)
    km = (kst[0].sum(1) / Lk).view(B, H, D)
    kmc = km.reshape(B * H, D).contiguous()
    chan_amax = torch.maximum(kst[1].amax(1).view(B * H, D) - kmc, kmc - kst[2].amin(1).view(B * H, D))
    chan = k_scale == "channel"
    if chan:  # K per channel; q takes the channel scales on
        kvec, qvec = _inv_and_scale(chan_amax.clamp_min(AMAX_FLOOR))
        k_pow = torch.ones(B * H, dtype=torch.float32, device=dev)
    else:
        k_pow = k_pow_of(chan_amax.amax(1))
        kvec = qvec = kmc  # unused
    # 2. K and Q per (token, head)
    Lkp = _k_rows(Lk, k_perm32)
    Lks = _k_rows(Lk, k_perm32, 128)
    k8 = torch.empty((B * H, Lkp, D), dtype=FP8_DTYPE, device=dev)
    ks = None if chan else torch.empty((B * H, Lks), dtype=torch.float16, device=dev)
    if Lkp > Lk:  # the last group's rows that no key maps to
        k8.view(torch.uint8)[:, Lk & ~31:].zero_()
    if Lks > Lk and not chan:
        ks[:, Lk & ~127:].zero_()
    _quant_rows_hd_kernel[(triton.cdiv(Lk, br), B * H)](
        k, k8, k8 if chan else ks, kmc, (1.0 / k_pow).contiguous(), kvec.contiguous(), Lk, Lkp, Lks, H,
        k.stride(0), k.stride(1), k.stride(2), 1.0,
        D=D, BLOCK_R=br, IS_K=True, KCHAN=chan, PERM32=k_perm32, INTERPRET=interp, num_warps=8)
    q8 = torch.empty((B * H, Lq, D), dtype=FP8_DTYPE, device=dev)
    qs = torch.empty((B * H, Lq), dtype=torch.float32, device=dev)
    _quant_rows_hd_kernel[(triton.cdiv(Lq, br), B * H)](
        q, q8, qs, kmc, k_pow, qvec.contiguous(), Lq, Lq, Lq, H, q.stride(0), q.stride(1), q.stride(2),
        softmax_scale * LOG2E, D=D, BLOCK_R=br, IS_K=False, KCHAN=chan, PERM32=False, INTERPRET=interp,
        num_warps=8)
    res.update(q8=q8, qs=qs, k8=k8, ks=ks, km=km, k_scale=k_scale, Lkp=Lkp)
    res["k_chan" if chan else "k_pow"] = qvec if chan else k_pow
    if pv == "fp8":
        vmax = torch.empty((B, n_chunks, C), dtype=torch.float32, device=dev)
        _col_stats_kernel[grid](v, vmax, vmax, vmax, vmax, Lk, C, D, v.stride(0), v.stride(1), v.stride(2),
                                n_chunks, CHUNK=chunk, BLOCK_R=stats_r, BLOCK_C=block_c, DO_SUM=False,
                                DO_MINMAX=False, DO_AMAX=True, num_warps=4)
        amax = vmax.amax(1).view(B * H, D).clamp_min(AMAX_FLOOR)
        inv, vs = _inv_and_scale(amax)
        Lp = _padded_len(Lk)
        vt = torch.empty((B * H, D, Lp), dtype=FP8_DTYPE, device=dev)
        if Lp > Lk:
            vt[:, :, Lk:].zero_()
        _quant_v_kernel[(triton.cdiv(Lk, br), B * H)](
            v, vt, inv.contiguous(), Lk, H, Lp, v.stride(0), v.stride(1), v.stride(2),
            D=D, BLOCK_R=br, INTERPRET=interp, num_warps=8)
        res.update(vt=vt, vs=vs.contiguous(), Lp=Lp)
    return res
