"""Full-width RMSNorm -> input dtype, one pass (the cross-attention and audio-injector q norm).

Per row x [C] (a bf16 GEMM output), exactly ``block.rms_norm`` (``WanRMSNorm``):
    r = rsqrt( mean_c(fp32(x)^2) + eps );   y = dt( dt(x * r) * w )       dt = x.dtype, w in dt
The torch version runs five kernels over the [B, L, C] tensor (pow, mean, mul, cast, mul by w);
this is one read and one write (spec §10.4 without the rotation).
"""
from __future__ import annotations

import torch

from ._utils import is_interpreter, kernels_usable, row_norm_launch, to_dtype, triton, tl

# bf16 outputs: 1 bf16 ulp (summation order of the sum of squares).
TOLERANCES = {torch.bfloat16: dict(atol=1e-2, rtol=2**-7), torch.float32: dict(atol=1e-5, rtol=1e-5)}

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, n_rows, C, sx, sy, eps,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr, INTERPRET: tl.constexpr):
        rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols[None, :] < C)
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)
        w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
        DT = Y.dtype.element_ty
        # dt(x*r) * w in dt: for bf16 the fp32 product of two bf16 values is exact, so one more
        # rounding equals the bf16 multiply.
        y = to_dtype(to_dtype(x * r[:, None], DT, INTERPRET).to(tl.float32) * w[None, :], DT, INTERPRET)
        tl.store(Y + rows[:, None] * sy + cols[None, :], y, mask=mask)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return n.to(x.dtype) * weight


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., C] with weight [C]; same result as the reference."""
    C = x.shape[-1]
    ok = (kernels_usable(x, weight) and x.dtype in (torch.bfloat16, torch.float32)
          and weight.dtype == x.dtype and weight.is_contiguous() and weight.numel() == C
          and x.stride(-1) == 1)
    if not ok:
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, C)  # a view for the GEMM outputs this is called on
    if x2.stride(-1) != 1:
        return rms_norm_reference(x, weight, eps)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y
    BLOCK_C, ROWS, num_warps = row_norm_launch(C)
    _rms_norm_kernel[(triton.cdiv(n_rows, ROWS),)](
        x2, weight, y, n_rows, C, x2.stride(0), C, eps,
        BLOCK_C=BLOCK_C, ROWS=ROWS, INTERPRET=is_interpreter(), num_warps=num_warps)
    return y
