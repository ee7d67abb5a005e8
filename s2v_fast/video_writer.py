"""MP4 output with PyAV (no ffmpeg binary): H.264 yuv420p (libx264, CRF 18) + AAC audio.

Differences from the reference's save path (imageio libx264 "quality 8", then an ffmpeg process
muxing AAC 192k with ``-shortest``) are deliberate and limited to the container step:

* frames are written clip by clip while sampling continues (nothing holds the whole video);
* the file is written to a hidden temporary name in the same directory (``.NAME.<pid>.partial``,
  never a video name) and atomically renamed to the requested path on success, so a crash never
  leaves a half-written file at ``path``;
* the MP4 is fragmented (``movflags frag_keyframe+empty_moov``; a keyframe, hence a new fragment,
  at the first frame of each clip; the file flushed at every fragment): a ``.partial`` left by a
  SIGKILL or a power loss opens and plays up to the last fragment on disk (every clip written
  but the latest, whose last frames the encoder still held). SIGINT / SIGTERM / SIGHUP arriving
  while a clip is written or the file finished are delivered right after, so the finished file
  holds whole clips only;
* one writer per output: an exclusive lock (``fcntl.flock`` on ``.NAME.lock`` next to the output,
  removed on release) refuses a second process writing the same output, and taking the lock
  removes the ``.partial`` files an earlier, killed run left for that output (:class:`OutputLock`);
* ``-shortest`` is made exact: with ``trim_to_audio`` (default) video frames starting at or after
  the end of the audio are dropped, and audio past the end of the video is cut (for example when
  the number of clips was capped). Audio starts at pts 0 (the reference's 3-frame lead of the
  picture, spec §8.8, is kept).

Pixel mapping is the reference's: clamp to [-1, 1], (x + 1) / 2, * 255, truncate to uint8.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
from fractions import Fraction
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import InputError, S2VError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: outputs are not locked
    fcntl = None

__all__ = ["MP4Writer", "OutputLock", "OutputBusyError", "probe_mp4", "check_output_writable",
           "check_output_name", "load_audio_for_mux", "frames_to_uint8", "OUTPUT_EXTENSIONS",
           "partial_path", "lock_path", "stale_partials", "signals_deferred"]

# Sample rates the AAC encoder accepts.
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
_AAC_FRAME = 1024

# Output name extension -> PyAV muxer: H.264 + AAC go in ISO base media files; a .gif / .avi /
# .mkv name would get bytes that do not match it.
OUTPUT_EXTENSIONS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}

# Fragmented MP4 (playable at every fragment), written through to the file at every fragment;
# delay_moov writes the header with the first fragment, once the encoders' delays are known, so
# the edit lists (B-frame offset, AAC priming) and hence A/V sync are those of a plain MP4.
_MUX_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof+delay_moov", "flush_packets": "1"}


def check_output_name(path) -> str:
    """Raise InputError unless ``path`` ends in an MP4-family extension; returns the muxer name."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in OUTPUT_EXTENSIONS:
        what = f"extension '{ext}'" if ext else "no extension"
        raise InputError(f"output '{os.fspath(path)}' has {what}; the video is H.264 + AAC in an "
                         f"MP4 file: use a name ending in .mp4 (or .m4v, .mov)")
    return OUTPUT_EXTENSIONS[ext]


def check_output_writable(path) -> str:
    """Raise InputError (before any heavy work) unless ``path`` is an MP4-family name that can be
    created/overwritten.

    Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"output path '{path}' is a directory; pass a file name such as out.mp4")
    check_output_name(path)
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


# ------------------------------------------------------------------------------------------------
# hidden files next to the output: the partial file and the lock


def partial_path(path, pid: Optional[int] = None) -> str:
    """``DIR/.NAME.<pid>.partial``: where the writer of ``DIR/NAME`` writes until it is done."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(d, f".{name}.{os.getpid() if pid is None else pid}.partial")


def lock_path(path) -> str:
    """``DIR/.NAME.lock``: the lock file of output ``DIR/NAME`` (exists while a run holds it)."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(d, f".{name}.lock")


def stale_partials(path) -> List[str]:
    """The partial files of output ``path`` in its directory: ``.NAME.<pid>.partial`` and the
    older naming ``.STEM.<pid>.partial.mp4`` (STEM: NAME without .mp4). Stale whenever the
    output's lock is held: every live writer of the output holds it."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    stem = name[:-4] if name.lower().endswith(".mp4") else name
    pattern = re.compile(rf"\.{re.escape(name)}\.\d+\.partial|\.{re.escape(stem)}\.\d+\.partial\.mp4")
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(os.path.join(d, n) for n in names if pattern.fullmatch(n))


class OutputBusyError(InputError):
    """Another process is writing the same output file."""


class OutputLock:
    """Exclusive lock on one output path, one process at a time: ``fcntl.flock`` on ``.NAME.lock``
    next to the output. The lock file holds the owner's pid and is removed on release; one left
    by a killed process is not locked any more (the kernel drops flocks with the process), so it
    never blocks the next run, which takes it over.

    Re-entrant within a process (:meth:`acquire` returns the held lock with one more reference):
    the CLI takes it before loading the model, the :class:`MP4Writer` of the same run again.
    Taking it the first time removes the partial files an earlier, killed run left for this
    output (``removed`` lists them).
    """

    _held: dict = {}
    _guard = threading.RLock()

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self.lock_path = lock_path(self.path)
        self.removed: List[str] = []
        self._fd: Optional[int] = None
        self._refs = 0

    @classmethod
    def acquire(cls, path) -> "OutputLock":
        """The lock of ``path``; OutputBusyError (one line) when another process holds it."""
        key = os.path.abspath(os.fspath(path))
        with cls._guard:
            lock = cls._held.get(key)
            if lock is None:
                lock = cls(key)
                lock._lock()
                cls._held[key] = lock
            lock._refs += 1
            return lock

    @classmethod
    def is_held(cls, path) -> bool:
        """Whether this process holds the lock of ``path``."""
        return os.path.abspath(os.fspath(path)) in cls._held

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise InputError(f"cannot create the lock file '{self.lock_path}' ({e.strerror}); "
                                 f"choose another --output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_pid(fd)
                os.close(fd)
                who = f"another s2v-fast run (pid {owner})" if owner else "another s2v-fast run"
                raise OutputBusyError(f"'{self.path}' is being written by {who}; wait for it to "
                                      f"finish or choose another --output") from None
            except OSError:  # no flock on this file system: go on unlocked
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.remove(self.lock_path)
                return
            try:  # still the file at lock_path? (an owner unlinks it before unlocking)
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - lost the race 20 times in a row
            raise OutputBusyError(f"'{self.path}' is being written by another s2v-fast run; "
                                  f"wait for it to finish or choose another --output")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        for stale in stale_partials(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
                self.removed.append(stale)

    def release(self) -> None:
        """Drop one reference; the last one removes the lock file, then unlocks."""
        with self._guard:
            if self._refs <= 0:
                return
            self._refs -= 1
            if self._refs:
                return
            if self._held.get(self.path) is self:
                del self._held[self.path]
            if self._fd is not None:
                with contextlib.suppress(OSError):  # unlink while still locked: see _lock
                    os.remove(self.lock_path)
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _read_pid(fd: int) -> Optional[int]:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


_DEFERRED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def signals_deferred():
    """Run the block whole: SIGINT / SIGTERM / SIGHUP arriving meanwhile are delivered right
    after it, to the handler (or default action) they would have met. Main thread only (only
    there can handlers change); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list = []
    saved = {}
    for sig in _DEFERRED_SIGNALS:
        old = signal.getsignal(sig)
        if old is None or old == signal.SIG_IGN:  # set outside Python, or ignored: leave it
            continue
        saved[sig] = old
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


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

    A ``write_frames`` call (a clip) starts with a keyframe, hence a new MP4 fragment, when at
    least a second of video was written since the last one. The writer holds the output's
    :class:`OutputLock` from construction to finish / abort.
    """

    _active: set = set()  # outputs with an open writer in this process

    def __init__(self, path, fps=16, audio_path=None, crf: int = 18, trim_to_audio: bool = True,
                 audio_sample_rate: Optional[int] = None, audio_bitrate: int = 192000,
                 preset: str = "medium", live: bool = False):
        self._closed = True  # until the lock is held: nothing to undo before
        self.finished = False
        self._lock = None
        self._container = None
        self.path = check_output_writable(path)
        self.format = check_output_name(self.path)
        # live (the streaming mode): write the output itself, one fragment per write_frames
        # call, with a zero-latency encoder, so a player can open it while it grows; it is
        # playable at every point, so an interrupted run keeps what it wrote
        self.live = bool(live)
        self.tmp_path = self.path if self.live else partial_path(self.path)
        self.fps = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
        if self.fps <= 0:
            raise InputError(f"fps must be positive, got {fps}")
        self.crf = int(crf)
        self.preset = preset
        self.trim_to_audio = bool(trim_to_audio)
        self.audio_bitrate = int(audio_bitrate)
        self.frames_written = 0
        self.frames_dropped = 0
        self.chunks_written = 0  # write_frames calls that wrote at least one frame (clips)
        self._vstream = None
        self._astream = None
        self._size = None
        self._audio = None
        self._audio_rate = None
        self._audio_pos = 0
        self._last_key = None
        if audio_path is not None:
            audio, rate = load_audio_for_mux(audio_path, audio_sample_rate)
            if rate not in _AAC_RATES:  # AAC cannot store arbitrary rates: resample upwards
                target = next((r for r in _AAC_RATES if r >= rate), _AAC_RATES[-1])
                audio, rate = load_audio_for_mux(audio_path, target)
            self._audio, self._audio_rate = audio, rate
        if self.path in MP4Writer._active:
            raise S2VError(f"another MP4Writer of this process is writing '{self.path}'; "
                           f"finish or abort it first")
        self._lock = OutputLock.acquire(self.path)  # OutputBusyError: another process writes it
        MP4Writer._active.add(self.path)
        self._closed = False

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
        self._container = av.open(self.tmp_path, mode="w", format=self.format,
                                  options=dict(_MUX_OPTIONS))
        vs = self._container.add_stream("libx264", rate=self.fps)
        vs.width, vs.height = width, height
        vs.pix_fmt = "yuv420p"
        self._frame_tb = Fraction(1) / self.fps
        vs.time_base = self._frame_tb
        vs.codec_context.time_base = self._frame_tb
        vs.options = {"crf": str(self.crf), "preset": self.preset}
        if self.live:
            vs.options["tune"] = "zerolatency"  # no lookahead / B-frames: packets leave at once
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
        """Append frames; returns how many were written (fewer when trimmed to the audio).

        Interrupt signals arriving meanwhile are delivered when it returns: a clip is in the
        file whole or not at all."""
        if self._closed:
            raise RuntimeError("MP4Writer is closed")
        arr = frames_to_uint8(frames)
        if arr.shape[0] == 0:
            return 0
        with signals_deferred():
            return self._write(arr)

    def _write(self, arr: np.ndarray) -> int:
        import av

        t, h, w, _ = arr.shape
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
            gap = 0 if self.live else self.fps
            if i == 0 and (self._last_key is None or self.frames_written - self._last_key >= gap):
                frame.pict_type = av.video.frame.PictureType.I  # keyframe: a new fragment
                self._last_key = self.frames_written
            for packet in self._vstream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        self._write_audio(final=False)
        if arr.shape[0]:
            self.chunks_written += 1
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
        """Flush encoders, close the file and atomically move it to ``path``. Returns ``path``.

        Interrupt signals arriving meanwhile are delivered after it: a finish is never cut short."""
        if self.finished:
            return self.path
        if self._closed:
            raise S2VError(f"the writer of '{self.path}' was aborted; nothing was written")
        if self.frames_written == 0:
            self.abort()
            if self.frames_dropped:
                raise S2VError(f"no video frames were written to '{self.path}': the audio is shorter "
                               f"than one frame; use a longer audio file")
            raise S2VError(f"no video frames were written to '{self.path}'; nothing was generated")
        with signals_deferred():
            try:
                self._write_audio(final=True)
                for packet in self._vstream.encode(None):
                    self._container.mux(packet)
                if self._astream is not None:
                    for packet in self._astream.encode(None):
                        self._container.mux(packet)
                self._container.close()
                self._container = None
                if self.tmp_path != self.path:
                    os.replace(self.tmp_path, self.path)
            except BaseException:
                self.abort()
                raise
            self.finished = True
            self._release()
        return self.path

    close = finish

    def abort(self):
        """Drop everything written so far; nothing is left on disk (a finished file stays)."""
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass
            self._container = None
        if not self.finished and not self._closed:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp_path)
        self._release()

    def _release(self):
        if not self._closed:
            MP4Writer._active.discard(self.path)
        self._closed = True
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.release()

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
    if info["n_audio_streams"]:  # the played length: the packets' end, encoder priming excluded
        with av.open(path) as c:  # (a fragmented file's stream duration counts the priming)
            st = c.streams.audio[0]
            end = max((p.pts + p.duration for p in c.demux(st) if p.pts is not None and p.duration),
                      default=None)
            if end is not None and st.time_base:
                info["audio_duration"] = float((end - max(0, st.start_time or 0)) * st.time_base)
    return info
