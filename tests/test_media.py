"""Preprocessing: size selection, reference image, pose video, validators (spec §8.1, §8.2, §8.4)."""
import json
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from s2v_fast.errors import InputError
from s2v_fast.media import (MAX_AREA_CONFIGS, center_crop_offsets, check_num_frames, check_size,
                            get_size_less_than_area, image_size, iter_pose_clips,
                            load_reference_image,
                            max_area_from_name, read_pose_video, resized_size_shorter_side)
from util import fixture, load_fixture, rel_err


@pytest.fixture(scope="module")
def pu():
    with open(fixture("manifest.json")) as f:
        tol = json.load(f)["tolerance_per_tensor"]
    return (load_fixture("pipeline_utils", "inputs.safetensors"),
            load_fixture("pipeline_utils", "outputs.safetensors"), tol)


def test_size_table_exact(pu):
    _, out, _ = pu
    table = out["size_table"]
    assert table.shape[0] == 18
    for h, w, area, oh, ow in table.tolist():
        assert get_size_less_than_area(h, w, area) == (oh, ow), (h, w, area)


def test_size_examples_and_configs():
    assert MAX_AREA_CONFIGS["480*832"] == 399360
    assert MAX_AREA_CONFIGS["720*1280"] == 921600
    assert MAX_AREA_CONFIGS["1024*704"] == 720896
    assert set(MAX_AREA_CONFIGS) == {"720*1280", "1280*720", "480*832", "832*480", "704*1280",
                                     "1280*704", "1024*704", "704*1024"}
    assert max_area_from_name("480x832") == 399360
    with pytest.raises(InputError):
        max_area_from_name("123*456")
    assert get_size_less_than_area(720, 1280, "720*1280") == (704, 1280)
    assert get_size_less_than_area(1080, 1920, 1024 * 704) == (640, 1088)
    assert get_size_less_than_area(1024, 1024, 480 * 832) == (576, 576)
    for area in MAX_AREA_CONFIGS.values():
        for h, w in [(512, 512), (720, 1280), (1280, 720), (333, 517)]:
            oh, ow = get_size_less_than_area(h, w, area)
            assert oh % 64 == 0 and ow % 64 == 0 and oh * ow <= area


def test_resize_and_crop_geometry():
    # 720x1280 into 448x832: shorter side 448 -> 448x796, padded 18 px left and right
    assert resized_size_shorter_side(720, 1280, 448) == (448, 796)
    pad, (top, left) = center_crop_offsets(448, 796, 448, 832)
    assert pad == (18, 0, 18, 0) and (top, left) == (0, 0)
    # odd padding: left = d//2, right = (d+1)//2
    assert center_crop_offsets(115, 64, 128, 64)[0] == (0, 6, 0, 7)
    # crop offsets use Python round (half to even)
    assert center_crop_offsets(64, 106, 64, 64)[1] == (0, 21)
    assert center_crop_offsets(64, 67, 64, 64)[1] == (0, 2)   # round(1.5) = 2
    assert center_crop_offsets(64, 69, 64, 64)[1] == (0, 2)   # round(2.5) = 2


@pytest.mark.parametrize("i", [0, 1])
def test_reference_image_matches_reference(pu, tmp_path, i):
    inp, out, tol = pu
    img = inp[f"image_{i}"].numpy()
    expected = out[f"ref_pixel_values_{i}"]
    h, w = img.shape[:2]
    area = 4096 if i == 0 else 8192
    H, W = get_size_less_than_area(h, w, area)
    assert (H, W) == tuple(expected.shape[-2:])
    bound = float(tol[f"pipeline_utils/outputs.safetensors:ref_pixel_values_{i}"]["recommended"])
    path = tmp_path / f"img{i}.png"
    Image.fromarray(img).save(path)
    assert image_size(str(path)) == (h, w)
    for src in (img, Image.fromarray(img), str(path), path):
        got = load_reference_image(src, H, W)
        assert got.shape == (1, 3, 1, H, W) and got.dtype == torch.float32
        assert rel_err(got, expected) <= bound
        assert torch.equal(got, expected)  # achieved: exact


def test_reference_image_padding_is_black():
    img = np.full((90, 50, 3), 255, np.uint8)
    x = load_reference_image(img, 128, 64)
    assert torch.all(x[..., :6, :] == -1) and torch.all(x[..., 121:, :] == -1)
    assert torch.all(x[..., 6:121, :] == 1)


def test_reference_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_reference_image(str(tmp_path / "missing.png"), 64, 64)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot decode") as e:
        load_reference_image(str(bad), 64, 64)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="directory"):
        load_reference_image(str(tmp_path), 64, 64)


def test_validators():
    assert check_size(448, 832) == (448, 832)
    with pytest.raises(InputError, match=r"height 450 is not divisible by 64; use e\.g\. 448"):
        check_size(450, 832)
    with pytest.raises(InputError, match="width 100 is not divisible by 64"):
        check_size(448, 100)
    with pytest.raises(InputError):
        check_size(0, 64)
    assert check_num_frames(80) == 80
    with pytest.raises(InputError, match="--num-frames must be divisible by 4"):
        check_num_frames(81)
    with pytest.raises(InputError):
        check_num_frames(0)


def _write_gray_video(path, n, fps, h, w, step=8):
    """Lossless-ish H.264 video whose frame i is uniform grey (i*step)."""
    import av

    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = w, h, "yuv444p"
        s.options = {"qp": "0"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), i * step, np.uint8), format="rgb24")
            f.pts = i
            f.time_base = Fraction(1) / Fraction(fps)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def _gray(v):
    return v / 255.0 * 2 - 1


@pytest.mark.parametrize("fps,stride", [(30, 2), (16, 1), (48, 3), (15, 1)])
def test_pose_video_stride_and_padding(tmp_path, fps, stride):
    path = tmp_path / "pose.mp4"
    n_src = 12
    _write_gray_video(path, n_src, fps, 48, 80)
    n_avail = len(range(0, n_src, stride))
    num = n_avail + 3
    x = read_pose_video(str(path), 64, 64, num)
    assert x.shape == (1, 3, num, 64, 64) and x.dtype == torch.float32
    for k in range(n_avail):
        assert (x[0, :, k] - _gray(k * stride * 8)).abs().max().item() < 3 / 255 * 2, k
    assert torch.all(x[0, :, n_avail:] == -1)
    # fewer requested than available: truncated
    y = read_pose_video(str(path), 64, 64, 2)
    assert y.shape[2] == 2 and torch.allclose(y, x[:, :, :2])


def test_iter_pose_clips_equals_chunked_read(tmp_path):
    path = tmp_path / "pose.mp4"
    _write_gray_video(path, 22, 30, 48, 80)              # 11 sampled frames
    full = read_pose_video(str(path), 64, 64, 4 * 4)
    clips = list(iter_pose_clips(str(path), 64, 64, 4, 4))
    assert len(clips) == 4
    for a, b in zip(clips, full.chunk(4, dim=2)):
        assert torch.equal(a, b)
    assert torch.all(clips[3] == -1)


def test_pose_video_pads_mid_grey(tmp_path):
    path = tmp_path / "pose_sq.mp4"
    _write_gray_video(path, 2, 16, 32, 32, step=200)
    x = read_pose_video(str(path), 64, 128, 2)  # 32x32 -> 64x64, padded to 64x128
    assert torch.all(x[0, :, :, :, :32] == 0) and torch.all(x[0, :, :, :, 96:] == 0)
    assert (x[0, :, 1, :, 32:96] - _gray(200)).abs().max().item() < 3 / 255 * 2


def test_pose_video_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_pose_video(str(tmp_path / "none.mp4"), 64, 64, 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError) as e:
        read_pose_video(str(bad), 64, 64, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="directory"):
        read_pose_video(str(tmp_path), 64, 64, 4)


def test_example_assets_present_and_small():
    root = os.path.join(os.path.dirname(__file__), "..", "examples")
    img, wav = os.path.join(root, "portrait.png"), os.path.join(root, "speech.wav")
    assert os.path.getsize(img) + os.path.getsize(wav) < 300 * 1024
    assert image_size(img) == (512, 512)
    import soundfile as sf

    info = sf.info(wav)
    assert info.samplerate == 16000 and info.channels == 1 and 3.0 <= info.duration <= 5.0
    x = load_reference_image(img, *get_size_less_than_area(512, 512, MAX_AREA_CONFIGS["480*832"]))
    assert x.shape == (1, 3, 1, 512, 512)  # already fits: no resize


# ----------------------------------------------------------------------------- input checks (issue 30)
def test_reference_image_size_check(tmp_path):
    from s2v_fast.media import check_reference_image

    for (w, h), ok in (((1, 1), False), ((63, 500), False), ((500, 63), False), ((64, 64), True)):
        p = tmp_path / f"{w}x{h}.png"
        Image.new("RGB", (w, h)).save(p)
        if ok:
            assert check_reference_image(str(p)) == (h, w)
        else:
            with pytest.raises(InputError, match=f"is {w}x{h} pixels; use one at least 64 pixels") as e:
                check_reference_image(str(p))
            assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        check_reference_image(str(tmp_path / "none.png"))


def test_decompression_bomb_warns_once_or_fails_in_one_line(tmp_path, monkeypatch, recwarn):
    import warnings

    from s2v_fast import media

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 80x80 = 6400 px: over, not twice over
    monkeypatch.setattr(media, "_warned_large", set())
    p = tmp_path / "big.png"
    Image.new("RGB", (80, 80)).save(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        media.check_reference_image(str(p))
        media.open_image_rgb(str(p))
        load_reference_image(str(p), 64, 64)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and issubclass(caught[0].category, media.LargeImageWarning), msgs
    assert "is 80x80 (0.0 megapixels), over PIL's decompression-bomb limit" in msgs[0]
    assert "\n" not in msgs[0]
    huge = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(huge)  # 10000 px: over twice the limit, PIL refuses
    with pytest.raises(InputError, match="has 0.0 megapixels, over PIL's decompression-bomb limit") as e:
        media.open_image_rgb(str(huge))
    assert "\n" not in str(e.value)


def test_audio_duration_check():
    from s2v_fast.media import check_audio_duration

    check_audio_duration("a.wav", 0.25)
    check_audio_duration("a.wav", 0.3, fps=8, trim_to_audio=False)
    with pytest.raises(InputError, match=r"is 0\.240 s long; it must cover at least one 4-frame "
                                         r"latent group \(0\.25 s at 16 fps\)"):
        check_audio_duration("a.wav", 0.24)
    with pytest.raises(InputError, match=r"\(0\.50 s at 8 fps\)"):
        check_audio_duration("a.wav", 0.3, fps=8)
