"""`parallelize(model, state)`: the DiT with tensor / sequence parallelism applied.

:class:`ParallelDiT` has the DiT's step API (``prepare_conditions``, ``forward_step``,
``__call__``), so the pipeline's ``CFGDenoiser`` (or :class:`~.cfg.ParallelCFGDenoiser`) uses it
unchanged. With sequence parallelism a step is:

1. embed only the local noisy frames (patch + pose + segment embedding) and take the local
   slice of the step-invariant ref/motion tokens (conditions are sharded once per clip);
2. time MLP (replicated, tiny);
3. the model's own ``run_blocks`` with the local split index, local RoPE rows and local audio
   frames (Ulysses / ring inside ``SelfAttention.attend``; audio injection local);
4. the head on the local noisy tokens, then ONE all-gather of the 64-wide head outputs over the
   SP group (80x less data than gathering the 5120-wide hidden states) and unpatchify.
Every rank returns the full velocity, so the scheduler step runs replicated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..errors import S2VError
from ..models.dit import S2VConditions, unpatchify
from .config import ParallelState
from .sequence import (ShardConditions, install_sequence_parallel, make_shard_plan,
                       shard_conditions)
from .tensor_parallel import apply_tensor_parallel


class ParallelDiT:
    def __init__(self, model, state: ParallelState):
        self.model = model
        self.state = state
        cfg = state.config
        cfg.validate(state.world_size, num_heads=model.config.num_heads,
                     ffn_dim=model.config.ffn_dim, dim=model.config.dim)
        if cfg.tensor_parallel_size > 1:
            apply_tensor_parallel(model, state.tp_group, state.tp_rank, cfg.tensor_parallel_size)
        self.sp = install_sequence_parallel(model, state) if cfg.sp_degree > 1 else None

    def __getattr__(self, name):  # config, device, compute_dtype, precision, ...
        if name in ("model", "state", "sp"):
            raise AttributeError(name)
        return getattr(self.model, name)

    # ------------------------------------------------------------------ conditions
    def shard_conditions(self, cond: S2VConditions) -> S2VConditions:
        if self.sp is None:
            return cond
        cfg = self.state.config
        plan = make_shard_plan(cond.seq_len, cond.num_noisy, cond.grid[1] * cond.grid[2],
                               cfg.sp_degree, cfg.shard_policy)
        return shard_conditions(cond, plan, self.state.sp_rank)

    @torch.no_grad()
    def prepare_conditions(self, *args, **kwargs) -> S2VConditions:
        """The model's step-invariant work (replicated), then this rank's shard of it."""
        return self.shard_conditions(self.model.prepare_conditions(*args, **kwargs))

    # ------------------------------------------------------------------ one DiT call
    def _check_precision(self, cond) -> None:
        """The fused fast path (fast/blocks.py) bypasses the TP hooks; it runs sequence
        parallel through ``SelfAttention.attend``, with frame-aligned shards only (its audio
        injection runs on whole local frames)."""
        if getattr(self.model, "precision", "reference") != "fast":
            return
        reason = fast_precision_unsupported(self.state.config)
        if reason:
            raise S2VError(f"{reason}; use reference precision (--precision reference)")
        if isinstance(cond, ShardConditions):
            plan = cond.plan
            if not all(plan.frame_aligned(i) for i in range(plan.parts)):
                raise S2VError(f"precision 'fast' needs frame-aligned sequence shards, got token "
                               f"bounds {list(plan.bounds)} (latent frame = {plan.frame_tokens} "
                               "tokens); use fewer sequence-parallel ranks or reference precision")

    @torch.no_grad()
    def forward_step(self, x: torch.Tensor, t, cond: S2VConditions) -> torch.Tensor:
        self._check_precision(cond)
        if not isinstance(cond, ShardConditions):
            return self.model.forward_step(x, t, cond)
        m = self.model
        if x.dim() == 4:
            x = x.unsqueeze(0)
        full = cond.full
        B = full.batch
        if x.shape[0] not in (1, B) or tuple(x.shape[2:]) != (full.grid[0], *full.latent_hw):
            from ..errors import InputError
            raise InputError(f"x shape {list(x.shape)} does not match the prepared conditions")
        t = torch.as_tensor(t, device=m.device).reshape(-1)
        shared = full.shared_video and x.shape[0] == 1 and t.numel() == 1
        x = x.to(m.device).expand(B, *x.shape[1:])
        parts = []
        if cond.local_noisy:
            tok = m.embed_noisy(x[:, :, cond.frame0:cond.frame1], cond)
            parts.append(tok[:, cond.noisy_offset:cond.noisy_offset + cond.local_noisy])
        parts.append(cond.extra_tokens)
        tokens = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        e_t, e0 = m.time_embed(m._timesteps(t, B))
        self.sp.plan = cond.plan
        h = m.run_blocks(tokens, e0, cond, shared_rows=shared)
        h = m.head(h[:, :cond.local_noisy], e_t)  # [B, n_local, 64]
        h = gather_sequence(h, [b - a for a, b in (cond.plan.noisy_range(i)
                                                   for i in range(cond.plan.parts))],
                            self.state.sp_group)
        return unpatchify(h, full.grid, m.patch_size, m.config.out_dim).float()

    @torch.no_grad()
    def __call__(self, x, t, context, ref_latents, motion_latents, cond_states, audio_input,
                 drop_motion_frames: bool = False) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(0)
        cond = self.prepare_conditions(context, ref_latents, motion_latents, cond_states,
                                       audio_input, drop_motion_frames, num_frames=x.shape[2],
                                       batch_size=x.shape[0])
        return self.forward_step(x, t, cond)


def fast_precision_unsupported(config) -> Optional[str]:
    """Why precision 'fast' cannot run with this ParallelConfig (None when it can); the reason
    names the flag. Checked before loading (pipeline) and at every step (ParallelDiT)."""
    if config.tensor_parallel_size > 1:
        return "precision 'fast' does not support --tensor-parallel-size > 1 yet"
    if config.sp_degree > 1 and getattr(config, "shard_policy", "frame") != "frame":
        return "precision 'fast' needs frame-aligned sequence shards (--sp-shard-policy frame)"
    return None


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


def parallelize(model, state: ParallelState) -> ParallelDiT:
    """Apply the DiT parts of ``state.config`` (TP + SP) to ``model`` in place."""
    return ParallelDiT(model, state)
