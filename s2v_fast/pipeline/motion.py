"""The clip loop's motion context (spec §8.3, §8.7): the last 73 pixel frames generated so far,
kept as a float buffer, and their VAE latents, which condition the next clip."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .settings import INIT_FIRST_FRAME_COPIES, MOTION_FRAMES


class MotionContext:
    """The 73-frame float motion buffer and its latents.

    ``encode``: the pipeline's VAE encode ([1, 3, T, H, W] pixels -> latents). Clip 0 starts from
    an all-zero buffer; with ``init_first_frame`` its last 6 frames are the reference image.
    :attr:`latents` is what the next clip is conditioned on; :meth:`advance` appends a decoded
    clip and re-encodes.
    """

    def __init__(self, ref_pixels: torch.Tensor, init_first_frame: bool,
                 encode: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype):
        _, _, _, height, width = ref_pixels.shape
        self._encode = encode
        self.buffer = torch.zeros(1, 3, MOTION_FRAMES, height, width, device=ref_pixels.device,
                                  dtype=torch.float32)
        self.latents: Optional[torch.Tensor] = None
        if init_first_frame:  # reference writes into a param_dtype buffer: round like it does
            self.buffer[:, :, -INIT_FIRST_FRAME_COPIES:] = ref_pixels.to(dtype).float()
            self.latents = encode(self.buffer)
        # Else the reference encodes the all-zero buffer here, but clip 0 drops the motion frames
        # (the DiT never reads them, the decode starts from the reference latent) and clip 1
        # re-encodes the buffer: that 73-frame encode is never observed, so it is not run.

    def advance(self, video: torch.Tensor) -> torch.Tensor:
        """The last 73 frames of [buffer, ``video``] become the buffer; returns its latents."""
        k = min(MOTION_FRAMES, video.shape[2])
        self.buffer = torch.cat([self.buffer[:, :, k:], video[:, :, -k:].float()], dim=2)
        self.latents = self._encode(self.buffer)
        return self.latents
