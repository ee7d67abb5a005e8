"""The streaming (block-causal) forward on the fused kernels: :class:`FastCausal`.

The same math and rounding points as :class:`~s2v_fast.models.causal.CausalS2V` (LiveAvatar's
dtype map: bf16 residual stream between blocks, bf16 rounding before ``norm3``), run the way the
faithful fast path runs a block (``blocks.py``):

* norm1 + modulation, q/k RMSNorm + RoPE (fp32 table of the fp16-rounded angles; the reference
  rotates in float64), both residuals + norm2 modulation, the FFN residual: Triton kernels;
  the FFN's GELU in the GEMM epilogue (or in the fp8 activation quantiser).
* The block's RoPE'd keys are written straight into the step's ring by the q/k kernel; attention
  reads ``[ring | reference keys | motion keys]`` assembled by one ``torch.cat`` per layer (the
  reference concatenates twice). Keeping the cond keys next to each ring instead would save that
  copy (~0.3 GB per layer at 704x384, ~6 ms per forward) but cost a cond copy per step cache:
  +8.6 GB at 704x384, which does not fit an 80 GB H100 in bf16 beside the four 10.4 GB rings and
  the 30.6 GB of weights. A kernel that takes the keys as segments is the way to drop it.
  The reference frame's keys are re-RoPE'd at the call's reference time, as upstream does.
* Text cross-attention over the compacted prompt keys (``text_kv.py``), K/V once per prompt.
* Audio: the block's audio encoder output, AdaLN terms and audio K/V are computed once per block
  (the 4 steps of a block share its audio window) and run through the fused injection kernels.

Used by the streaming runner when the DiT runs on the fast path (``model.precision == "fast"``)
with bf16 weights; other dtypes take the reference forward (the kernels' fp32 forms are for the
faithful path's tests only).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.gated_residual import gated_residual, residual_pair_norm_modulate
from ..kernels.norm_modulate import norm_modulate
from ..kernels.qk_norm_rope import qk_norm_rope
from ..kernels.rms_norm import rms_norm
from ..models.audio_encoder import MOTION_LATENT_FRAMES, MOTION_PIXEL_FRAMES
from ..models.block import linear
from ..models.causal import (ROPE_ROUND, CausalS2V, CondCache, RingKVCache, block_segment,
                             ref_segment)
from ..models.dit import unpatchify
from ..models.rope import RopeTable, apply_rope, build_rope_table
from ..quantization import gelu_linear, same_input_linears
from .blocks import AudioCache, _heads, fast_inject_audio, fill_audio_cache, linear_gelu
from .plan import build_plan
from .text_kv import compact_text_kv, compacted_key_counts, text_attention_output


class FastTextKV:
    """The prompt's text K/V per block: ``dense`` (all padded rows, for the prefill, which runs
    the reference math) and the compacted form the fast block uses (keys, values, bias, counts)."""

    def __init__(self, dense, text_len: int, text_rows: int):
        self.dense = dense
        lens = (min(text_rows, text_len),)
        self.keys = compacted_key_counts(lens, text_len)
        self.compact = []
        for k, v in dense:
            kc, vc, bias = compact_text_kv(k, v, lens)
            self.compact.append((kc.contiguous(), vc.contiguous(), bias))

    def __getitem__(self, i):  # the reference prefill indexes the per-block dense K/V
        return self.dense[i]

    def __len__(self) -> int:
        return len(self.dense)


class FastCausal(CausalS2V):
    """:class:`CausalS2V` on the fused kernels (module docstring); same call signatures."""

    def __init__(self, model):
        super().__init__(model)
        self._audio: Optional[tuple] = None  # (audio_block, start_frame, a_loc, a_glb, AudioCache)

    @property
    def fused(self) -> bool:
        return self.dtype == torch.bfloat16

    @torch.no_grad()
    def text_kv(self, context):
        dense = super().text_kv(context)
        if not self.fused:
            return dense
        rows = context.shape[0] if torch.is_tensor(context) and context.dim() == 2 else None
        if rows is None:  # a batch or list of prompts: keep the dense keys
            return dense
        return FastTextKV(dense, self.model.config.text_len, rows)

    # ------------------------------------------------------------------ per-block work
    def _block_audio(self, audio_block: torch.Tensor, start_frame: int, nf: int):
        """Audio features, AdaLN terms and K/V of a block's audio window (once per block)."""
        memo = self._audio
        if memo is not None and memo[0] is audio_block and memo[1] == start_frame:
            return memo[2]
        m = self.model
        a_loc, a_glb = m.casual_audio_encoder(audio_block.to(self.device),
                                              (MOTION_PIXEL_FRAMES, MOTION_LATENT_FRAMES))
        a_loc, a_glb = a_loc.to(self.dtype), a_glb.to(self.dtype)
        if a_loc.shape[1] != nf:
            raise ValueError(f"audio block gives {a_loc.shape[1]} latent frames, expected {nf}")
        cache = fill_audio_cache(AudioCache(plan=build_plan(m)), m, a_loc, a_glb)
        self._audio = (audio_block, start_frame, cache)
        return cache

    def _attention_kv(self, cache: RingKVCache, layer: int, end: int, cond: CondCache,
                      ref_table: RopeTable) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys [ring filled so far | reference keys at this call's time | motion keys] and their
        values, one concatenation each."""
        ck, cv = cache.active(layer, end)
        nr = cond.num_ref
        ref_k = apply_rope(cond.k[layer][:, :nr], ref_table).to(ck.dtype)
        return (torch.cat([ck, ref_k, cond.motion_k[layer]], dim=1),
                torch.cat([cv, cond.v[layer]], dim=1))

    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, t: float, cache: RingKVCache, cond: CondCache,
                      start_frame: int, audio_block: torch.Tensor, text_kv,
                      ref_time: int) -> torch.Tensor:
        if not self.fused or not isinstance(text_kv, FastTextKV):
            return super().forward_block(x, t, cache, cond, start_frame, audio_block,
                                         getattr(text_kv, "dense", text_kv), ref_time)
        m = self.model
        dev = self.device
        xs, (nf, th, tw) = self.block_tokens(x)
        n = nf * th * tw
        start_tok = start_frame * th * tw
        audio = self._block_audio(audio_block, start_frame, nf)
        rope = build_rope_table([block_segment(start_frame, nf, th, tw)], self.head_dim, dev,
                                torch.float32, round_to=ROPE_ROUND)
        ref_rope = build_rope_table([ref_segment(ref_time, *cond.ref_hw)], self.head_dim, dev,
                                    torch.float32, round_to=ROPE_ROUND)
        cos, sin = rope.cos.contiguous(), rope.sin.contiguous()
        e_t, e0 = self._time(t, nf)
        plan = audio.plan
        for i, block in enumerate(m.blocks):
            sa, ca = block.self_attn, block.cross_attn
            H = sa.num_heads
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = block.modulation_terms(e0)
            h = norm_modulate(xs, shift_sa, scale_sa, n, eps=block.eps,
                              round_normed_to_bf16=xs.dtype == torch.bfloat16,
                              out_dtype=sa.q.weight.dtype)
            q, k, v = same_input_linears(h, (sa.q, sa.k, sa.v))
            k_slot, v_slot = cache.slot(i, start_tok, n)
            q, _ = qk_norm_rope(q, k, sa.norm_q.weight, sa.norm_k.weight, cos, sin, H,
                                eps=sa.norm_q.eps, k_out=k_slot)
            v_slot.copy_(_heads(v, H))
            keys, vals = self._attention_kv(cache, i, start_tok + n, cond, ref_rope)
            y = linear(m.causal_attn(q, keys, vals).flatten(2), sa.o)
            # norm3 reads the residual rounded to bf16 (LiveAvatar), so it is stored once here
            x1 = gated_residual(xs, y, gate_sa, n)
            n3 = block.norm3
            h3 = F.layer_norm(x1.to(torch.bfloat16), (x1.shape[-1],), n3.weight, n3.bias,
                              n3.eps).to(ca.q.weight.dtype)
            qc = _heads(rms_norm(linear(h3, ca.q), ca.norm_q.weight, ca.norm_q.eps), H)
            kc, vc, bias = text_kv.compact[i]
            yc = text_attention_output(qc, kc, vc, bias, text_kv.keys, ca.o)
            x2, h2 = residual_pair_norm_modulate(xs, y, gate_sa, yc, shift_ff, scale_ff, n,
                                                 eps=block.eps, out_dtype=block.ffn[0].weight.dtype)
            if plan.fp8_ffn_out[i]:
                y2 = gelu_linear(linear(h2, block.ffn[0]), block.ffn[2])
            else:
                y2 = linear(linear_gelu(h2, block.ffn[0]), block.ffn[2])
            xs = gated_residual(x2, y2, gate_ff, n).to(xs.dtype)  # block output: input dtype
            j = m.audio_injector.layer_to_index.get(i)
            if j is not None:
                xs = fast_inject_audio(m, j, xs, n, audio)
        out = self._head(xs, e_t)
        return unpatchify(out, (nf, th, tw), self.patch, m.config.out_dim)


def causal_runner_for(model) -> CausalS2V:
    """The block-causal forward matching the model's block runner: :class:`FastCausal` on the
    fast path, the reference :class:`CausalS2V` otherwise."""
    return FastCausal(model) if model.precision == "fast" else CausalS2V(model)
