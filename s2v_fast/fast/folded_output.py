"""Cross-attention over a few keys with its output projection folded into the values.

For attention over Lk keys followed by the output projection o (C <- H*D):

    y[s] = Wo . concat_h( sum_j p[s,h,j] v[j,h] ) + bo = sum_{h,j} p[s,h,j] (Wo_h v[j,h]) + bo
         = P[s] . W^T + bo,      W[c, h*Lk + j] = sum_d Wo[c, h*D + d] v[j, h, d]

so the projection GEMM takes K = H*Lk inputs per token instead of C = H*D. Exact in real
arithmetic; what rounds differs: P and W are rounded to the weight dtype (bf16) instead of the
attention output P.V (the same 2^-9 relative step), and the GEMM accumulates in fp32 as before.
W is tiny to compute (2*C*H*Lk*D FLOPs: ~2 GFLOP for 38 text keys), so it is formed per call
from the cached v and takes no memory across steps.

Where it applies (the fast path, plain ``nn.Linear`` output projections; not FP8Linear):
* audio injection: every latent frame attends to its own 5 audio tokens, so K = 40*5 + 1 (the
  bias as a ones column) padded to 208 instead of 5120: the injector's output GEMM becomes a
  batched GEMM per frame with 25x fewer FLOPs (``fold_frame_values``).
* text cross-attention over compacted prompt keys (``text_kv.py``): per CFG branch, when
  H*Lk <= FOLD_MAX_FRACTION * C (Lk <= 96 keys at 14B; the GEMM then saves >= 25 % of its FLOPs,
  which pays for writing P). A long prompt keeps the plain path (``fold_text_values``).
S2V_FOLD_OUTPUT=0 turns both off.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..options import env_options

FOLD_OUTPUT = env_options().kernels.fold_output  # a module constant: benchmarks switch it
FOLD_MAX_FRACTION = 0.75


def weight_format(layer: nn.Module) -> str:
    """"fp8" for a linear that declares it (``FP8Linear.weight_format``), else "dense"."""
    return getattr(type(layer), "weight_format", "dense")


def foldable(o: nn.Module) -> bool:
    """A dense Linear with bias (an fp8 linear keeps the unfolded path)."""
    return FOLD_OUTPUT and weight_format(o) == "dense" and o.bias is not None


def fold_text_values(o: nn.Linear, v: torch.Tensor) -> torch.Tensor:
    """v [Lk, H, D] -> W [C, H*Lk] (o's dtype): W[c, h*Lk + j] = Wo[c, hD:(h+1)D] . v[j, h]."""
    Lk, H, D = v.shape
    C = o.weight.shape[0]
    w = o.weight.view(C, H, D).transpose(0, 1)  # [H, C, D]
    u = torch.matmul(w, v.to(w.dtype).permute(1, 2, 0))  # [H, C, Lk]
    return u.transpose(0, 1).reshape(C, H * Lk)


def fold_frame_values(o: nn.Linear, v: torch.Tensor, width: int) -> torch.Tensor:
    """Per-frame audio values v [B, F, NK, H, D] -> U [B*F, width, C] (o's dtype): row h*NK + j
    is Wo_h v[b, f, j, h], row H*NK is the bias (it meets the ones column of the probabilities),
    the rest 0. ``y[b, f] = P[b, f] @ U[b*F + f]`` is the injector's output projection."""
    B, Fr, NK, H, D = v.shape
    C = o.weight.shape[0]
    wt = o.weight.view(C, H, D).permute(1, 2, 0)  # [H, D, C]
    vh = v.to(wt.dtype).permute(3, 0, 1, 2, 4).reshape(H, B * Fr * NK, D)
    u = torch.matmul(vh, wt)  # [H, B*F*NK, C]
    out = u.new_zeros(B * Fr, width, C)
    out[:, :H * NK] = u.view(H, B * Fr, NK, C).transpose(0, 1).reshape(B * Fr, H * NK, C)
    out[:, H * NK] = o.bias.to(out.dtype)
    return out


def fold_text_worth_it(num_heads: int, num_keys: int, o: nn.Module) -> bool:
    return foldable(o) and 0 < num_heads * num_keys <= FOLD_MAX_FRACTION * o.weight.shape[1]
