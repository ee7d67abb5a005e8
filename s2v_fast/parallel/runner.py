"""`parallelize(model, state)`: the DiT with tensor / sequence parallelism applied.

:class:`ParallelDiT` has the DiT's step API (``prepare_conditions``, ``forward_step``,
``__call__``), so the pipeline's ``CFGDenoiser`` (or :class:`~.cfg.ParallelCFGDenoiser`) uses it
unchanged. With sequence parallelism a step is the model's own ``forward_step`` over this rank's
shard of the conditions, with the strategy (``sequence.SequenceParallelAttention``) installed at
the model's declared seams:

1. ``step_tokens``: embed only the local noisy frames (patch + pose + segment embedding) and take the local
   slice of the step-invariant ref/motion tokens (conditions are sharded once per clip);
2. time MLP (replicated, tiny);
3. the model's ``run_blocks`` with the local split index, local RoPE rows and local audio
   frames (Ulysses / ring inside ``SelfAttention.attend``; audio injection local);
4. ``step_output``: the head on the local noisy tokens, then ONE all-gather of the 64-wide head outputs over the
   SP group (80x less data than gathering the 5120-wide hidden states) and unpatchify.
Every rank returns the full velocity, so the scheduler step runs replicated.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import S2VError
from ..models.dit import S2VConditions
from .config import ParallelState
from .sequence import ShardConditions, install_sequence_parallel, make_shard_plan, shard_conditions
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
        """The model's own step: with a shard of the conditions its sequence-parallel strategy
        embeds the local tokens and gathers the velocity (``SequenceParallelAttention``)."""
        self._check_precision(cond)
        return self.model.forward_step(x, t, cond)

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


def parallelize(model, state: ParallelState) -> ParallelDiT:
    """Apply the DiT parts of ``state.config`` (TP + SP) to ``model`` in place."""
    return ParallelDiT(model, state)
