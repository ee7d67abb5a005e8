"""Block-causal forward of the S2V DiT: LiveAvatar's streaming mode (spec liveavatar.md §4, 11-16).

The same weights as :class:`~s2v_fast.models.dit.S2VTransformer` (a LoRA merged in beforehand),
run the way LiveAvatar's ``CausalWanModel_S2V`` runs them in inference:

* **prefill** (``_forward_sink``): one forward at t = 0 over the cond tokens only, i.e. the
  reference latent (RoPE time 30) and the FramePack motion tokens, without audio. Every layer keeps
  the normed, *un-RoPE'd* K and the V of those tokens (:class:`CondCache`). The cond tokens never
  see noisy tokens.
* **block forward** (``_forward_inference``): the query tokens are one block of noisy latent frames
  at absolute RoPE time ``start_frame..``. Each layer writes the block's RoPE'd K/V into a ring
  buffer (:class:`RingKVCache`, one per denoising step) at ``start_token % capacity`` and attends
  to ``[ring (the filled part) | cond K re-RoPE'd with the ref frame at time ref_time | cond V]``.
  Then text cross-attention, FFN and the audio injectors, as in the faithful model.

Dtype map (LiveAvatar's, which differs from the faithful model's in two places): every block's
output is cast back to its input dtype (the residual stream is bf16 between blocks in production),
and the input of ``norm3`` (text cross-attention) is rounded to bf16 even in an fp32 run. RoPE
tables are rounded to fp16 (upstream stores them as complex32) and applied in float64. With fp32
weights everything else is fp32, which is how the golden fixtures were made.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F

from .audio_encoder import MOTION_LATENT_FRAMES, MOTION_PIXEL_FRAMES
from .block import S2VBlock, layer_norm, linear, linear_fp32, segment_modulate
from .dit import SEG_MOTION, SEG_NOISY, SEG_REF, S2VTransformer, sinusoidal_embedding, unpatchify
from .motion import conv_tokens
from .rope import REF_TIME_POSITION, RopeTable, Segment, apply_rope, build_rope_table

ROPE_ROUND = torch.float16  # LiveAvatar's rope_precompute keeps cos/sin as complex32


def ref_rope_time(start_frame: int, rd: int) -> int:
    """RoPE time of the reference frame for a block starting at latent frame ``start_frame``:
    ``30 + max(0, F - (30 - rd))`` = ``max(30, F + rd)`` (upstream draws rd in [4, 30])."""
    return REF_TIME_POSITION + max(0, start_frame - (REF_TIME_POSITION - rd))


def block_segment(start_frame: int, frames: int, th: int, tw: int) -> Segment:
    """RoPE segment of a noisy block at absolute latent frames [start, start + frames)."""
    return (start_frame, 0, 0), (start_frame + frames, th, tw), (frames, th, tw)


def ref_segment(time: int, th: int, tw: int) -> Segment:
    return (time, 0, 0), (time + 1, th, tw), (1, th, tw)


# ----------------------------------------------------------------------------- caches
@dataclass
class CondCache:
    """The "sink": per layer the normed un-RoPE'd K and the V of the cond tokens [B, Lc, H, D]
    (reference tokens first, then motion).

    Upstream re-applies RoPE to all cond keys on every forward, but only the reference frame's
    time rolls; the motion tokens' positions are fixed, so their RoPE'd keys are kept
    (``motion_k``, the same numbers: RoPE is elementwise per token)."""

    k: List[torch.Tensor]
    v: List[torch.Tensor]
    ref_hw: Tuple[int, int]  # (th, tw) of the reference tokens
    motion_segments: List[Segment]  # fixed RoPE segments of the motion tokens
    motion_k: List[torch.Tensor] = field(default_factory=list)  # RoPE'd motion keys per layer

    @property
    def num_tokens(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_ref(self) -> int:
        return self.ref_hw[0] * self.ref_hw[1]

    def rope(self, ref_time: int, head_dim: int, device, dtype) -> RopeTable:
        """The table of all cond tokens (the prefill's self-attention)."""
        th, tw = self.ref_hw
        segs = [ref_segment(ref_time, th, tw)] + list(self.motion_segments)
        return build_rope_table(segs, head_dim, device, dtype, round_to=ROPE_ROUND)

    def keys(self, layer: int, ref_table: RopeTable) -> torch.Tensor:
        """Layer ``layer``'s cond keys with the reference frame at ``ref_table``'s time."""
        ref = _rope(self.k[layer][:, :self.num_ref], ref_table)
        return torch.cat([ref, self.motion_k[layer]], dim=1)


class RingKVCache:
    """One denoising step's rolling K/V cache: per layer ring buffers [B, capacity, H, D].

    A block of n tokens starting at absolute token ``start`` is written at ``start % capacity``
    (capacity is a multiple of the block length, so a write never wraps). Until the ring is
    full only ``[0, start + n)`` is read; afterwards all of it (order does not matter: softmax
    over keys is permutation invariant, and the ring order is upstream's order)."""

    def __init__(self, num_layers: int, capacity: int, batch: int, heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.capacity = capacity
        shape = (batch, capacity, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def slot(self, layer: int, start: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The ring rows [B, n, H, D] a block of n tokens starting at absolute token ``start``
        goes to (views: a kernel may write its output there)."""
        if self.capacity % n:
            raise ValueError(f"cache capacity {self.capacity} is not a multiple of the block "
                             f"length {n}")
        s = start % self.capacity
        return self.k[layer][:, s:s + n], self.v[layer][:, s:s + n]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ks, vs = self.slot(layer, start, k.shape[1])
        ks.copy_(k)
        vs.copy_(v)

    def active(self, layer: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """K/V filled so far when the block ending at absolute token ``end`` has been written."""
        n = min(end, self.capacity)
        return self.k[layer][:, :n], self.v[layer][:, :n]


# ----------------------------------------------------------------------------- math steps
def _terms(block: S2VBlock, e0: torch.Tensor, column: int):
    """The 6 fp32 modulation tensors [B, 1, C] of one segment (0: timestep t, 1: t = 0)."""
    return [m[:, column:column + 1] for m in block.modulation_terms(e0)]


def _modulate(x: torch.Tensor, shift, scale, eps: float) -> torch.Tensor:
    """fp32 LN(x) * (1 + scale) + shift, LN rounded to x's dtype first (``norm1(x).float()``)."""
    return segment_modulate(layer_norm(x, eps), shift, scale, x.shape[1])


def _qkv(block: S2VBlock, h: torch.Tensor):
    sa = block.self_attn
    q = sa._heads(sa.norm_q(linear(h, sa.q)))
    k = sa._heads(sa.norm_k(linear(h, sa.k)))
    v = sa._heads(linear(h, sa.v))
    return q, k, v


def _rope(x: torch.Tensor, table: RopeTable) -> torch.Tensor:
    return apply_rope(x, table).to(x.dtype)


def _attn_out(block: S2VBlock, attn, q, k, v) -> torch.Tensor:
    """o(attn(q, k, v)): ``attn`` is the model's ``causal`` attention slot."""
    return linear(attn(q, k, v).flatten(2), block.self_attn.o)


def _cross_ffn(block: S2VBlock, x: torch.Tensor, terms, text_kv) -> torch.Tensor:
    """x + CrossAttn(norm3(bf16(x))) ; x + FFN(mod(LN(x))) * gate (fp32 residual)."""
    cdt = block.cross_attn.q.weight.dtype
    n3 = block.norm3
    h = F.layer_norm(x.to(torch.bfloat16), (x.shape[-1],), n3.weight, n3.bias, n3.eps).to(cdt)
    x = x + block.cross_attn(h, kv=text_kv)
    _, _, _, shift_ff, scale_ff, gate_ff = terms
    h = _modulate(x, shift_ff, scale_ff, block.eps)
    return x + block.ffn_forward(h).float() * gate_ff


# ----------------------------------------------------------------------------- the model
class CausalS2V:
    """LiveAvatar's causal inference over an :class:`S2VTransformer` (no copy of the weights)."""

    def __init__(self, model: S2VTransformer):
        self.model = model
        c = model.config
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.patch = model.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_step_cache(self, capacity_tokens: int, batch: int = 1) -> RingKVCache:
        return RingKVCache(len(self.model.blocks), capacity_tokens, batch, self.num_heads,
                           self.head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------ per-prompt work
    @torch.no_grad()
    def text_kv(self, context) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Text cross-attention K/V of every block, once per prompt (upstream recomputes them)."""
        emb = self.model.embed_text(context, 1)
        return [b.cross_attn.context_kv(emb) for b in self.model.blocks]

    def _time(self, t: float, frames: int):
        """(e_t [1, dim], E [1, 6, 2, dim]) for a block whose ``frames`` latent frames share t.

        Computed over upstream's rows ``[t] * frames + [0] * frames`` (per-frame timesteps plus
        the zero-timestep rows): the values are the same for any row count, but the fp32 GEMM's
        rounding depends on it, and these shapes give upstream's bits."""
        m = self.model
        rows = torch.tensor([float(t)] * frames + [0.0] * frames, device=self.device,
                            dtype=torch.float32)
        s = sinusoidal_embedding(m.config.freq_dim, rows)
        e = linear_fp32(F.silu(linear_fp32(s, m.time_embedding[0])), m.time_embedding[2])
        e0 = linear_fp32(F.silu(e), m.time_projection[1]).unflatten(1, (6, m.config.dim))
        E = torch.stack([e0[0], e0[frames]], dim=1).unsqueeze(0)  # [1, 6, 2, dim]
        return e[:1], E

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, ref_latents: torch.Tensor, motion_latents: torch.Tensor, text_kv,
                block_frames: int = 3) -> CondCache:
        """t = 0 forward over [ref | motion] tokens -> the cond K/V of every layer
        (``block_frames``: the streaming block length; upstream's prefill carries t per frame)."""
        m = self.model
        dev = self.device
        ref_tok = m.segment_embedding(conv_tokens(ref_latents.to(dev), m.patch_embedding), SEG_REF)
        mot_tok = m.segment_embedding(m.frame_packer(motion_latents.to(dev)), SEG_MOTION)
        x = torch.cat([ref_tok, mot_tok], dim=1)
        ph, pw = self.patch[1:]
        ref_hw = (ref_latents.shape[-2] // ph, ref_latents.shape[-1] // pw)
        cache = CondCache([], [], ref_hw, m.frame_packer.segments(*motion_latents.shape[-2:]))
        rope = cache.rope(REF_TIME_POSITION, self.head_dim, dev, torch.float64)
        _, e0 = self._time(0.0, block_frames)
        last = len(m.blocks) - 1
        for i, block in enumerate(m.blocks):
            terms = _terms(block, e0, 1)
            h = _modulate(x, terms[0], terms[1], block.eps).to(self.dtype)
            q, k, v = _qkv(block, h)
            k_roped = _rope(k, rope)
            cache.k.append(k)
            cache.v.append(v)
            cache.motion_k.append(k_roped[:, cache.num_ref:])
            if i == last:  # the last block's output is never used: only its K/V are
                break
            y = _attn_out(block, m.causal_attn, _rope(q, rope), k_roped, v)
            x_in = x
            x = x + y.float() * terms[2]
            x = _cross_ffn(block, x, terms, text_kv[i]).to(x_in.dtype)
        return cache

    # ------------------------------------------------------------------ one block
    def block_tokens(self, x: torch.Tensor):
        """Noisy tokens [B, n, dim] of a block x [B, 16, F, lh, lw] and its grid (F, th, tw): patch
        embedding + the pose conv's bias (the pose condition is zero) + the noisy segment."""
        m = self.model
        _, _, nf, lh, lw = x.shape
        ph, pw = self.patch[1:]
        tok = conv_tokens(x.to(self.device), m.patch_embedding)
        tok = tok + m.cond_encoder.bias.to(tok.dtype)
        return m.segment_embedding(tok, SEG_NOISY), (nf, lh // ph, lw // pw)

    @torch.no_grad()
    def forward_block(self, x: torch.Tensor, t: float, cache: RingKVCache, cond: CondCache,
                      start_frame: int, audio_block: torch.Tensor, text_kv,
                      ref_time: int) -> torch.Tensor:
        """Velocity [B, 16, F, lh, lw] (compute dtype) of a noisy block x [B, 16, F, lh, lw].

        audio_block [B, 25, D, 4F]: the block's bucketed audio features (the encoder left-pads
        them with the first frame repeated 73 times, as the faithful model does)."""
        m = self.model
        dev = self.device
        tok, (nf, th, tw) = self.block_tokens(x)
        n = nf * th * tw
        start_tok = start_frame * th * tw

        a_loc, a_glb = m.casual_audio_encoder(audio_block.to(dev),
                                              (MOTION_PIXEL_FRAMES, MOTION_LATENT_FRAMES))
        a_loc, a_glb = a_loc.to(self.dtype), a_glb.to(self.dtype)
        if a_loc.shape[1] != nf:
            raise ValueError(f"audio block gives {a_loc.shape[1]} latent frames, expected {nf}")

        rope = build_rope_table([block_segment(start_frame, nf, th, tw)], self.head_dim, dev,
                                torch.float64, round_to=ROPE_ROUND)
        th_r, tw_r = cond.ref_hw
        ref_rope = build_rope_table([ref_segment(ref_time, th_r, tw_r)], self.head_dim, dev,
                                    torch.float64, round_to=ROPE_ROUND)
        e_t, e0 = self._time(t, nf)
        xs = tok
        for i, block in enumerate(m.blocks):
            terms = _terms(block, e0, 0)
            h = _modulate(xs, terms[0], terms[1], block.eps).to(self.dtype)
            q, k, v = _qkv(block, h)
            q, k = _rope(q, rope), _rope(k, rope)
            cache.write(i, start_tok, k, v)
            ck, cv = cache.active(i, start_tok + n)
            keys = torch.cat([ck, cond.keys(i, ref_rope)], dim=1)
            vals = torch.cat([cv, cond.v[i]], dim=1)
            y = _attn_out(block, m.causal_attn, q, keys, vals)
            x_in = xs
            xs = xs + y.float() * terms[2]
            xs = _cross_ffn(block, xs, terms, text_kv[i]).to(x_in.dtype)
            j = m.audio_injector.layer_to_index.get(i)
            if j is not None:
                xs = m.audio_injector.inject(j, xs, n, a_loc, a_glb)
        out = self._head(xs, e_t)
        return unpatchify(out, (nf, th, tw), self.patch, m.config.out_dim)

    def _head(self, x: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
        """CausalHead_S2V: fp32 Linear(LN(x) * (1 + scale) + shift), output in x's dtype."""
        head = self.model.head
        mod = head.modulation.float() + e_t.float()[:, None, :]
        h = layer_norm(x, head.eps).float() * (1 + mod[:, 1:2]) + mod[:, 0:1]
        return linear_fp32(h, head.head).to(x.dtype)
