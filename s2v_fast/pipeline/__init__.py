"""The Wan2.2 Speech-to-Video pipeline (spec §8), one job per module:

- ``s2v_pipeline.py``  :class:`S2VPipeline`: components, stages, ``generate`` (inputs, clips, MP4)
- ``clip_loop.py``     ``run_clips``: the reference clip loop, readable top to bottom
- ``motion.py``        the 73-frame motion buffer and its latents, carried from clip to clip
- ``loading.py``       ``from_pretrained``: options checked, checkpoint, LoRA, DiT / VAE / encoders
- ``placement.py``     where components live: offload, freed encoders, multi-process transforms
- ``settings.py``      reference constants, the numeric-settings table, clip and frame counts
- ``results.py``       ``S2VOutput``, ``ClipResult``, ``PipelineCallback``
- ``interrupts.py``    Ctrl-C, signals and errors mid-run: the MP4 keeps the finished clips
"""
from ..denoiser import CFGDenoiser
from .interrupts import GenerationInterrupted, PartialOutputError, SignalInterrupt, interrupt_signal
from .results import ClipResult, PipelineCallback, S2VOutput
from .s2v_pipeline import S2VPipeline
from .settings import (AUDIO_FPS_IN, AUDIO_FPS_MID, AUDIO_SAMPLE_RATE, DEFAULT_MAX_AREA,
                       DEFAULT_MODEL, DEFAULT_PROMPT, FIRST_CLIP_DROP, INIT_FIRST_FRAME_COPIES,
                       LAT_MOTION_FRAMES, MOTION_FRAMES, NUM_TRAIN_TIMESTEPS, NUMERIC_SETTINGS,
                       SAMPLE_FPS, SEED_MAX, SIZE_DIVISOR, SamplingOptions, check_numeric_settings,
                       clips_for_frames, frames_for_clips, validate_settings)

__all__ = [
    "S2VPipeline", "S2VOutput", "ClipResult", "PipelineCallback", "CFGDenoiser",
    "GenerationInterrupted", "PartialOutputError", "SignalInterrupt", "interrupt_signal",
    "NUMERIC_SETTINGS", "SamplingOptions", "check_numeric_settings", "validate_settings",
    "frames_for_clips", "clips_for_frames",
    "AUDIO_FPS_IN", "AUDIO_FPS_MID", "AUDIO_SAMPLE_RATE", "DEFAULT_MAX_AREA", "DEFAULT_MODEL",
    "DEFAULT_PROMPT", "FIRST_CLIP_DROP", "INIT_FIRST_FRAME_COPIES", "LAT_MOTION_FRAMES",
    "MOTION_FRAMES", "NUM_TRAIN_TIMESTEPS", "SAMPLE_FPS", "SEED_MAX", "SIZE_DIVISOR",
]
