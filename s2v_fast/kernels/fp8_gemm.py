"""FP8 (e4m3) GEMMs for the DiT linears: per-token activation scales x per-output-channel weights.

    y[m, n] = (sum_k a8[m, k] * w8[n, k]) * sa[m] * sw[n] + bias[n]            (fp32 accumulate)

* Weights: quantised once (:func:`quantize_weight`): sw[n] = amax_k |W[n, k]| / 448,
  w8 = e4m3(W * (448 / amax)) (round to nearest even; the row maximum maps exactly to +-448).
* Activations: quantised per token on every call by one Triton pass over the rows
  (:func:`quantize_rows`): the row is held in registers, its amax taken, fp8 values and the fp32
  scale written. Same formula as the weights (the kernel uses correctly rounded divisions, so it is
  bit-identical to the torch reference :func:`quantize_rows_reference`).
* GEMM: ``torch._scaled_mm(a8, w8.t(), scale_a=[M,1], scale_b=[1,N], bias, out_dtype=bf16)``
  (rowwise scaling; Hopper, torch >= 2.5). Where that is unavailable (CPU, odd shapes, other
  GPUs) the module *emulates* exactly the same quantisation: dequantise (fp8 -> fp32 * scales) and
  matmul in fp32, so CPU tests check the quantiser and the plumbing.

Accuracy (measured on CPU with the emulation, 512 x 5120 -> 1024, vs an fp32 GEMM of the same
bf16 inputs): relative L2 3.6-3.8 %, mean row cosine 0.9993. e4m3 keeps 3 mantissa bits: one
rounding costs ~2.7 % RMS relative per operand, so an incoherent dot product (random signs)
lands at ~sqrt(2) x 2.7 % = 3.8 %; that floor does not depend on the scaling granularity.
Outputs that are coherent sums (trained weights aligned with their inputs) do better.
"""
from __future__ import annotations

import functools
import warnings

import torch

from ..options import env_options
from ._utils import is_interpreter, kernels_usable, next_pow2, to_dtype, triton, tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Smallest amax used for a scale: an all-zero row quantises to zeros with a tiny positive scale
# (no 0/0). 2^-100 keeps 448/amax finite in fp32.
AMAX_FLOOR = 2.0 ** -100

if triton is not None:

    @triton.jit
    def e4m3_round(x, INTERPRET: tl.constexpr):
        """fp32 (|x| <= 448, already clamped) -> float8e4nv, round to nearest even.

        On the GPU the cast is ``cvt.rn.satfinite.e4m3x2.f32``. The triton 3.9 CPU interpreter's
        fp32 -> fp8 cast is wrong (a mantissa round-up does not carry into the exponent: 7.9 ->
        4.0; ties and subnormals are truncated), so under the interpreter round by hand first and
        hand it an exactly representable value: normal range (|x| >= 2^-6) by rounding the fp32
        mantissa to 3 bits, subnormal range (spacing 2^-9) with the 1.5 * 2^14 magic-number add.
        """
        if INTERPRET:
            bits = x.to(tl.int32, bitcast=True)
            neg = bits < 0  # sign bit (also for -0.0)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
            xn = bits.to(tl.float32, bitcast=True)
            xa = tl.abs(x)
            xs = (xa + 24576.0) - 24576.0
            xs = tl.where(neg, -xs, xs)
            x = tl.where(xa < 0.015625, xs, xn)
        return x.to(tl.float8e4nv)

    if hasattr(tl.math, "div_rn"):

        @triton.jit
        def _rdiv(a, b):
            """Correctly rounded fp32 division (torch's ``/``; the default GPU ``/`` is approximate)."""
            return tl.math.div_rn(a, b)

    else:  # pragma: no cover

        @triton.jit
        def _rdiv(a, b):
            return a / b

    @triton.jit
    def _gelu_in_dtype(x, GELU: tl.constexpr, XDTYPE: tl.constexpr, INTERPRET: tl.constexpr):
        """fp32 x -> gelu_tanh(x) rounded to XDTYPE (as F.gelu on an XDTYPE tensor), back in fp32."""
        if GELU:
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            x = 0.5 * x * (2.0 - 2.0 / (1.0 + tl.exp(tl.minimum(2.0 * u, 80.0))))  # 1 + tanh(u)
            if XDTYPE != tl.float32:
                x = to_dtype(x, XDTYPE, INTERPRET).to(tl.float32)
        return x

    @triton.jit
    def _quant_rows_kernel(
        X, Y, S, M, K, sxm, sym,
        BLOCK_K: tl.constexpr, ROWS: tl.constexpr, SINGLE: tl.constexpr, GELU: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Per-row e4m3 quantisation of X [M, K] (any float dtype) -> Y [M, K] fp8, S [M] fp32;
        GELU: of gelu_tanh(X) (computed in fp32, rounded to X's dtype first, as F.gelu)."""
        xdt = X.dtype.element_ty
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        if SINGLE:  # the whole row lives in registers: one read, one write
            mask = rmask[:, None] & (cols[None, :] < K)
            x = tl.load(X + rows64[:, None] * sxm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = _gelu_in_dtype(x, GELU, xdt, INTERPRET)
            amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)
            inv = _rdiv(tl.full([ROWS], 448.0, tl.float32), amax)
            y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
            tl.store(Y + rows64[:, None] * sym + cols[None, :], e4m3_round(y, INTERPRET), mask=mask)
        else:  # long rows: amax pass, then a quantise pass (the re-read hits L2)
            amax = tl.full([ROWS], 7.888609052210118e-31, tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
                x = tl.load(X + rows64[:, None] * sxm + (k0 + cols)[None, :], mask=mask, other=0.0)
                x = _gelu_in_dtype(x.to(tl.float32), GELU, xdt, INTERPRET)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            inv = _rdiv(tl.full([ROWS], 448.0, tl.float32), amax)
            for k0 in range(0, K, BLOCK_K):
                mask = rmask[:, None] & ((k0 + cols)[None, :] < K)
                x = tl.load(X + rows64[:, None] * sxm + (k0 + cols)[None, :], mask=mask, other=0.0)
                x = _gelu_in_dtype(x.to(tl.float32), GELU, xdt, INTERPRET)
                y = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
                tl.store(Y + rows64[:, None] * sym + (k0 + cols)[None, :], e4m3_round(y, INTERPRET), mask=mask)
        scale = _rdiv(amax, tl.full([ROWS], 448.0, tl.float32))
        tl.store(S + rows64, scale, mask=rmask)


# ----------------------------------------------------------------------------- references
def quantize_rows_reference(x: torch.Tensor, gelu: bool = False):
    """x [..., K] -> (e4m3 [..., K], fp32 scale [...]) with x ~= fp8.float() * scale[..., None];
    ``gelu``: of ``F.gelu(x, approximate="tanh")`` (fp32 math, rounded to x's dtype)."""
    if gelu:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").to(x.dtype)
    xf = x.float()
    amax = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR)
    inv, scale = _inv_and_scale(amax)
    q = (xf * inv[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _inv_and_scale(amax: torch.Tensor):
    """(448 / amax, amax / 448) as correctly rounded fp32 tensor-tensor divisions, like the
    kernels' ``div_rn`` (torch turns ``scalar / t`` into ``reciprocal(t) * scalar``, and CUDA
    turns ``t / scalar`` into a multiply by the reciprocal: both can differ by one ulp)."""
    m = torch.full_like(amax, FP8_MAX)
    return torch.div(m, amax), torch.div(amax, m)


def quantize_weight(w: torch.Tensor, chunk_rows: int = 4096):
    """Weight [N, K] -> (e4m3 [N, K] contiguous, fp32 per-output-channel scale [N]).

    Chunked over output channels so a 13824 x 5120 weight needs only a small fp32 temporary."""
    N = w.shape[0]
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty(N, dtype=torch.float32, device=w.device)
    for n0 in range(0, N, chunk_rows):
        q[n0:n0 + chunk_rows], s[n0:n0 + chunk_rows] = quantize_rows_reference(w[n0:n0 + chunk_rows])
    return q, s


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 [..., K] * fp32 scale [...] -> fp32."""
    return q.float() * scale.float()[..., None]


def fp8_linear_reference(a8, sa, w8, sw, bias=None, out_dtype=torch.bfloat16):
    """The exact emulation: dequantise both operands, fp32 matmul, fp32 bias, cast once."""
    y = dequantize(a8, sa) @ dequantize(w8, sw).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ----------------------------------------------------------------------------- quantiser launch
# (num_warps, ROWS) per row-length class; tried in order, the first that compiles is kept.
_QUANT_LAUNCH = {
    "small": [(4, 4), (2, 4), (4, 1)],  # K <= 2048
    "mid": [(8, 1), (4, 1), (16, 1)],  # K <= 8192
    "large": [(16, 1), (8, 1), (32, 1)],  # K <= 16384
    "loop": [(8, 1), (4, 1)],  # longer rows, BLOCK_K 4096 chunks
}
_QUANT_OK: dict = {}
_QUANT_FAILED: set = set()


def _quant_class(K: int) -> str:
    if K <= 2048:
        return "small"
    if K <= 8192:
        return "mid"
    if K <= 16384:
        return "large"
    return "loop"


def _launch_quant(x2, y, s, cls, num_warps, rows, gelu=False):
    M, K = x2.shape
    single = cls != "loop"
    block_k = next_pow2(K) if single else 4096
    interp = is_interpreter()
    grid = (triton.cdiv(M, rows),)
    _quant_rows_kernel[grid](x2, y, s, M, K, x2.stride(0), y.stride(0),
                             BLOCK_K=block_k, ROWS=rows, SINGLE=single, GELU=gelu, INTERPRET=interp,
                             num_warps=num_warps)


def quantize_rows(x: torch.Tensor, out: torch.Tensor = None, scale: torch.Tensor = None,
                  gelu: bool = False):
    """Per-row (per-token) e4m3 quantisation, one Triton pass: x [..., K] -> (fp8 [M, K], fp32 [M]).

    ``gelu``: quantise gelu_tanh(x) instead, computed in the same pass (the FFN's second linear:
    saves writing and re-reading the GELU output). Falls back to :func:`quantize_rows_reference`
    where the kernel cannot run (no triton, CPU without the interpreter) or no launch config
    compiles; the numbers are the same (with ``gelu``: up to the last bit of tanh, see tests)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = out if out is not None else torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = scale if scale is not None else torch.empty((M,), dtype=torch.float32, device=x.device)
    cls = _quant_class(K)
    key = (cls, bool(gelu))  # launch configs are kept per row class and variant
    if M == 0 or K == 0 or not kernels_usable(x2, y, s) or key in _QUANT_FAILED:
        q, sc = quantize_rows_reference(x2, gelu)
        y.copy_(q)
        s.copy_(sc)
        return y, s
    cands = [_QUANT_OK[key]] if key in _QUANT_OK else _QUANT_LAUNCH[cls]
    if is_interpreter() and cls != "loop":  # the interpreter runs programs one by one: few, big ones
        cands = [(4, min(next_pow2(M), max(1, 65536 // next_pow2(K))))]
    for num_warps, rows in cands:
        try:
            _launch_quant(x2, y, s, cls, num_warps, rows, gelu)
            if not is_interpreter():
                _QUANT_OK[key] = (num_warps, rows)
            return y, s
        except Exception as e:  # config does not compile on this triton / GPU: next one
            last = e
    _QUANT_FAILED.add(key)
    warnings.warn(f"fp8 row quantiser: no launch config compiled for K={K} ({last!r}); using torch")
    q, sc = quantize_rows_reference(x2, gelu)
    y.copy_(q)
    s.copy_(sc)
    return y, s


# ----------------------------------------------------------------------------- GEMM
_SCALED_MM_STATE = {"bias": True, "ok": True, "error": None}


@functools.lru_cache(maxsize=None)
def _scaled_mm_capable(device_index: int) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    major, minor = torch.cuda.get_device_capability(device_index)
    return (major, minor) >= (8, 9)


def scaled_mm_usable(a8: torch.Tensor, w8: torch.Tensor, out_dtype) -> bool:
    """Can ``torch._scaled_mm`` rowwise run this product (CUDA sm_89+/sm_90, bf16 out, K, N % 16)?"""
    if not (a8.is_cuda and w8.is_cuda) or not _SCALED_MM_STATE["ok"]:
        return False
    if env_options().kernels.fp8_gemm_emulate:
        return False
    K, N = a8.shape[1], w8.shape[0]
    return out_dtype == torch.bfloat16 and K % 16 == 0 and N % 16 == 0 and \
        _scaled_mm_capable(a8.device.index or 0)


def _scaled_mm(a8, sa, w8, sw, bias, out_dtype, use_fast_accum=False):
    kw = dict(scale_a=sa.view(-1, 1), scale_b=sw.view(1, -1), out_dtype=out_dtype,
              use_fast_accum=use_fast_accum)
    if bias is not None and _SCALED_MM_STATE["bias"]:
        try:
            return torch._scaled_mm(a8, w8.t(), bias=bias.to(out_dtype), **kw)
        except RuntimeError:  # bias not supported with rowwise scaling here: add it after
            _SCALED_MM_STATE["bias"] = False
    y = torch._scaled_mm(a8, w8.t(), **kw)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def fp8_gemm(a8, sa, w8, sw, bias=None, out_dtype=torch.bfloat16, use_fast_accum=False):
    """y [M, N] = (a8 [M, K] * sa [M]) @ (w8 [N, K] * sw [N])^T + bias, in out_dtype."""
    if scaled_mm_usable(a8, w8, out_dtype):
        try:
            return _scaled_mm(a8, sa, w8, sw, bias, out_dtype, use_fast_accum)
        except RuntimeError as e:  # e.g. a torch build without rowwise fp8: emulate from now on
            _SCALED_MM_STATE.update(ok=False, error=repr(e)[:300])
            warnings.warn(f"torch._scaled_mm rowwise failed ({e!r:.200}); emulating the fp8 GEMM")
    return fp8_linear_reference(a8, sa, w8, sw, bias, out_dtype)


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor, bias=None,
               out_dtype=None, use_fast_accum=False) -> torch.Tensor:
    """Linear with per-token fp8 activations: x [..., K] -> [..., N] (out_dtype, default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    a8, sa = quantize_rows(x)
    y = fp8_gemm(a8, sa, w8, sw, bias, out_dtype, use_fast_accum)
    return y.reshape(*lead, w8.shape[0])


# ----------------------------------------------------------------------------- test / bench data
def realistic_linear_input(M: int, K: int, *, seed: int = 0, device="cpu", dtype=torch.bfloat16,
                           outliers: int = 8, outlier_scale=(10.0, 30.0), gelu: bool = False):
    """DiT-like GEMM input [M, K]: LayerNorm'd tokens under adaLN modulation (per-channel scale
    1 + N(0, 0.5^2), shift N(0, 0.3^2)) with `outliers` channels 10-30x larger ('massive
    activations'); ``gelu=True``: the FFN's second GEMM input, GELU-tanh of such a projection.
    Generated on ``device`` with its own generator (CPU and CUDA draw different numbers)."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=dev)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    scale = 1 + 0.5 * torch.randn(K, generator=g, device=dev)
    shift = 0.3 * torch.randn(K, generator=g, device=dev)
    idx = torch.randperm(K, generator=g, device=dev)[:outliers]
    lo, hi = outlier_scale
    scale[idx] *= lo + (hi - lo) * torch.rand(outliers, generator=g, device=dev)
    x = x.mul_(scale).add_(shift)
    if gelu:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype=dtype)


def realistic_weight(N: int, K: int, *, seed: int = 1, device="cpu", dtype=torch.bfloat16):
    """Linear weight [N, K] with fan-in scaling and per-output-channel norms varying 0.5-2x."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.randn(N, K, generator=g, device=dev) / K ** 0.5
    w = w * torch.exp(0.35 * torch.randn(N, 1, generator=g, device=dev))
    return w.to(dtype=dtype)


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean cosine over rows (last dim) and relative L2 over the whole tensor, in fp32."""
    o, r = out.float().reshape(-1, out.shape[-1]), ref.float().reshape(-1, ref.shape[-1])
    cos = torch.nn.functional.cosine_similarity(o, r, dim=-1).mean().item()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    return dict(cosine=cos, rel_l2=rel)
