"""Wan2.2 Speech-to-Video pipeline: the clip loop of spec §8, readable top to bottom.

    pipe = S2VPipeline.from_pretrained("Wan-AI/Wan2.2-S2V-14B", device="cuda")
    out = pipe.generate("face.png", "speech.wav", output="out.mp4")

``generate`` does, in order (spec section in brackets):

1. checks (sizes, frames, output path), then size from the image and ``max_area`` (§8.1) and the
   reference image as [-1, 1] pixels (§8.2) -- cheap, so bad inputs fail before the encoders run;
2. audio: wav2vec2 (25 layers, 50 Hz) -> 30 fps -> bucketed to 16 fps video frames; the number of
   clips comes from the audio, capped by ``num_clips`` and by the frames the trimmed video needs (§5);
3. text: prompt + negative prompt -> two unpadded contexts (§6);
4. optional pose frames (§8.4);
5. :meth:`S2VPipeline.run_clips`: reference latent, motion buffer, per-clip pose latents, noise and
   scheduler, CFG denoising, decode, trim, motion update (§8.2-§8.7); each clip is yielded as soon
   as it is decoded and written to the MP4 right away.

``run_clips`` takes precomputed contexts / audio features, so the exact reference loop can be
checked against the golden end-to-end fixtures without a text encoder or wav2vec2.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .denoiser import CFGDenoiser
from .errors import InputError, S2VError

# Reference constants (spec §3.1).
MOTION_FRAMES = 73  # pixel frames of motion context
LAT_MOTION_FRAMES = (MOTION_FRAMES + 3) // 4  # 19 latent frames
INIT_FIRST_FRAME_COPIES = 6  # init_first_frame puts the ref image into the last 6 motion frames
FIRST_CLIP_DROP = 3  # frames dropped from clip 0 when its motion is dropped
SAMPLE_FPS = 16
AUDIO_FPS_IN = 50
AUDIO_FPS_MID = 30
AUDIO_SAMPLE_RATE = 16000
NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_PROMPT = "A person speaking naturally"
DEFAULT_MAX_AREA = 480 * 832
DEFAULT_MODEL = "Wan-AI/Wan2.2-S2V-14B"
SIZE_DIVISOR = 64


# ------------------------------------------------------------------------------------------------
# profiling hooks: the real StageTimer / trace_range when s2v_fast.profiling provides them


class _NullStageTimer:
    def stage(self, name, **meta):
        return contextlib.nullcontext()


def _default_stage_timer():
    try:
        from .profiling.stage_timer import current_stage_timer
    except ImportError:  # pragma: no cover - profiling module absent
        return _NullStageTimer()
    return current_stage_timer()


def _trace_range(name: str):
    try:
        from .profiling.ranges import trace_range
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return trace_range(name)


# ------------------------------------------------------------------------------------------------
# progress / inspection callbacks


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


def _emit(callbacks: Sequence, name: str, *args) -> None:
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


class SignalInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a signal handler (the CLI turns SIGINT, SIGTERM and SIGHUP
    into it): handled exactly like Ctrl-C, and carries the signal for the exit code (128 + n)."""

    def __init__(self, signum: int):
        import signal as _signal

        self.signum = int(signum)
        try:
            self.signal_name = _signal.Signals(self.signum).name
        except ValueError:  # pragma: no cover
            self.signal_name = f"signal {self.signum}"
        super().__init__(self.signal_name)


def interrupt_signal(exc: BaseException) -> Optional[int]:
    """The signal number behind a KeyboardInterrupt (None for a plain one, e.g. a callback's)."""
    for _ in range(8):  # the exception, or what it was raised from
        if exc is None:
            break
        if isinstance(exc, SignalInterrupt):
            return exc.signum
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _interrupted(exc: BaseException) -> str:
    """'interrupted' or 'interrupted by SIGTERM'."""
    sig = interrupt_signal(exc)
    return "interrupted" if sig is None else f"interrupted by {SignalInterrupt(sig).signal_name}"


class _PartialMixin:
    def _set(self, clips_done, num_clips, frames_written, output_path, cause):
        self.clips_done = clips_done
        self.num_clips = num_clips
        self.frames_written = frames_written
        self.output_path = output_path
        self.cause = cause


class GenerationInterrupted(KeyboardInterrupt, _PartialMixin):
    """Ctrl-C (or SIGTERM / SIGHUP through the CLI) after at least one clip was written: the MP4
    holds the finished clips. ``signum``: the signal, None for a plain KeyboardInterrupt."""

    def __init__(self, message, **info):
        super().__init__(message)
        self._set(**info)
        self.signum = interrupt_signal(self.cause)


class PartialOutputError(S2VError, _PartialMixin):
    """An error after at least one clip was written: the MP4 holds the finished clips."""

    def __init__(self, message, **info):
        super().__init__(message)
        self._set(**info)


# ------------------------------------------------------------------------------------------------
# small helpers


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


SEED_MAX = 2**63 - 1  # seed + clip index must fit torch.Generator.manual_seed
_MULTIPLE_OF_64 = lambda v: _is_int(v) and v >= SIZE_DIVISOR and v % SIZE_DIVISOR == 0  # noqa: E731
_AT_LEAST_1 = lambda v: _is_int(v) and v >= 1  # noqa: E731

# Every numeric setting of a generation: (name = generate() argument and CLI dest, CLI flag,
# check, the valid range in words). The CLI checks its parsed flags against this table right
# after argparse (before any model is loaded), generate() its arguments; a value that fails
# gives one line: "<flag> <value> is not <range>". None (an optional setting not given) passes.
NUMERIC_SETTINGS = (
    ("height", "--height", _MULTIPLE_OF_64, "a positive multiple of 64 (e.g. 448 or 832)"),
    ("width", "--width", _MULTIPLE_OF_64, "a positive multiple of 64 (e.g. 448 or 832)"),
    ("max_area", "--max-area", lambda v: _is_int(v) and v >= SIZE_DIVISOR ** 2,
     f"an area of at least {SIZE_DIVISOR}*{SIZE_DIVISOR} = {SIZE_DIVISOR ** 2} pixels (e.g. 480*832)"),
    ("num_frames", "--num-frames", lambda v: _is_int(v) and v >= 4 and v % 4 == 0,
     "a positive multiple of 4 (default 80)"),
    ("num_clips", "--num-clips", _AT_LEAST_1, "an integer >= 1 (default: as many as the audio needs)"),
    ("fps", "--fps", lambda v: _is_finite(v) and v > 0, f"a number > 0 (default {SAMPLE_FPS}, the model's rate)"),
    ("num_inference_steps", "--num-inference-steps", _AT_LEAST_1, "an integer >= 1 (default 40)"),
    ("guidance_scale", "--guidance-scale", lambda v: _is_finite(v) and v >= 0,
     "a finite number >= 0 (default 4.5; any value <= 1 turns classifier-free guidance off: "
     "one conditional pass per step)"),
    ("flow_shift", "--flow-shift", lambda v: _is_finite(v) and v > 0, "a finite number > 0 (default 3.0)"),
    ("seed", "--seed", lambda v: _is_int(v) and -1 <= v <= SEED_MAX,
     f"an integer from 0 to {SEED_MAX}, or -1 for a random seed"),
    ("ulysses_degree", "--ulysses-degree", _AT_LEAST_1, "an integer >= 1"),
    ("ring_degree", "--ring-degree", _AT_LEAST_1, "an integer >= 1"),
    ("tensor_parallel_size", "--tensor-parallel-size", _AT_LEAST_1, "an integer >= 1"),
    ("cfg_parallel_size", "--cfg-parallel-size", lambda v: _is_int(v) and v in (1, 2), "1 or 2"),
    ("vae_patch_parallel_size", "--vae-patch-parallel-size", _AT_LEAST_1, "an integer >= 1"),
)


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def check_numeric_settings(values) -> None:
    """Check every setting of ``values`` (a mapping, e.g. ``vars(args)``) that
    :data:`NUMERIC_SETTINGS` names; one-line InputError for the first bad one."""
    for name, flag, ok, valid in NUMERIC_SETTINGS:
        v = values.get(name)
        if v is not None and not ok(v):
            raise InputError(f"{flag} {_show(v)} is not {valid}")


def validate_settings(*, height=None, width=None, num_frames=80, num_inference_steps=40,
                      guidance_scale=4.5, sample_solver="unipc", max_area=DEFAULT_MAX_AREA,
                      num_clips=None, fps=SAMPLE_FPS, flow_shift=None, seed=None) -> None:
    """Cheap checks done before any model is loaded (each raises a one-line InputError)."""
    check_numeric_settings(dict(height=height, width=width, num_frames=num_frames,
                                num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, max_area=max_area,
                                num_clips=num_clips, fps=fps, flow_shift=flow_shift, seed=seed))
    if (height is None) != (width is None):
        raise InputError("pass both --height and --width, or neither (then the size follows the image)")
    if sample_solver is not None and sample_solver not in ("unipc", "dpm++"):
        raise InputError(f"--sample-solver {sample_solver!r} is not supported; use unipc or dpm++")


def frames_for_clips(num_clips: int, num_frames: int, drop_first: bool) -> int:
    """Total output frames of ``num_clips`` clips (spec §8.7): 77 + 80(n-1) by default."""
    if num_clips <= 0:
        return 0
    first = num_frames - FIRST_CLIP_DROP if drop_first else num_frames
    return first + num_frames * (num_clips - 1)


def clips_for_frames(total_frames: int, num_frames: int, drop_first: bool) -> int:
    """Smallest number of clips giving at least ``total_frames`` frames."""
    first = num_frames - FIRST_CLIP_DROP if drop_first else num_frames
    if total_frames <= first:
        return 1
    return 1 + math.ceil((total_frames - first) / num_frames)


# ------------------------------------------------------------------------------------------------


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
            self._attach_parallel(parallel)

    # -------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device=None, dtype=None, *,
                        precision: Optional[str] = None, attention_backend: Optional[str] = None,
                        offload: Optional[str] = None, free_encoders: bool = False,
                        quantization: Optional[str] = None, parallel=None, audio_device=None, cache_dir: Optional[str] = None,
                        load_text_encoder: bool = True, load_audio_encoder: bool = True,
                        loras: Sequence = ()):
        """Load every component from ``model``: ``"tiny"``, a local checkpoint directory in the
        official layout, or a Hugging Face repo id (downloaded on first use).

        ``device``: default CUDA when available, else CPU. ``dtype``: default bf16 on CUDA, fp32 on
        the CPU. The wav2vec2 audio encoder runs in fp32 (on ``audio_device``, default ``device``).
        ``precision``: the DiT path, ``"fast"`` (fused Triton kernels) or ``"reference"``; default
        fast on CUDA, reference on the CPU or with options fast does not support yet.
        ``attention_backend``: calls ``kernels.attention.set_attention_backend`` (process-wide).
        ``offload``: ``"cpu"`` (:meth:`enable_cpu_offload`) or ``"layerwise"``
        (:meth:`enable_layerwise_offload`); the weights are then loaded into host memory, never
        all onto the GPU at once. ``free_encoders``: with offload, drop the text / audio encoders
        after their first use (a pipeline that generates once).
        ``parallel``: a :class:`~s2v_fast.parallel.ParallelConfig` (under torchrun;
        torch.distributed is initialised here, gloo on the CPU, NCCL on ``cuda:LOCAL_RANK``) or
        an existing :class:`~s2v_fast.parallel.ParallelState`. Every option is checked (one-line
        :class:`InputError`) before any weights are read.
        ``loras``: LoRAs to merge into the DiT (``"PATH_OR_HF_ID[:SCALE]"`` strings or
        :class:`~s2v_fast.lora.LoraSpec`), once, in fp32, before quantisation; the files are
        resolved (downloaded) and read before the DiT is.
        """
        from . import hub
        from .models.audio_features import AudioFeatureExtractor
        from .models.dit import S2VTransformer
        from .models.text_encoder import TextEncoder
        from .models.vae import WanVAE
        from .runtime import (apply_attention_backend, check_offload_mode, check_quantization,
                              init_parallel, resolve_precision, validate_parallel_for_model)

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _parse_dtype(dtype, device)
        offload = check_offload_mode(offload)
        if attention_backend is not None:
            apply_attention_backend(attention_backend, device)
        pconf = getattr(parallel, "config", parallel)  # ParallelState -> its ParallelConfig
        precision, _ = resolve_precision(precision, device, offload=offload, parallel=pconf)
        quantization = check_quantization(quantization, offload=offload, parallel=pconf)
        path = hub.resolve_model(model, cache_dir=cache_dir)
        lora_weights = _read_loras(loras, cache_dir, model_path=path)
        if lora_weights:  # keys and shapes against the checkpoint's config, no weights read
            from .config import DiTConfig
            from .lora import check_lora

            with torch.device("meta"):
                check_lora(S2VTransformer(DiTConfig.from_json(path)), lora_weights)
        state = None
        if parallel is not None:
            validate_parallel_for_model(pconf, path, getattr(parallel, "world_size", None))
            state = init_parallel(parallel, device)
            if device.type == "cuda":
                device = state.device  # cuda:LOCAL_RANK
            if state.world_size == 1:
                state = None
        # With offload every weight goes to host memory first: the GPU never holds them all.
        load_device = torch.device("cpu") if offload else device
        tp = state.config.tensor_parallel_size if state is not None else 1
        if lora_weights and tp > 1:
            raise InputError("--lora with --tensor-parallel-size > 1 is not supported yet (the "
                             "merge needs the unsharded weights); drop one of them")
        timer = _default_stage_timer()
        with timer.stage("model_load"), _no_transformers_progress_bars():
            if tp > 1:  # read only this rank's slices of the sharded weights
                from .parallel import load_dit_sharded

                dit = load_dit_sharded(path, state.tp_rank, tp, device=load_device, dtype=dtype)
            else:
                dit = S2VTransformer.from_pretrained(path, device=load_device, dtype=dtype)
            dit.precision = precision
            if lora_weights:
                from .lora import merge_lora

                merge_lora(dit, lora_weights)
            if quantization != "none":  # in place, layer by layer
                from .kernels.attention import get_attention_backend
                from .quantization import quantize_dit

                # on the GPU the default `auto` attention becomes fp8 self-attention too (faster
                # than cuDNN bf16: results/attention_configs-*); a backend the user named stays
                fp8_attn = device.type == "cuda" and get_attention_backend() == "auto"
                quantize_dit(dit, quantization, attention="fp8" if fp8_attn else False)
            vae = WanVAE.from_file(os.path.join(path, hub.VAE_CHECKPOINT), device=load_device,
                                   dtype=torch.float32)
            text = (TextEncoder.from_pretrained(path, device=load_device, dtype=dtype)
                    if load_text_encoder else None)
            audio = (AudioFeatureExtractor.from_pretrained(
                os.path.join(path, hub.WAV2VEC_DIR), device=audio_device or device)
                if load_audio_encoder else None)
            pipe = cls(dit, vae, text, audio, device=device, dtype=dtype, model_path=path,
                       parallel=state)
            if offload is not None:
                pipe._enable_offload(offload, free_encoders)
        return pipe

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
        from .runtime import PRECISIONS, fast_precision_blocker

        if value not in PRECISIONS:
            raise InputError(f"precision {value!r}: use fast or reference")
        if value == "fast":
            why = fast_precision_blocker(self.parallel.config if self.parallel is not None else None)
            if why:
                raise InputError(f"{why}; use --precision reference")
        self.dit_module.precision = value

    def enable_cpu_offload(self, free_encoders: bool = False) -> "S2VPipeline":
        """Model-level offload (``--enable-cpu-offload``): every component (DiT, VAE, text and
        audio encoders) waits in pinned host memory and is on the GPU only while its stage runs;
        each stage moves the one it needs. ``free_encoders=True`` drops the encoders after their
        first use. Weights are read-only while offloaded. On a CPU device the same bookkeeping
        runs (copies between host buffers) and saves nothing."""
        return self._enable_offload("cpu", free_encoders)

    def enable_layerwise_offload(self, free_encoders: bool = False) -> "S2VPipeline":
        """``--enable-layerwise-offload``: as :meth:`enable_cpu_offload`, and the DiT blocks stay
        in pinned host memory during denoising too: two block-sized GPU buffers, the next block
        copied on a side stream while the current one runs. Works with both precisions."""
        return self._enable_offload("layerwise", free_encoders)

    def _enable_offload(self, mode: str, free_encoders: bool) -> "S2VPipeline":
        from .offload import ModelOffloader, enable_layerwise_offload

        if self.offloader is not None:
            raise S2VError(f"offload ({self.offload_mode}) is already enabled on this pipeline")
        off = ModelOffloader(self.device)
        if mode == "layerwise":
            enable_layerwise_offload(self.dit_module, self.device)
        off.register("dit", self.dit_module)
        off.register("vae", getattr(self.vae, "vae", self.vae))  # the VAE inside VAEPatchParallel
        if self.text_encoder is not None:
            off.register("text_encoder", self.text_encoder)
        audio = self.audio_encoder
        if audio is not None and torch.device(getattr(audio, "device", self.device)) == self.device:
            off.register("audio_encoder", audio)  # (an encoder on its own audio_device stays)
        self.offloader, self.offload_mode, self.free_encoders = off, mode, bool(free_encoders)
        return self

    def _on_device(self, name: str):
        """Context in which component ``name`` is on the device (no-op without offload)."""
        off = self.offloader
        if off is None or name not in off:
            return contextlib.nullcontext()
        return off.use(name)

    def _done_with(self, name: str) -> None:
        """After an encoder's stage: release it when ``free_encoders`` asks for it."""
        off = self.offloader
        if off is not None and self.free_encoders and name in off:
            off.release(name)
            setattr(self, name, None)
            self._freed.add(name)

    def _no_component(self, name: str, hint: str) -> S2VError:
        if name in self._freed:
            return S2VError(f"the {name.replace('_', ' ')} was freed after its first use "
                            f"(free_encoders=True); {hint}, or load the pipeline again")
        return S2VError(f"this pipeline has no {name.replace('_', ' ')}; {hint}")

    def _attach_parallel(self, state) -> None:
        """Multi-process run: TP/SP DiT transform, VAE patch parallel (see docs/multi_gpu.md)."""
        from .parallel import VAEPatchParallel, parallelize

        self.parallel = state
        self.dit = parallelize(self.dit, state)
        if state.config.vae_patch_parallel_size > 1:
            self.vae = VAEPatchParallel(self.vae, state.vae_group)

    @property
    def is_main_process(self) -> bool:
        """Rank 0 (or a single process): writes the MP4."""
        return self.parallel is None or self.parallel.is_main

    # -------------------------------------------------------------------------------- stages
    def select_size(self, image_hw, height=None, width=None, max_area=DEFAULT_MAX_AREA):
        """(H, W): explicit, or the largest multiple-of-64 size <= max_area keeping the aspect (§8.1)."""
        if height is not None and width is not None:
            return int(height), int(width)
        from .media import get_size_less_than_area

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
            raise self._no_component("text_encoder", "pass prompt_embeds= and negative_prompt_embeds=")
        from .models.text_encoder import DEFAULT_NEGATIVE_PROMPT

        if not negative_prompt:  # reference: "" means the S2V default negative prompt
            negative_prompt = DEFAULT_NEGATIVE_PROMPT
        with self._on_device("text_encoder"):
            if not with_negative:
                return self.text_encoder.encode([prompt])[0], None
            ctx, ctx_null = self.text_encoder.encode([prompt, negative_prompt])
        return ctx, ctx_null

    def load_audio(self, audio):
        """Path or 16 kHz mono float waveform -> np.float32 [N] (InputError for bad/silent audio)."""
        from .models.audio_features import load_audio

        if isinstance(audio, (str, os.PathLike)):
            return load_audio(os.fspath(audio), sr=AUDIO_SAMPLE_RATE)
        wave = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise InputError("audio waveform must be a non-empty 1-D array at 16 kHz")
        return wave

    def audio_features(self, wave) -> torch.Tensor:
        """wav2vec2 hidden states of all 25 layers at 50 Hz: [25, T_a, D] float32 (§5.1)."""
        if self.audio_encoder is None:
            raise self._no_component("audio_encoder", "pass audio_feats_50hz=")
        # The reference runs wav2vec2 in fp32 on the CPU; on a GPU keep its convs out of TF32.
        prev = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with self._on_device("audio_encoder"):
                return self.audio_encoder(wave)
        finally:
            torch.backends.cudnn.allow_tf32 = prev

    def bucket_audio(self, feats_50hz: torch.Tensor, num_frames: int):
        """[25, T_a, D] at 50 Hz -> ([1, 25, D, num_clips*num_frames] in ``dtype``, num_clips) (§5.2)."""
        from .models.audio_features import bucket_features, interpolate_features

        feats30 = interpolate_features(feats_50hz.float(), AUDIO_FPS_IN, AUDIO_FPS_MID)
        bucket, num_clips = bucket_features(feats30, fps=SAMPLE_FPS, batch_frames=num_frames)
        audio_emb = bucket.to(self.device, self.dtype).permute(1, 2, 0).unsqueeze(0)  # [1, 25, D, F_tot]
        return audio_emb, int(num_clips)

    def load_reference(self, image, height: int, width: int) -> torch.Tensor:
        """Resize the shorter side, center-crop/pad -> [1, 3, 1, H, W] float32 in [-1, 1] (§8.2)."""
        from .media import load_reference_image

        return load_reference_image(image, height, width).to(self.device, torch.float32)

    def load_pose(self, pose_video, height, width, total_frames) -> torch.Tensor:
        """Pose frames from the start of the video at 16 fps, resized/cropped, padded with -1:
        [1, 3, total_frames, H, W] float32 in [-1, 1] on the CPU (§8.4)."""
        from .media import read_pose_video

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
        with self._on_device("vae"):
            return self.vae.encode(video.to(self.device, torch.float32))

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._on_device("vae"):
            return self.vae.decode(latents.to(self.device, torch.float32))

    def make_scheduler(self, sample_solver: str, num_inference_steps: int, flow_shift: float):
        """A fresh scheduler per clip (shift=1 at construction, flow shift at set_timesteps; §8.5)."""
        from .schedulers import make_scheduler

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
            from .parallel import make_denoiser

            return make_denoiser(self.dit, self.parallel, self.dtype, guidance_scale,
                                 self.cfg_batch, **inputs)
        return CFGDenoiser(self.dit, self.dtype, guidance_scale, self.cfg_batch, **inputs)

    # -------------------------------------------------------------------------------- clip loop
    @torch.inference_mode()
    def run_clips(
        self,
        *,
        context: torch.Tensor,
        context_null: Optional[torch.Tensor],
        audio_emb: torch.Tensor,
        num_clips: int,
        ref_pixels: torch.Tensor,
        num_frames: int = 80,
        num_inference_steps: int = 40,
        guidance_scale: float = 4.5,
        flow_shift: float = 3.0,
        sample_solver: str = "unipc",
        seed: int = 42,
        init_first_frame: bool = False,
        pose_frames: Optional[torch.Tensor] = None,
        noise_fn: Optional[Callable[[tuple, int], torch.Tensor]] = None,
        generator_device=None,
        callbacks: Sequence = (),
        stage_timer=None,
    ) -> Iterator[ClipResult]:
        """The reference clip loop (spec §8.3-§8.7); yields each clip as soon as it is decoded.

        ``context``/``context_null``: [L, text_dim]; ``audio_emb``: [1, 25, D, >= num_clips*num_frames]
        (bucketed, ``dtype``); ``ref_pixels``: [1, 3, 1, H, W] in [-1, 1]; ``pose_frames``:
        [1, 3, >= num_clips*num_frames, H, W] in [-1, 1] or None (zero condition).
        ``noise_fn(shape, seed) -> tensor`` replaces the default device-generator noise.
        """
        timer = stage_timer or _default_stage_timer()
        dev = self.device
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
            ref_latents = self.vae_encode(ref_pixels)
            motion_buffer = torch.zeros(1, 3, MOTION_FRAMES, height, width, device=dev, dtype=torch.float32)
            if init_first_frame:  # reference writes into a param_dtype buffer: round like it does
                motion_buffer[:, :, -INIT_FIRST_FRAME_COPIES:] = ref_pixels.to(self.dtype).float()
                motion_latents = self.vae_encode(motion_buffer)
            else:
                # The reference encodes the all-zero buffer here, but clip 0 drops the motion
                # frames (the DiT never reads them, the decode starts from the reference latent)
                # and clip 1 re-encodes the buffer: that 73-frame encode is never observed.
                motion_latents = None

        for r in range(num_clips):
            with _trace_range(f"clip{r}"):
                drop = drop_first_motion and r == 0

                # Pose condition (§8.4): prepend the first frame, encode 1+F*4 frames, drop latent 0.
                if pose_frames is not None:
                    with timer.stage("pose_encode", clip=r):
                        chunk = pose_frames[:, :, r * num_frames:(r + 1) * num_frames]
                        chunk = torch.cat([chunk[:, :, :1], chunk], dim=2).to(dev, self.dtype)
                        cond = self.vae_encode(chunk.float())[:, :, 1:].to(self.dtype)
                else:  # the reference encodes -1 frames and multiplies by 0: a zero condition
                    cond = None  # (the DiT then adds the cond_encoder bias only, the same numbers)

                # Fresh noise (seed + r) and a fresh scheduler for every clip (§8.5).
                shape = (16, lat_frames, lat_h, lat_w)
                noise = (noise_fn(shape, seed + r) if noise_fn is not None
                         else self.make_noise(shape, seed + r, generator_device))
                latents = noise.to(dev).unsqueeze(0)
                scheduler = self.make_scheduler(sample_solver, num_inference_steps, flow_shift)
                timesteps = scheduler.timesteps
                audio_input = audio_emb[..., r * num_frames:(r + 1) * num_frames].to(dev, self.dtype)
                _emit(callbacks, "on_clip_start", r, dict(
                    noise=noise, timesteps=timesteps, audio_input=audio_input, cond=cond,
                    motion_latents=motion_latents, ref_latents=ref_latents, drop_motion_frames=drop))

                # Denoising loop. Step-invariant DiT inputs (text, audio, ref/motion/pose tokens)
                # are prepared once per clip; the math per step is the reference's.
                t_start = time.perf_counter()
                with timer.stage("denoise", clip=r), self._on_device("dit"):
                    denoiser = self.make_denoiser(
                        context=context, context_null=context_null, ref_latents=ref_latents,
                        motion_latents=motion_latents, cond=cond, audio_input=audio_input,
                        drop_motion=drop, guidance_scale=guidance_scale)
                    for i, t in enumerate(timesteps):
                        with _trace_range(f"step{i}"):
                            t_in = t.reshape(1).to(dev)
                            v, v_cond, v_uncond = denoiser(latents, t_in)
                            x_in = latents
                            latents = scheduler.step(v, t, latents)
                        _emit(callbacks, "on_step_end", r, i, dict(
                            timestep=t, x_in=x_in, v_cond=v_cond, v_uncond=v_uncond, latents=latents))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                denoise_s = time.perf_counter() - t_start

                # Decode [ref or motion latents, new latents], keep the last num_frames (§8.7).
                with timer.stage("vae_decode", clip=r):
                    head = ref_latents if drop else motion_latents
                    video = self.vae_decode(torch.cat([head.float(), latents.float()], dim=2))
                    video = video[:, :, -num_frames:]
                    if drop:
                        video = video[:, :, FIRST_CLIP_DROP:]

            yield ClipResult(index=r, video=video, latents=latents, denoise_seconds=denoise_s,
                             num_steps=len(timesteps))

            # Motion context for the next clip: last 73 frames of [buffer, clip], re-encoded.
            motion_latents_out = None
            if r + 1 < num_clips:
                with timer.stage("motion_encode", clip=r):
                    k = min(MOTION_FRAMES, video.shape[2])
                    motion_buffer = torch.cat([motion_buffer[:, :, k:], video[:, :, -k:].float()], dim=2)
                    motion_latents = self.vae_encode(motion_buffer)
                    motion_latents_out = motion_latents
            _emit(callbacks, "on_clip_end", r, dict(
                latents=latents, video=video, motion_latents_out=motion_latents_out,
                frames=video.shape[2]))

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
        timer = stage_timer or _default_stage_timer()
        callbacks = list(callbacks or ())
        validate_settings(height=height, width=width, num_frames=num_frames,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          sample_solver=sample_solver, max_area=max_area, num_clips=num_clips, fps=fps,
                          flow_shift=flow_shift, seed=seed)
        if audio is None and audio_feats_50hz is None:
            raise InputError("no audio given; pass --audio FILE (wav/mp3/flac)")
        if return_video is None:
            return_video = output is None
        if seed is None or seed < 0:
            seed = random.randint(0, 2**31 - 1)
        if output is not None:
            from .media import check_output_writable

            check_output_writable(output)
            if not self.is_main_process:  # multi-process: rank 0 writes the MP4
                output = None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        # 1. Size and reference image (cheap: a bad image fails before the heavy encoders run).
        from .media import open_image_rgb

        pil = open_image_rgb(image)
        height, width = self.select_size((pil.height, pil.width), height, width, max_area)
        ref_pixels = self.load_reference(pil, height, width)

        # 2. Audio: waveform -> 50 Hz wav2vec2 features -> 16 fps buckets -> number of clips.
        with timer.stage("audio_features"):
            wave = self.load_audio(audio) if audio is not None else None
            if audio_feats_50hz is None:
                audio_feats_50hz = self.audio_features(wave)
                self._done_with("audio_encoder")
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
                seed, n_clips, max_frames, total_frames = _from_rank0(
                    seed, n_clips, max_frames, total_frames)

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
                    self._done_with("text_encoder")

            # 4. Pose frames (optional), for exactly the clips that will run.
            pose_frames = None
            if pose_video is not None:
                with timer.stage("pose_read"):
                    pose_frames = self.load_pose(pose_video, height, width, n_clips * num_frames)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise

        _emit(callbacks, "on_start", dict(
            height=height, width=width, num_clips=n_clips, num_frames=num_frames,
            num_inference_steps=num_inference_steps, total_frames=total_frames, seed=seed,
            audio_seconds=audio_seconds, output=output))

        # 5. The clip loop; every clip is written as soon as it is decoded.
        clips, frames_done, clips_done, denoise_s, steps_run = [], 0, 0, 0.0, 0
        try:
            for clip in self.run_clips(
                context=context, context_null=context_null, audio_emb=audio_emb, num_clips=n_clips,
                ref_pixels=ref_pixels, num_frames=num_frames, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, flow_shift=flow_shift, sample_solver=sample_solver,
                seed=seed, init_first_frame=init_first_frame, pose_frames=pose_frames,
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
            self._handle_failure(exc, writer, clips_done, n_clips, frames_done, output)
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
        _emit(callbacks, "on_end", result)
        return result

    @staticmethod
    def _handle_failure(exc, writer, clips_done, n_clips, frames_done, output, unit="clips"):
        """Ctrl-C, a signal or an error mid-run: keep the finished clips in a valid MP4, else
        leave nothing.

        A ``KeyboardInterrupt`` (a :class:`SignalInterrupt` too) is re-raised as
        :class:`GenerationInterrupted` (a KeyboardInterrupt carrying what was kept); any other
        error after >= 1 written clip as :class:`PartialOutputError`. The writer is the judge of
        what was kept: it takes interrupt signals only between clips, so a clip it wrote is whole
        even when the interrupt came before the loop counted it.
        """
        if writer is None:
            return
        if not (writer.chunks_written > 0 and isinstance(exc, (KeyboardInterrupt, Exception))):
            writer.abort()
            return
        try:
            writer.finish()  # (a no-op when the interrupt came right after the final finish)
        except Exception:
            writer.abort()
            return
        clips_done = max(clips_done, writer.chunks_written)
        info = dict(clips_done=clips_done, num_clips=n_clips, frames_written=writer.frames_written,
                    output_path=writer.path, cause=exc)
        kept = (f"kept the {clips_done} finished {unit[:-1]}(s) ({writer.frames_written} frames) "
                f"in {writer.path}")
        if isinstance(exc, KeyboardInterrupt):
            raise GenerationInterrupted(f"{_interrupted(exc)} after {clips_done} of {n_clips} {unit}; "
                                        f"{kept}", **info) from exc
        raise PartialOutputError(f"generation failed after {clips_done} of {n_clips} {unit} "
                                 f"({_one_line(exc)}); {kept}", **info) from exc

    __call__ = generate

    def _open_writer(self, output, fps, audio, trim_to_audio):
        """MP4 writer (temp file + atomic rename on finish) carrying the original audio file."""
        from .media import MP4Writer

        audio_path = os.fspath(audio) if isinstance(audio, (str, os.PathLike)) else None
        return MP4Writer(output, fps=fps, audio_path=audio_path, trim_to_audio=trim_to_audio)


def _read_loras(loras, cache_dir=None, model_path: Optional[str] = None) -> list:
    """[(LoraWeights, scale)] of LoRA specs (strings or LoraSpec), resolved and validated.
    ``tiny`` names the tiny model set's own LoRA file (with ``--model tiny`` only)."""
    from . import hub
    from .lora import LoraSpec, load_lora, parse_lora_spec, resolve_lora_file
    from .models.tiny import TINY_LORA

    out = []
    for spec in loras or ():
        spec = spec if isinstance(spec, LoraSpec) else parse_lora_spec(spec)
        source = spec.source
        if source == "tiny":
            if model_path is None or not hub.is_tiny_dir(model_path):
                raise InputError("--lora tiny is the tiny model set's LoRA; use it with --model tiny")
            source = os.path.join(model_path, TINY_LORA)
        out.append((load_lora(resolve_lora_file(source, cache_dir=cache_dir)), spec.scale))
    return out


@contextlib.contextmanager
def _no_transformers_progress_bars():
    """Local loads are fast; transformers' per-tensor 'Loading weights' bar is only noise."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _from_rank0(*values):
    """Rank 0's values on every rank (one broadcast over the default process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    box = list(values)
    dist.broadcast_object_list(box, src=0)
    return tuple(box)


def _one_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {s[0]}" if s else type(exc).__name__


def _module_device(module) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _parse_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float": torch.float32}
    if str(dtype) not in names:
        raise InputError(f"--dtype {dtype} is not supported; use bfloat16 or float32")
    return names[str(dtype)]
