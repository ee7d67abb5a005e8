"""The clip / block / step loops of LiveAvatar's streaming mode (upstream ``causal_s2v_pipeline``
``generate``; spec liveavatar.md §10-18).

Per clip r: noise ``randn(16, 12, h, w)`` from a generator seeded ``seed + r``; block b takes its
latent frames [3b, 3b + 3) and the 12 video frames of audio [48r + 12b, 48r + 12b + 12). Each of
the 4 Euler steps is one DiT forward on step i's own rolling cache (timestep forcing): step i of
every block reads and writes cache i only. The cond ("sink") cache comes from a t = 0 prefill at
clip 0 and, in the real-time mode, again at clip 1 from the first generated latent.

The reference frame's RoPE time rolls with ``rd``: upstream draws it per forward with an unseeded
``random.randint(4, 30)``; here it comes from ``random.Random(seed)`` unless a sequence is given
(the golden fixtures record theirs). Memory is flat: the caches are fixed-size rings and every
finished block is handed to the caller.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional

import torch

from ..errors import InputError
from ..models.causal import CausalS2V, CondCache, RingKVCache, ref_rope_time
from ..models.dit import S2VTransformer
from ..schedulers import FlowEulerSchedule
from .preset import REALTIME, StreamingSettings

RD_RANGE = (4, 30)


@dataclass
class StepEvent:
    """What one denoising step saw and produced (for checks and profiling hooks)."""

    clip: int
    block: int
    step: int
    rd: int
    x_in: torch.Tensor
    velocity: torch.Tensor
    x_out: torch.Tensor


@dataclass
class BlockResult:
    clip: int
    block: int
    index: int  # blocks since the start of the stream
    start_frame: int  # absolute latent frame of the block's first frame
    noise: torch.Tensor  # [1, 16, f, h, w]
    latents: torch.Tensor  # [1, 16, f, h, w] after the last step


def seeded_rd(seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(*RD_RANGE)


class StreamingRunner:
    """Runs the streaming mode over a model whose LoRA (if any) is already merged."""

    def __init__(self, model: S2VTransformer, settings: StreamingSettings = StreamingSettings(),
                 rd_sequence: Optional[Iterable[int]] = None,
                 on_step: Optional[Callable[[StepEvent], None]] = None):
        self.causal = CausalS2V(model)
        self.settings = settings
        self.schedule = FlowEulerSchedule(settings.steps, settings.shift)
        self._rd = iter(rd_sequence) if rd_sequence is not None else seeded_rd(settings.seed)
        self.on_step = on_step
        self.caches: List[RingKVCache] = []
        self.cond: Optional[CondCache] = None

    def next_rd(self) -> int:
        try:
            return int(next(self._rd))
        except StopIteration:
            raise InputError("the injected rd sequence ran out; pass one value per DiT forward "
                             "(steps x blocks)") from None

    def make_noise(self, clip: int, lh: int, lw: int) -> torch.Tensor:
        """Clip noise [16, 12, lh, lw] in the compute dtype, generator seeded ``seed + clip``."""
        dev = self.causal.device
        g = torch.Generator(device=dev).manual_seed(self.settings.seed + clip)
        return torch.randn(16, self.settings.latent_frames_per_clip, lh, lw, generator=g,
                           dtype=self.causal.dtype, device=dev)

    def stream(self, *, context, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
               audio: torch.Tensor, num_clips: int) -> Iterator[BlockResult]:
        """Yield every block's final latents, in order. audio: [1, 25, D, >= 48 * num_clips]
        bucketed at the mode's fps; context: the prompt's [L, text_dim] embedding."""
        s = self.settings
        causal = self.causal
        lh, lw = ref_latents.shape[-2:]
        ph, pw = causal.patch[1:]
        frame_tokens = (lh // ph) * (lw // pw)
        need = s.frames_per_clip * num_clips
        if audio.shape[-1] < need:
            raise InputError(f"audio features cover {audio.shape[-1]} frames, {need} needed for "
                             f"{num_clips} clip(s)")
        text_kv = causal.text_kv(context)
        self.caches = [causal.new_step_cache(s.cache_frames * frame_tokens)
                       for _ in range(s.steps)]
        self.cond = causal.prefill(ref_latents, motion_latents, text_kv, s.block_frames)
        first_latent = None
        index = 0
        for r in range(num_clips):
            if r == 1 and s.sink == REALTIME:  # the rolling sink frame
                self.cond = causal.prefill(first_latent, motion_latents, text_kv, s.block_frames)
            noise = self.make_noise(r, lh, lw)
            for b in range(s.blocks_per_clip):
                f0 = b * s.block_frames
                x = noise[:, f0:f0 + s.block_frames].unsqueeze(0)
                a0 = r * s.frames_per_clip + b * s.video_frames_per_block
                audio_block = audio[..., a0:a0 + s.video_frames_per_block]
                start_frame = index * s.block_frames
                out = self._denoise(x, r, b, start_frame, audio_block, text_kv)
                if first_latent is None:
                    first_latent = out[:, :, 0:1].clone()
                yield BlockResult(r, b, index, start_frame, x, out)
                index += 1

    def _denoise(self, x, clip, block, start_frame, audio_block, text_kv) -> torch.Tensor:
        sch = self.schedule
        for i, t in enumerate(sch.timesteps.tolist()):
            rd = self.next_rd()
            v = self.causal.forward_block(x, t, self.caches[i], self.cond, start_frame,
                                          audio_block, text_kv, ref_rope_time(start_frame, rd))
            x_next = sch.step(v, i, x)
            if self.on_step is not None:
                self.on_step(StepEvent(clip, block, i, rd, x, v, x_next))
            x = x_next
        return x
