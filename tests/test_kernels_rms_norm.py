"""rms_norm (Triton) vs the torch reference (``block.rms_norm`` math) on fresh random inputs."""

import pytest
import torch

from s2v_fast.kernels.rms_norm import TOLERANCES, rms_norm, rms_norm_reference
from s2v_fast.models.block import rms_norm as block_rms_norm

from util import DEV, bf16_ulps



@pytest.mark.parametrize("shape", [(2, 7, 96), (1, 5, 5120), (3, 33), (2, 4, 3, 40)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_reference(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype).to(DEV)
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(dtype).to(DEV)
    got = rms_norm(x, w, 1e-6)
    ref = rms_norm_reference(x, w, 1e-6)
    assert got.shape == x.shape and got.dtype == dtype
    # the reference is the model's own function
    torch.testing.assert_close(ref, block_rms_norm(x, w, 1e-6), rtol=0, atol=0)
    if dtype == torch.bfloat16:  # sum-of-squares order: at most 1 bf16 ulp, rarely
        d = bf16_ulps(got, ref)
        assert int(d.max()) <= 1 and (d > 0).float().mean().item() < 0.02
    else:
        torch.testing.assert_close(got, ref, **TOLERANCES[dtype])


def test_rms_norm_strided_rows():
    # a column slice of a wider GEMM output (row stride != C) falls back or runs on a copy: same result
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(4, 9, 128, generator=g).to(torch.bfloat16).to(DEV)
    x = wide[..., :64]
    w = (torch.randn(64, generator=g) + 1).to(torch.bfloat16).to(DEV)
    d = bf16_ulps(rms_norm(x, w), rms_norm_reference(x, w))
    assert int(d.max()) <= 1


@pytest.mark.gpu
def test_gpu_production_shape():
    # On the GPU the kernel's rsqrt and sum order differ from torch's in the last fp32 bits; a
    # 1-ulp flip of bf16(x * r) becomes up to 2 ulps after the bf16 multiply by w.
    x = torch.randn(2, 32760, 5120, device="cuda").to(torch.bfloat16) * 2
    w = (torch.randn(5120, device="cuda") * 0.3 + 1).to(torch.bfloat16)
    d = bf16_ulps(rms_norm(x, w), rms_norm_reference(x, w))
    assert int(d.max()) <= 2 and (d > 0).float().mean().item() < 0.01, (int(d.max()), (d > 0).float().mean().item())
