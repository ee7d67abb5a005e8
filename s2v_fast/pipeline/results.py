"""What a generation hands back: :class:`S2VOutput` (the result of ``generate``),
:class:`ClipResult` (one decoded clip of ``run_clips``) and the :class:`PipelineCallback` hooks
called along the way; :func:`begin_outputs`, the checks every generation (faithful or streaming)
makes on its inputs and outputs before any work."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import InputError


def begin_outputs(device, audio, audio_feats_50hz, output: Optional[str],
                  return_video: Optional[bool]) -> bool:
    """Audio given (a file or precomputed features), ``output`` writable, the peak-memory counter
    reset; -> whether to return the video (default: when nothing is written)."""
    if audio is None and audio_feats_50hz is None:
        raise InputError("no audio given; pass --audio FILE (wav/mp3/flac)")
    if output is not None:
        from ..media import check_output_writable

        check_output_writable(output)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return output is None if return_video is None else return_video


class PipelineCallback:
    """Base class for ``callbacks=[...]``: override what you need; every method is optional.

    ``info`` dicts hold live tensors (no copies); clone what you keep. Raising from a callback
    stops generation (``KeyboardInterrupt`` is treated like Ctrl-C: finished clips are kept).
    """

    def on_start(self, info: dict) -> None:
        """height, width, num_clips, num_frames (per clip), num_inference_steps, total_frames."""

    def on_clip_start(self, clip: int, info: dict) -> None:
        """noise, timesteps, audio_input, cond, motion_latents, drop_motion_frames."""

    def on_step_end(self, clip: int, step: int, info: dict) -> None:
        """timestep, x_in, v_cond, v_uncond (None without CFG), latents (after the step)."""

    def on_clip_end(self, clip: int, info: dict) -> None:
        """latents, video [1,3,n,H,W], motion_latents_out (None after the last clip), frames."""

    def on_end(self, output: "S2VOutput") -> None:
        """Called once with the result."""


def emit(callbacks: Sequence, name: str, *args) -> None:
    """Call ``name(*args)`` on every callback that defines it."""
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)


@dataclass
class S2VOutput:
    """Result of :meth:`S2VPipeline.generate`.

    ``video``: [3, N, H, W] float32 in [-1, 1] on the CPU (None when ``return_video=False``).
    """

    video: Optional[torch.Tensor]
    num_frames: int
    num_clips: int
    height: int
    width: int
    fps: int
    output_path: Optional[str] = None
    seed: int = 0
    total_seconds: float = 0.0
    denoise_seconds: float = 0.0
    num_steps_run: int = 0
    peak_memory_bytes: Optional[int] = None
    audio_seconds: Optional[float] = None
    first_frame_seconds: Optional[float] = None  # streaming mode: start -> first frame decoded
    frames_per_second: Optional[float] = None  # streaming mode: frames / block-loop seconds

    @property
    def seconds_per_step(self) -> float:
        return self.denoise_seconds / self.num_steps_run if self.num_steps_run else 0.0


@dataclass
class ClipResult:
    """One decoded clip as yielded by :meth:`S2VPipeline.run_clips`."""

    index: int
    video: torch.Tensor  # [1, 3, n, H, W] float32 in [-1, 1], on the pipeline device
    latents: torch.Tensor  # [1, 16, F, h, w]
    denoise_seconds: float
    num_steps: int
    extra: dict = field(default_factory=dict)
