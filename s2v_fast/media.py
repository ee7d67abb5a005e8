"""Input preprocessing (spec §8.1, §8.2, §8.4) and output validation helpers.

* :func:`get_size_less_than_area` -- the reference's output-size search (multiples of 64).
* :func:`load_reference_image` -- PIL RGB -> shorter side resized (PIL bilinear, antialiased) ->
  centre crop / zero pad -> [1, 3, 1, H, W] float32 in [-1, 1].
* :func:`read_pose_video` -- PyAV decode from the start at stride round(src_fps / 16) ->
  [1, 3, N, H, W] in [-1, 1], padded with -1 frames.
* validators raising :class:`~s2v_fast.errors.InputError` with one-line messages, and the CLI's
  input pre-checks (:func:`check_reference_image`, :func:`check_audio_duration`): an image at
  least 64 px on each side, audio covering at least one 4-frame latent group;
* images over PIL's decompression-bomb limit give one :class:`LargeImageWarning` per file (the
  CLI prints it as one line), or a one-line InputError past twice the limit.

The MP4 writer lives in :mod:`s2v_fast.video_writer` and is re-exported here.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError
from .video_writer import MP4Writer, check_output_writable, load_audio_for_mux, probe_mp4  # noqa: F401

__all__ = [
    "MAX_AREA_CONFIGS", "SIZE_DIVISOR", "get_size_less_than_area", "resized_size_shorter_side",
    "center_crop_offsets", "load_reference_image", "read_pose_video", "iter_pose_clips", "check_size",
    "check_num_frames", "MP4Writer", "probe_mp4", "check_output_writable", "load_audio_for_mux",
    "check_reference_image", "check_audio_duration", "LargeImageWarning", "MIN_IMAGE_SIDE",
]

SIZE_DIVISOR = 64
MIN_IMAGE_SIDE = 64  # a reference image smaller than one 64-pixel block on a side means nothing
LATENT_GROUP_FRAMES = 4  # video frames per latent frame (the VAE's temporal stride)
MODEL_FPS = 16  # the rate the model generates at

# Same keys/values as the reference's MAX_AREA_CONFIGS (wan/configs/__init__.py); every one of
# them is a supported S2V-14B size.
MAX_AREA_CONFIGS = {
    "720*1280": 720 * 1280,
    "1280*720": 1280 * 720,
    "480*832": 480 * 832,
    "832*480": 832 * 480,
    "704*1280": 704 * 1280,
    "1280*704": 1280 * 704,
    "1024*704": 1024 * 704,
    "704*1024": 704 * 1024,
}
DEFAULT_MAX_AREA = "1024*704"


# ------------------------------------------------------------------------------------------------
# Size selection
# ------------------------------------------------------------------------------------------------
def get_size_less_than_area(height: int, width: int, max_area: int = 1024 * 704,
                            divisor: int = 64) -> Tuple[int, int]:
    """Largest (H, W), both multiples of ``divisor``, with H*W <= max_area, keeping the aspect ratio
    of (height, width) as closely as the reference search does (spec §8.1).

    100 candidate scales from s_max down towards s_min; each gives (int(h*s), int(w*s)) rounded up
    to multiples of ``divisor``; the first whose area fits is returned. If none fits (only for
    max_area < divisor**2), the reference's aspect-ratio fallback is used; it can return 0 for a side.
    (The reference hard-codes 64 in the round-up step; identical for the default divisor.)
    """
    if isinstance(max_area, str):
        max_area = max_area_from_name(max_area)
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise InputError(f"image size {height}x{width} is invalid; use a non-empty image")
    if height * width <= max_area:
        max_scale, min_scale = 1.0, 0.1
    else:
        d = divisor - 1
        a = height * width
        b = d * (height + width)
        c = d ** 2 - max_area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))

    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        new_h, new_w = int(height * scale), int(width * scale)
        pad_h = (divisor - new_h % divisor) % divisor
        pad_w = (divisor - new_w % divisor) % divisor
        out_h, out_w = new_h + pad_h, new_w + pad_w
        if out_h * out_w <= max_area:
            return out_h, out_w

    # Fallback (degenerate: max_area smaller than one divisor x divisor block).
    aspect = width / height
    out_w = int((max_area * aspect) ** 0.5 // divisor * divisor)
    out_h = int((max_area / aspect) ** 0.5 // divisor * divisor)
    if out_w >= width or out_h >= height:
        out_w = int(width // divisor * divisor)
        out_h = int(height // divisor * divisor)
    return out_h, out_w


def max_area_from_name(name: Union[str, int]) -> int:
    """'480*832' -> 399360 (also accepts '480x832' and plain integers)."""
    if isinstance(name, int):
        return name
    key = str(name).strip().lower().replace("x", "*")
    if key in MAX_AREA_CONFIGS:
        return MAX_AREA_CONFIGS[key]
    raise InputError(f"unknown size '{name}'; use one of: {', '.join(MAX_AREA_CONFIGS)}")


# ------------------------------------------------------------------------------------------------
# Validators
# ------------------------------------------------------------------------------------------------
def _nearest_multiple(v: int, m: int) -> int:
    return max(m, int(round(v / m)) * m)


def check_size(height: int, width: int, divisor: int = SIZE_DIVISOR) -> Tuple[int, int]:
    """Raise InputError unless height and width are positive multiples of ``divisor``."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise InputError(f"{name} {v} is invalid; use a positive multiple of {divisor}, e.g. {divisor * 7}")
        if v % divisor:
            raise InputError(f"{name} {v} is not divisible by {divisor}; use e.g. "
                             f"{_nearest_multiple(int(v), divisor)}")
    return int(height), int(width)


def check_num_frames(n: int) -> int:
    """Frames per clip (infer_frames): a positive multiple of 4 (the VAE's temporal stride)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise InputError(f"--num-frames must be a positive integer divisible by 4 (got {n}); use e.g. 80")
    if n % 4:
        raise InputError(f"--num-frames must be divisible by 4 (got {n}); use e.g. {_nearest_multiple(int(n), 4)}")
    return int(n)


# ------------------------------------------------------------------------------------------------
# torchvision-equivalent Resize(int) / CenterCrop geometry
# ------------------------------------------------------------------------------------------------
def resized_size_shorter_side(h: int, w: int, size: int) -> Tuple[int, int]:
    """Output (h, w) of ``Resize(size)``: shorter side -> size, long side int(size*long/short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop_offsets(h: int, w: int, out_h: int, out_w: int):
    """torchvision CenterCrop geometry.

    Returns ((pad_left, pad_top, pad_right, pad_bottom), (top, left)): pad first (zeros,
    left = (W - w)//2, right = (W - w + 1)//2, same for top/bottom) where the image is smaller than
    the crop, then crop at top = int(round((h' - H)/2)), left = int(round((w' - W)/2)) (Python
    round: half to even) where it is larger.
    """
    pad = (
        (out_w - w) // 2 if out_w > w else 0,
        (out_h - h) // 2 if out_h > h else 0,
        (out_w - w + 1) // 2 if out_w > w else 0,
        (out_h - h + 1) // 2 if out_h > h else 0,
    )
    h2, w2 = h + pad[1] + pad[3], w + pad[0] + pad[2]
    top = int(round((h2 - out_h) / 2.0))
    left = int(round((w2 - out_w) / 2.0))
    return pad, (top, left)


def _center_crop_tensor(x: torch.Tensor, out_h: int, out_w: int, fill: float = 0.0) -> torch.Tensor:
    """CenterCrop on [..., h, w] with constant padding ``fill``."""
    h, w = x.shape[-2:]
    (pl, pt, pr, pb), (top, left) = center_crop_offsets(h, w, out_h, out_w)
    if pl or pt or pr or pb:
        x = F.pad(x, (pl, pr, pt, pb), mode="constant", value=fill)
    return x[..., top:top + out_h, left:left + out_w]


# ------------------------------------------------------------------------------------------------
# Reference image
# ------------------------------------------------------------------------------------------------
class LargeImageWarning(UserWarning):
    """The reference image is over PIL's decompression-bomb limit (decoded anyway)."""


_warned_large: set = set()  # images already warned about (one warning per file and process)


def _mpix(n: int) -> str:
    return f"{n / 1e6:.1f} megapixels"


def _open_image(path: str) -> Image.Image:
    """Image.open + load of a file (native mode), with PIL's decompression-bomb warning turned
    into one LargeImageWarning per file and its error into a one-line InputError."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f" has {_mpix(int(m.group(1)))}," if m else " is"
        raise InputError(f"reference image '{path}'{size} over PIL's decompression-bomb limit of "
                         f"{_mpix(2 * Image.MAX_IMAGE_PIXELS)}; downscale it (the video is at "
                         f"most about 1 megapixel)") from None
    for w in caught:
        if issubclass(w.category, Image.DecompressionBombWarning):
            key = os.path.abspath(path)
            if key not in _warned_large:
                _warned_large.add(key)
                iw, ih = img.size
                warnings.warn(LargeImageWarning(
                    f"reference image '{path}' is {iw}x{ih} ({_mpix(iw * ih)}), over PIL's "
                    f"decompression-bomb limit of {_mpix(Image.MAX_IMAGE_PIXELS)}; it is decoded "
                    f"anyway (slow, {iw * ih * 3 / 2**30:.1f} GiB as RGB) and resized to the video "
                    f"size: downscale it to skip this"), stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    try:
        img.load()
    except BaseException:
        img.close()
        raise
    return img


def open_image_rgb(path_or_pil) -> Image.Image:
    """Open an image file (or take a PIL image / uint8 HxWx3 array) as PIL RGB; InputError on failure."""
    if isinstance(path_or_pil, Image.Image):
        return path_or_pil.convert("RGB")
    if isinstance(path_or_pil, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(path_or_pil)).convert("RGB")
    if isinstance(path_or_pil, torch.Tensor):
        return Image.fromarray(path_or_pil.detach().cpu().numpy()).convert("RGB")
    path = _check_image_path(path_or_pil)
    try:
        with _open_image(path) as img:
            return img.convert("RGB")
    except InputError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, ...
        raise InputError(f"cannot decode reference image '{path}' ({type(e).__name__}); "
                         f"use a valid PNG or JPEG file") from None


def _check_image_path(path_or_pil) -> str:
    path = os.fspath(path_or_pil)
    if not os.path.exists(path):
        raise InputError(f"reference image '{path}' does not exist; check the --image path")
    if os.path.isdir(path):
        raise InputError(f"reference image '{path}' is a directory; pass an image file (PNG/JPEG)")
    return path


def check_reference_image(path) -> Tuple[int, int]:
    """CLI pre-check of ``--image``: the file decodes and is at least MIN_IMAGE_SIDE pixels on
    each side (one-line InputError otherwise). Returns (height, width)."""
    path = _check_image_path(path)
    try:
        with _open_image(path) as img:
            w, h = img.size
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot decode reference image '{path}' ({type(e).__name__}); "
                         f"use a valid PNG or JPEG file") from None
    if min(w, h) < MIN_IMAGE_SIDE:
        raise InputError(f"reference image '{path}' is {w}x{h} pixels; use one at least "
                         f"{MIN_IMAGE_SIDE} pixels on each side (the video is made of "
                         f"{SIZE_DIVISOR}-pixel blocks)")
    return h, w


def check_audio_duration(path, seconds: float, fps: int = MODEL_FPS, trim_to_audio: bool = True) -> None:
    """CLI pre-check of ``--audio``: at least one 4-frame latent group long, at the model's 16 fps
    (and, when the video is trimmed to the audio, at ``fps`` too: 4 output frames)."""
    rate = min(float(fps), MODEL_FPS) if trim_to_audio else MODEL_FPS
    need = LATENT_GROUP_FRAMES / rate
    if seconds < need - 1e-9:
        raise InputError(f"audio file '{os.fspath(path)}' is {seconds:.3f} s long; it must cover at "
                         f"least one {LATENT_GROUP_FRAMES}-frame latent group ({need:.2f} s at "
                         f"{rate:g} fps): use a longer audio file")


def image_size(path_or_pil) -> Tuple[int, int]:
    """(height, width) of the image (as the reference reads it for size selection)."""
    img = open_image_rgb(path_or_pil)
    return img.height, img.width


def load_reference_image(path_or_pil, height: int, width: int) -> torch.Tensor:
    """Reference image -> float32 [1, 3, 1, H, W] in [-1, 1] (spec §8.2).

    torchvision ``Resize(min(H, W))`` on a PIL image (PIL bilinear, antialiased) then
    ``CenterCrop((H, W))`` (zero = black padding), ``ToTensor``, ``*2 - 1``.
    """
    img = open_image_rgb(path_or_pil)
    w0, h0 = img.size
    new_h, new_w = resized_size_shorter_side(h0, w0, min(height, width))
    if (new_h, new_w) != (h0, w0):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, h, w]
    arr = _center_crop_tensor(arr, height, width, fill=0)
    x = arr.float().div(255)
    return x.unsqueeze(1).unsqueeze(0) * 2 - 1.0


# ------------------------------------------------------------------------------------------------
# Pose video
# ------------------------------------------------------------------------------------------------
def _iter_pose_frames(path, height: int, width: int, fps: int = 16):
    """Yield preprocessed pose frames [3, H, W] (float32, [-1, 1]) from the start of the video at
    stride max(1, round(src_fps / fps)). Raises InputError for unusable files."""
    import av  # local import: PyAV is only needed for pose input

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"pose video '{path}' does not exist; check the --pose-video path")
    if os.path.isdir(path):
        raise InputError(f"pose video '{path}' is a directory; pass a video file (MP4)")
    n = 0
    try:
        container = av.open(path)
    except Exception as e:
        raise InputError(f"cannot open pose video '{path}' ({type(e).__name__}); "
                         f"use a valid MP4 file") from None
    try:
        if not container.streams.video:
            raise InputError(f"pose video '{path}' has no video stream; pass a video file (MP4)")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        src_fps = float(rate) if rate else float(fps)
        interval = max(1, round(src_fps / fps))
        decoded = container.decode(stream)
        index = 0
        while True:
            try:
                frame = next(decoded)
            except StopIteration:
                break
            except Exception as e:
                raise InputError(f"cannot decode pose video '{path}' ({type(e).__name__}); "
                                 f"use a valid MP4 file") from None
            if index % interval == 0:
                rgb = frame.to_ndarray(format="rgb24")
                x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0) / 255.0 * 2 - 1.0
                h0, w0 = x.shape[-2:]
                nh, nw = resized_size_shorter_side(h0, w0, min(height, width))
                if (nh, nw) != (h0, w0):
                    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                                      antialias=True)
                yield _center_crop_tensor(x[0], height, width, fill=0.0)
                n += 1
            index += 1
    finally:
        container.close()
    if n == 0:
        raise InputError(f"pose video '{path}' contains no decodable frames; use a valid video file")


def read_pose_video(path, height: int, width: int, num_frames: int, fps: int = 16) -> torch.Tensor:
    """Pose video -> float32 [1, 3, num_frames, H, W] in [-1, 1] (spec §8.4).

    Frames from the start at stride max(1, round(src_fps / fps)), at most ``num_frames``; each is
    mapped to [-1, 1], resized (shorter side -> min(H, W), bilinear, antialiased, torchvision tensor
    path), centre-cropped with 0 padding (mid-grey); missing frames are -1.
    For long videos prefer :func:`iter_pose_clips` (one clip in memory at a time).
    """
    if num_frames <= 0:
        raise InputError(f"number of pose frames must be positive, got {num_frames}")
    out = torch.full((1, 3, num_frames, height, width), -1.0, dtype=torch.float32)
    frames = _iter_pose_frames(path, height, width, fps)
    for n, x in enumerate(frames):
        out[0, :, n] = x
        if n + 1 >= num_frames:
            frames.close()
            break
    return out


def iter_pose_clips(path, height: int, width: int, frames_per_clip: int, num_clips: int,
                    fps: int = 16):
    """Yield ``num_clips`` chunks [1, 3, frames_per_clip, H, W] equal to
    ``read_pose_video(path, H, W, frames_per_clip * num_clips).chunk(num_clips, dim=2)``,
    decoding the video once and holding one clip at a time."""
    if frames_per_clip <= 0 or num_clips <= 0:
        raise InputError(f"pose clips need positive sizes, got {frames_per_clip} x {num_clips}")
    frames = _iter_pose_frames(path, height, width, fps)
    exhausted = False
    for _ in range(num_clips):
        clip = torch.full((1, 3, frames_per_clip, height, width), -1.0, dtype=torch.float32)
        for k in range(frames_per_clip):
            if exhausted:
                break
            try:
                clip[0, :, k] = next(frames)
            except StopIteration:
                exhausted = True
        yield clip
    frames.close()
