"""Cross-attention folded into its output projection (fast/folded_output.py).

y = P @ (Wo.V) + bo must equal Wo.(P @ V) + bo: checked in float64 (exact up to fp64 rounding),
then the probability kernels against their torch references (CPU: Triton interpreter; @gpu: bf16
on the H100 at the 14B head layout), then the text / audio paths end to end against the unfolded
path, and the fast DiT's use of both.
"""
import math

import pytest
import torch
import torch.nn as nn

from s2v_fast.kernels.audio_injection import (
    frame_attention_probs,
    frame_attention_probs_reference,
    frame_cross_attention_reference,
    frame_probs_width,
)
from s2v_fast.kernels.flash_attention import attention_reference
from s2v_fast.kernels.short_attention import short_attention_probs, short_attention_probs_reference
from s2v_fast.fast import folded_output
from s2v_fast.fast.folded_output import fold_frame_values, fold_text_values, fold_text_worth_it
from s2v_fast.fast.text_kv import compact_text_kv, compacted_key_counts, text_attention_output
from s2v_fast.fast import set_precision

from util import DEV


def _linear(C, dtype, seed=0):
    torch.manual_seed(seed)
    o = nn.Linear(C, C)
    with torch.no_grad():
        o.bias.normal_(0, 0.5)
    return o.to(dtype).to(DEV).requires_grad_(False)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_fold_text_values_is_exact_f64():
    Lq, Lk, H, D = 23, 7, 3, 16
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(Lq, H, Lk, generator=g, dtype=torch.float64), -1).to(DEV)
    v = torch.randn(Lk, H, D, generator=g, dtype=torch.float64).to(DEV)
    o = _linear(H * D, torch.float64)
    plain = o(torch.einsum("qhk,khd->qhd", p, v).reshape(Lq, H * D))
    folded = torch.addmm(o.bias, p.reshape(Lq, H * Lk), fold_text_values(o, v).t())
    assert (folded - plain).abs().max().item() <= 1e-12


def test_fold_frame_values_is_exact_f64():
    B, Fr, Nf, NK, H, D = 2, 3, 5, 5, 3, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Fr * Nf, H, D, generator=g, dtype=torch.float64).to(DEV)
    k = torch.randn(B, Fr, NK, H, D, generator=g, dtype=torch.float64).to(DEV)
    v = torch.randn(B, Fr, NK, H, D, generator=g, dtype=torch.float64).to(DEV)
    o = _linear(H * D, torch.float64)
    plain = o(frame_cross_attention_reference(q, k, v).flatten(2))
    width = frame_probs_width(H, NK)
    p = frame_attention_probs_reference(q, k)
    assert width % 8 == 0 and torch.all(p[..., H * NK] == 1) and torch.all(p[..., H * NK + 1:] == 0)
    folded = torch.bmm(p.view(B * Fr, Nf, width), fold_frame_values(o, v, width)).view(B, Fr * Nf, -1)
    # both torch references take the softmax in fp32 (as the kernels): fp32-level agreement
    assert (folded - plain).abs().max().item() <= 1e-6


@pytest.mark.parametrize("Lk,H,D", [(1, 2, 32), (14, 3, 64), (38, 2, 128), (119, 1, 16)])
def test_short_attention_probs_matches_reference(Lk, H, D):
    g = torch.Generator().manual_seed(Lk)
    B, Lq = 2, 70  # not a multiple of the 128-row tile
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    q = (torch.randn(B, Lq, H, D, generator=g) * 1.5).to(dt).to(DEV)
    k = (torch.randn(B, Lk, H, D, generator=g) * 1.5).to(dt).to(DEV)
    bias = torch.randn(B, Lk, generator=g)
    bias[1, Lk // 2:] = float("-inf") if Lk > 1 else 0.0  # dropped keys of the shorter item
    bias = bias.to(DEV)
    p = short_attention_probs(q, k, bias)
    ref = short_attention_probs_reference(q, k, bias)
    assert p.shape == (B, Lq, H, Lk) and p.dtype == dt
    # fp32: exp2 with the folded log2 e vs exp (a few ulps); bf16: one rounding of p (2^-9)
    tol = 1e-5 if dt == torch.float32 else 4e-3
    assert (p.float() - ref.float()).abs().max().item() <= tol
    sums = p.float().sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=4 * tol * max(1, Lk ** 0.5))


@pytest.mark.parametrize("B,Fr,Nf,H,D", [(1, 3, 7, 2, 32), (2, 2, 40, 3, 64), (2, 2, 33, 40, 128)])
def test_frame_attention_probs_matches_reference(B, Fr, Nf, H, D):
    g = torch.Generator().manual_seed(B + Fr + Nf + H)
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    q = (torch.randn(B, Fr * Nf, H, D, generator=g) * 2).to(dt).to(DEV)
    k = (torch.randn(B, Fr, 5, H, D, generator=g) * 2).to(dt).to(DEV)
    out = torch.full((B, Fr * Nf, frame_probs_width(H, 5)), float("nan"), dtype=dt, device=DEV)
    p = frame_attention_probs(q, k, out=out)  # poisoned: every column must be written
    ref = frame_attention_probs_reference(q, k)
    tol = 1e-5 if dt == torch.float32 else 4e-3
    assert not torch.isnan(p).any()
    assert (p.float() - ref.float()).abs().max().item() <= tol


def test_text_attention_output_folds_only_short_prompts(monkeypatch):
    """Item 0 (5 keys) folds; item 1 (60 keys: H * 60 > 0.75 C) keeps attention + projection.
    fp32 both ways: the same function up to summation order (<= 1e-5 relative)."""
    T, H, D = 64, 2, 32
    C = H * D
    lens = (4, 60)
    g = torch.Generator().manual_seed(3)
    dt = torch.float32
    q = torch.randn(2, 50, H, D, generator=g).to(DEV)
    k = torch.randn(2, T, H, D, generator=g).to(DEV)
    v = torch.randn(2, T, H, D, generator=g).to(DEV)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = k[b, n], v[b, n]
    o = _linear(C, dt)
    plain = o(attention_reference(q, k, v).flatten(2))
    kc, vc, bias = compact_text_kv(k, v, lens)
    keys = compacted_key_counts(lens, T)
    assert keys == (5, 61)
    assert fold_text_worth_it(H, 5, o) and not fold_text_worth_it(H, 61, o)
    calls = []
    import s2v_fast.fast.text_kv as tk
    real = tk.short_attention_probs
    monkeypatch.setattr(tk, "short_attention_probs", lambda *a, **kw: calls.append(a[1].shape[1]) or real(*a, **kw))
    y = text_attention_output(q, kc, vc, bias, keys, o)
    assert calls == [5]
    assert _rel(y, plain) <= 1e-5
    monkeypatch.setattr(folded_output, "FOLD_OUTPUT", False)  # S2V_FOLD_OUTPUT=0
    calls.clear()
    assert _rel(text_attention_output(q, kc, vc, bias, keys, o), plain) <= 1e-5 and calls == []


def test_fp8_output_projections_are_not_folded():
    from s2v_fast.quantization import FP8Linear

    assert not folded_output.foldable(FP8Linear.__new__(FP8Linear))
    assert not folded_output.foldable(nn.Linear(8, 8, bias=False))
    assert folded_output.foldable(nn.Linear(8, 8))


def test_fast_dit_folds_audio_and_text(monkeypatch):
    """The tiny bf16 DiT on the fast path folds every audio injector and both (short) prompts."""
    from s2v_fast import S2VTransformer
    from s2v_fast.config import DiTConfig
    import s2v_fast.fast.blocks as fp
    import s2v_fast.fast.text_kv as tk

    from test_fast_path import _bf16_inputs

    torch.manual_seed(0)
    model = S2VTransformer(DiTConfig.preset("tiny")).to(torch.bfloat16).eval()
    inp = _bf16_inputs(model.config, F=2, lh=8, lw=8)
    ref = model(**inp)
    counts = {"audio": 0, "text": 0}
    real_f, real_t = fp.fold_frame_values, tk.fold_text_values
    monkeypatch.setattr(fp, "fold_frame_values", lambda *a: counts.__setitem__("audio", counts["audio"] + 1) or real_f(*a))
    monkeypatch.setattr(tk, "fold_text_values", lambda *a: counts.__setitem__("text", counts["text"] + 1) or real_t(*a))
    set_precision(model, "fast")
    out = model(**inp)
    cfg = model.config
    assert counts == {"audio": len(model.audio_injector.injector), "text": 2 * cfg.num_layers}
    # the fast path's bound against the reference (issue 5), as test_fast_path.py
    cos = torch.nn.functional.cosine_similarity(out.flatten().float(), ref.flatten().float(), dim=0).item()
    assert _rel(out, ref) <= 1e-2 and cos >= 0.9999


@pytest.mark.gpu
def test_gpu_folded_cross_attention_bf16_at_14b_heads():
    """bf16, 40 heads x 128, 4096 queries: text (38 keys + bias) and audio (5 keys per frame)
    folded vs unfolded, both against an fp32 computation from the same bf16 inputs. The folded
    error must stay at the unfolded one's level (both are bf16 roundings of the same sums)."""
    H, D, C = 40, 128, 5120
    g = torch.Generator().manual_seed(0)
    o = _linear(C, torch.bfloat16)
    of = nn.Linear(C, C).to(DEV)
    of.load_state_dict({k: t.float() for k, t in o.state_dict().items()})
    q = torch.randn(2, 4096, H, D, generator=g).to(torch.bfloat16).to(DEV)
    lens = (37, 118)
    k = (torch.randn(2, 512, H, D, generator=g) * 0.5).to(torch.bfloat16).to(DEV)
    v = torch.randn(2, 512, H, D, generator=g).to(torch.bfloat16).to(DEV)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = k[b, n], v[b, n]
    exact = of(attention_reference(q.float(), k.float(), v.float()).flatten(2))
    kc, vc, bias = compact_text_kv(k, v, lens)
    keys = compacted_key_counts(lens, 512)
    folded = text_attention_output(q, kc, vc, bias, keys, o)
    folded_output.FOLD_OUTPUT = False
    try:
        plain = text_attention_output(q, kc, vc, bias, keys, o)
    finally:
        folded_output.FOLD_OUTPUT = True
    e_f, e_p = _rel(folded[0], exact[0]), _rel(plain[0], exact[0])
    assert e_f <= max(2 * e_p, 4e-3), (e_f, e_p)
    assert torch.equal(folded[1], plain[1])  # 119 keys: not folded
    # audio: 20 frames x 205 tokens, 5 keys each
    Fr, Nf = 20, 205
    qa = torch.randn(2, Fr * Nf, H, D, generator=g).to(torch.bfloat16).to(DEV)
    ka = torch.randn(2, Fr, 5, H, D, generator=g).to(torch.bfloat16).to(DEV)
    va = torch.randn(2, Fr, 5, H, D, generator=g).to(torch.bfloat16).to(DEV)
    exact_a = of(frame_cross_attention_reference(qa.float(), ka.float(), va.float()).flatten(2))
    width = frame_probs_width(H, 5)
    ya = torch.bmm(frame_attention_probs(qa, ka).view(2 * Fr, Nf, width), fold_frame_values(o, va, width))
    plain_a = o(frame_cross_attention_reference(qa, ka, va).flatten(2))
    e_f, e_p = _rel(ya.view(2, Fr * Nf, C), exact_a), _rel(plain_a, exact_a)
    assert e_f <= max(2 * e_p, 4e-3), (e_f, e_p)
    assert math.isfinite(e_f)
