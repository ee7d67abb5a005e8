"""Wan2.2 Speech-to-Video pipeline (spec §8): :class:`S2VPipeline` holds the components, runs
the stages and ``generate``.

    pipe = S2VPipeline.from_pretrained("Wan-AI/Wan2.2-S2V-14B", device="cuda")
    out = pipe.generate("face.png", "speech.wav", output="out.mp4")

``generate`` does, in order (spec section in brackets):

1. checks (sizes, frames, output path), then size from the image and ``max_area`` (§8.1) and the
   reference image as [-1, 1] pixels (§8.2) -- cheap, so bad inputs fail before the encoders run;
2. audio: wav2vec2 (25 layers, 50 Hz) -> 30 fps -> bucketed to 16 fps video frames; the number of
   clips comes from the audio, capped by ``num_clips`` and by the frames the trimmed video needs (§5);
3. text: prompt + negative prompt -> two unpadded contexts (§6);
4. optional pose frames (§8.4);
5. :meth:`S2VPipeline.run_clips` (``clip_loop.py``): reference latent, motion buffer, per-clip
   pose latents, noise and scheduler, CFG denoising, decode, trim, motion update (§8.2-§8.7);
   each clip is yielded as soon as it is decoded and written to the MP4 right away.

``run_clips`` takes precomputed contexts / audio features, so the exact reference loop can be
checked against the golden end-to-end fixtures without a text encoder or wav2vec2.
"""
from __future__ import annotations

import math
import os
import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..denoiser import CFGDenoiser
from ..errors import InputError
from ..profiling.stage_timer import current_stage_timer
from .clip_loop import run_clips
from .interrupts import keep_finished_clips
from .loading import from_pretrained
from .placement import (attach_parallel, done_with, enable_offload, from_rank0, missing_component,
                        on_device)
from .results import S2VOutput, begin_outputs, emit
from .settings import (AUDIO_FPS_IN, AUDIO_FPS_MID, AUDIO_SAMPLE_RATE, DEFAULT_MAX_AREA,
                       DEFAULT_PROMPT, NUM_TRAIN_TIMESTEPS, SAMPLE_FPS, SIZE_DIVISOR,
                       SamplingOptions, clips_for_frames, frames_for_clips, validate_settings)


class S2VPipeline:
    """Wan2.2-S2V inference pipeline.

    Components (any of the encoders may be None when precomputed inputs are passed):
    ``dit`` (:class:`~s2v_fast.models.dit.S2VTransformer`), ``vae``
    (:class:`~s2v_fast.models.vae.WanVAE`), ``text_encoder``, ``audio_encoder``.

    ``dtype`` is the reference ``param_dtype``: bf16 (GPU default) or fp32 (CPU default; then
    every tensor is fp32). Latent noise, pose latents and audio features take this dtype; the
    reference / motion latents and the VAE stay fp32 (spec §4.13, §8).
    """

    def __init__(self, dit, vae, text_encoder=None, audio_encoder=None, *, device=None,
                 dtype=None, model_path: Optional[str] = None, parallel=None):
        self.dit = dit
        self.vae = vae
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder
        self.device = torch.device(device) if device is not None else _module_device(dit)
        self.dtype = dtype if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model_path = model_path
        self.cfg_batch = True  # CFG branches as one batch-2 DiT call (set False for two calls)
        self.offloader = None  # s2v_fast.offload.ModelOffloader once offload is enabled
        self.offload_mode: Optional[str] = None  # None, "cpu" or "layerwise"
        self.free_encoders = False  # release the encoders after their stage (offload only)
        self._freed: set = set()
        self.parallel = None  # s2v_fast.parallel.ParallelState of a multi-process run
        if parallel is not None:
            attach_parallel(self, parallel)

    # -------------------------------------------------------------------------------- loading
    from_pretrained = classmethod(from_pretrained)  # (pipeline/loading.py)

    # -------------------------------------------------------------------------------- options
    @property
    def dit_module(self):
        """The DiT ``nn.Module`` (inside the multi-GPU wrapper when there is one)."""
        return self.dit.model if self.parallel is not None else self.dit

    @property
    def precision(self) -> str:
        """DiT path: ``"fast"`` (fused Triton kernels, per-clip caches) or ``"reference"``."""
        return getattr(self.dit_module, "precision", "reference")

    @precision.setter
    def precision(self, value: str) -> None:
        from ..runtime import PRECISIONS, fast_precision_blocker

        if value not in PRECISIONS:
            raise InputError(f"precision {value!r}: use fast or reference")
        if value == "fast":
            why = fast_precision_blocker(self.parallel.config if self.parallel is not None else None)
            if why:
                raise InputError(f"{why}; use --precision reference")
        from ..fast import set_precision

        set_precision(self.dit_module, value)

    def enable_cpu_offload(self, free_encoders: bool = False) -> "S2VPipeline":
        """Model-level offload (``--enable-cpu-offload``): every component (DiT, VAE, text and
        audio encoders) waits in pinned host memory and is on the GPU only while its stage runs;
        each stage moves the one it needs. ``free_encoders=True`` drops the encoders after their
        first use. Weights are read-only while offloaded. On a CPU device the same bookkeeping
        runs (copies between host buffers) and saves nothing."""
        enable_offload(self, "cpu", free_encoders)
        return self

    def enable_layerwise_offload(self, free_encoders: bool = False) -> "S2VPipeline":
        """``--enable-layerwise-offload``: as :meth:`enable_cpu_offload`, and the DiT blocks stay
        in pinned host memory during denoising too: two block-sized GPU buffers, the next block
        copied on a side stream while the current one runs. Works with both precisions."""
        enable_offload(self, "layerwise", free_encoders)
        return self

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or a single process): writes the MP4."""
        return self.parallel is None or self.parallel.is_main

    # -------------------------------------------------------------------------------- stages
    def select_size(self, image_hw, height=None, width=None, max_area=DEFAULT_MAX_AREA):
        """(H, W): explicit, or the largest multiple-of-64 size <= max_area keeping the aspect (§8.1)."""
        if height is not None and width is not None:
            return int(height), int(width)
        from ..media import get_size_less_than_area

        h, w = get_size_less_than_area(image_hw[0], image_hw[1], int(max_area), divisor=SIZE_DIVISOR)
        if h <= 0 or w <= 0:
            raise InputError(f"--max-area {max_area} is too small for a {image_hw[0]}x{image_hw[1]} image; "
                             f"use at least {SIZE_DIVISOR}*{SIZE_DIVISOR} or pass --height/--width")
        return int(h), int(w)

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None,
                      with_negative: bool = True):
        """(context, context_null): unpadded [L, text_dim] contexts of the prompt and negative
        prompt; ``with_negative=False`` (no CFG: the negative branch never runs) gives
        (context, None)."""
        if self.text_encoder is None:
            raise missing_component(self, "text_encoder", "pass prompt_embeds= and negative_prompt_embeds=")
        from ..models.text_encoder import DEFAULT_NEGATIVE_PROMPT

        if not negative_prompt:  # reference: "" means the S2V default negative prompt
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        with on_device(self, "text_encoder"):
            if not with_negative:
                return self.text_encoder.encode([prompt])[0], None
            ctx, ctx_null = self.text_encoder.encode([prompt, negative_prompt])
        return ctx, ctx_null

    def load_audio(self, audio):
        """Path or 16 kHz mono float waveform -> np.float32 [N] (InputError for bad/silent audio)."""
        from ..models.audio_features import load_audio

        if isinstance(audio, (str, os.PathLike)):
            return load_audio(os.fspath(audio), sr=AUDIO_SAMPLE_RATE)
        wave = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise InputError("audio waveform must be a non-empty 1-D array at 16 kHz")
        return wave

    def audio_features(self, wave) -> torch.Tensor:
        """wav2vec2 hidden states of all 25 layers at 50 Hz: [25, T_a, D] float32 (§5.1)."""
        if self.audio_encoder is None:
            raise missing_component(self, "audio_encoder", "pass audio_feats_50hz=")
        # The reference runs wav2vec2 in fp32 on the CPU; on a GPU keep its convs out of TF32.
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with on_device(self, "audio_encoder"):
                return self.audio_encoder(wave)
        finally:
            torch.backends.cudnn.allow_tf32 = prev

    def bucket_audio(self, feats_50hz: torch.Tensor, num_frames: int):
        """[25, T_a, D] at 50 Hz -> ([1, 25, D, num_clips*num_frames] in ``dtype``, num_clips) (§5.2)."""
        from ..models.audio_features import bucket_features, interpolate_features

        feats30 = interpolate_features(feats_50hz.float(), AUDIO_FPS_IN, AUDIO_FPS_MID)
        bucket, num_clips = bucket_features(feats30, fps=SAMPLE_FPS, batch_frames=num_frames)
        audio_emb = bucket.to(self.device, self.dtype).permute(1, 2, 0).unsqueeze(0)  # [1, 25, D, F_tot]
        return audio_emb, int(num_clips)

    def load_reference(self, image, height: int, width: int) -> torch.Tensor:
        """Resize the shorter side, center-crop/pad -> [1, 3, 1, H, W] float32 in [-1, 1] (§8.2)."""
        from ..media import load_reference_image

        return load_reference_image(image, height, width).to(self.device, torch.float32)

    def load_pose(self, pose_video, height, width, total_frames) -> torch.Tensor:
        """Pose frames from the start of the video at 16 fps, resized/cropped, padded with -1:
        [1, 3, total_frames, H, W] float32 in [-1, 1] on the CPU (§8.4)."""
        from ..media import read_pose_video

        frames = read_pose_video(pose_video, height, width, num_frames=total_frames, fps=SAMPLE_FPS)
        frames = frames.float().cpu()
        if frames.dim() == 4:
            frames = frames.unsqueeze(0)
        n = frames.shape[2]
        if n < total_frames:
            pad = -torch.ones(1, 3, total_frames - n, height, width)
            frames = torch.cat([frames, pad], dim=2)
        return frames[:, :, :total_frames]

    def vae_encode(self, video: torch.Tensor) -> torch.Tensor:
        with on_device(self, "vae"):
            return self.vae.encode(video.to(self.device, torch.float32))

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        with on_device(self, "vae"):
            return self.vae.decode(latents.to(self.device, torch.float32))

    def make_scheduler(self, sample_solver: str, num_inference_steps: int, flow_shift: float):
        """A fresh scheduler per clip (shift=1 at construction, flow shift at set_timesteps; §8.5)."""
        from ..schedulers import make_scheduler

        sched = make_scheduler(sample_solver, num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        sched.set_timesteps(num_inference_steps, shift=flow_shift, device=self.device)
        return sched

    def make_noise(self, shape, seed: int, generator_device=None) -> torch.Tensor:
        """randn(shape, dtype, generator=Generator(device).manual_seed(seed)) like the reference."""
        gen_device = torch.device(generator_device) if generator_device is not None else self.device
        g = torch.Generator(device=gen_device).manual_seed(int(seed))
        noise = torch.randn(*shape, dtype=self.dtype, device=gen_device, generator=g)
        return noise.to(self.device)

    def make_denoiser(self, *, context, context_null, ref_latents, motion_latents, cond,
                      audio_input, drop_motion: bool, guidance_scale: float) -> "CFGDenoiser":
        """The per-clip velocity function (CFG over text + audio, spec §8.5); CFG parallel (one
        branch per rank) when the pipeline runs with ``cfg_parallel_size == 2``."""
        inputs = dict(context=context, context_null=context_null, ref_latents=ref_latents,
                      motion_latents=motion_latents, cond=cond, audio_input=audio_input,
                      drop_motion=drop_motion)
        if self.parallel is not None:
            from ..parallel import make_denoiser

            return make_denoiser(self.dit, self.parallel, self.dtype, guidance_scale,
                                 self.cfg_batch, **inputs)
        return CFGDenoiser(self.dit, self.dtype, guidance_scale, self.cfg_batch, **inputs)

    # -------------------------------------------------------------------------------- clip loop
    run_clips = run_clips  # the reference clip loop, top to bottom: pipeline/clip_loop.py

    # -------------------------------------------------------------------------------- generate
    def generate(
        self,
        image,
        audio=None,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: Optional[str] = None,
        *,
        height: Optional[int] = None,
        width: Optional[int] = None,
        max_area: int = DEFAULT_MAX_AREA,
        num_frames: int = 80,
        num_inference_steps: int = 40,
        guidance_scale: float = 4.5,
        flow_shift: float = 3.0,
        sample_solver: str = "unipc",
        seed: int = 42,
        fps: int = SAMPLE_FPS,
        init_first_frame: bool = False,
        pose_video=None,
        num_clips: Optional[int] = None,
        output: Optional[str] = None,
        trim_to_audio: bool = True,
        return_video: Optional[bool] = None,
        callbacks: Sequence = (),
        stage_timer=None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        audio_feats_50hz: Optional[torch.Tensor] = None,
        noise_fn: Optional[Callable] = None,
        generator_device=None,
    ) -> S2VOutput:
        """Generate a talking video from ``image`` (path, PIL image or uint8 HWC array) and
        ``audio`` (path or 16 kHz mono waveform).

        Defaults are the Wan2.2-S2V-14B config values (spec §3.1): 80 frames per clip, 40 UniPC
        steps, guidance 4.5, flow shift 3, 16 fps, max area 480*832. The number of clips follows the
        audio (about one per 5 s), capped by ``num_clips``. With ``output`` the MP4 (H.264 + the
        original audio) is written clip by clip; it is trimmed to the audio length unless
        ``trim_to_audio=False``. ``seed=-1`` picks a random seed.

        Precomputed inputs (tests, custom encoders): ``prompt_embeds`` / ``negative_prompt_embeds``
        ([L, text_dim]) skip the text encoder, ``audio_feats_50hz`` ([25, T, D]) skips wav2vec2.
        ``noise_fn(shape, seed)`` or ``generator_device`` override how the per-clip noise is drawn.
        """
        t_total = time.perf_counter()
        timer = stage_timer or current_stage_timer()
        callbacks = list(callbacks or ())
        validate_settings(height=height, width=width, max_area=max_area, num_clips=num_clips, fps=fps)
        sampling = SamplingOptions(
            num_frames=num_frames, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, flow_shift=flow_shift, sample_solver=sample_solver,
            seed=seed, init_first_frame=init_first_frame).checked()
        seed = sampling.seed
        return_video = begin_outputs(self.device, audio, audio_feats_50hz, output, return_video)
        if output is not None and not self.is_main_process:  # multi-process: rank 0 writes
            output = None

        # 1. Size and reference image (cheap: a bad image fails before the heavy encoders run).
        from ..media import open_image_rgb

        pil = open_image_rgb(image)
        height, width = self.select_size((pil.height, pil.width), height, width, max_area)
        ref_pixels = self.load_reference(pil, height, width)

        # 2. Audio: waveform -> 50 Hz wav2vec2 features -> 16 fps buckets -> number of clips.
        with timer.stage("audio_features"):
            wave = self.load_audio(audio) if audio is not None else None
            if audio_feats_50hz is None:
                audio_feats_50hz = self.audio_features(wave)
                done_with(self, "audio_encoder")
            audio_emb, clips_from_audio = self.bucket_audio(audio_feats_50hz, num_frames)
        audio_seconds = (len(wave) / AUDIO_SAMPLE_RATE if wave is not None
                         else audio_feats_50hz.shape[1] / AUDIO_FPS_IN)
        n_clips = clips_from_audio if num_clips is None else min(int(num_clips), clips_from_audio)

        # The MP4 writer reads the audio track now (cheap) so both agree on the trimmed length.
        writer = self._open_writer(output, fps, audio, trim_to_audio) if output is not None else None
        try:
            max_frames = None
            if trim_to_audio:  # frames past the end of the audio are dropped; so are whole clips
                max_frames = getattr(writer, "max_frames", None) or max(1, math.ceil(audio_seconds * fps - 1e-6))
                n_clips = min(n_clips, clips_for_frames(max_frames, num_frames, not init_first_frame))
            total_frames = frames_for_clips(n_clips, num_frames, not init_first_frame)
            if max_frames is not None:
                total_frames = min(total_frames, max_frames)
            if self.parallel is not None:  # every rank must run the same clips with the same seed
                seed, n_clips, max_frames, total_frames = from_rank0(
                    seed, n_clips, max_frames, total_frames)
                sampling = dataclasses.replace(sampling, seed=seed)

            # 3. Text contexts: prompt and negative prompt (default: the S2V negative prompt).
            with timer.stage("text_encode"):
                context, context_null = prompt_embeds, negative_prompt_embeds
                if context is None or (guidance_scale > 1 and context_null is None):
                    # without CFG (scale <= 1) the reference encodes the negative prompt and
                    # never uses it: encode the prompt alone
                    enc, enc_null = self.encode_prompt(prompt, negative_prompt,
                                                       with_negative=guidance_scale > 1)
                    context = enc if context is None else context
                    context_null = enc_null if context_null is None else context_null
                    done_with(self, "text_encoder")

            # 4. Pose frames (optional), for exactly the clips that will run.
            pose_frames = None
            if pose_video is not None:
                with timer.stage("pose_read"):
                    pose_frames = self.load_pose(pose_video, height, width, n_clips * num_frames)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

        emit(callbacks, "on_start", dict(
            height=height, width=width, num_clips=n_clips, num_frames=num_frames,
            num_inference_steps=num_inference_steps, total_frames=total_frames, seed=seed,
            audio_seconds=audio_seconds, output=output))

        # 5. The clip loop; every clip is written as soon as it is decoded.
        clips, frames_done, clips_done, denoise_s, steps_run = [], 0, 0, 0.0, 0
        try:
            for clip in self.run_clips(
                context=context, context_null=context_null, audio_emb=audio_emb, num_clips=n_clips,
                ref_pixels=ref_pixels, sampling=sampling, pose_frames=pose_frames,
                noise_fn=noise_fn, generator_device=generator_device, callbacks=callbacks,
                stage_timer=timer,
            ):
                video = clip.video[0]  # [3, n, H, W]
                if max_frames is not None:
                    video = video[:, :max(0, max_frames - frames_done)]
                if writer is not None and video.shape[1]:
                    with timer.stage("video_write", clip=clip.index):
                        writer.write_frames(video)
                if return_video:
                    clips.append(video.float().cpu())
                frames_done += video.shape[1]
                clips_done += 1
                denoise_s += clip.denoise_seconds
                steps_run += clip.num_steps
            if writer is not None:
                with timer.stage("video_write"):
                    writer.finish()
        except BaseException as exc:
            keep_finished_clips(exc, writer, clips_done, n_clips)
            raise
        finally:
            if self.offloader is not None:  # nothing stays on the GPU between generations
                self.offloader.offload_all()

        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        result = S2VOutput(
            video=torch.cat(clips, dim=1) if return_video and clips else None,
            num_frames=frames_done, num_clips=clips_done, height=height, width=width, fps=fps,
            output_path=output, seed=seed, total_seconds=time.perf_counter() - t_total,
            denoise_seconds=denoise_s, num_steps_run=steps_run, peak_memory_bytes=peak,
            audio_seconds=audio_seconds)
        emit(callbacks, "on_end", result)
        return result

    __call__ = generate

    def _open_writer(self, output, fps, audio, trim_to_audio):
        """MP4 writer (temp file + atomic rename on finish) carrying the original audio file."""
        from ..media import MP4Writer

        audio_path = os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else None
        return MP4Writer(output, fps=fps, audio_path=audio_path, trim_to_audio=trim_to_audio)


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")
