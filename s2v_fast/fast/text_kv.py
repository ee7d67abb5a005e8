"""Exact compaction of the text cross-attention keys (spec §10.7).

The text context is zero-padded to ``text_len`` (512) rows before the text MLP, so the
``512 - L_b`` padding rows of batch item b are identical, and so are their k/v rows. Softmax
attention over n identical keys equals attention over one copy with ln(n) added to its logit:

    sum over the padding of exp(s_pad) v_pad = n exp(s_pad) v_pad = exp(s_pad + ln n) v_pad.

So item b keeps its L_b text keys, one padding key with bias ln(512 - L_b), and, up to the batch's
longest, unused slots with bias -inf. Mathematically exact; the fp32 softmax sums round
differently from a 512-key softmax (measured in tests/test_text_kv.py). With typical prompts
(L_b ~ 20-200) all keys fit one tile of the short-key kernel (``kernels/short_attention.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..kernels.attention import attention
from ..kernels.flash_attention import triton_attention
from ..models.block import linear
from ..kernels.short_attention import short_attention, short_attention_probs, short_attention_supported
from .folded_output import fold_text_values, fold_text_worth_it


def compacted_key_counts(text_lens: Sequence[int], text_len: int) -> Tuple[int, ...]:
    """Keys item b keeps after ``compact_text_kv``: its text rows and one padding row (if any)."""
    lens = [min(max(int(n), 0), text_len) for n in text_lens]
    return tuple(n + (n < text_len) for n in lens)


def compact_text_kv(k: torch.Tensor, v: torch.Tensor, text_lens: Sequence[int]
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k/v [B, T, H, D] over T zero-padded text rows -> (k_c, v_c [B, Lc, H, D], bias [B, Lc] fp32)."""
    B, T = k.shape[:2]
    if len(text_lens) != B:
        raise ValueError(f"{len(text_lens)} text lengths for batch {B}")
    lens = [min(max(int(n), 0), T) for n in text_lens]
    keep = compacted_key_counts(lens, T)
    Lc = max(keep)
    kc = k.new_zeros(B, Lc, *k.shape[2:])
    vc = v.new_zeros(B, Lc, *v.shape[2:])
    bias = torch.full((B, Lc), float("-inf"), dtype=torch.float32)
    for b, (n, m) in enumerate(zip(lens, keep)):
        kc[b, :m] = k[b, :m]
        vc[b, :m] = v[b, :m]
        bias[b, :n] = 0.0
        if n < T:
            bias[b, n] = math.log(T - n)
    return kc, vc, bias.to(k.device)


def text_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Text cross-attention over compacted keys with their bias: the short-key Triton kernel up
    to 256 keys, else the flash kernel (on CPU without the interpreter both fall back to fp32
    SDPA with the bias as an additive mask). No bias (uncompacted keys): the attention entry
    point."""
    if key_bias is None:
        return attention(q, k, v)
    if short_attention_supported(q, k):
        return short_attention(q, k, v, key_bias)
    return triton_attention(q, k, v, key_bias=key_bias)


def text_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_bias: Optional[torch.Tensor], keys: Optional[Sequence[int]],
                          o: torch.nn.Module) -> torch.Tensor:
    """``o(text_attention(q, k, v, key_bias))`` -> [B, Lq, C]. ``keys``: compacted keys per item
    (``compacted_key_counts``; None: uncompacted). Items with few enough keys run folded
    (``folded_output.py``): their probabilities times Wo.V in one GEMM of K = H * keys[b]; the
    others attend and project as usual."""
    B, Lq, H, D = q.shape
    fold = [keys is not None and key_bias is not None and short_attention_supported(q, k[:, :n])
            and fold_text_worth_it(H, n, o) for n in (keys or [0] * B)]
    if not any(fold):
        return linear(text_attention(q, k, v, key_bias).flatten(2), o)
    y = torch.empty(B, Lq, o.weight.shape[0], dtype=o.weight.dtype, device=q.device)
    for b in range(B):
        qb, yb = q[b:b + 1], y[b]
        if fold[b]:
            n = keys[b]
            p = short_attention_probs(qb, k[b:b + 1, :n], key_bias[b:b + 1, :n])
            torch.addmm(o.bias, p.view(Lq, H * n), fold_text_values(o, v[b, :n]).t(), out=yb)
        else:
            a = text_attention(qb, k[b:b + 1], v[b:b + 1], None if key_bias is None else key_bias[b:b + 1])
            torch.addmm(o.bias, a.view(Lq, H * D).to(o.weight.dtype), o.weight.t(), out=yb)
    return y
