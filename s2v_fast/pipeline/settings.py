"""What a generation may be asked for: the reference constants (spec §3.1), the table of numeric
settings every entry point checks before any model is loaded, and the clip / frame counts (§8.7).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import random
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

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


@dataclass(frozen=True)
class SamplingOptions:
    """The sampler settings of one faithful-mode generation (defaults: the Wan2.2-S2V-14B config,
    spec §3.1). ``generate`` builds it from its keywords and checks it once (:meth:`checked`);
    the clip loop (``run_clips``) takes it as one value."""

    num_frames: int = 80
    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    flow_shift: float = 3.0
    sample_solver: str = "unipc"
    seed: int = 42
    init_first_frame: bool = False

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs (two branches per step) only for a scale above 1."""
        return self.guidance_scale > 1

    def checked(self) -> "SamplingOptions":
        """These options after the checks of :data:`NUMERIC_SETTINGS` (one-line InputError),
        with a seed of -1 (or None) replaced by a random one."""
        check_numeric_settings(dataclasses.asdict(self))
        if self.sample_solver not in ("unipc", "dpm++"):
            raise InputError(f"--sample-solver {self.sample_solver!r} is not supported; use unipc "
                             "or dpm++")
        if self.seed is None or self.seed < 0:
            return dataclasses.replace(self, seed=random.randint(0, 2**31 - 1))
        return self


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
