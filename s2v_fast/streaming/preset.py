"""Constants of the LiveAvatar mode (upstream ``s2v_causal_sft.yaml``, ``wan_s2v_14B_modified.py``
and its launch scripts; spec liveavatar.md §0-3)."""
from __future__ import annotations

from dataclasses import dataclass

LIVEAVATAR_LORA = "Quark-Vision/Live-Avatar"  # HF repo; the file is liveavatar.safetensors
LIVEAVATAR_LORA_SCALE = 0.5  # rank 128, alpha 64; the file carries no alpha
LIVEAVATAR_MAX_AREA = 704 * 384  # --size 704*384 (a max area: sides become multiples of 64)

REALTIME, OFFLINE = "realtime", "offline"
SINK_MODES = (REALTIME, OFFLINE)


@dataclass(frozen=True)
class StreamingSettings:
    """One streaming run. ``sink``: which upstream behaviour to follow.

    * ``realtime`` (default; upstream's multi-GPU real-time path): reference latent from a 1-frame
      encode; from clip 1 on the first generated latent (clip 0, block 0, frame 0) replaces it and
      the cond cache is rebuilt.
    * ``offline`` (upstream's single-GPU path, the golden fixtures): reference latent = the second
      latent of a 5-frame encode of the image; the cond cache is never rebuilt.
    """

    steps: int = 4
    shift: float = 3.0
    fps: int = 25
    frames_per_clip: int = 48  # video frames -> 12 latent frames
    block_frames: int = 3  # latent frames per block
    cache_frames: int = 12  # latent frames in each step's rolling KV cache
    motion_frames: int = 73  # video frames of motion context (19 latents)
    warmup_latents: int = 7  # motion latents that warm the streaming VAE decoder
    drop_first_frames: int = 3  # decoded frames the first block drops
    seed: int = 420
    sink: str = REALTIME

    def __post_init__(self):
        from ..errors import InputError

        if self.sink not in SINK_MODES:
            raise InputError(f"unknown sink mode {self.sink!r}; use one of {SINK_MODES}")
        if self.frames_per_clip % 4 or self.latent_frames_per_clip % self.block_frames:
            raise InputError(f"frames per clip {self.frames_per_clip} must give a number of "
                             f"latent frames divisible by {self.block_frames}")
        if self.cache_frames % self.block_frames:
            raise InputError(f"cache frames {self.cache_frames} must be a multiple of "
                             f"{self.block_frames}")

    @property
    def latent_frames_per_clip(self) -> int:
        """(frames + 3 + motion) // 4 - motion latents, as upstream computes it (48 -> 12)."""
        return (self.frames_per_clip + 3 + self.motion_frames) // 4 - (self.motion_frames + 3) // 4

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames_per_clip // self.block_frames

    @property
    def video_frames_per_block(self) -> int:
        return 4 * self.block_frames
