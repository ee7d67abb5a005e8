"""MP4 output with PyAV (no ffmpeg binary): H.264 yuv420p (libx264, CRF 18) + AAC audio.

Differences from the reference's save path (imageio libx264 "quality 8", then an ffmpeg process
muxing AAC 192k with ``-shortest``) are deliberate and limited to the container step:

* frames are written clip by clip while sampling continues (nothing holds the whole video);
* the file is written to a hidden temporary name in the same directory and atomically renamed to
  the requested path on success, so a crash never leaves a half-written file at ``path``;
* ``-shortest`` is made exact: with ``trim_to_audio`` (default) video frames starting at or after
  the end of the audio are dropped, and audio past the end of the video is cut (for example when
  the number of clips was capped). Audio starts at pts 0 (the reference's 3-frame lead of the
  picture, spec §8.8, is kept).

Pixel mapping is the reference's: clamp to [-1, 1], (x + 1) / 2, * 255, truncate to uint8.
"""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np
import torch

from .errors import InputError, S2VError

__all__ = ["MP4Writer", "probe_mp4", "check_output_writable", "load_audio_for_mux",
           "frames_to_uint8"]

# Sample rates the AAC encoder accepts.
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
_AAC_FRAME = 1024


def check_output_writable(path) -> str:
    """Raise InputError (before any heavy work) unless ``path`` can be created/overwritten.

    Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"output path '{path}' is a directory; pass a file name such as out.mp4")
    d = os.path.dirname(path)
    if not os.path.isdir(d):
        raise InputError(f"output directory '{d}' does not exist; create it or choose another --output")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise InputError(f"output file '{path}' is not writable; choose another --output")
    try:  # a real probe: os.access is not reliable (root, read-only mounts, ACLs)
        fd, probe = tempfile.mkstemp(prefix=".s2v_write_test_", dir=d)
        os.close(fd)
        os.remove(probe)
    except OSError:
        raise InputError(f"output directory '{d}' is not writable; choose another --output") from None
    return path


def load_audio_for_mux(path, sample_rate: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """Decode an audio file at its native rate (or ``sample_rate``) with PyAV.

    Returns (float32 [channels, samples] with channels 1 or 2 (more are down-mixed to stereo),
    sample_rate). Raises InputError for missing / undecodable / empty audio.
    """
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"audio file '{path}' does not exist; check the --audio path")
    chunks = []
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                raise InputError(f"'{path}' has no audio stream; pass a WAV/MP3/FLAC file")
            stream = container.streams.audio[0]
            src_rate = stream.codec_context.sample_rate or stream.rate
            channels = stream.codec_context.channels or 1
            rate = int(sample_rate or src_rate)
            layout = "mono" if channels == 1 else "stereo"
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot decode audio file '{path}' ({type(e).__name__}); "
                         f"use a valid WAV/MP3/FLAC file") from None
    if not chunks:
        raise InputError(f"audio file '{path}' contains no samples; use a non-empty audio file")
    audio = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)
    if audio.shape[1] == 0:
        raise InputError(f"audio file '{path}' contains no samples; use a non-empty audio file")
    return audio, rate


def frames_to_uint8(frames) -> np.ndarray:
    """float [3, T, H, W] (or [1, 3, T, H, W]) in [-1, 1] or uint8 [T, H, W, 3] -> uint8 [T, H, W, 3]."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if frames.dtype == torch.uint8:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got {tuple(frames.shape)}")
        return frames.cpu().numpy()
    if frames.dim() == 5 and frames.shape[0] == 1:
        frames = frames[0]
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"float frames must be [3, T, H, W] in [-1, 1], got {tuple(frames.shape)}")
    x = frames.detach().float().clamp(-1, 1)
    x = ((x + 1) / 2 * 255).to(torch.uint8)          # truncation, as the reference
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class MP4Writer:
    """Streaming MP4 writer (H.264 yuv420p CRF ``crf`` + optional AAC audio), atomic on success.

    with MP4Writer("out.mp4", fps=16, audio_path="speech.wav") as w:
        for clip in clips:             # float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3]
            w.write_frames(clip)
    # -> out.mp4 appears only here; on an exception the temporary file is removed.
    """

    def __init__(self, path, fps=16, audio_path=None, crf: int = 18, trim_to_audio: bool = True,
                 audio_sample_rate: Optional[int] = None, audio_bitrate: int = 192000,
                 preset: str = "medium"):
        self.path = check_output_writable(path)
        d, name = os.path.split(self.path)
        stem = name[:-4] if name.lower().endswith(".mp4") else name
        self.tmp_path = os.path.join(d, f".{stem}.{os.getpid()}.partial.mp4")
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        if self.fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.crf = int(crf)
        self.preset = preset
        self.trim_to_audio = bool(trim_to_audio)
        self.audio_bitrate = int(audio_bitrate)
        self.frames_written = 0
        self.frames_dropped = 0
        self._container = None
        self._vstream = None
        self._astream = None
        self._size = None
        self._closed = False
        self._audio = None
        self._audio_rate = None
        self._audio_pos = 0
        if audio_path is not None:
            audio, rate = load_audio_for_mux(audio_path, audio_sample_rate)
            if rate not in _AAC_RATES:  # AAC cannot store arbitrary rates: resample upwards
                target = next((r for r in _AAC_RATES if r >= rate), _AAC_RATES[-1])
                audio, rate = load_audio_for_mux(audio_path, target)
            self._audio, self._audio_rate = audio, rate

    # -- properties ---------------------------------------------------------------------------
    @property
    def audio_duration(self) -> Optional[float]:
        return None if self._audio is None else self._audio.shape[1] / self._audio_rate

    @property
    def max_frames(self) -> Optional[int]:
        """Frames that start before the audio ends (only when trimming to audio)."""
        if self._audio is None or not self.trim_to_audio:
            return None
        n, sr = self._audio.shape[1], self._audio_rate
        num = n * self.fps.numerator
        den = sr * self.fps.denominator
        return -(-num // den)  # ceil(n * fps / sr)

    # -- open / write -------------------------------------------------------------------------
    def _open(self, height: int, width: int):
        import av

        if height % 2 or width % 2:
            raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
        self._size = (height, width)
        self._container = av.open(self.tmp_path, mode="w", format="mp4",
                                  options={"movflags": "+faststart"})
        vs = self._container.add_stream("libx264", rate=self.fps)
        vs.width, vs.height = width, height
        vs.pix_fmt = "yuv420p"
        self._frame_tb = Fraction(1) / self.fps
        vs.time_base = self._frame_tb
        vs.codec_context.time_base = self._frame_tb
        vs.options = {"crf": str(self.crf), "preset": self.preset}
        self._vstream = vs
        if self._audio is not None:
            channels = self._audio.shape[0]
            ast = self._container.add_stream("aac", rate=self._audio_rate)
            ast.layout = "mono" if channels == 1 else "stereo"
            ast.format = "fltp"
            # The AAC encoder caps bits per frame at 6144 per channel.
            ast.bit_rate = min(self.audio_bitrate, 6 * self._audio_rate * channels)
            ast.time_base = Fraction(1, self._audio_rate)
            self._astream = ast

    def write_frames(self, frames) -> int:
        """Append frames; returns how many were written (fewer when trimmed to the audio)."""
        import av

        if self._closed:
            raise RuntimeError("MP4Writer is closed")
        arr = frames_to_uint8(frames)
        t, h, w, _ = arr.shape
        if t == 0:
            return 0
        if self._container is None:
            self._open(h, w)
        elif (h, w) != self._size:
            raise ValueError(f"frame size changed from {self._size} to {(h, w)}")
        limit = self.max_frames
        if limit is not None:
            keep = max(0, min(t, limit - self.frames_written))
            self.frames_dropped += t - keep
            arr = arr[:keep]
        for i in range(arr.shape[0]):
            frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = self._frame_tb  # not the stream's: the muxer may change that
            for packet in self._vstream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        self._write_audio(final=False)
        return arr.shape[0]

    def _audio_target(self) -> int:
        """Audio samples covered by the video written so far (never more than the audio)."""
        sr = self._audio_rate
        n = self.frames_written * sr * self.fps.denominator // self.fps.numerator
        return min(self._audio.shape[1], n)

    def _write_audio(self, final: bool):
        import av

        if self._astream is None:
            return
        target = self._audio_target()
        if not final:  # whole AAC frames only until the end
            target = self._audio_pos + (target - self._audio_pos) // _AAC_FRAME * _AAC_FRAME
        layout = "mono" if self._audio.shape[0] == 1 else "stereo"
        while self._audio_pos < target:
            n = min(_AAC_FRAME, target - self._audio_pos)
            chunk = np.ascontiguousarray(self._audio[:, self._audio_pos:self._audio_pos + n])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = self._audio_rate
            frame.pts = self._audio_pos
            frame.time_base = Fraction(1, self._audio_rate)
            for packet in self._astream.encode(frame):
                self._container.mux(packet)
            self._audio_pos += n

    # -- finish / abort ---------------------------------------------------------------------------
    def finish(self) -> str:
        """Flush encoders, close the file and atomically move it to ``path``. Returns ``path``."""
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            if self.frames_dropped:
                raise S2VError(f"no video frames were written to '{self.path}': the audio is shorter "
                               f"than one frame; use a longer audio file")
            raise S2VError(f"no video frames were written to '{self.path}'; nothing was generated")
        try:
            self._write_audio(final=True)
            for packet in self._vstream.encode(None):
                self._container.mux(packet)
            if self._astream is not None:
                for packet in self._astream.encode(None):
                    self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.path

    close = finish

    def abort(self):
        """Drop everything written so far; nothing is left on disk."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        try:
            os.remove(self.tmp_path)
        except FileNotFoundError:
            pass
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        self.finish()
        return False

    def __del__(self):
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


def probe_mp4(path) -> dict:
    """Stream facts of an MP4 (for tests and the CLI summary)."""
    import av

    path = os.fspath(path)
    info = dict(video_frames=0, fps=None, width=None, height=None, audio_duration=None,
                video_duration=None, n_video_streams=0, n_audio_streams=0, video_codec=None,
                pix_fmt=None, audio_codec=None, audio_sample_rate=None, audio_channels=None,
                audio_start=None)
    with av.open(path) as c:
        info["n_video_streams"] = len(c.streams.video)
        info["n_audio_streams"] = len(c.streams.audio)
        if c.streams.video:
            vs = c.streams.video[0]
            info["video_codec"] = vs.codec_context.name
            info["pix_fmt"] = vs.codec_context.pix_fmt
            info["width"], info["height"] = vs.codec_context.width, vs.codec_context.height
            rate = vs.average_rate or vs.guessed_rate
            info["fps"] = float(rate) if rate else None
            frames = vs.frames
            if not frames:
                frames = sum(1 for p in c.demux(vs) if p.size)
            info["video_frames"] = int(frames)
            if vs.duration is not None and vs.time_base:
                info["video_duration"] = float(vs.duration * vs.time_base)
            elif info["fps"]:
                info["video_duration"] = frames / info["fps"]
        if c.streams.audio:
            st = c.streams.audio[0]
            info["audio_codec"] = st.codec_context.name
            info["audio_sample_rate"] = st.codec_context.sample_rate
            info["audio_channels"] = st.codec_context.channels
            if st.duration is not None and st.time_base:
                info["audio_duration"] = float(st.duration * st.time_base)
            if st.start_time is not None and st.time_base:
                info["audio_start"] = float(st.start_time * st.time_base)
    return info
