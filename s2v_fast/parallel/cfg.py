"""CFG parallel: the two classifier-free-guidance branches on two ranks.

cfg rank 0 runs the conditional branch (prompt + clip audio), cfg rank 1 the unconditional one
(negative prompt + zero audio); reference / motion / pose inputs are shared (spec §8.5). The
predictions are all-gathered over the cfg group and both ranks form
``v = v_u + g * (v_c - v_u)`` in fp32 from identical inputs, so the latents stay bitwise equal on
both ranks without a broadcast. Same call contract as the pipeline's ``CFGDenoiser``:
``denoiser(x, t) -> (v, v_cond, v_uncond)``.
"""
from __future__ import annotations

import torch

from .config import ParallelState
from .sequence import all_gather_tensor


class ParallelCFGDenoiser:
    def __init__(self, dit, state: ParallelState, dtype, guidance_scale, *, context, context_null,
                 ref_latents, motion_latents, cond, audio_input, drop_motion):
        self.dit, self.state, self.dtype = dit, state, dtype
        self.guidance_scale = float(guidance_scale)
        self.use_cfg = self.guidance_scale > 1
        if state.config.cfg_parallel_size != 2:
            raise ValueError("ParallelCFGDenoiser needs cfg_parallel_size == 2")
        uncond = self.use_cfg and state.cfg_rank == 1
        branch = dict(context=[context_null if uncond else context],
                      audio_input=torch.zeros_like(audio_input) if uncond else audio_input,
                      ref_latents=ref_latents, motion_latents=motion_latents, cond_states=cond,
                      drop_motion_frames=drop_motion)
        self.branch = branch
        self.prepared = None
        if hasattr(dit, "prepare_conditions") and hasattr(dit, "forward_step"):
            self.prepared = dit.prepare_conditions(num_frames=audio_input.shape[-1] // 4, **branch)

    def _call(self, x, t):
        if self.prepared is not None:
            return self.dit.forward_step(x, t, self.prepared)
        return self.dit(x, t, **self.branch)

    @torch.no_grad()
    def __call__(self, x, t):
        """-> (v, v_cond, v_uncond); x [1, 16, F, h, w], t [1] int64 (same on both ranks)."""
        v = self._call(x.to(self.dtype), t).float().contiguous()
        if not self.use_cfg:  # both ranks ran the conditional branch
            return v, v, None
        both = v.new_empty(2, *v.shape)
        all_gather_tensor(both, v, self.state.cfg_group)
        v_cond, v_uncond = both[0], both[1]
        return v_uncond + self.guidance_scale * (v_cond - v_uncond), v_cond, v_uncond


def make_denoiser(dit, state: ParallelState, dtype, guidance_scale, batch_cfg=True, **inputs):
    """The pipeline's denoiser for ``state``: CFG-parallel when cfg_parallel_size == 2, else the
    pipeline's own ``CFGDenoiser`` over the (possibly sequence/tensor parallel) DiT."""
    if state.config.cfg_parallel_size == 2:
        return ParallelCFGDenoiser(dit, state, dtype, guidance_scale, **inputs)
    from ..denoiser import CFGDenoiser

    return CFGDenoiser(dit, dtype, guidance_scale, batch_cfg, **inputs)
