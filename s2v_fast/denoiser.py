"""Classifier-free guidance over text + audio for one clip (spec §8.5): the velocity function the
sampler calls at every step. The multi-GPU variant (one branch per rank) is
:class:`s2v_fast.parallel.cfg.ParallelCFGDenoiser`.
"""
from __future__ import annotations

import torch

from .profiling.ranges import trace_range


class CFGDenoiser:
    """Velocity of one clip: ``v = v_u + g * (v_c - v_u)`` in fp32 (spec §8.5).

    The conditional branch gets the prompt and the clip's audio, the unconditional one the
    negative prompt and all-zero audio; reference, motion and pose inputs are shared. With
    ``batch_cfg`` both branches run as one batch-2 DiT call; ``guidance_scale <= 1`` runs only
    the conditional branch. When the DiT offers ``prepare_conditions`` / ``forward_step`` the
    step-invariant work is done once here instead of at every step.
    """

    def __init__(self, dit, dtype, guidance_scale, batch_cfg, *, context, context_null, ref_latents,
                 motion_latents, cond, audio_input, drop_motion):
        self.dit = dit
        self.dtype = dtype
        self.guidance_scale = float(guidance_scale)
        self.use_cfg = self.guidance_scale > 1
        self.batch_cfg = batch_cfg and self.use_cfg
        common = dict(ref_latents=ref_latents, motion_latents=motion_latents, cond_states=cond,
                      drop_motion_frames=drop_motion)
        zero_audio = torch.zeros_like(audio_input)
        if self.batch_cfg:  # batch-1 video inputs: the DiT knows the two rows share them
            self.branches = [dict(context=[context, context_null],
                                  audio_input=torch.cat([audio_input, zero_audio]), **common)]
        else:
            self.branches = [dict(context=[context], audio_input=audio_input, **common)]
            if self.use_cfg:
                self.branches.append(dict(context=[context_null], audio_input=zero_audio, **common))
        self.prepared = None
        if hasattr(dit, "prepare_conditions") and hasattr(dit, "forward_step"):
            frames = audio_input.shape[-1] // 4
            self.prepared = [dit.prepare_conditions(num_frames=frames, **b) for b in self.branches]

    def _call(self, i, x, t):
        if self.prepared is not None:
            return self.dit.forward_step(x, t, self.prepared[i])
        return self.dit(x, t, **self.branches[i])

    def __call__(self, x, t):
        """-> (v, v_cond, v_uncond); x [1, 16, F, h, w], t [1] int64."""
        x_in = x.to(self.dtype)
        if self.batch_cfg:
            with trace_range("cfg:batch2"):
                v = self._call(0, x_in, t)  # one latent, both branches (the DiT broadcasts it)
            v_cond, v_uncond = v[:1].float(), v[1:].float()
        else:
            with trace_range("cfg:cond"):
                v_cond = self._call(0, x_in, t).float()
            if not self.use_cfg:
                return v_cond, v_cond, None
            with trace_range("cfg:uncond"):
                v_uncond = self._call(1, x_in, t).float()
        return v_uncond + self.guidance_scale * (v_cond - v_uncond), v_cond, v_uncond
