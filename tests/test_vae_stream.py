"""Streaming VAE decode (s2v_fast/models/vae_stream.py) against the whole-clip ``WanVAE.decode``.

The streaming decoder runs the same per-latent-frame op sequence as ``decode`` with the caches
carried across calls, so the contract bound (max-abs <= 1e-6) is met with room: measured 0.0
(bit-identical) on CPU for fp32 and bf16 VAEs, every chunking, tiled and sliced.
"""
import pytest
import torch

from s2v_fast.errors import InputError
from s2v_fast.models.vae import WanVAE
from s2v_fast.testing.latents import smooth_latents

TOL = 1e-6


@pytest.fixture(scope="module")
def vae():
    return WanVAE.tiny(dim=4, seed=0)


@pytest.fixture(scope="module")
def z():
    return smooth_latents((1, 16, 9, 4, 6), seed=1)


def stream(dec, z, chunks):
    """Decode ``z`` in ``chunks`` (latent frames per call); the per-call outputs."""
    assert sum(chunks) == z.shape[2]
    outs, i = [], 0
    for c in chunks:
        outs.append(dec.decode(z[:, :, i:i + c]))
        i += c
    return outs


def max_diff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("chunks", [[1] * 9, [2, 2, 2, 2, 1], [3, 3, 3], [1, 3, 2, 3]])
def test_chunked_equals_whole_clip_fp32(vae, z, chunks):
    ref = vae.decode(z)
    outs = stream(vae.stream_decoder(), z, chunks)
    # the stream's first latent frame gives 1 pixel frame, every later one 4
    assert [o.shape[2] for o in outs] == [1 + 4 * (chunks[0] - 1)] + [4 * c for c in chunks[1:]]
    assert all(o.dtype == torch.float32 for o in outs)
    assert max_diff(torch.cat(outs, 2), ref) <= TOL


def test_unclamped(vae, z):
    ref = vae.decode(z, clamp=False)
    assert ref.abs().max() > 1  # so clamping would show
    out = torch.cat(stream(vae.stream_decoder(clamp=False), z, [2, 3, 4]), 2)
    assert max_diff(out, ref) <= TOL


def test_bf16_vae_chunked_equals_whole_clip(z):
    vae = WanVAE.tiny(dim=4, seed=0, dtype=torch.bfloat16)
    ref = vae.decode(z).float()  # decode returns the model dtype; the stream returns fp32
    outs = stream(vae.stream_decoder(), z, [1, 3, 2, 3])
    assert all(o.dtype == torch.float32 for o in outs)
    assert max_diff(torch.cat(outs, 2), ref) <= TOL  # measured 0.0: same bf16 op sequence


def test_warmup_then_blocks_equals_dropping_warm_frames(vae):
    n_warm = 7  # LiveAvatar's real-time path warms with 7 motion latents
    z = smooth_latents((1, 16, n_warm + 3, 4, 6), seed=2)
    ref = vae.decode(z)[:, :, 1 + 4 * (n_warm - 1):]
    dec = vae.stream_decoder()
    assert dec.warmup(z[:, :, :n_warm]) is None
    out = torch.cat(stream(dec, z[:, :, n_warm:], [1, 2]), 2)
    assert max_diff(out, ref) <= TOL


def test_reset_equals_fresh_decoder(vae, z):
    fresh = stream(vae.stream_decoder(), z[:, :, :4], [1, 3])
    dec = vae.stream_decoder()
    stream(dec, z[:, :, 4:], [2, 3])
    with pytest.raises(InputError, match="reset"):  # another spatial size needs a new stream
        dec.decode(z[..., :2, :2])
    dec.reset()
    again = stream(dec, z[:, :, :4], [1, 3])
    assert all(torch.equal(a, b) for a, b in zip(again, fresh))


def test_cache_memory_flat(vae):
    z = smooth_latents((1, 16, 30, 2, 2), seed=3)
    dec = vae.stream_decoder()
    stream(dec, z[:, :, :3], [1] * 3)
    after3 = dec.cache_nbytes()
    stream(dec, z[:, :, 3:], [1] * 27)
    assert after3 > 0 and dec.cache_nbytes() == after3


def test_tiled_and_sliced_stream_equals_decode():
    # each tile keeps its own tail cache, each batch item its own lane (as decode slices them)
    vae = WanVAE.tiny(dim=4, seed=0)
    z = smooth_latents((2, 16, 6, 8, 12), seed=4)
    vae.enable_tiling(32, 32, 8, 8, 16)
    vae.enable_slicing()
    assert len(vae.decode_tile_boxes(8, 12)) == 12
    ref = vae.decode(z)
    dec = vae.stream_decoder()
    out = torch.cat(stream(dec, z, [1, 3, 2]), 2)
    assert max_diff(out, ref) <= TOL
    vae.disable_tiling()
    with pytest.raises(InputError, match="tiling/slicing settings"):
        dec.decode(z[:, :, :1])
