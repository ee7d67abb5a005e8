"""Step-pipelined streaming: LiveAvatar's timestep-forcing pipeline parallelism (TPP).

In the streaming mode step i of every block reads and writes only step i's rolling cache, so the
4 steps of one block need not run on one GPU: rank i holds the whole model, cache i and the cond
cache, and runs step i of every block. Rank 0 starts each block from its noise; every rank sends
its result to rank i + 1 (point-to-point, [1, 16, 3, h, w] in the compute dtype); the last DiT
rank has the final latents. With an optional extra decode rank (upstream's 5th GPU) it sends them
there instead, so the VAE decode runs beside the DiT rather than between two of the last rank's
steps. Once the pipeline is full, ``steps`` blocks are in flight and a block finishes every DiT
forward instead of every ``steps`` forwards.

Every rank does exactly what :class:`~s2v_fast.streaming.runner.StreamingRunner` does for its
step, with the same functions (block bookkeeping, noise, Euler step), so the final latents are
the same bits:

* rd: the single process draws one sequence in (clip, block, step) order; rank i regenerates it
  (same seed, or the same injected list) and takes elements ``block_index * steps + i``.
* real-time sink: before clip 1 the last DiT rank sends the first generated latent to every other
  DiT rank, and each re-prefills the cond cache. Every DiT rank does this after its last block of
  clip 0, which drains the pipeline once per stream (``steps - 1`` idle forwards): sending it
  as soon as it exists would have to cross the block hand-offs still in flight, which deadlocks
  with blocking sends (gloo's rendezvous, NCCL's lazily created pair communicators). The offline
  mode never refreshes.
* Each DiT rank runs the prefill itself: it is one forward over the cond tokens, cheaper than a
  step, and sending the per-layer K/V would cost more than recomputing them (upstream does the
  same).
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import InputError
from ..fast.causal import causal_runner_for
from ..models.dit import S2VTransformer
from ..schedulers import FlowEulerSchedule
from ..streaming.preset import StreamingSettings
from ..streaming.runner import (LATENT_CHANNELS, BlockPlan, BlockResult, check_audio, clip_noise,
                                denoise_step, first_latent_of, plan_blocks, refreshes_sink,
                                seeded_rd, step_cache, take_rd)


def world_needed(steps: int, decode_rank: bool) -> int:
    return steps + int(decode_rank)


def check_world(world: int, steps: int, decode_rank: bool) -> None:
    """One rank per denoising step (+ the decode rank); anything else is a launch mistake."""
    need = world_needed(steps, decode_rank)
    if world != need:
        extra = " + 1 decode rank" if decode_rank else ""
        raise InputError(f"step-pipelined streaming needs {need} processes ({steps} denoising "
                         f"steps{extra}), got {world}; launch with torchrun --nproc-per-node "
                         f"{need}")


def rank_rd(sequence: Iterable[int], steps: int, step: int) -> Iterator[int]:
    """The rd values the single-process runner uses for step ``step`` of each block, in block
    order: elements ``step, step + steps, ...`` of its one (clip, block, step) sequence."""
    return islice(iter(sequence), step, None, steps)


class _ClipNoise:
    """Each clip's noise, made once per clip by the ranks that need it (rank 0 for its input,
    the output rank for ``BlockResult.noise``): regenerating it is cheaper than sending it."""

    def __init__(self, settings: StreamingSettings, lh: int, lw: int, dtype, device):
        self.args = (lh, lw, dtype, device)
        self.settings = settings
        self.clip, self.noise = None, None

    def block(self, plan: BlockPlan) -> torch.Tensor:
        if plan.clip != self.clip:
            self.clip, self.noise = plan.clip, clip_noise(self.settings, plan.clip, *self.args)
        return plan.noise_of(self.noise)


class StepPipelineRunner:
    """The streaming mode with step i of every block on rank i of ``group`` (default: the world).

    Build it on every rank of ``group`` with the same settings and the same ``rd_sequence``
    (None: the ``seeded_rd(settings.seed)`` sequence), then iterate :meth:`stream` to the end on
    every rank with the same inputs. Ranks 0..steps-1 run the DiT; with ``decode_rank`` rank
    ``steps`` only receives the final latents: it needs no DiT, so its ``model`` may be None,
    with ``dtype`` and ``device`` then saying what the DiT ranks compute in and where to
    receive. :attr:`is_output` says which rank yields the blocks.
    """

    def __init__(self, model: Optional[S2VTransformer],
                 settings: StreamingSettings = StreamingSettings(), group=None,
                 rd_sequence: Optional[Iterable[int]] = None, decode_rank: bool = False,
                 dtype: Optional[torch.dtype] = None, device=None):
        if not dist.is_initialized():
            raise InputError("step-pipelined streaming runs one process per step: launch with "
                             f"torchrun --nproc-per-node "
                             f"{world_needed(settings.steps, decode_rank)} and initialise "
                             "torch.distributed first")
        world = dist.get_world_size(group)
        check_world(world, settings.steps, decode_rank)
        self.group = group if group is not None else dist.group.WORLD
        self.settings = settings
        self.rank = dist.get_rank(self.group)
        self.last_dit = settings.steps - 1
        self.is_output = self.rank == world - 1
        self.step = self.rank if self.rank <= self.last_dit else None  # None: the decode rank
        if model is not None:
            self.causal = causal_runner_for(model)  # FastCausal on the fast path
            self.dtype, self.device = self.causal.dtype, self.causal.device
        elif self.step is None and dtype is not None and device is not None:
            self.causal, self.dtype, self.device = None, dtype, torch.device(device)
        else:
            raise InputError(f"rank {self.rank} of the step pipeline needs the model (the "
                             f"decode rank: dtype= and device= of the DiT ranks instead)")
        self.schedule = FlowEulerSchedule(settings.steps, settings.shift)
        rd = rd_sequence if rd_sequence is not None else seeded_rd(settings.seed)
        self._rd = rank_rd(rd, settings.steps, self.step) if self.step is not None else None
        self.cache = None
        self.cond = None

    # ------------------------------------------------------------------ point-to-point
    def _peer(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _send(self, x: torch.Tensor, to: int) -> None:
        dist.send(x.contiguous(), self._peer(to), group=self.group)

    def _recv(self, frm: int, frames: int, lh: int, lw: int) -> torch.Tensor:
        x = torch.empty(1, LATENT_CHANNELS, frames, lh, lw, dtype=self.dtype, device=self.device)
        dist.recv(x, self._peer(frm), group=self.group)
        return x

    def _share_first_latent(self, first: Optional[torch.Tensor], lh: int, lw: int):
        """The last DiT rank's first generated latent, on every DiT rank (all of them call this
        after their last block of clip 0, so nothing else is in flight)."""
        if self.step == self.last_dit:
            for r in range(self.last_dit):
                self._send(first, r)
            return first
        return self._recv(self.last_dit, 1, lh, lw)

    # ------------------------------------------------------------------ the stream
    def stream(self, *, context, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
               audio: torch.Tensor, num_clips: int) -> Iterator[BlockResult]:
        """Same arguments and, on the output rank (:attr:`is_output`), the same blocks as
        :meth:`StreamingRunner.stream <s2v_fast.streaming.runner.StreamingRunner.stream>`. On the
        other ranks it yields nothing, but must still be iterated to the end: that runs the
        rank's step."""
        check_audio(self.settings, audio, num_clips)  # on every rank, so none waits on a failed one
        lh, lw = ref_latents.shape[-2:]
        if self.step is None:
            return self._decode_rank(lh, lw, num_clips)
        return self._step_rank(context, ref_latents, motion_latents, audio, num_clips)

    def _decode_rank(self, lh: int, lw: int, num_clips: int) -> Iterator[BlockResult]:
        noise = _ClipNoise(self.settings, lh, lw, self.dtype, self.device)
        for p in plan_blocks(self.settings, num_clips):
            out = self._recv(self.last_dit, p.frames, lh, lw)
            yield BlockResult(p.clip, p.block, p.index, p.start_frame, noise.block(p), out)

    def _step_rank(self, context, ref_latents, motion_latents, audio,
                   num_clips) -> Iterator[BlockResult]:
        s, causal, i = self.settings, self.causal, self.step
        lh, lw = ref_latents.shape[-2:]
        text_kv = causal.text_kv(context)
        self.cache = step_cache(causal, s, lh, lw)
        self.cond = causal.prefill(ref_latents, motion_latents, text_kv, s.block_frames)
        noise = _ClipNoise(s, lh, lw, self.dtype, self.device)
        first = None
        for p in plan_blocks(s, num_clips):
            if p.block == 0 and refreshes_sink(s, p.clip):
                first = self._share_first_latent(first, lh, lw)
                self.cond = causal.prefill(first, motion_latents, text_kv, s.block_frames)
            x = noise.block(p) if i == 0 else self._recv(i - 1, p.frames, lh, lw)
            _, x = denoise_step(causal, self.schedule, i, x, self.cache, self.cond,
                                p.start_frame, p.audio_of(audio), text_kv, take_rd(self._rd))
            if i < self.last_dit:
                self._send(x, i + 1)
                continue
            if first is None:
                first = first_latent_of(x)
            if self.is_output:
                yield BlockResult(p.clip, p.block, p.index, p.start_frame, noise.block(p), x)
            else:
                self._send(x, i + 1)
