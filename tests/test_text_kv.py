"""Compacted text cross-attention keys (spec §10.7) and the flash kernel's per-key bias.

Attention over a prompt's rows + one padding key with logit bias ln(#padding) must equal attention
over all text_len keys whose padding rows are identical (fast/text_kv.py). CPU runs the Triton
kernel in the interpreter (dot operands upcast, see test_kernels_flash_attention.py); @gpu runs
the bf16 tensor-core kernel.
"""
import math

import pytest
import torch

from s2v_fast.kernels.flash_attention import FLASH_CONFIGS, attention_reference, triton_attention
from s2v_fast.fast.text_kv import compact_text_kv, text_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def padded_kv(lens, T, H, D, dtype, seed=0):
    """k/v [B, T, H, D] whose rows >= lens[b] are one repeated padding row (as the text MLP of a
    zero-padded context produces)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    k = torch.randn(B, T, H, D, generator=g) * 1.5
    v = torch.randn(B, T, H, D, generator=g)
    pad_k, pad_v = torch.randn(H, D, generator=g) * 1.5, torch.randn(H, D, generator=g)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = pad_k, pad_v
    return k.to(dtype).to(DEV), v.to(dtype).to(DEV)


@pytest.mark.parametrize("lens", [(37, 118), (0, 5), (63, 63), (64, 1), (127, 128)])
def test_compaction_is_exact_fp32(lens):
    T, H, D = 128, 2, 32
    k, v = padded_kv(lens, T, H, D, torch.float32, seed=sum(lens))
    q = torch.randn(len(lens), 50, H, D, generator=torch.Generator().manual_seed(1)).to(DEV)
    full = attention_reference(q, k, v)
    kc, vc, bias = compact_text_kv(k, v, lens)
    assert kc.shape[1] == max(n + (n < T) for n in lens) and bias.dtype == torch.float32
    for b, n in enumerate(lens):  # text keys 0, one padding key ln(T - n), then dropped slots
        assert torch.all(bias[b, :n] == 0)
        if n < T:
            assert bias[b, n].item() == pytest.approx(math.log(T - n))
        assert torch.all(torch.isneginf(bias[b, n + (n < T):]))
    # fp32 on both sides: the softmax sums differ in order and exp(s + ln n) vs n exp(s) rounding,
    # a few fp32 ulps of logits up to ~30 (measured <= 6e-6 on O(1) outputs)
    assert (attention_reference(q, kc, vc, key_bias=bias) - full).abs().max().item() <= 2e-5
    # and the Triton kernel (interpreter on CPU) with the bias
    assert (triton_attention(q, kc, vc, key_bias=bias) - full).abs().max().item() <= 2e-5


def test_compaction_of_unpadded_context_keeps_every_key():
    k, v = padded_kv((16, 16), 16, 1, 16, torch.float32)
    kc, vc, bias = compact_text_kv(k, v, (16, 16))
    assert torch.equal(kc, k) and torch.equal(vc, v) and torch.all(bias == 0)


@pytest.mark.parametrize("idx", [0, 1, 5])  # BLOCK_N 64 / 128 / 64, pointer and TMA paths
def test_key_bias_in_kernel_matches_masked_reference(idx):
    """Bias values of every kind (0, positive, negative, -inf), keys not a multiple of the tile."""
    g = torch.Generator().manual_seed(idx)
    B, Lq, Lk, H, D = 2, 70, 150, 2, 64
    q, k, v = (torch.randn(B, L, H, D, generator=g).half().to(DEV) for L in (Lq, Lk, Lk))
    bias = torch.randn(B, Lk, generator=g) * 2
    bias[0, 100:] = float("-inf")
    bias[1, 3] = math.log(400.0)
    bias = bias.to(DEV)
    got = triton_attention(q, k, v, key_bias=bias, config=FLASH_CONFIGS[idx])
    ref = attention_reference(q, k, v, key_bias=bias)
    assert (got.double() - ref.double()).abs().max().item() <= 2e-3  # fp16 p and output rounding


def test_text_attention_broadcasts_one_query_over_the_prompts():
    """The shared-rows path passes q expanded over the batch (stride 0): same as a real copy."""
    k, v = padded_kv((9, 20), 32, 2, 32, torch.float32, seed=3)
    kc, vc, bias = compact_text_kv(k, v, (9, 20))
    q1 = torch.randn(1, 40, 2, 32, generator=torch.Generator().manual_seed(4)).to(DEV)
    got = text_attention(q1.expand(2, -1, -1, -1), kc, vc, bias)
    ref = text_attention(q1.repeat(2, 1, 1, 1), kc, vc, bias)
    assert torch.allclose(got, ref, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("lens", [(37, 118), (300, 2), (511, 512)])
def test_gpu_bf16_compacted_text_attention(lens):
    """bf16 tensor-core kernel over compacted keys vs fp32 attention over all 512 keys."""
    T, H, D = 512, 8, 128
    k, v = padded_kv(lens, T, H, D, torch.bfloat16, seed=lens[0])
    q = torch.randn(2, 4100, H, D, device=DEV).bfloat16()
    kc, vc, bias = compact_text_kv(k, v, lens)
    got = text_attention(q, kc, vc, bias)
    full = attention_reference(q, k, v)
    assert (got.float() - full.float()).abs().max().item() <= 1.6e-2  # bf16 p + output rounding


@pytest.mark.parametrize("Lk", [1, 17, 119, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_short_key_kernel_matches_reference(Lk, dtype):
    """One key tile (16-256 keys, padded to a power of two), bias of every kind, query tails that
    leave whole tiles of a program empty (Lq = 300 with 8 tiles of 64/128 rows per program)."""
    from s2v_fast.kernels.short_attention import short_attention

    g = torch.Generator().manual_seed(Lk)
    B, Lq, H, D = 2, 300, 2, 64
    q = torch.randn(B, Lq, H, D, generator=g).to(dtype).to(DEV)
    k = (torch.randn(B, Lk, H, D, generator=g) * 1.5).to(dtype).to(DEV)
    v = torch.randn(B, Lk, H, D, generator=g).to(dtype).to(DEV)
    bias = torch.randn(B, Lk, generator=g)
    bias[0, Lk // 2 + 1:] = float("-inf")
    bias = bias.to(DEV)
    got = short_attention(q, k, v, bias)
    ref = attention_reference(q, k, v, key_bias=bias)
    tol = 2e-3 if dtype == torch.float16 else 2e-5  # fp16: p and output rounding; fp32: sum order
    assert (got.double() - ref.double()).abs().max().item() <= tol
    assert (short_attention(q, k, v) - attention_reference(q, k, v)).abs().max().item() <= tol
