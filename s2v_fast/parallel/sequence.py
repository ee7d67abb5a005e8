"""Sequence parallelism for the S2V DiT: shard plan, Ulysses all-to-all, ring attention.

Sequence ``[noisy (Lv) | ref | motion]`` (spec §4.6) is cut into ``sp = ring * ulysses``
contiguous shards, shard ``i`` on sp-rank ``i``. Per rank the block math is local except self
attention:

* **Ulysses** (``ulysses`` ranks, consecutive shards): ONE ``all_to_all_single`` sends q, k and v
  together (``[3, B, L_i, H, D]``, split by head group) and returns the ulysses group's whole
  sub-sequence for ``H / ulysses`` heads; after attention ONE all-to-all sends the output back.
  Uneven shards use split sizes (no padding).
* **Ring** (``ring`` ranks, one per ulysses group): the k/v chunk travels round the ring
  (``batch_isend_irecv``, overlapped with the attention of the current chunk); partial results
  merge with their log-sum-exp: ``lse = logaddexp(lse_a, lse_b)``,
  ``o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)`` (fp32).

Shard plan (:func:`make_shard_plan`): boundaries at ``round(i * L / sp)``; with policy ``"frame"``
a boundary inside the noisy tokens moves to the nearest latent-frame boundary (multiple of
``Nf = th * tw``) when that moves it by at most 25% of a shard. Audio injection is per token (a
token only needs its own frame's audio), so it never needs a collective: frame-aligned shards
run the model's injector once on whole local frames, unaligned ones run it on up to three pieces
(head partial frame, whole frames, tail partial frame).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..models.dit import S2VConditions, unpatchify
from ..models.rope import RopeTable

FRAME_SNAP_TOLERANCE = 0.25  # max boundary move, as a fraction of the mean shard


# ----------------------------------------------------------------------------- shard plan
@dataclass(frozen=True)
class ShardPlan:
    bounds: Tuple[int, ...]  # sp + 1 token offsets, bounds[0] = 0, bounds[-1] = L
    num_noisy: int
    frame_tokens: int

    @property
    def parts(self) -> int:
        return len(self.bounds) - 1

    @property
    def lengths(self) -> List[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def range(self, i: int) -> Tuple[int, int]:
        return self.bounds[i], self.bounds[i + 1]

    def noisy_range(self, i: int) -> Tuple[int, int]:
        a, b = self.range(i)
        return min(a, self.num_noisy), min(b, self.num_noisy)

    def frame_aligned(self, i: int) -> bool:
        a, b = self.noisy_range(i)
        return b == a or (a % self.frame_tokens == 0 and b % self.frame_tokens == 0)


def make_shard_plan(seq_len: int, num_noisy: int, frame_tokens: int, parts: int,
                    policy: str = "frame") -> ShardPlan:
    if parts < 1:
        raise ValueError(f"parts={parts}")
    bounds = [0]
    mean = seq_len / parts
    for i in range(1, parts):
        b = round(i * seq_len / parts)
        if policy == "frame" and 0 < b < num_noisy:
            snapped = min(round(b / frame_tokens) * frame_tokens, num_noisy)
            if abs(snapped - b) <= FRAME_SNAP_TOLERANCE * mean:
                b = snapped
        bounds.append(min(max(b, bounds[-1]), seq_len))
    bounds.append(seq_len)
    return ShardPlan(tuple(bounds), num_noisy, frame_tokens)


# ----------------------------------------------------------------------------- conditions
@dataclass
class ShardConditions(S2VConditions):
    """This rank's slice of :class:`S2VConditions` (the full ones are kept in ``full``).

    ``extra_tokens`` / ``rope`` / ``segment_ids`` cover only local tokens; ``cond_tokens`` and
    ``audio_*`` cover the latent frames ``[frame0, frame1)`` touched by the local noisy tokens;
    ``num_noisy`` is the local noisy count (the local segment split index).
    """

    full: Optional[S2VConditions] = None
    plan: Optional[ShardPlan] = None
    shard: int = 0
    start: int = 0
    end: int = 0
    local_noisy: int = 0
    frame0: int = 0
    frame1: int = 0
    noisy_offset: int = 0  # offset of the first local noisy token inside frame0

    @property
    def num_noisy(self) -> int:  # the model uses it as the local segment split
        return self.local_noisy

    @property
    def seq_len(self) -> int:
        return self.end - self.start

    @property
    def whole(self) -> S2VConditions:
        return self.full

    @property
    def frame_aligned(self) -> bool:
        return self.plan.frame_aligned(self.shard)

    @property
    def frame_tokens(self) -> int:
        return self.plan.frame_tokens


def slice_rope(rope: RopeTable, a: int, b: int) -> RopeTable:
    return RopeTable(pos=rope.pos[a:b], cos=rope.cos[a:b], sin=rope.sin[a:b])


def shard_conditions(cond: S2VConditions, plan: ShardPlan, shard: int) -> ShardConditions:
    Lv, Nf = cond.num_noisy, plan.frame_tokens
    a, b = plan.range(shard)
    na, nb = plan.noisy_range(shard)
    f0, f1 = (na // Nf, -(-nb // Nf)) if nb > na else (0, 0)
    ea, eb = max(a, Lv) - Lv, max(b, Lv) - Lv
    cond_tokens = None if cond.cond_tokens is None else cond.cond_tokens[:, f0 * Nf:f1 * Nf]
    fields = {f.name: getattr(cond, f.name) for f in dataclasses.fields(S2VConditions)}
    fields.update(audio_local=cond.audio_local[:, f0:f1], audio_global=cond.audio_global[:, f0:f1],
                  cond_tokens=cond_tokens, extra_tokens=cond.extra_tokens[:, ea:eb],
                  rope=slice_rope(cond.rope, a, b), segment_ids=cond.segment_ids[a:b],
                  grid=(f1 - f0, cond.grid[1], cond.grid[2]))
    if "cache" in fields:  # per-clip caches (fast path) must be built from the local slices
        fields["cache"] = {}
    return ShardConditions(**fields, full=cond, plan=plan, shard=shard, start=a, end=b,
                           local_noisy=nb - na, frame0=f0, frame1=f1,
                           noisy_offset=na - f0 * Nf)


# ----------------------------------------------------------------------------- gathers
def gather_sequence(h: torch.Tensor, lengths, group) -> torch.Tensor:
    """All-gather uneven [B, n_i, C] pieces (sp-rank order) into [B, sum n_i, C] on every rank."""
    P, n_max = len(lengths), max(lengths)
    B, n, C = h.shape
    send = h.new_zeros(B, n_max, C)
    send[:, :n] = h
    recv = h.new_empty(P, B, n_max, C)
    all_gather_tensor(recv, send, group)
    return torch.cat([recv[i, :, :lengths[i]] for i in range(P)], dim=1)


def all_gather_tensor(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """Equal-size all-gather: ``out`` (contiguous, [group size, *inp.shape]) gets every rank's
    ``inp`` (``all_gather_single`` on torch >= 2.13, ``all_gather_into_tensor`` before)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out.view(-1), inp.contiguous().view(-1), group=group)



# ----------------------------------------------------------------------------- Ulysses
def ulysses_scatter_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          lengths: Sequence[int], group) -> torch.Tensor:
    """q, k, v [B, L_me, H, D] -> [3, B, sum(lengths), H/U, D] with ONE all-to-all.

    ``lengths`` are the shard lengths of the U group members (group-rank order).
    """
    U = len(lengths)
    B, L, H, D = q.shape
    Hu = H // U
    send = q.new_empty(U, 3, B, L, Hu, D)
    for i, t in enumerate((q, k, v)):
        send[:, i].copy_(t.reshape(B, L, U, Hu, D).permute(2, 0, 1, 3, 4))
    unit = 3 * B * Hu * D
    recv = q.new_empty(unit * sum(lengths))
    dist.all_to_all_single(recv, send.reshape(-1), [unit * n for n in lengths],
                           [unit * L] * U, group=group)
    chunks = [c.view(3, B, n, Hu, D) for c, n in zip(recv.split([unit * n for n in lengths]),
                                                       lengths)]
    return torch.cat(chunks, dim=2)


def ulysses_gather_heads(o: torch.Tensor, lengths: Sequence[int], me: int, group) -> torch.Tensor:
    """o [B, sum(lengths), H/U, D] -> [B, lengths[me], H, D] with ONE all-to-all."""
    U = len(lengths)
    B, _, Hu, D = o.shape
    if B == 1 and o.is_contiguous():
        send = o.reshape(-1)  # the per-rank token ranges are already contiguous, in order
    else:
        send = torch.cat([c.reshape(-1) for c in o.split(list(lengths), dim=1)])
    unit = B * Hu * D
    n = lengths[me]
    recv = o.new_empty(U, B, n, Hu, D)
    dist.all_to_all_single(recv.view(-1), send, [unit * n] * U, [unit * m for m in lengths],
                           group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, n, U * Hu, D)


# ----------------------------------------------------------------------------- LSE attention
def _attention_with_lse_math(q, k, v, scale):
    """Explicit fp32 softmax (CPU / fallback): o [B,Lq,H,D] fp32, lse [B,H,Lq] fp32."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()), lse


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the natural-log log-sum-exp of the scaled logits.

    q [B, Lq, H, D], k/v [B, Lk, H, D] -> (o [B, Lq, H, D] (q dtype on the flash path, fp32
    otherwise), lse [B, H, Lq] fp32). CUDA bf16/fp16: ``aten._scaled_dot_product_flash_attention``
    (FlashAttention-2, returns logsumexp); CUDA fp32: memory-efficient attention; else explicit
    fp32 math.
    """
    D = q.shape[-1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    if k.shape[1] == 0:
        B, Lq, H, _ = q.shape
        return (q.new_zeros(B, Lq, H, v.shape[-1], dtype=torch.float32),
                q.new_full((B, H, Lq), float("-inf"), dtype=torch.float32))
    if q.is_cuda:
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        try:
            if q.dtype in (torch.bfloat16, torch.float16):
                out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, False,
                                                                          False, scale=scale)
            else:
                out = torch.ops.aten._scaled_dot_product_efficient_attention(
                    qt, kt, vt, None, True, 0.0, False, scale=scale)
            o, lse = out[0], out[1]
            return o.transpose(1, 2), lse[..., :q.shape[1]].float()
        except RuntimeError:  # unsupported shape / head dim: exact math below
            pass
    return _attention_with_lse_math(q, k, v, scale)


def merge_attention(o: Optional[torch.Tensor], lse: Optional[torch.Tensor], o_i: torch.Tensor,
                    lse_i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable merge of two partial softmax results over disjoint key sets (fp32)."""
    o_i = o_i.float()
    if o is None:
        return o_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    w = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    w_i = torch.exp(lse_i - new).transpose(1, 2).unsqueeze(-1)
    return o * w + o_i * w_i, new


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_lengths: Sequence[int],
                   me: int, ring_ranks: Sequence[int], group) -> torch.Tensor:
    """Attention of local q over the k/v of every ring member; -> [B, Lq, H, D] in q's dtype.

    ``seg_lengths[j]`` is ring member j's token count (so uneven chunks are received exactly);
    ``ring_ranks`` are the members' global ranks. The next chunk is in flight while the current
    one is attended.
    """
    R = len(seg_lengths)
    kv = torch.stack([k, v])
    nxt, prv = ring_ranks[(me + 1) % R], ring_ranks[(me - 1) % R]
    o = lse = None
    for step in range(R):
        src = (me - step) % R
        reqs, buf = [], None
        if step < R - 1:
            n = seg_lengths[(src - 1) % R]
            buf = kv.new_empty(2, kv.shape[1], n, *kv.shape[3:])
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, group),
                                           dist.P2POp(dist.irecv, buf, prv, group)])
        if kv.shape[2] > 0 and q.shape[1] > 0:
            o_i, lse_i = attention_with_lse(q, kv[0], kv[1])
            o, lse = merge_attention(o, lse, o_i, lse_i)
        for r in reqs:
            r.wait()
        if buf is not None:
            kv = buf
    if o is None:
        return torch.zeros_like(q)
    return o.to(q.dtype)


# ----------------------------------------------------------------------------- the hook
class SequenceParallelAttention:
    """The sequence-parallel strategy of the DiT (see :func:`install_sequence_parallel`):

    * ``sp(q, k, v, local)``: every block's self-attention (``SelfAttention.sequence_parallel``):
      Ulysses head exchange and / or ring passes around ``local`` (the block's attention slot);
    * ``inject_audio(model, j, x, split, cond)``: the model's audio injection of a token shard
      (``S2VTransformer.parallel_strategy``), in pieces where the shard cuts a frame.

    ``plan`` is set by the runner for the current clip layout before the blocks run.
    """

    def __init__(self, state):
        self.state = state
        self.plan: Optional[ShardPlan] = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local) -> torch.Tensor:
        st, cfg = self.state, self.state.config
        U, R = cfg.ulysses_degree, cfg.ring_degree
        lens = self.plan.lengths
        r, u = st.ring_rank, st.ulysses_rank
        ulens = lens[r * U:(r + 1) * U]
        if U > 1:
            q, k, v = ulysses_scatter_heads(q, k, v, ulens, st.ulysses_group).unbind(0)
        if R > 1:
            seg = [sum(lens[j * U:(j + 1) * U]) for j in range(R)]
            o = ring_attention(q, k, v, seg, r, st.ring_ranks, st.ring_group)
        else:
            o = local(q, k, v)
        if U > 1:
            o = ulysses_gather_heads(o, ulens, u, st.ulysses_group)
        return o

    def step_tokens(self, model, x: torch.Tensor, cond: "ShardConditions") -> torch.Tensor:
        """The rank's input tokens of one step: its slice of the noisy tokens (only the latent
        frames it touches are embedded) and of the step-invariant ref / motion tokens."""
        self.plan = cond.plan
        parts = []
        if cond.local_noisy:
            tok = model.embed_noisy(x[:, :, cond.frame0:cond.frame1], cond)
            parts.append(tok[:, cond.noisy_offset:cond.noisy_offset + cond.local_noisy])
        parts.append(cond.extra_tokens)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def step_output(self, model, h: torch.Tensor, e_t: torch.Tensor, cond: "ShardConditions"
                    ) -> torch.Tensor:
        """The head on the rank's noisy tokens, then ONE all-gather of the 64-wide head outputs
        over the sequence-parallel group (80x less data than the hidden states) -> the full
        velocity on every rank."""
        h = model.head(h[:, :cond.local_noisy], e_t)  # [B, n_local, 64]
        plan = cond.plan
        h = gather_sequence(h, [b - a for a, b in (plan.noisy_range(i) for i in range(plan.parts))],
                            self.state.sp_group)
        full = cond.full
        return unpatchify(h, full.grid, model.patch_size, model.config.out_dim).float()

    def inject_audio(self, model, j: int, x: torch.Tensor, split: int, cond):
        inj = model.audio_injector
        if isinstance(cond, ShardConditions) and split == 0:
            return x  # no noisy tokens on this rank
        if not isinstance(cond, ShardConditions) or cond.frame_aligned:
            return inj.inject(j, x, split, cond.audio_local, cond.audio_global)
        return _inject_pieces(model, j, x, split, cond)


def install_sequence_parallel(model, state) -> SequenceParallelAttention:
    """Install the strategy at the model's declared seams: every block's
    ``self_attn.sequence_parallel`` and the model's ``parallel_strategy``."""
    sp = SequenceParallelAttention(state)
    for blk in model.blocks:
        blk.self_attn.sequence_parallel = sp
    model.parallel_strategy = sp
    return sp


def remove_sequence_parallel(model) -> None:
    for blk in model.blocks:
        blk.self_attn.sequence_parallel = None
    model.parallel_strategy = None


def _inject_pieces(model, j: int, x: torch.Tensor, split: int, cond: ShardConditions):
    """Audio injection of an unaligned shard: head partial frame, whole frames, tail partial.

    Each piece calls the model's own injector with its frames' audio; no collective.
    """
    Nf, off = cond.frame_tokens, cond.noisy_offset
    head = min(Nf - off, split) if off else 0
    whole = (split - head) // Nf
    pieces = []  # (token start, token count, first local frame, frames)
    if head:
        pieces.append((0, head, 0, 1))
    f = 1 if head else 0
    if whole:
        pieces.append((head, whole * Nf, f, whole))
        f += whole
    tail = split - head - whole * Nf
    if tail:
        pieces.append((head + whole * Nf, tail, f, 1))
    inj = model.audio_injector
    for a, n, f, nf in pieces:
        piece = x[:, a:a + n]
        out = inj.inject(j, piece, n, cond.audio_local[:, f:f + nf], cond.audio_global[:, f:f + nf])
        if out.data_ptr() != piece.data_ptr():
            x[:, a:a + n] = out
    return x
