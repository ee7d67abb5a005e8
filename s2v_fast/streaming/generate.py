"""``generate_streaming``: the LiveAvatar mode end to end, video that plays while it is made.

image + audio + prompt -> (LoRA already merged into ``pipe.dit``) -> per block of 3 latent
frames: 4 DiT forwards (:class:`~s2v_fast.streaming.runner.StreamingRunner`) -> the streaming VAE
decode (its causal cache carried from block to block, warmed with 7 motion latents as upstream's
real-time path does) -> 12 frames appended to a live fragmented MP4 (one fragment per block, so a
player can open the file at any moment; Ctrl-C or an error keeps every block written).

Inputs as upstream prepares them: the image resized and centre-cropped to a multiple-of-64 size
within the mode's max area (704x384 for a 9:16 portrait); motion latents = VAE(the image repeated
73 frames); reference latent = VAE(the image) (real-time) or the second latent of VAE(the image
repeated 5 frames) (offline); audio = wav2vec2 features at 30 Hz bucketed at 25 fps, 48 frames per
clip, as many clips as the audio needs. The first block drops its first 3 decoded frames, so n
clips give 48 n - 3 frames.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Sequence

import torch

from ..errors import InputError
from .preset import LIVEAVATAR_MAX_AREA, OFFLINE, StreamingSettings
from .runner import StreamingRunner


def encode_audio(pipe, wave, settings: StreamingSettings, audio_feats_50hz=None):
    """-> ([1, 25, D, frames] in the pipeline dtype, clips the audio needs)."""
    from ..models.audio_features import bucket_features, interpolate_features
    from ..pipeline.settings import AUDIO_FPS_IN, AUDIO_FPS_MID

    feats = audio_feats_50hz if audio_feats_50hz is not None else pipe.audio_features(wave)
    feats30 = interpolate_features(feats.float(), AUDIO_FPS_IN, AUDIO_FPS_MID)
    bucket, clips = bucket_features(feats30, fps=settings.fps, batch_frames=settings.frames_per_clip)
    return bucket.to(pipe.device, pipe.dtype).permute(1, 2, 0).unsqueeze(0), int(clips)


def encode_reference(pipe, ref_pixels: torch.Tensor, settings: StreamingSettings):
    """(reference latent [1, 16, 1, h, w], motion latents [1, 16, T, h, w]) of the image."""
    if settings.sink == OFFLINE:
        five = ref_pixels.repeat(1, 1, 5, 1, 1)
        ref = pipe.vae_encode(five)[:, :, 1:2]
        motion = pipe.vae_encode(five.repeat(1, 1, settings.motion_frames, 1, 1))
    else:
        ref = pipe.vae_encode(ref_pixels)
        motion = pipe.vae_encode(ref_pixels.repeat(1, 1, settings.motion_frames, 1, 1))
    return ref, motion


def generate_streaming(pipe, image, audio=None, prompt: Optional[str] = None, *,
                       settings: StreamingSettings = StreamingSettings(),
                       height: Optional[int] = None, width: Optional[int] = None,
                       max_area: int = LIVEAVATAR_MAX_AREA, num_clips: Optional[int] = None,
                       output: Optional[str] = None, trim_to_audio: bool = True,
                       return_video: Optional[bool] = None, callbacks: Sequence = (),
                       prompt_embeds: Optional[torch.Tensor] = None,
                       audio_feats_50hz: Optional[torch.Tensor] = None, rd_sequence=None,
                       runner=None):
    """Run the streaming mode on an :class:`~s2v_fast.pipeline.S2VPipeline`; returns its
    :class:`~s2v_fast.pipeline.S2VOutput` (``first_frame_seconds`` and ``frames_per_second``
    filled in). ``pipe.dit`` must be the plain model (LoRA merged, fp8 optional).

    ``runner``: default a :class:`StreamingRunner` over ``pipe.dit``; a
    :class:`~s2v_fast.parallel.step_pipeline.StepPipelineRunner` runs this rank's step, and only
    its output rank (``runner.is_output``) decodes, writes ``output`` and returns the video."""
    from ..media import open_image_rgb
    from ..pipeline.interrupts import keep_finished_clips
    from ..pipeline.placement import on_device
    from ..pipeline.results import S2VOutput, begin_outputs, emit
    from ..pipeline.settings import AUDIO_SAMPLE_RATE, DEFAULT_PROMPT

    t_start = time.perf_counter()
    callbacks = list(callbacks or ())
    if pipe.parallel is not None or pipe.offloader is not None:
        raise InputError("--mode liveavatar runs on one process without offload for now; drop "
                         "the multi-GPU and offload flags (step-pipelined streaming is in the "
                         "Python API: s2v_fast.parallel.step_pipeline)")
    return_video = begin_outputs(pipe.device, audio, audio_feats_50hz, output, return_video)

    pil = open_image_rgb(image)
    height, width = pipe.select_size((pil.height, pil.width), height, width, max_area)
    ref_pixels = pipe.load_reference(pil, height, width)
    wave = pipe.load_audio(audio) if audio is not None else None
    audio_emb, clips_needed = encode_audio(pipe, wave, settings, audio_feats_50hz)
    audio_seconds = (len(wave) / AUDIO_SAMPLE_RATE if wave is not None
                     else audio_feats_50hz.shape[1] / 50.0)
    n_clips = clips_needed if num_clips is None else min(int(num_clips), clips_needed)
    if prompt_embeds is None:
        if pipe.text_encoder is None:
            raise InputError("no text encoder loaded; pass prompt_embeds=")
        with on_device(pipe, "text_encoder"):
            (prompt_embeds,) = pipe.text_encoder.encode([prompt or DEFAULT_PROMPT])
    ref_latents, motion_latents = encode_reference(pipe, ref_pixels, settings)

    writer = None
    if output is not None:
        from ..media import MP4Writer

        audio_path = os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else None
        writer = MP4Writer(output, fps=settings.fps, audio_path=audio_path,
                           trim_to_audio=trim_to_audio, preset="veryfast", live=True)
    max_frames = None
    if trim_to_audio:
        max_frames = (getattr(writer, "max_frames", None)
                      or max(1, math.ceil(audio_seconds * settings.fps - 1e-6)))
    if runner is None:
        runner = StreamingRunner(pipe.dit, settings, rd_sequence=rd_sequence)
    decoder = pipe.vae.stream_decoder() if getattr(runner, "is_output", True) else None
    stop_early = isinstance(runner, StreamingRunner)  # one process: skip the blocks past the audio
    total_blocks = n_clips * settings.blocks_per_clip
    emit(callbacks, "on_start", dict(height=height, width=width, num_clips=n_clips,
                                      num_blocks=total_blocks, steps=settings.steps,
                                      total_frames=n_clips * settings.frames_per_clip
                                      - settings.drop_first_frames, fps=settings.fps,
                                      seed=settings.seed, mode="liveavatar"))
    frames, frames_done, first_frame_s, t_loop = [], 0, None, time.perf_counter()
    blocks_done = 0
    try:
        with torch.no_grad():
            if decoder is not None:
                decoder.warmup(motion_latents[:, :, :settings.warmup_latents].to(pipe.device))
            for blk in runner.stream(context=prompt_embeds, ref_latents=ref_latents,
                                     motion_latents=motion_latents, audio=audio_emb,
                                     num_clips=n_clips):  # nothing on a step rank without output
                if max_frames is not None and frames_done >= max_frames:
                    continue  # past the audio; the step pipeline's other ranks still send these
                video = decoder.decode(blk.latents.float())[0]  # [3, 12, H, W]
                if blk.index == 0:
                    video = video[:, settings.drop_first_frames:]
                if max_frames is not None:
                    video = video[:, :max(0, max_frames - frames_done)]
                if writer is not None and video.shape[1]:
                    writer.write_frames(video)
                if return_video:
                    frames.append(video.cpu())
                frames_done += video.shape[1]
                blocks_done += 1
                if first_frame_s is None:
                    first_frame_s = time.perf_counter() - t_start
                elapsed = time.perf_counter() - t_loop
                emit(callbacks, "on_block_end", blk, dict(
                    frames=frames_done, first_frame_seconds=first_frame_s,
                    frames_per_second=frames_done / elapsed if elapsed > 0 else 0.0,
                    num_blocks=total_blocks))
                if stop_early and max_frames is not None and frames_done >= max_frames:
                    break
        if writer is not None:
            writer.finish()
    except BaseException as exc:
        keep_finished_clips(exc, writer, blocks_done, total_blocks, unit="blocks")
        raise
    loop_s = time.perf_counter() - t_loop
    peak = torch.cuda.max_memory_allocated(pipe.device) if pipe.device.type == "cuda" else None
    result = S2VOutput(video=torch.cat(frames, dim=1) if return_video and frames else None,
                       num_frames=frames_done, num_clips=n_clips, height=height, width=width,
                       fps=settings.fps, output_path=output, seed=settings.seed,
                       total_seconds=time.perf_counter() - t_start, denoise_seconds=loop_s,
                       num_steps_run=blocks_done * settings.steps, peak_memory_bytes=peak,
                       audio_seconds=audio_seconds, first_frame_seconds=first_frame_s,
                       frames_per_second=frames_done / loop_s if loop_s > 0 else 0.0)
    emit(callbacks, "on_end", result)
    return result
