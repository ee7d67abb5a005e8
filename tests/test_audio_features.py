"""Audio front-end: golden interpolation/bucketing (tests/fixtures/audio), tiny wav2vec2, load_audio."""
import hashlib
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from s2v_fast.errors import CheckpointError, InputError
from s2v_fast.models.audio_features import (
    AudioFeatureExtractor,
    bucket_features,
    bucket_indices,
    conv_output_length,
    interpolate_features,
    load_audio,
    make_tiny_wav2vec2,
)
from util import load_fixture, rel_err

CASES = [(t, f) for t in (150, 263, 500) for f in (80, 48)]


@pytest.fixture(scope="module")
def golden():
    return load_fixture("audio", "inputs.safetensors"), load_fixture("audio", "outputs.safetensors")


@pytest.fixture(scope="module")
def tiny_w2v(tmp_path_factory):
    return make_tiny_wav2vec2(str(tmp_path_factory.mktemp("w2v")), seed=0)


@pytest.fixture(scope="module")
def extractor(tiny_w2v):
    return AudioFeatureExtractor.from_pretrained(tiny_w2v)


# ---------------------------------------------------------------------------- golden


@pytest.mark.parametrize("t_a", [150, 263, 500])
def test_interp30(golden, t_a):
    inp, out = golden
    y = interpolate_features(inp[f"feats50_{t_a}"], 50, 30)
    assert y.shape == (25, int(t_a / 50 * 30), 4)
    assert rel_err(y, out[f"interp30_{t_a}"]) <= 1e-5


@pytest.mark.parametrize("t_a,f", CASES)
def test_bucket(golden, t_a, f):
    _, out = golden
    feats30 = out[f"interp30_{t_a}"]
    bucket, num_clips, idx = bucket_features(feats30, fps=16, batch_frames=f, m=0, return_indices=True)
    assert num_clips == int(out[f"num_clips_{t_a}_f{f}"])
    assert idx.dtype == torch.int64 and torch.equal(idx, out[f"indices_{t_a}_f{f}"])
    exp = out[f"bucket_{t_a}_f{f}"]
    assert bucket.shape == exp.shape == (num_clips * f, 25, 4)
    assert rel_err(bucket, exp) <= 1e-5
    assert torch.equal(bucket, exp)  # pure gather: bit-exact
    idx_np, n2 = bucket_indices(feats30.shape[1], 16, f)
    assert n2 == num_clips and np.array_equal(idx_np, idx.numpy())


def test_zero_clip_quirk(golden):
    _, out = golden
    for t_a, f, zero_clip in [(150, 48, 1), (500, 80, 2)]:
        bucket, num_clips = bucket_features(out[f"interp30_{t_a}"], 16, f)
        assert num_clips == zero_clip + 1
        assert (bucket[zero_clip * f:] == 0).all()
        assert bucket[:zero_clip * f].abs().sum() > 0


def test_round_half_even_indices():
    idx, n = bucket_indices(300, 16, 80)
    assert n == 3
    assert idx[4] == 8 and idx[12] == 22  # 7.5 -> 8, 22.5 -> 22
    assert np.array_equal(idx[:8], [0, 2, 4, 6, 8, 9, 11, 13])


def test_bucket_neighbours():
    feats = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)
    b, n = bucket_features(feats, fps=16, batch_frames=4, m=1)
    assert b.shape == (n * 4, 2, 9)
    # frame 0 -> index 0, neighbours clamp to [0, 0, 1]
    assert torch.equal(b[0, 0], torch.cat([feats[0, 0], feats[0, 0], feats[0, 1]]))


# ---------------------------------------------------------------------------- extractor


def test_tiny_model_deterministic_and_official_layout(tmp_path, tiny_w2v):
    from safetensors import safe_open

    d2 = make_tiny_wav2vec2(str(tmp_path / "again"), seed=0)
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "vocab.json"):
        h = [hashlib.sha256(open(os.path.join(d, name), "rb").read()).hexdigest() for d in (tiny_w2v, d2)]
        assert h[0] == h[1], name
    with safe_open(os.path.join(tiny_w2v, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"wav2vec2.encoder.pos_conv_embed.conv.weight_g", "wav2vec2.encoder.pos_conv_embed.conv.weight_v",
            "wav2vec2.masked_spec_embed", "lm_head.weight", "wav2vec2.feature_projection.projection.weight",
            "wav2vec2.encoder.layer_norm.weight", "wav2vec2.encoder.layers.23.final_layer_norm.weight",
            "wav2vec2.feature_extractor.conv_layers.6.layer_norm.weight"} <= keys


def test_extractor_loads_all_weights(extractor, tiny_w2v):
    from safetensors.torch import load_file

    sd = load_file(os.path.join(tiny_w2v, "model.safetensors"))
    msd = extractor.model.state_dict()
    ren = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
    assert len(sd) == len(msd)
    for k, v in sd.items():
        for a, b in ren.items():
            k = k.replace(a, b) if k.endswith(a) else k
        assert torch.equal(msd[k], v), k


def test_extractor_shapes_and_layout(extractor):
    rng = np.random.RandomState(0)
    n = 16000 + 123
    wave = (0.1 * rng.randn(n)).astype(np.float32)
    feats = extractor(wave)
    t_a = conv_output_length(n)
    assert t_a == (n - 400) // 320 + 1
    assert feats.shape == (25, t_a, 32) and feats.dtype == torch.float32
    # layout: 0 = layer-0 input, 1..23 = layer outputs, 24 = after the final LayerNorm
    iv = extractor.preprocess(wave)
    assert abs(float(iv.mean())) < 1e-4 and abs(float(iv.std()) - 1) < 1e-2  # do_normalize
    with torch.no_grad():
        r = extractor.model(iv, output_hidden_states=True)
        enc = extractor.model.wav2vec2.encoder
        for i in range(24):
            assert torch.equal(r.hidden_states[i][0], feats[i]), i
        assert torch.allclose(enc.layer_norm(r.hidden_states[24])[0], feats[24], atol=1e-6, rtol=0)
        # index 24 is normalised: ~zero mean / unit variance per frame before the affine
        assert not torch.allclose(r.hidden_states[24][0], feats[24])
    # torch input, same result
    assert torch.equal(extractor(torch.from_numpy(wave)), feats)
    # the whole chain to a bucket
    f30 = interpolate_features(feats)
    bucket, num_clips = bucket_features(f30, 16, 80)
    assert bucket.shape == (80, 25, 32) and num_clips == 1


def test_extractor_errors(tmp_path, tiny_w2v, extractor):
    with pytest.raises(CheckpointError, match="not found"):
        AudioFeatureExtractor.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        AudioFeatureExtractor.from_pretrained(str(tmp_path / "empty"))
    with pytest.raises(InputError):
        extractor(np.zeros(100, np.float32))


# ---------------------------------------------------------------------------- load_audio


def _tone(n, sr, amp=0.3):
    t = np.arange(n) / sr
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_load_audio_wav(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, _tone(16000, 16000), 16000)
    w = load_audio(p)
    assert w.dtype == np.float32 and w.shape == (16000,)
    assert np.abs(w - _tone(16000, 16000)).max() < 1e-4  # PCM16 rounding
    # stereo 22.05 kHz -> mono 16 kHz
    p2 = tmp_path / "b.flac"
    x = _tone(22050, 22050)
    sf.write(p2, np.stack([x, x], 1), 22050)
    w2 = load_audio(str(p2))
    assert w2.dtype == np.float32 and w2.ndim == 1 and abs(len(w2) - 16000) <= 1


def test_load_audio_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00garbage-not-audio" * 10)
    with pytest.raises(InputError, match="cannot decode"):
        load_audio(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(InputError, match="no samples"):
        load_audio(empty)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(InputError, match="silent"):
        load_audio(silent)
    short = tmp_path / "short.wav"
    sf.write(short, _tone(300, 16000), 16000)
    with pytest.raises(InputError, match="too short"):
        load_audio(short)
    for p in (tmp_path / "missing.wav", bad, empty, silent, short):
        try:
            load_audio(p)
        except InputError as e:
            assert "\n" not in str(e)
