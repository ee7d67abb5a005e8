"""The fast DiT step (``apply_fast_path(model)``): fused Triton kernels + step-invariant caches.

Same math and rounding points as the reference path in ``block.py`` (spec §4.13, §10); what
changes is how it is executed:

* Step-invariant work is computed once per clip and kept in :class:`ClipCache` (spec §10.5-8):
  the fp32 RoPE cos/sin table, the text cross-attention K/V of every block (per prompt), and for
  every audio injector the AdaLN (shift, scale) and the K/V of the 5 audio tokens per frame.
* Memory-bound chains run as single Triton kernels (``s2v_fast/kernels``):
  norm1/norm2 + adaLN modulation -> bf16; q/k full-width RMSNorm + RoPE -> bf16; the
  cross-attention and audio q RMSNorm;
  norm3 (affine) of the self-attention gated residual (not stored); both residuals + norm2
  modulation in one pass;
  FFN gated residual + the next block's norm1 modulation (when no audio injection or weight
  offload sits between the two blocks; else the FFN residual alone); audio LN + per-frame
  AdaLN; per-frame audio cross-attention (5 keys, in registers); audio residual add.
* Both CFG branches run as one batch of 2 (the pipeline passes B = 2). Given one latent for both
  (``shared_rows``), block 0's self-attention half and its cross-attention q run once: the
  branches differ only from the first text cross-attention on (text and audio, spec §8.5).
* Text cross-attention runs over compacted keys (``text_kv.py``, spec §10.7): each prompt's own
  rows plus one padding key with logit bias ln(#padding rows), in the short-key Triton kernel.
* Attention over few keys is folded into its output projection (``folded_output.py``): the
  audio injectors' (5 keys per frame) and a short prompt's, y = P @ (Wo.V) + bo with K = H*keys.
* The last block computes output rows only for the noisy tokens (the head reads nothing else).
* GEMMs stay in cuBLAS (``F.linear``); self-attention goes through the block's attention slot.
* What may fuse in a clip comes from :class:`~s2v_fast.fast.plan.FastPlan` (offload, sequence
  parallel, fp8 linears and the attention backends declare themselves there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.audio_injection import (
    audio_adaln,
    audio_residual_add,
    frame_attention_probs,
    frame_cross_attention,
    frame_probs_width,
)
from ..kernels.gated_residual import (
    gated_residual,
    gated_residual_layernorm_affine,
    gated_residual_norm_modulate,
    residual_pair_norm_modulate,
)
from ..kernels.norm_modulate import norm_modulate
from ..kernels.qk_norm_rope import qk_norm_rope
from ..kernels.registry import backend_info
from ..kernels.rms_norm import rms_norm
from ..options import env_options
from ..profiling.ranges import trace_range
from ..models.block import linear
from ..quantization import gelu_linear, same_input_linears
from .folded_output import fold_frame_values, foldable
from .plan import FastPlan, build_plan
from .text_kv import compact_text_kv, compacted_key_counts, text_attention_output


@dataclass(kw_only=True)
class AudioCache:
    """Per audio injector: the AdaLN (shift, scale) [B, F, C] (cdt) and the K/V of the audio
    tokens [B, F, n, H, D] of each latent frame; the plan says how the injection attends."""

    plan: FastPlan
    audio_shift: List[torch.Tensor] = field(default_factory=list)
    audio_scale: List[torch.Tensor] = field(default_factory=list)
    audio_kv: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass(kw_only=True)
class ClipCache(AudioCache):
    """Step-invariant tensors of one clip and CFG batch (built on the first fast step), and the
    fusion plan of the current step."""

    rope: object  # RopeTable (fp32 fallback for non-bf16 models)
    cos: torch.Tensor  # [L, D/2] fp32
    sin: torch.Tensor
    context: torch.Tensor  # padded text embeddings [B, text_len, C]
    text_lens: Optional[Tuple[int, ...]]  # None: attend over all text_len keys
    # per block: k, v [B, Lc, H, D] (compacted when text_lens is known), computed on the block's
    # first fast step (inside the block's hooks, so a layerwise-offloaded block has its weights
    # on the GPU); text_bias [B, Lc] fp32 logit bias of the compacted keys (same for every block)
    text_kv: List[Optional[Tuple[torch.Tensor, torch.Tensor]]]
    text_bias: Optional[torch.Tensor] = None
    text_keys: Optional[Tuple[int, ...]] = None  # compacted keys per item (compacted_key_counts)


@torch.no_grad()
def fill_audio_cache(cache: AudioCache, model, audio_local: torch.Tensor,
                     audio_global: torch.Tensor) -> AudioCache:
    """The injectors' AdaLN terms and audio K/V of ``audio_local`` [B, F, n, C] /
    ``audio_global`` [B, F, 1, C] (the encoder's outputs), appended to ``cache``."""
    B, F_, n_tok, C = audio_local.shape
    gvec = audio_global[:, :, 0].reshape(B * F_, C)
    local = audio_local.reshape(B * F_, n_tok, C)
    for j, ada in enumerate(model.audio_injector.injector_adain_layers):
        emb = linear(F.silu(gvec), ada.linear)  # cdt (bf16-rounded shift/scale, spec §4.13)
        shift, scale = emb.chunk(2, dim=-1)
        cache.audio_shift.append(shift.reshape(B, F_, C).contiguous())
        cache.audio_scale.append(scale.reshape(B, F_, C).contiguous())
        k, v = model.audio_injector.injector[j].context_kv(local)  # [B*F, n, H, D]
        cache.audio_kv.append((k.reshape(B, F_, n_tok, *k.shape[-2:]).contiguous(),
                               v.reshape(B, F_, n_tok, *v.shape[-2:]).contiguous()))
    return cache


@torch.no_grad()
def build_clip_cache(model, cond, plan: Optional[FastPlan] = None) -> ClipCache:
    """Everything the blocks need that does not change across the sampling steps of a clip."""
    cos = cond.rope.cos.float().contiguous()
    sin = cond.rope.sin.float().contiguous()
    plan = plan or build_plan(model)
    cache = ClipCache(plan=plan, rope=cond.rope, cos=cos, sin=sin, context=cond.context,
                      text_lens=cond.text_lens if plan.text != "dense" else None,
                      text_kv=[None] * len(model.blocks))
    return fill_audio_cache(cache, model, cond.audio_local, cond.audio_global)


# Sequence parallel (s2v_fast.parallel) runs this path: self-attention goes through
# ``SelfAttention.attend`` and the clip cache is built from the rank's shard of the conditions; the
# audio injection runs on whole local latent frames, so the shards must be frame-aligned.

# FFN up-projection + tanh-GELU in one cuBLASLt call (GELU applied to the fp32 accumulator in the
# GEMM epilogue, then one bf16 rounding; the reference rounds before the GELU: <= 1 bf16 ulp of
# the activation). S2V_GELU_EPILOGUE=0 keeps the separate GELU kernel.
GELU_EPILOGUE = env_options().kernels.gelu_epilogue  # a module constant: benchmarks switch it


def linear_gelu(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    w = layer.weight
    if GELU_EPILOGUE and x.is_cuda and w.dtype == torch.bfloat16 and layer.bias is not None:
        x2 = x.to(w.dtype).reshape(-1, x.shape[-1])
        y = torch._addmm_activation(layer.bias, x2, w.t(), use_gelu=True)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.gelu(linear(x, layer), approximate="tanh")


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))


def _text_kv(ca, cache: ClipCache, index: int):
    """Block ``index``'s text K/V (computed and compacted on first use) and the key bias."""
    if cache.text_kv[index] is None:
        kc, vc = ca.context_kv(cache.context)
        if cache.text_lens is not None:
            kc, vc, cache.text_bias = compact_text_kv(kc, vc, cache.text_lens)
            cache.text_keys = compacted_key_counts(cache.text_lens, cache.context.shape[1])
        cache.text_kv[index] = (kc.contiguous(), vc.contiguous())
    return (*cache.text_kv[index], cache.text_bias)


def fast_block(block, x: torch.Tensor, e0: torch.Tensor, split: int, cache: ClipCache, index: int,
               start=None, next_block=None, shared: bool = False, rows_out: Optional[int] = None):
    """One transformer block; x [B, L, C] (bf16 at block 0, fp32 after) -> (fp32 x, next start).

    ``start``: (norm1 output h, modulation terms) of this block when the previous block computed
    them; ``next_block``: fuse the FFN residual with that block's norm1 modulation and return its
    start (else None); ``shared``: the rows of x and e0 are identical, so everything up to the
    text cross-attention runs on row 0 and is broadcast; ``rows_out``: only tokens [0, rows_out)
    of the output are used (the last block: the head reads the noisy tokens), so the other
    tokens only give keys and values and x comes back as [B, rows_out, C].

    The attention half ends in two passes instead of three: norm3 reads x + y*gate without
    storing it, and one pass adds both residuals and computes norm2 (same fp32 operations)."""
    sa, ca = block.self_attn, block.cross_attn
    H = sa.num_heads
    B = x.shape[0]
    if start is None:  # norm1 + modulation -> bf16 (block 0 rounds the normalised value: x is bf16)
        terms = block.modulation_terms(e0)
        if shared:
            x = x[:1]
        h = norm_modulate(x, terms[0][:x.shape[0]], terms[1][:x.shape[0]], split, eps=block.eps,
                          round_normed_to_bf16=x.dtype == torch.bfloat16, out_dtype=sa.q.weight.dtype)
    else:
        if shared:
            raise ValueError("shared rows need start=None (block 0)")
        h, terms = start
    _, _, gate_sa, shift_ff, scale_ff, gate_ff = terms  # shift/scale_sa: in h
    with trace_range("self_attention"):
        if sa.v.weight.dtype == torch.bfloat16:
            q, k, v = same_input_linears(h, (sa.q, sa.k, sa.v))  # fp8: one activation quantisation
            q, k = qk_norm_rope(q, k, sa.norm_q.weight, sa.norm_k.weight,
                                cache.cos, cache.sin, H, eps=sa.norm_q.eps)
        else:  # fp32 models (CPU tests): the kernel emits bf16 for attention, keep fp32 instead
            v = linear(h, sa.v)
            q, k = sa.qk_norm_rope(h, cache.rope)
        if rows_out is not None:  # dead query rows: keys and values only
            q, x = q[:, :rows_out], x[:, :rows_out]
        with trace_range("attention"):
            a = sa.attend(q, k, _heads(v, H))  # the sequence-parallel seam (Ulysses / ring)
        y = linear(a.flatten(2), sa.o)
    gate_sa = gate_sa[:x.shape[0]]
    _, h3 = gated_residual_layernorm_affine(x, y, gate_sa, split, block.norm3.weight, block.norm3.bias,
                                            eps=block.eps, out_dtype=ca.q.weight.dtype, store_x=False)
    with trace_range("cross_attention"):
        qc = _heads(rms_norm(linear(h3, ca.q), ca.norm_q.weight, ca.norm_q.eps), H)
        kc, vc, bias = _text_kv(ca, cache, index)
        qc = qc.expand(B, *qc.shape[1:])  # shared rows: one q, B prompts
        mode = cache.plan.text
        if mode == "fused":
            yc = text_attention_output(qc, kc, vc, bias, cache.text_keys, ca.o)  # folded when short
        elif mode == "bias":  # the configured backend, over the compacted keys
            yc = linear(backend_info(ca.attn.backend).bias_fn(qc, kc, vc, bias).flatten(2), ca.o)
        else:  # the configured backend over every padded key, as the reference
            yc = linear(ca.attn(qc, kc, vc).flatten(2), ca.o)
    # x_new = (x + y*gate_sa) + yc (x is updated in place when it is an fp32 [B, ...] tensor)
    x_new = torch.empty(yc.shape, dtype=torch.float32, device=x.device) if shared else None
    x, h2 = residual_pair_norm_modulate(x.expand(B, *x.shape[1:]), y.expand(B, *y.shape[1:]), gate_sa,
                                        yc, shift_ff, scale_ff, split, eps=block.eps, out=x_new,
                                        out_dtype=block.ffn[0].weight.dtype)
    with trace_range("ffn"):
        if cache.plan.fp8_ffn_out[index]:  # GELU fused into the fp8 activation quantiser
            y2 = gelu_linear(linear(h2, block.ffn[0]), block.ffn[2])
        else:  # GELU in the first GEMM's epilogue
            y2 = linear(linear_gelu(h2, block.ffn[0]), block.ffn[2])
    if next_block is None:
        return gated_residual(x, y2, gate_ff, split), None
    terms_next = next_block.modulation_terms(e0)
    x, h_next = gated_residual_norm_modulate(x, y2, gate_ff, terms_next[0], terms_next[1], split,
                                             eps=next_block.eps,
                                             out_dtype=next_block.self_attn.q.weight.dtype)
    return x, (h_next, terms_next)


def fast_inject_audio(model, j: int, x: torch.Tensor, num_noisy: int, cache: AudioCache) -> torch.Tensor:
    """Audio injector j on the noisy tokens (x updated in place)."""
    if num_noisy == 0:  # a sequence-parallel rank holding only reference / motion tokens
        return x
    inj = model.audio_injector.injector[j]
    shift, scale = cache.audio_shift[j], cache.audio_scale[j]
    Fr = shift.shape[1]
    with trace_range("audio_injection"):
        ada = model.audio_injector.injector_adain_layers[j]
        if shift.dtype == torch.bfloat16:
            a = audio_adaln(x[:, :num_noisy], shift, scale, num_noisy // Fr, eps=ada.eps)
        else:  # fp32 models: the kernel's output is bf16 by contract; use the module math
            B, _, C = x.shape
            hv = x[:, :num_noisy].reshape(B * Fr, num_noisy // Fr, C)
            a = ada(hv, shift_scale=(shift.reshape(B * Fr, C), 1 + scale.reshape(B * Fr, C)))
            a = a.reshape(B, num_noisy, C)
        q = _heads(rms_norm(linear(a, inj.q), inj.norm_q.weight, inj.norm_q.eps), inj.num_heads)
        k, v = cache.audio_kv[j]
        if cache.plan.audio == "dense":  # the configured backend, per frame
            Bq, Fr = v.shape[:2]
            qf = q.reshape(Bq * Fr, num_noisy // Fr, *q.shape[2:])
            o = inj.attn(qf, k.flatten(0, 1), v.flatten(0, 1)).reshape(q.shape)
            y = linear(o.flatten(2), inj.o)
        elif foldable(inj.o):  # 5 keys per frame: P [.., H*5 + 1 -> 208] @ [Wo_h v; bo] per frame
            B, Fr = v.shape[:2]
            width = frame_probs_width(inj.num_heads, v.shape[2])
            p = frame_attention_probs(q, k).view(B * Fr, num_noisy // Fr, width)
            y = torch.bmm(p, fold_frame_values(inj.o, v, width)).view(B, num_noisy, -1)
        else:
            o = frame_cross_attention(q, k, v)
            y = linear(o.flatten(2), inj.o)
        return audio_residual_add(x, y, num_noisy)


class FastBlocks:
    """The fast path's block runner (``model.blocks_runner``; ``s2v_fast.fast.apply_fast_path``):
    all blocks + audio injections of one step (``shared_rows``: see ``fast_block``'s ``shared``,
    applied to block 0)."""

    precision = "fast"
    rope_dtype = torch.float32

    def __call__(self, model, x: torch.Tensor, e0: torch.Tensor, cond, shared_rows: bool = False
                 ) -> torch.Tensor:
        # the plan is re-read every step (a few attribute reads): offload or a backend may be
        # switched between the steps of a clip; the cache is rebuilt only when the text keys'
        # form changes with it
        plan = build_plan(model)
        cache = cond.cache.get("fast")
        if cache is None or cache.plan.text != plan.text:
            cache = cond.cache["fast"] = build_clip_cache(model, cond, plan)
        cache.plan = plan
        split = cond.num_noisy
        blocks, start, last = model.blocks, None, len(model.blocks) - 1
        streamer = plan.streamer
        for i, block in enumerate(blocks):
            j = model.audio_injector.layer_to_index.get(i)
            nxt = blocks[i + 1] if plan.fuse_next[i] else None
            # the head reads only the noisy tokens: the last block computes no other output rows
            rows_out = split if i == last and plan.rows_out_last else None
            with trace_range(f"block{i}"):
                if streamer is not None:
                    streamer.before_block(i)
                x, start = fast_block(block, x, e0, split, cache, i, start, nxt,
                                      shared_rows and i == 0, rows_out)
                if streamer is not None:
                    streamer.after_block(i)
            if j is not None:
                x = fast_inject_audio(model, j, x, split, cache)
        return x
