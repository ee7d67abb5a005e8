"""MP4Writer (PyAV): H.264 yuv420p + AAC, clip-by-clip, atomic rename, audio trimming."""
import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from s2v_fast.errors import InputError, S2VError
from s2v_fast.video_writer import (MP4Writer, check_output_writable, frames_to_uint8,
                                   load_audio_for_mux, probe_mp4)


def _wav(path, seconds, sr=16000, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    if channels == 2:
        x = np.stack([x, 0.5 * x], axis=1)
    sf.write(str(path), x.astype(np.float32), sr)
    return str(path)


def _clip(t=20, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, t, h, w, generator=g) * 2 - 1


def test_two_clips_with_audio(tmp_path):
    wav = _wav(tmp_path / "a.wav", 3.0)                   # 48 frames of audio
    out = tmp_path / "out.mp4"
    with MP4Writer(str(out), fps=16, audio_path=wav) as w:
        for r in range(2):
            w.write_frames(_clip(seed=r))
            assert not out.exists()                         # never visible before finish
            assert os.path.exists(w.tmp_path)
            assert os.path.dirname(w.tmp_path) == str(tmp_path)
    assert out.exists() and not os.path.exists(w.tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "out.mp4"]
    info = probe_mp4(out)
    assert info["n_video_streams"] == 1 and info["n_audio_streams"] == 1
    assert info["video_frames"] == 40 and info["fps"] == 16.0
    assert (info["width"], info["height"]) == (96, 64)
    assert info["video_codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    assert info["audio_codec"] == "aac" and info["audio_sample_rate"] == 16000
    # video (2.5 s) ended first: the audio is cut to the video length and starts at 0
    assert info["audio_duration"] == pytest.approx(2.5, abs=0.07)
    assert info["audio_start"] == pytest.approx(0.0, abs=1e-3)


def test_trim_to_audio(tmp_path):
    wav = _wav(tmp_path / "a.wav", 2.3)                   # ceil(2.3 * 16) = 37 frames
    out = tmp_path / "trim.mp4"
    w = MP4Writer(str(out), audio_path=wav)
    written = [w.write_frames(_clip(seed=r)) for r in range(3)]
    w.finish()
    assert written == [20, 17, 0] and w.frames_dropped == 23
    info = probe_mp4(out)
    assert info["video_frames"] == 37
    assert info["audio_duration"] == pytest.approx(2.3, abs=0.07)
    # without trimming all frames are kept
    out2 = tmp_path / "notrim.mp4"
    with MP4Writer(str(out2), audio_path=wav, trim_to_audio=False) as w2:
        for r in range(3):
            w2.write_frames(_clip(seed=r))
    info2 = probe_mp4(out2)
    assert info2["video_frames"] == 60
    assert info2["audio_duration"] == pytest.approx(2.3, abs=0.07)


def test_stereo_and_unusual_rate(tmp_path):
    wav = _wav(tmp_path / "s.wav", 1.0, sr=44100, channels=2)
    audio, sr = load_audio_for_mux(wav)
    assert audio.shape[0] == 2 and sr == 44100 and audio.dtype == np.float32
    out = tmp_path / "st.mp4"
    with MP4Writer(str(out), audio_path=wav) as w:
        w.write_frames(_clip(t=16))
    info = probe_mp4(out)
    assert info["audio_channels"] == 2 and info["audio_sample_rate"] == 44100
    odd = _wav(tmp_path / "odd.wav", 1.0, sr=12345)
    out2 = tmp_path / "odd.mp4"
    with MP4Writer(str(out2), audio_path=odd) as w:
        w.write_frames(_clip(t=16))
    info2 = probe_mp4(out2)
    assert info2["audio_sample_rate"] in (16000,) and info2["audio_duration"] == pytest.approx(1.0, abs=0.07)


def test_no_audio_uint8_and_pixels(tmp_path):
    out = tmp_path / "v.mp4"
    yy, xx = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 96), indexing="ij")
    frame = np.stack([yy * 255, xx * 255, (1 - yy) * 200], axis=-1).astype(np.uint8)
    frames = np.repeat(frame[None], 8, axis=0)
    with MP4Writer(str(out)) as w:
        w.write_frames(torch.from_numpy(frames))
        w.write_frames(frames)                               # numpy also accepted
    info = probe_mp4(out)
    assert info["n_audio_streams"] == 0 and info["video_frames"] == 16
    import av

    with av.open(str(out)) as c:
        dec = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert np.abs(dec.astype(np.float32) - frame).mean() < 3.0  # CRF 18 on a smooth gradient


def test_float_mapping_is_reference():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6).expand(3, 1, 1, 6)
    u = frames_to_uint8(x)
    assert u.shape == (1, 1, 6, 3)
    assert u[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]     # truncation, not rounding
    assert frames_to_uint8(x.to(torch.bfloat16)).tolist() == u.tolist()
    assert frames_to_uint8(x.unsqueeze(0)).tolist() == u.tolist()    # [1, 3, T, H, W]


def test_abort_and_exception_leave_nothing(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with MP4Writer(str(out)) as w:
            w.write_frames(_clip(t=4))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    w = MP4Writer(str(out))
    w.write_frames(_clip(t=4))
    w.abort()
    assert os.listdir(tmp_path) == []


def test_zero_frames_raises(tmp_path):
    out = tmp_path / "empty.mp4"
    w = MP4Writer(str(out))
    with pytest.raises(S2VError, match="no video frames"):
        w.finish()
    assert os.listdir(tmp_path) == []


def test_existing_output_replaced_atomically(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    with MP4Writer(str(out)) as w:
        w.write_frames(_clip(t=4))
        assert out.read_bytes() == b"old"
    assert probe_mp4(out)["video_frames"] == 4


def test_output_path_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_output_writable(str(tmp_path / "nope" / "o.mp4"))
    with pytest.raises(InputError, match="is a directory"):
        check_output_writable(str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        MP4Writer(str(tmp_path / "nope" / "o.mp4"))
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        with pytest.raises(InputError, match="not writable"):
            check_output_writable("/proc/s2v_out.mp4")
    assert check_output_writable(str(tmp_path / "ok.mp4")) == str(tmp_path / "ok.mp4")
    assert os.listdir(tmp_path) == []


def test_audio_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        MP4Writer(str(tmp_path / "o.mp4"), audio_path=str(tmp_path / "none.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000garbage")
    with pytest.raises(InputError):
        MP4Writer(str(tmp_path / "o.mp4"), audio_path=str(bad))


# ----------------------------------------------------------------------------- faults (issue 30)
def _decodable(path):
    """Frames PyAV decodes from a (possibly cut) file; None when it does not open."""
    import av

    try:
        c = av.open(str(path))
    except av.error.InvalidDataError:
        return None
    n = 0
    with c:
        try:
            for _ in c.decode(video=0):
                n += 1
        except av.error.InvalidDataError:
            pass
    return n


def test_partial_is_playable_while_writing(tmp_path):
    """Fragmented MP4: a copy of the partial taken after each clip (what a SIGKILL or power loss
    leaves) plays every clip but the one the encoder still holds; the finished file cut anywhere
    plays up to the cut."""
    import shutil

    out = tmp_path / "o.mp4"
    snaps = []
    with MP4Writer(str(out), audio_path=_wav(tmp_path / "a.wav", 10.0)) as w:
        assert os.path.basename(w.tmp_path) == f".o.mp4.{os.getpid()}.partial"
        for r in range(3):
            w.write_frames(_clip(t=48, seed=r))
            shutil.copy(w.tmp_path, tmp_path / f"snap{r}")
            snaps.append(_decodable(tmp_path / f"snap{r}"))
    assert snaps[0] in (None, 0) and snaps[1] >= 48 and snaps[2] >= 96  # one clip behind
    data = out.read_bytes()
    for frac in (0.2, 0.5, 0.8, 0.99):  # (noise frames: bytes ~ frames)
        cut = tmp_path / "cut.mp4"
        cut.write_bytes(data[:int(len(data) * frac)])
        assert _decodable(cut) >= 144 * frac - 24, frac
    info = probe_mp4(out)
    assert info["video_frames"] == 144 and info["audio_duration"] == pytest.approx(9.0, abs=0.01)


def test_output_names(tmp_path):
    for name in ("clip.gif", "clip.avi", "clip.mkv", "clip", "clip.mp4.tmp"):
        with pytest.raises(InputError, match="use a name ending in .mp4") as e:
            MP4Writer(str(tmp_path / name))
        assert "\n" not in str(e.value)
    for name in ("a.mov", "b.M4V", "c.MP4"):
        with MP4Writer(str(tmp_path / name)) as w:
            w.write_frames(_clip(t=4))
        assert probe_mp4(tmp_path / name)["video_frames"] == 4
    assert sorted(os.listdir(tmp_path)) == ["a.mov", "b.M4V", "c.MP4"]


def test_lock_refuses_a_second_writer_and_cleans_stale_partials(tmp_path):
    import fcntl

    from s2v_fast.video_writer import OutputBusyError, OutputLock, lock_path

    out = tmp_path / "o.mp4"
    (tmp_path / ".o.mp4.99999.partial").write_bytes(b"x")   # left by a killed run
    (tmp_path / ".o.4242.partial.mp4").write_bytes(b"x")    # the same, older naming
    (tmp_path / ".other.mp4.5.partial").write_bytes(b"x")   # another output's: kept
    (tmp_path / ".o.mp4.lock").write_text("99999\n")         # a dead owner's lock file
    with OutputLock.acquire(out) as lock:
        assert sorted(os.path.basename(p) for p in lock.removed) == [".o.4242.partial.mp4",
                                                                    ".o.mp4.99999.partial"]
        assert open(lock_path(out)).read() == f"{os.getpid()}\n"
        with MP4Writer(str(out)) as w:  # the same process: re-entrant
            w.write_frames(_clip(t=4))
        assert os.path.exists(lock_path(out))  # still held by the outer reference
        with pytest.raises(S2VError, match="another MP4Writer of this process"):
            w1 = MP4Writer(str(out))
            MP4Writer(str(out))
        w1.abort()
    assert sorted(os.listdir(tmp_path)) == [".other.mp4.5.partial", "o.mp4"]

    # another process holds it: flock from a second open file description acts as one
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4321\n")
    try:
        with pytest.raises(OutputBusyError) as e:
            MP4Writer(str(out))
        assert str(e.value) == (f"'{out}' is being written by another s2v-fast run (pid 4321); "
                                f"wait for it to finish or choose another --output")
    finally:
        os.close(fd)
    os.remove(lock_path(out))
    assert sorted(os.listdir(tmp_path)) == [".other.mp4.5.partial", "o.mp4"]


def test_signals_wait_for_the_clip_and_the_finish(tmp_path):
    """SIGTERM during write_frames / finish reaches its handler only after the call."""
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(("handler", signum))

    class W(MP4Writer):
        def _write(self, arr):
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("writing")
            return super()._write(arr)

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        w = W(str(tmp_path / "o.mp4"))
        w.write_frames(_clip(t=4))
        seen.append("returned")
        assert seen == ["writing", ("handler", signal.SIGTERM), "returned"]
        assert signal.getsignal(signal.SIGTERM) is handler
        w.finish()
    finally:
        signal.signal(signal.SIGTERM, prev)
    assert probe_mp4(tmp_path / "o.mp4")["video_frames"] == 4


def test_finish_after_abort_raises(tmp_path):
    w = MP4Writer(str(tmp_path / "o.mp4"))
    w.write_frames(_clip(t=4))
    w.abort()
    with pytest.raises(S2VError, match="was aborted"):
        w.finish()
    assert os.listdir(tmp_path) == []
