"""channel_norm (Triton RMS_norm + SiLU over channels-last rows) vs its torch reference, and the
reference vs the VAE's own ``RMSNorm`` (s2v_fast/models/vae.py)."""
import pytest
import torch
import torch.nn.functional as F

from s2v_fast.kernels.channel_norm import TOLERANCES, channel_norm, channel_norm_reference
from s2v_fast.models.vae import RMSNorm

from util import DEV, bf16_ulps

pytest.importorskip("triton")


def test_reference_is_the_vae_norm():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(12)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 1.5, generator=g)
    x = torch.randn(2, 12, 3, 4, 5, generator=g) * 3
    want = F.silu(norm(x))
    got = channel_norm_reference(x.permute(0, 2, 3, 4, 1), norm.gamma, silu=True)
    torch.testing.assert_close(got.permute(0, 4, 1, 2, 3), want, rtol=1e-6, atol=1e-6)
    # an all-zero pixel stays zero (F.normalize clamps the norm), no NaN
    z = channel_norm_reference(torch.zeros(3, 12), norm.gamma)
    assert torch.equal(z, torch.zeros(3, 12))


@pytest.mark.parametrize("C", [4, 96, 384])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
@pytest.mark.parametrize("silu", [False, True])
def test_kernel_matches_reference(C, dtype, out_dtype, silu):
    g = torch.Generator().manual_seed(C)
    x = (torch.randn(2, 3, 5, 7, C, generator=g) * 2 + 0.3).to(dtype).to(DEV)
    gamma = (torch.rand(C, 1, 1, 1, generator=g) + 0.5).to(DEV)
    x[0, 0, 0, 0] = 0  # a zero row
    got = channel_norm(x, gamma, silu, out_dtype, use_kernel=True)
    ref = channel_norm_reference(x, gamma, silu, out_dtype)
    assert got.shape == x.shape and got.dtype == out_dtype
    assert torch.isfinite(got).all()
    if out_dtype == torch.bfloat16:  # sum-of-squares order: at most 1 bf16 ulp, rarely
        d = bf16_ulps(got, ref)
        assert int(d.max()) <= 1 and (d > 0).float().mean().item() < 0.02
    else:
        torch.testing.assert_close(got, ref, **TOLERANCES[torch.float32])


def test_strided_rows_fall_back():
    # rows that are not packed (a channel slice) take the reference, same result
    x = torch.randn(4, 6, 32).to(DEV)[..., :16]
    gamma = torch.ones(16).to(DEV)
    torch.testing.assert_close(channel_norm(x, gamma, use_kernel=True),
                               channel_norm_reference(x, gamma), rtol=1e-5, atol=1e-5)
