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
from ..fast.causal import causal_runner_for
from ..models.causal import CausalS2V, CondCache, RingKVCache, ref_rope_time
from ..models.dit import S2VTransformer
from ..schedulers import FlowEulerSchedule
from .preset import REALTIME, StreamingSettings

RD_RANGE = (4, 30)
LATENT_CHANNELS = 16


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


def take_rd(rd: Iterator[int]) -> int:
    """The next rd of a (seeded or injected) sequence; an injected one that runs out is a user
    error."""
    try:
        return int(next(rd))
    except StopIteration:
        raise InputError("the injected rd sequence ran out; pass one value per DiT forward "
                         "(steps x blocks)") from None


# ------------------------------------------------------------------ per-block bookkeeping
# Shared by this runner and the step pipeline (s2v_fast.parallel.step_pipeline), whose ranks must
# agree with it bit for bit on every block's noise, audio window and RoPE start.
@dataclass(frozen=True)
class BlockPlan:
    """Where one block sits in the stream."""

    clip: int
    block: int
    index: int  # blocks since the start of the stream
    start_frame: int  # absolute latent frame of the block's first frame
    frames: int  # latent frames per block
    audio_frames: int  # video frames of audio per block
    audio_start: int  # first video frame of the block's audio window

    def noise_of(self, clip_noise: torch.Tensor) -> torch.Tensor:
        """The block's [1, 16, f, h, w] slice (a view) of its clip's noise [16, F, h, w]."""
        f0 = self.block * self.frames
        return clip_noise[:, f0:f0 + self.frames].unsqueeze(0)

    def audio_of(self, audio: torch.Tensor) -> torch.Tensor:
        return audio[..., self.audio_start:self.audio_start + self.audio_frames]


def plan_blocks(settings: StreamingSettings, num_clips: int) -> Iterator[BlockPlan]:
    """Every block of ``num_clips`` clips, in stream order."""
    s = settings
    for r in range(num_clips):
        for b in range(s.blocks_per_clip):
            index = r * s.blocks_per_clip + b
            yield BlockPlan(r, b, index, index * s.block_frames, s.block_frames,
                            s.video_frames_per_block,
                            r * s.frames_per_clip + b * s.video_frames_per_block)


def check_audio(settings: StreamingSettings, audio: torch.Tensor, num_clips: int) -> None:
    need = settings.frames_per_clip * num_clips
    if audio.shape[-1] < need:
        raise InputError(f"audio features cover {audio.shape[-1]} frames, {need} needed for "
                         f"{num_clips} clip(s)")


def clip_noise(settings: StreamingSettings, clip: int, lh: int, lw: int, dtype: torch.dtype,
               device) -> torch.Tensor:
    """Clip noise [16, 12, lh, lw] in the compute dtype, generator seeded ``seed + clip``."""
    g = torch.Generator(device=device).manual_seed(settings.seed + clip)
    return torch.randn(LATENT_CHANNELS, settings.latent_frames_per_clip, lh, lw, generator=g,
                       dtype=dtype, device=device)


def refreshes_sink(settings: StreamingSettings, clip: int) -> bool:
    """Whether the cond cache is rebuilt from the first generated latent before ``clip``."""
    return clip == 1 and settings.sink == REALTIME


def first_latent_of(latents: torch.Tensor) -> torch.Tensor:
    """The real-time mode's rolling sink frame: frame 0 of the stream's first block."""
    return latents[:, :, 0:1].clone()


def step_cache(causal: CausalS2V, settings: StreamingSettings, lh: int, lw: int) -> RingKVCache:
    """One denoising step's rolling cache of ``cache_frames`` latent frames."""
    ph, pw = causal.patch[1:]
    return causal.new_step_cache(settings.cache_frames * (lh // ph) * (lw // pw))


def denoise_step(causal: CausalS2V, schedule: FlowEulerSchedule, step: int, x: torch.Tensor,
                 cache: RingKVCache, cond: CondCache, start_frame: int, audio_block: torch.Tensor,
                 text_kv, rd: int):
    """Euler step ``step`` of one block on that step's cache -> (velocity, next latents)."""
    t = schedule.timesteps[step].item()
    v = causal.forward_block(x, t, cache, cond, start_frame, audio_block, text_kv,
                             ref_rope_time(start_frame, rd))
    return v, schedule.step(v, step, x)


class StreamingRunner:
    """Runs the streaming mode over a model whose LoRA (if any) is already merged."""

    def __init__(self, model: S2VTransformer, settings: StreamingSettings = StreamingSettings(),
                 rd_sequence: Optional[Iterable[int]] = None,
                 on_step: Optional[Callable[[StepEvent], None]] = None):
        self.causal = causal_runner_for(model)  # FastCausal on the fast path
        self.settings = settings
        self.schedule = FlowEulerSchedule(settings.steps, settings.shift)
        self._rd = iter(rd_sequence) if rd_sequence is not None else seeded_rd(settings.seed)
        self.on_step = on_step
        self.caches: List[RingKVCache] = []
        self.cond: Optional[CondCache] = None

    def next_rd(self) -> int:
        return take_rd(self._rd)

    def make_noise(self, clip: int, lh: int, lw: int) -> torch.Tensor:
        return clip_noise(self.settings, clip, lh, lw, self.causal.dtype, self.causal.device)

    def stream(self, *, context, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
               audio: torch.Tensor, num_clips: int) -> Iterator[BlockResult]:
        """Yield every block's final latents, in order. audio: [1, 25, D, >= 48 * num_clips]
        bucketed at the mode's fps; context: the prompt's [L, text_dim] embedding."""
        s = self.settings
        causal = self.causal
        lh, lw = ref_latents.shape[-2:]
        check_audio(s, audio, num_clips)
        text_kv = causal.text_kv(context)
        self.caches = [step_cache(causal, s, lh, lw) for _ in range(s.steps)]
        self.cond = causal.prefill(ref_latents, motion_latents, text_kv, s.block_frames)
        first_latent = None
        for p in plan_blocks(s, num_clips):
            if p.block == 0:
                if refreshes_sink(s, p.clip):
                    self.cond = causal.prefill(first_latent, motion_latents, text_kv,
                                               s.block_frames)
                noise = self.make_noise(p.clip, lh, lw)
            x = p.noise_of(noise)
            out = self._denoise(x, p, p.audio_of(audio), text_kv)
            if first_latent is None:
                first_latent = first_latent_of(out)
            yield BlockResult(p.clip, p.block, p.index, p.start_frame, x, out)

    def _denoise(self, x, plan: BlockPlan, audio_block, text_kv) -> torch.Tensor:
        for i in range(len(self.schedule)):
            rd = self.next_rd()
            v, x_next = denoise_step(self.causal, self.schedule, i, x, self.caches[i], self.cond,
                                     plan.start_frame, audio_block, text_kv, rd)
            if self.on_step is not None:
                self.on_step(StepEvent(plan.clip, plan.block, i, rd, x, v, x_next))
            x = x_next
        return x
