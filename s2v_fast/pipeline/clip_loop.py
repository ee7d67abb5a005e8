"""The reference clip loop (spec §8.3-§8.7), readable top to bottom: ``S2VPipeline.run_clips``.

Per clip: pose condition, fresh noise and scheduler, CFG denoising, decode, trim, and the motion
context for the next clip. ``generate`` (:mod:`.s2v_pipeline`) prepares the inputs and writes
each yielded clip to the MP4; the loop takes precomputed contexts and audio features, so it is
checked against the golden end-to-end fixtures without a text encoder or wav2vec2.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..errors import S2VError
from ..profiling.ranges import trace_range
from ..profiling.stage_timer import current_stage_timer
from .motion import MotionContext
from .placement import on_device
from .results import ClipResult, emit
from .settings import FIRST_CLIP_DROP, LAT_MOTION_FRAMES, MOTION_FRAMES, SamplingOptions


@torch.inference_mode()
def run_clips(
    pipe,
    *,
    context: torch.Tensor,
    context_null: Optional[torch.Tensor],
    audio_emb: torch.Tensor,
    num_clips: int,
    ref_pixels: torch.Tensor,
    sampling: SamplingOptions = SamplingOptions(),
    pose_frames: Optional[torch.Tensor] = None,
    noise_fn: Optional[Callable[[tuple, int], torch.Tensor]] = None,
    generator_device=None,
    callbacks: Sequence = (),
    stage_timer=None,
) -> Iterator[ClipResult]:
    """The reference clip loop (spec §8.3-§8.7); yields each clip as soon as it is decoded.

    ``pipe``: the :class:`~s2v_fast.pipeline.S2VPipeline` (this is its ``run_clips`` method).
    ``context``/``context_null``: [L, text_dim]; ``audio_emb``: [1, 25, D, >= num_clips*num_frames]
    (bucketed, ``dtype``); ``ref_pixels``: [1, 3, 1, H, W] in [-1, 1]; ``pose_frames``:
    [1, 3, >= num_clips*num_frames, H, W] in [-1, 1] or None (zero condition).
    ``sampling``: frames per clip, steps, guidance, shift, solver, seed, init_first_frame.
    ``noise_fn(shape, seed) -> tensor`` replaces the default device-generator noise.
    """
    timer = stage_timer or current_stage_timer()
    num_frames, seed = sampling.num_frames, sampling.seed
    guidance_scale, init_first_frame = sampling.guidance_scale, sampling.init_first_frame
    dev = pipe.device
    _, _, _, height, width = ref_pixels.shape
    lat_h, lat_w = height // 8, width // 8
    lat_frames = (num_frames + 3 + MOTION_FRAMES) // 4 - LAT_MOTION_FRAMES  # = num_frames / 4
    drop_first_motion = not init_first_frame
    context = context.to(dev)
    context_null = context_null.to(dev) if context_null is not None else None
    if guidance_scale > 1 and context_null is None:
        raise S2VError("guidance_scale > 1 needs a negative context (context_null)")

    # Reference latent (§8.2) and the 73-frame float motion buffer (§8.3).
    with timer.stage("reference_encode"):
        ref_pixels = ref_pixels.to(dev, torch.float32)
        ref_latents = pipe.vae_encode(ref_pixels)
        motion = MotionContext(ref_pixels, init_first_frame, pipe.vae_encode, pipe.dtype)

    for r in range(num_clips):
        with trace_range(f"clip{r}"):
            drop = drop_first_motion and r == 0
            motion_latents = motion.latents

            # Pose condition (§8.4): prepend the first frame, encode 1+F*4 frames, drop latent 0.
            if pose_frames is not None:
                with timer.stage("pose_encode", clip=r):
                    chunk = pose_frames[:, :, r * num_frames:(r + 1) * num_frames]
                    chunk = torch.cat([chunk[:, :, :1], chunk], dim=2).to(dev, pipe.dtype)
                    cond = pipe.vae_encode(chunk.float())[:, :, 1:].to(pipe.dtype)
            else:  # the reference encodes -1 frames and multiplies by 0: a zero condition
                cond = None  # (the DiT then adds the cond_encoder bias only, the same numbers)

            # Fresh noise (seed + r) and a fresh scheduler for every clip (§8.5).
            shape = (16, lat_frames, lat_h, lat_w)
            noise = (noise_fn(shape, seed + r) if noise_fn is not None
                     else pipe.make_noise(shape, seed + r, generator_device))
            latents = noise.to(dev).unsqueeze(0)
            scheduler = pipe.make_scheduler(sampling.sample_solver, sampling.num_inference_steps,
                                            sampling.flow_shift)
            timesteps = scheduler.timesteps
            audio_input = audio_emb[..., r * num_frames:(r + 1) * num_frames].to(dev, pipe.dtype)
            emit(callbacks, "on_clip_start", r, dict(
                noise=noise, timesteps=timesteps, audio_input=audio_input, cond=cond,
                motion_latents=motion_latents, ref_latents=ref_latents, drop_motion_frames=drop))

            # Denoising loop. Step-invariant DiT inputs (text, audio, ref/motion/pose tokens)
            # are prepared once per clip; the math per step is the reference's.
            t_start = time.perf_counter()
            with timer.stage("denoise", clip=r), on_device(pipe, "dit"):
                denoiser = pipe.make_denoiser(
                    context=context, context_null=context_null, ref_latents=ref_latents,
                    motion_latents=motion_latents, cond=cond, audio_input=audio_input,
                    drop_motion=drop, guidance_scale=guidance_scale)
                for i, t in enumerate(timesteps):
                    with trace_range(f"step{i}"):
                        t_in = t.reshape(1).to(dev)
                        v, v_cond, v_uncond = denoiser(latents, t_in)
                        x_in = latents
                        latents = scheduler.step(v, t, latents)
                    emit(callbacks, "on_step_end", r, i, dict(
                        timestep=t, x_in=x_in, v_cond=v_cond, v_uncond=v_uncond, latents=latents))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            denoise_s = time.perf_counter() - t_start

            # Decode [ref or motion latents, new latents], keep the last num_frames (§8.7).
            with timer.stage("vae_decode", clip=r):
                head = ref_latents if drop else motion_latents
                video = pipe.vae_decode(torch.cat([head.float(), latents.float()], dim=2))
                video = video[:, :, -num_frames:]
                if drop:
                    video = video[:, :, FIRST_CLIP_DROP:]

        yield ClipResult(index=r, video=video, latents=latents, denoise_seconds=denoise_s,
                         num_steps=len(timesteps))

        # Motion context for the next clip: last 73 frames of [buffer, clip], re-encoded.
        motion_latents_out = None
        if r + 1 < num_clips:
            with timer.stage("motion_encode", clip=r):
                motion_latents_out = motion.advance(video)
        emit(callbacks, "on_clip_end", r, dict(
            latents=latents, video=video, motion_latents_out=motion_latents_out,
            frames=video.shape[2]))
