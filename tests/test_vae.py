"""Wan2.1 VAE (s2v_fast/models/vae.py, vae_tiling.py) against the reference fixtures (CPU fp32).

Tolerances (golden metric ``rel_err = max|C-E| / max|E|``):
* encode_video / encode_image: 1e-5, the manifest bound (fp32 vs fp64 reference spread 4e-7).
* decode_latent: 9.9e-5, the manifest bound: the tiny random decoder is poorly conditioned
  (fp32 vs fp64 reference spread 9.9e-6).
* decode_latent_unclamped: 1e-5, the manifest bound.
Our implementation mirrors the reference's chunked op order and is bit-identical on CPU (0.0).
"""
import math

import pytest
import torch

from s2v_fast.errors import CheckpointError, InputError
from s2v_fast.models.vae import WanVAE, vae_config_from_state_dict
from s2v_fast.models.vae_tiling import TileBox, TileMerger, tile_boxes, tile_starts, tile_weight, \
    tiled_apply
from util import fixture, load_fixture, rel_err

CKPT = fixture("vae", "Wan2.1_VAE.pth")


@pytest.fixture(scope="module")
def vae():
    return WanVAE.from_file(CKPT)


@pytest.fixture(scope="module")
def io():
    return load_fixture("vae", "inputs.safetensors"), load_fixture("vae", "outputs.safetensors")


@pytest.fixture(scope="module")
def tiny():
    return WanVAE.tiny(dim=4, seed=0)


# --------------------------------------------------------------------------- reference parity
@pytest.mark.parametrize("case,inp,tol", [("encode_video", "video", 1e-5),
                                          ("encode_image", "image", 1e-5)])
def test_encode_matches_reference(vae, io, case, inp, tol):
    inputs, outputs = io
    out = vae.encode(inputs[inp][None])
    assert out.shape == (1,) + tuple(outputs[case].shape)
    assert out.dtype == torch.float32
    assert rel_err(out[0], outputs[case]) <= tol


@pytest.mark.parametrize("case,clamp,tol", [("decode_latent", True, 9.9e-5),
                                            ("decode_latent_unclamped", False, 1e-5)])
def test_decode_matches_reference(vae, io, case, clamp, tol):
    inputs, outputs = io
    out = vae.decode(inputs["latent"][None], clamp=clamp)
    assert out.shape == (1,) + tuple(outputs[case].shape)
    assert rel_err(out[0], outputs[case]) <= tol
    if clamp:
        assert out.abs().max() <= 1.0


def test_batched_encode_decode_match_reference(vae, io):
    inputs, outputs = io
    video = torch.stack([inputs["video"], inputs["video"].flip(-1)])
    enc = vae.encode(video)
    assert rel_err(enc[0], outputs["encode_video"]) <= 1e-5
    lat = torch.stack([inputs["latent"], torch.zeros_like(inputs["latent"])])
    dec = vae.decode(lat)
    assert rel_err(dec[0], outputs["decode_latent"]) <= 9.9e-5


# --------------------------------------------------------------------------- structure / loading
def test_official_key_names_and_shapes():
    with torch.device("meta"):
        m = WanVAE()
    sd = m.state_dict()
    assert len(sd) == 194
    assert sd["encoder.downsamples.5.time_conv.weight"].shape == (192, 192, 3, 1, 1)
    assert sd["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert sd["decoder.upsamples.3.resample.1.weight"].shape == (192, 384, 3, 3)
    assert sd["decoder.upsamples.4.shortcut.weight"].shape == (384, 192, 1, 1, 1)
    assert sd["encoder.head.2.weight"].shape == (32, 384, 3, 3, 3)
    assert sd["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert sd["decoder.middle.0.residual.0.gamma"].shape == (384, 1, 1, 1)
    assert vae_config_from_state_dict(sd) == m.config


def test_from_file_infers_base_dim(vae):
    assert vae.config["dim"] == 4 and vae.config["z_dim"] == 16
    assert not any(p.is_meta for p in vae.parameters())
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in vae.parameters())


def test_missing_file_raises(tmp_path):
    path = tmp_path / "nope" / "Wan2.1_VAE.pth"
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        WanVAE.from_file(str(path))


def test_wrong_shape_names_tensor(tmp_path):
    sd = torch.load(CKPT, weights_only=True)
    sd["decoder.middle.0.residual.2.bias"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"decoder\.middle\.0\.residual\.2\.bias") as e:
        WanVAE.from_file(str(path))
    assert "\n" not in str(e.value)


def test_missing_and_unexpected_keys_named(tmp_path):
    sd = torch.load(CKPT, weights_only=True)
    del sd["decoder.head.2.bias"]
    sd["decoder.extra"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"decoder\.head\.2\.bias.*decoder\.extra"):
        WanVAE.from_file(str(path))


def test_corrupt_file_raises(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        WanVAE.from_file(str(path))


def test_tiny_is_seeded_and_keeps_global_rng():
    state = torch.random.get_rng_state()
    a, b = WanVAE.tiny(seed=3), WanVAE.tiny(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert vae_config_from_state_dict(a.state_dict())["dim"] == 4


# --------------------------------------------------------------------------- shapes / inputs
@pytest.mark.parametrize("t,n", [(1, 1), (5, 2), (6, 2), (9, 3)])
def test_frame_counts(tiny, t, n):
    z = tiny.encode(torch.zeros(1, 3, t, 8, 16))
    assert z.shape == (1, 16, n, 1, 2)
    assert tiny.decode(z).shape == (1, 3, 1 + 4 * (n - 1), 8, 16)


def test_bad_inputs(tiny):
    with pytest.raises(InputError):
        tiny.encode(torch.zeros(1, 3, 1, 20, 24))
    with pytest.raises(InputError):
        tiny.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(InputError):
        tiny.decode(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(InputError):
        tiny.enable_tiling(tile_sample_min_height=30)
    with pytest.raises(InputError):
        tiny.enable_tiling(tile_sample_min_height=32, tile_sample_overlap_height=32)
    assert not tiny.use_tiling


# --------------------------------------------------------------------------- slicing
def test_slicing_equals_per_item_and_batched(tiny):
    g = torch.Generator().manual_seed(1)
    video = torch.rand(3, 3, 5, 16, 16, generator=g) * 2 - 1
    z = torch.randn(3, 16, 2, 2, 2, generator=g)
    enc_b, dec_b = tiny.encode(video), tiny.decode(z, clamp=False)
    tiny.enable_slicing()
    try:
        enc_s, dec_s = tiny.encode(video), tiny.decode(z, clamp=False)
    finally:
        tiny.disable_slicing()
    # slicing == one call per item: bit-identical
    for i in range(3):
        assert torch.equal(enc_s[i:i + 1], tiny.encode(video[i:i + 1]))
        assert torch.equal(dec_s[i:i + 1], tiny.decode(z[i:i + 1], clamp=False))
    # batched vs sliced differ only by fp32 conv rounding (CPU conv algorithms depend on the
    # batch size); same bounds as the reference parity (the random decoder amplifies rounding:
    # its own fp32-vs-fp64 spread is ~4e-5). Measured: encode ~5e-7, decode ~1e-5.
    assert rel_err(enc_s, enc_b) <= 1e-5
    assert rel_err(dec_s, dec_b) <= 1e-4


def test_slicing_semantics_fp64():
    m = WanVAE.tiny(dim=4, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    video = (torch.rand(2, 3, 5, 8, 8, generator=g) * 2 - 1).double()
    z = torch.randn(2, 16, 2, 1, 1, generator=g).double()
    enc_b, dec_b = m.encode(video), m.decode(z, clamp=False)
    m.enable_slicing()
    assert rel_err(m.encode(video), enc_b) <= 1e-12
    assert rel_err(m.decode(z, clamp=False), dec_b) <= 1e-12


# --------------------------------------------------------------------------- tiling machinery
def test_tile_starts_cover_and_overlap():
    assert tile_starts(4, 4, 1) == [0]
    assert tile_starts(3, 4, 1) == [0]
    for size in range(9, 40):
        for tile, ov in [(4, 1), (4, 2), (8, 3), (5, 0)]:
            s = tile_starts(size, tile, ov)
            assert s[0] == 0 and s[-1] + tile == size
            assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))  # overlap >= ov
            assert len(s) == math.ceil((size - tile) / (tile - ov)) + 1  # fewest tiles


def test_linear_ramp_weights_regular_overlap():
    # two tiles [0,8) and [4,12) over 12 samples, blend 4: linear cross-fade, sum 1
    a = tile_weight(TileBox(0, 1, 0, 8), 1, 12, 0, 4)[0]
    b = tile_weight(TileBox(0, 1, 4, 12), 1, 12, 0, 4)[0]
    ramp = (torch.arange(4) + 0.5) / 4
    assert torch.allclose(b[:4], ramp) and torch.allclose(a[4:], ramp.flip(0))
    assert torch.all(a[:4] == 1) and torch.all(b[4:] == 1)
    assert torch.allclose(a[4:] + b[:4], torch.ones(4))


def test_merger_reconstructs_consistent_tiles():
    # tiles cut from one canvas must merge back to it exactly (partition of unity), including
    # irregular overlaps (last tile shifted to the border)
    g = torch.Generator().manual_seed(0)
    canvas = torch.randn(2, 3, 4, 40, 56, generator=g)
    boxes = tile_boxes(5, 7, 2, 3, 1, 1)  # latent grid; output scale 8
    assert len(boxes) > 4
    out = tiled_apply(lambda b: canvas[..., b.y0 * 8:b.y1 * 8, b.x0 * 8:b.x1 * 8], boxes,
                      40, 56, (8, 1), 8, 8)
    assert rel_err(out, canvas) <= 1e-6
    # distributed use: per-rank mergers summed == one merger
    m0, m1, full = TileMerger(40, 56, 8, 8), TileMerger(40, 56, 8, 8), TileMerger(40, 56, 8, 8)
    for i, b in enumerate(boxes):
        t = canvas[..., b.y0 * 8:b.y1 * 8, b.x0 * 8:b.x1 * 8] * (1 + 0.1 * i)
        (m0 if i % 2 == 0 else m1).add(t, b.scaled(8))
        full.add(t, b.scaled(8))
    m0.numer += m1.numer
    m0.denom += m1.denom
    assert torch.allclose(m0.result(), full.result(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- tiled VAE
@pytest.fixture(scope="module")
def tiling_case(tiny):
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 5, 64, 96, generator=g) * 2 - 1
    z = torch.randn(1, 16, 2, 8, 12, generator=g)
    ref_enc, ref_dec = tiny.encode(video), tiny.decode(z, clamp=False)
    tiny.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                       tile_sample_overlap_height=8, tile_sample_overlap_width=8)
    try:
        enc, dec = tiny.encode(video), tiny.decode(z, clamp=False)
        boxes = tiny.decode_tile_boxes(8, 12)
        tiles = [tiny.decode_tile(z, b) for b in boxes]
    finally:
        tiny.disable_tiling()
    return dict(video=video, z=z, ref_enc=ref_enc, ref_dec=ref_dec, enc=enc, dec=dec,
                boxes=boxes, tiles=tiles)


def test_tiled_shapes_and_tile_count(tiling_case):
    c = tiling_case
    assert len(c["boxes"]) == 12  # 3 x 4 tiles of 4x4 latents (32 px) on 8x12 latents
    assert c["enc"].shape == c["ref_enc"].shape and c["dec"].shape == c["ref_dec"].shape
    assert torch.isfinite(c["enc"]).all() and torch.isfinite(c["dec"]).all()


def test_tiled_decode_exact_where_one_tile_owns_the_pixel(tiling_case):
    # a pixel covered by exactly one tile (weight 1) must equal that tile's own decode
    c = tiling_case
    H, W = 64, 96
    count = torch.zeros(H, W, dtype=torch.int64)
    for b in c["boxes"]:
        p = b.scaled(8)
        count[p.y0:p.y1, p.x0:p.x1] += 1
    checked = 0
    for b, t in zip(c["boxes"], c["tiles"]):
        p = b.scaled(8)
        own = count[p.y0:p.y1, p.x0:p.x1] == 1
        region = c["dec"][..., p.y0:p.y1, p.x0:p.x1]
        assert torch.equal(region[..., own], t[..., own])
        checked += int(own.sum())
    assert checked > 0


def test_tiled_vs_untiled_bounded(tiling_case):
    # Loose bounds on white noise (they catch misplaced or unnormalised tiles: errors of order 1
    # everywhere); the tight, justified bound is test_tiled_decode_matches_plain_on_smooth_latents.
    c = tiling_case
    dec_mean = ((c["dec"] - c["ref_dec"]).abs().mean() / c["ref_dec"].abs().max()).item()
    enc_mean = ((c["enc"] - c["ref_enc"]).abs().mean() / c["ref_enc"].abs().max()).item()
    assert rel_err(c["dec"], c["ref_dec"]) <= 3.0 and dec_mean <= 0.3
    assert rel_err(c["enc"], c["ref_enc"]) <= 0.5 and enc_mean <= 0.05


def test_tiling_single_tile_is_exact(tiny):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 5, 32, 48, generator=g) * 2 - 1
    z = torch.randn(1, 16, 2, 4, 6, generator=g)
    ref_enc, ref_dec = tiny.encode(video), tiny.decode(z)
    tiny.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=48,
                       tile_sample_overlap_height=8, tile_sample_overlap_width=8)
    try:
        assert torch.equal(tiny.encode(video), ref_enc)
        assert torch.equal(tiny.decode(z), ref_dec)
    finally:
        tiny.disable_tiling()


def test_tiled_decode_matches_plain_on_smooth_latents():
    """Tiled decode vs the plain decode on realistic (smooth, unit-variance) latents.

    Two things separate a tile from the whole frame: the decoder's middle block attends over the
    whole frame, and every convolution beyond the tile's edge sees zero padding instead of the
    neighbours. Tiled decoding runs the stem (conv1 + middle, latent resolution) on whole frames
    and only the convolutional tail on tiles, each with a halo of context that is cropped away.
    What is left is the tail's receptive field beyond the 64 px halo: measured max-abs 3.2e-3,
    PSNR 97 dB here (bare tiles, halo 0: max 1.2, 24 dB). Bound: max-abs <= 2e-2 (the fast-VAE
    issue's bf16 bound) and PSNR >= 60 dB; the bare tiles must fail it, so the test can fail.
    Encode keeps the tile-local middle block (tile features are not blended before it): rel L2
    2.2e-3 with the halo against 4.3e-2 without."""
    import math

    from s2v_fast.testing.latents import smooth_latents

    vae = WanVAE.tiny(dim=4, seed=0)
    z = smooth_latents((1, 16, 2, 16, 32), seed=1)
    video = vae.decode(z)
    ref, ref_enc = vae.decode(z, clamp=False), vae.encode(video)

    def tiled(halo):
        vae.enable_tiling(64, 64, 16, 16, halo)
        try:
            d = vae.decode(z, clamp=False) - ref
            e = vae.encode(video) - ref_enc
        finally:
            vae.disable_tiling()
        return d.abs().max().item(), 10 * math.log10(4 / (d ** 2).mean().item()), rel_err(e + ref_enc, ref_enc)

    mx, psnr, enc = tiled(64)  # the default halo
    assert len(vae.decode_tile_boxes(16, 32)) > 4
    assert mx <= 2e-2 and psnr >= 60, (mx, psnr)
    assert enc <= 1e-2, enc
    mx0, psnr0, enc0 = tiled(0)
    assert mx0 > 2e-2 and psnr0 < 60 and enc0 > enc, (mx0, psnr0, enc0)
