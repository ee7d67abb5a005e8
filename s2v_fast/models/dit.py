"""S2V diffusion transformer (`WanModel_S2V`, spec §4) with official checkpoint key names.

One call (batch-first; B may be 2 = CFG branches):
1. step-invariant ``prepare_conditions``: text MLP over 512 zero-padded rows, audio encoder,
   pose (cond) tokens, reference + FramePack motion tokens (+ segment embedding), RoPE table.
2. ``forward_step``: noisy patch tokens, time MLP ([t, 0] -> E), blocks + audio injection
   (``run_blocks``), head + unpatchify -> fp32 velocity [B, 16, F, lh, lw].
Sequence: [noisy (Lv) | reference | motion]; tokens >= Lv use the t = 0 modulation.

The plain model is the reference math: it emulates the production bf16 dtype map (spec §4.13)
with explicit casts (see block.py); with fp32 weights everything is fp32. It imports no kernel,
quantisation, offload, parallel or profiling module. Transforms change how it runs through
declared seams, never by patching methods:

* ``blocks_runner``: who runs the blocks of a step (:class:`PlainBlocks` here; the fused fast path
  ``s2v_fast.fast.apply_fast_path`` installs its own). ``model.precision`` is the runner's name.
* attention slots (``attention_slots()``): the backend of each attention site
  (``s2v_fast.kernels.attention.configure_attention``).
* ``block_streamer``: set by layerwise offload (its weights arrive per block in hooks).
* ``parallel_strategy``: set by sequence parallelism (audio injection of a token shard).

Intermediates can be captured with ``with model.capture_intermediates() as store: ...``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention_sites import AttentionSlot
from ..config import DiTConfig
from ..errors import InputError
from .audio_encoder import MOTION_LATENT_FRAMES, MOTION_PIXEL_FRAMES, CausalAudioEncoder
from .audio_injector import AudioInjector
from .block import LayerNorm, S2VBlock, linear, linear_fp32
from .motion import FramePackMotioner, conv_tokens
from .rope import RopeTable, build_rope_table, reference_segment, video_segment

SEG_NOISY, SEG_REF, SEG_MOTION = 0, 1, 2


# ----------------------------------------------------------------------------- small steps
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, dim] fp32: concat(cos(t w_k), sin(t w_k)), w_k = 10000^(-k/(dim/2)), float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    s = torch.outer(pos, freqs)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1).float()


def unpatchify(tokens: torch.Tensor, grid: Tuple[int, int, int], patch: Tuple[int, int, int],
               out_dim: int) -> torch.Tensor:
    """[B, F*th*tw, pt*ph*pw*c] (c fastest) -> [B, c, F*pt, th*ph, tw*pw]."""
    B = tokens.shape[0]
    (F_, th, tw), (pt, ph, pw) = grid, patch
    u = tokens.reshape(B, F_, th, tw, pt, ph, pw, out_dim)
    u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return u.reshape(B, out_dim, F_ * pt, th * ph, tw * pw)


class Head(nn.Module):
    """`Head_S2V`: fp32 Linear(LN(x) * (1 + scale) + shift), (shift, scale) = modulation + e."""

    def __init__(self, dim: int, out_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm = LayerNorm(dim, eps)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        mod = self.modulation.float() + e.float()[:, None, :]  # [B, 2, C]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        h = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale) + shift
        return linear_fp32(h, self.head)


@dataclass
class S2VConditions:
    """Step-invariant inputs of one clip (reuse across sampling steps)."""

    context: torch.Tensor  # [B, text_len, dim] text_embedding output (cdt)
    audio_local: torch.Tensor  # [B, F, n+1, dim] fp32
    audio_global: torch.Tensor  # [B, F, 1, dim] fp32
    cond_tokens: Optional[torch.Tensor]  # [B, Lv, dim] pose tokens (None = no pose: bias only)
    extra_tokens: torch.Tensor  # [B, Lr+Lm, dim] ref+motion tokens incl. segment embedding
    rope: RopeTable  # per-token table for the whole sequence
    grid: Tuple[int, int, int]  # (F, th, tw) of the noisy tokens
    latent_hw: Tuple[int, int]
    segment_ids: torch.Tensor  # [L] int64
    drop_motion_frames: bool
    cache: dict = field(default_factory=dict)  # per-clip caches of the fast path (fast_path.py)
    # text rows per batch item before padding (rows >= text_lens[b] of ``context`` are identical)
    text_lens: Optional[Tuple[int, ...]] = None
    # every batch item has the same reference / motion / pose inputs (the CFG branches): with a
    # batch-1 x and one timestep the rows are identical up to the first text cross-attention
    shared_video: bool = False

    @property
    def num_noisy(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    @property
    def seq_len(self) -> int:
        return self.num_noisy + self.extra_tokens.shape[1]

    @property
    def whole(self) -> "S2VConditions":
        """The conditions of the whole clip (a rank's shard returns the ones it was cut from)."""
        return self


# ----------------------------------------------------------------------------- block runner
class PlainBlocks:
    """The reference block loop: each block through its module call (so module hooks, e.g.
    layerwise offload's, run), then its audio injector; intermediates recorded."""

    precision = "reference"
    rope_dtype = torch.float64

    def __call__(self, model: "S2VTransformer", x: torch.Tensor, e0: torch.Tensor,
                 cond: S2VConditions, shared_rows: bool = False) -> torch.Tensor:
        split = cond.num_noisy
        last = len(model.blocks) - 1
        for i, block in enumerate(model.blocks):
            x = block(x, e0, split, cond.rope, cond.context)
            model._record(f"block{i}_out", x)
            j = model.audio_injector.layer_to_index.get(i)
            if j is not None:
                x = model.inject_audio(j, x, split, cond)
                model._record(f"block{i}_after_audio", x)
        model._record(f"block{last}_final", x)
        return x


# ----------------------------------------------------------------------------- model
class S2VTransformer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.blocks_runner = PlainBlocks()
        self.block_streamer = None  # layerwise offload (s2v_fast.offload) declares itself here
        self.parallel_strategy = None  # sequence parallel (s2v_fast.parallel.sequence)
        self.causal_attn = AttentionSlot("causal")  # the streaming mode's (models/causal.py)
        self.debug: Optional[dict] = None
        self.patch_size = tuple(c.patch_size)
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, c.patch_size, stride=c.patch_size)
        self.cond_encoder = nn.Conv3d(c.cond_dim, c.dim, c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim),
                                            nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(),
                                            nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList([S2VBlock(c.dim, c.ffn_dim, c.num_heads, c.eps)
                                     for _ in range(c.num_layers)])
        self.head = Head(c.dim, c.out_dim * math.prod(c.patch_size), c.eps)
        self.casual_audio_encoder = CausalAudioEncoder(c.dim, c.audio_dim, 25,
                                                       c.num_audio_token, c.eps)
        self.audio_injector = AudioInjector(c.dim, c.num_heads, c.audio_inject_layers, c.eps)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self.frame_packer = FramePackMotioner(c.dim, c.in_dim)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype: Optional[torch.dtype] = None
                        ) -> "S2VTransformer":
        from ..checkpoint import load_dit

        return load_dit(path, device=device, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def precision(self) -> str:
        """The block runner's name: "reference" (plain) or "fast" (``s2v_fast.fast``)."""
        return self.blocks_runner.precision

    @property
    def rope_dtype(self) -> torch.dtype:
        return self.blocks_runner.rope_dtype

    def attention_slots(self):
        """Every attention slot of the model (``configure_attention`` fills them)."""
        for block in self.blocks:
            yield block.self_attn.attn
            yield block.cross_attn.attn
        for inj in self.audio_injector.injector:
            yield inj.attn
        yield self.causal_attn

    # ------------------------------------------------------------------ debug capture
    @contextlib.contextmanager
    def capture_intermediates(self):
        """Collect named intermediates (see manifest intermediates_doc) into a dict."""
        prev, self.debug = self.debug, {}
        try:
            yield self.debug
        finally:
            self.debug = prev

    def _record(self, name: str, value) -> None:
        if self.debug is not None:
            self.debug[name] = value.detach().clone() if torch.is_tensor(value) else value

    # ------------------------------------------------------------------ embeddings
    def text_rows(self, context, batch: int) -> list:
        """The batch's text contexts as a list of [L_i, text_dim] tensors (validated)."""
        c = self.config
        if isinstance(context, (list, tuple)):
            rows = list(context)
        elif context.dim() == 2:
            rows = [context]
        else:
            rows = list(context.unbind(0))
        if len(rows) == 1 and batch > 1:
            rows = rows * batch
        if len(rows) != batch:
            raise InputError(f"got {len(rows)} text contexts for batch {batch}; pass one per batch item")
        for r in rows:
            if r.dim() != 2 or r.shape[1] != c.text_dim:
                raise InputError(f"text context has shape {list(r.shape)}, expected [L, {c.text_dim}]")
            if r.shape[0] > c.text_len:
                raise InputError(f"text context has {r.shape[0]} rows > text_len {c.text_len}; "
                                 "shorten the prompt")
        return rows

    def embed_text(self, context, batch: int) -> torch.Tensor:
        """Zero-pad each [L_i, text_dim] to text_len rows -> text MLP -> [B, text_len, dim]."""
        c = self.config
        padded = [torch.cat([r, r.new_zeros(c.text_len - r.shape[0], r.shape[1])])
                  for r in self.text_rows(context, batch)]
        ctx = torch.stack(padded).to(self.device)
        h = linear(ctx, self.text_embedding[0])
        h = F.gelu(h, approximate="tanh")
        return linear(h, self.text_embedding[2])

    def time_embed(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 time MLP over [t_1..t_B, 0] -> (e_t [B, dim] for the head, E [B, 6, 2, dim])."""
        B = t.shape[0]
        t_all = torch.cat([t, t.new_zeros(1)])
        s = sinusoidal_embedding(self.config.freq_dim, t_all)
        e = linear_fp32(F.silu(linear_fp32(s, self.time_embedding[0])), self.time_embedding[2])
        e0 = linear_fp32(F.silu(e), self.time_projection[1])
        self._record("time_embedding_out", e)
        self._record("time_projection_out", e0)
        e0 = e0.unflatten(1, (6, self.config.dim))
        E = torch.cat([e0[:B].unsqueeze(2), e0[B:].unsqueeze(2).expand(B, -1, -1, -1)], dim=2)
        self._record("e0", E)
        return e[:B], E

    def segment_embedding(self, tokens: torch.Tensor, seg_id: int) -> torch.Tensor:
        """tokens + trainable_cond_mask[seg_id] in the tokens' dtype."""
        return tokens + self.trainable_cond_mask.weight[seg_id].to(tokens.dtype)

    def embed_noisy(self, x: torch.Tensor, cond: S2VConditions) -> torch.Tensor:
        """tok_v = cdt(patch(x)) + cdt(cond_encoder(pose)) + seg[0] -> [B, Lv, dim]."""
        tok = conv_tokens(x, self.patch_embedding)
        if cond.cond_tokens is not None:
            tok = tok + cond.cond_tokens
        else:
            tok = tok + self.cond_encoder.bias.to(tok.dtype)
        return self.segment_embedding(tok, SEG_NOISY)

    # ------------------------------------------------------------------ step-invariant work
    @torch.no_grad()
    def prepare_conditions(self, context, ref_latents: torch.Tensor,
                           motion_latents: Optional[torch.Tensor], cond_states: Optional[torch.Tensor],
                           audio_input: torch.Tensor, drop_motion_frames: bool = False,
                           num_frames: Optional[int] = None,
                           batch_size: Optional[int] = None) -> S2VConditions:
        dev = self.device
        B = max(ref_latents.shape[0], batch_size or 1)
        if isinstance(context, (list, tuple)):
            B = max(B, len(context))
        elif torch.is_tensor(context) and context.dim() == 3:
            B = max(B, context.shape[0])
        B = max(B, audio_input.shape[0])

        def batch(t, name):
            if t.shape[0] == B:
                return t.to(dev)
            if t.shape[0] == 1:
                return t.to(dev).expand(B, *t.shape[1:])
            raise InputError(f"{name} has batch {t.shape[0]}, expected {B} or 1")

        if ref_latents.dim() != 5:
            raise InputError(f"ref_latents must be [B, 16, 1, h, w], got {list(ref_latents.shape)}")
        lh, lw = ref_latents.shape[-2:]
        if audio_input.dim() != 4 or audio_input.shape[-1] % 4:
            raise InputError(f"audio_input must be [B, 25, D, 4F], got {list(audio_input.shape)}")
        F_ = num_frames if num_frames is not None else (
            cond_states.shape[2] if cond_states is not None else audio_input.shape[-1] // 4)
        if audio_input.shape[-1] != 4 * F_:
            raise InputError(f"audio_input has {audio_input.shape[-1]} frames, expected 4*F = {4 * F_}")
        ph, pw = self.patch_size[1:]
        th, tw = lh // ph, lw // pw

        context_emb = self.embed_text(context, B)
        text_lens = tuple(r.shape[0] for r in self.text_rows(context, B))
        shared = B > 1 and all(t is None or t.shape[0] == 1
                               for t in (ref_latents, motion_latents, cond_states))
        self._record("context_emb", context_emb)

        a_loc, a_glb = self.casual_audio_encoder(batch(audio_input, "audio_input"),
                                                 (MOTION_PIXEL_FRAMES, MOTION_LATENT_FRAMES))
        self._record("audio_local", a_loc)
        self._record("audio_global", a_glb)

        # batch-1 conditions shared by all batch items are embedded once, then expanded
        cond_tokens = None
        if cond_states is not None:
            cond_tokens = batch(conv_tokens(cond_states.to(dev), self.cond_encoder), "cond_states")

        ref_tok = batch(conv_tokens(ref_latents.to(dev), self.patch_embedding), "ref_latents")
        th_r, tw_r = ref_latents.shape[-2] // ph, ref_latents.shape[-1] // pw
        parts = [self.segment_embedding(ref_tok, SEG_REF)]
        segments = [video_segment(F_, th, tw), reference_segment(th_r, tw_r)]
        seg_ids = [torch.full((F_ * th * tw,), SEG_NOISY), torch.full((ref_tok.shape[1],), SEG_REF)]
        if not drop_motion_frames:  # clip 0: the reference computes and discards them; we skip
            if motion_latents is None:
                raise InputError("motion_latents are required unless drop_motion_frames=True")
            mot = batch(self.frame_packer(motion_latents.to(dev)), "motion_latents")
            parts.append(self.segment_embedding(mot, SEG_MOTION))
            segments += self.frame_packer.segments(motion_latents.shape[-2], motion_latents.shape[-1])
            seg_ids.append(torch.full((mot.shape[1],), SEG_MOTION))
        extra = torch.cat(parts, dim=1)
        rope = build_rope_table(segments, self.config.head_dim, dev, self.rope_dtype)
        segment_ids = torch.cat(seg_ids).long()
        self._record("segment_ids", segment_ids[None])
        self._record("rope_pos", rope.pos)
        self._record("rope_cos", rope.cos.double())
        self._record("rope_sin", rope.sin.double())
        return S2VConditions(context=context_emb, audio_local=a_loc, audio_global=a_glb,
                             cond_tokens=cond_tokens, extra_tokens=extra, rope=rope,
                             grid=(F_, th, tw), latent_hw=(lh, lw), segment_ids=segment_ids,
                             drop_motion_frames=bool(drop_motion_frames), text_lens=text_lens,
                             shared_video=shared)

    # ------------------------------------------------------------------ per-step work
    def inject_audio(self, j: int, x: torch.Tensor, num_noisy: int, cond: S2VConditions):
        if self.parallel_strategy is not None:  # a token shard may cut frames
            return self.parallel_strategy.inject_audio(self, j, x, num_noisy, cond)
        return self.audio_injector.inject(j, x, num_noisy, cond.audio_local, cond.audio_global)

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, cond: S2VConditions,
                   shared_rows: bool = False) -> torch.Tensor:
        """Blocks over the full token sequence, each followed by its audio injector (if any),
        by the installed runner. ``shared_rows``: the batch rows of x and e0 are identical (CFG
        branches of one latent; a runner may run block 0's self-attention once)."""
        return self.blocks_runner(self, x, e0, cond, shared_rows)

    def head_out(self, x: torch.Tensor, e_t: torch.Tensor, cond: S2VConditions) -> torch.Tensor:
        """Head on the noisy tokens + unpatchify -> fp32 [B, out_dim, F, lh, lw]."""
        h = self.head(x[:, :cond.num_noisy], e_t)
        self._record("head_out", h)
        return unpatchify(h, cond.grid, self.patch_size, self.config.out_dim).float()

    def _timesteps(self, t, B: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        if t.numel() == 1 and B > 1:
            t = t.expand(B)
        if t.numel() != B:
            raise InputError(f"got {t.numel()} timesteps for batch {B}")
        return t

    @torch.no_grad()
    def forward_step(self, x: torch.Tensor, t, cond: S2VConditions) -> torch.Tensor:
        """One DiT call given prepared conditions; x [B, 16, F, lh, lw] -> velocity fp32.

        With a parallel strategy installed (``parallel_strategy``) and this rank's shard of the
        conditions, the strategy embeds the local tokens and turns the local hidden states into
        the full velocity (``step_tokens`` / ``step_output``); the rest is the same."""
        if x.dim() == 4:
            x = x.unsqueeze(0)
        whole = cond.whole
        B = whole.batch
        if x.shape[0] not in (1, B) or tuple(x.shape[2:]) != (whole.grid[0], *whole.latent_hw):
            raise InputError(f"x shape {list(x.shape)} does not match the prepared conditions "
                             f"(batch {whole.batch}, F={whole.grid[0]}, latent {whole.latent_hw})")
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        shared = whole.shared_video and x.shape[0] == 1 and t.numel() == 1
        x = x.to(self.device).expand(B, *x.shape[1:])
        strategy = self.parallel_strategy if cond is not whole else None
        if strategy is not None:
            tokens = strategy.step_tokens(self, x, cond)
        else:
            tokens = torch.cat([self.embed_noisy(x, cond), cond.extra_tokens], dim=1)
        self._record("num_noisy_tokens", torch.tensor(cond.num_noisy))
        self._record("tokens_in", tokens)
        e_t, e0 = self.time_embed(self._timesteps(t, B))
        x = self.run_blocks(tokens, e0, cond, shared_rows=shared)
        if strategy is not None:
            return strategy.step_output(self, x, e_t, cond)
        out = self.head_out(x, e_t, cond)
        self._record("output", out)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t, context, ref_latents: torch.Tensor,
                motion_latents: Optional[torch.Tensor], cond_states: Optional[torch.Tensor],
                audio_input: torch.Tensor, drop_motion_frames: bool = False) -> torch.Tensor:
        """Velocity [B, 16, F, lh, lw] fp32 (see module docstring for the input contract).
        A batch-1 x with B contexts runs B branches on the same latent (CFG)."""
        if x.dim() == 4:
            x = x.unsqueeze(0)
        cond = self.prepare_conditions(context, ref_latents, motion_latents, cond_states,
                                       audio_input, drop_motion_frames, num_frames=x.shape[2],
                                       batch_size=x.shape[0])
        return self.forward_step(x, t, cond)
