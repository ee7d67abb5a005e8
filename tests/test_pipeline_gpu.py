"""The pipeline's clip loop on CUDA with the tiny model set (skipped without a GPU).

Checks the CUDA-only paths that CPU tests cannot reach: the fast default precision inside the
pipeline, pinned-memory model offload and layerwise offload with its side-stream prefetch, both
against the plain run (offload only moves weights: bit-identical), and fast vs reference within
bf16 tolerance. Uses ``run_clips`` with random contexts and audio features, so no audio decoder
or MP4 encoder is needed.
"""
import pytest

from s2v_fast.models.tiny import TINY_VERSION
import torch

from s2v_fast.pipeline import S2VPipeline
from s2v_fast.pipeline import SamplingOptions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from s2v_fast.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu_cache") / TINY_VERSION))


def _clip(pipe, steps=3):
    c = pipe.dit_module.config
    g = torch.Generator().manual_seed(0)
    frames = 8
    kw = dict(context=torch.randn(7, c.text_dim, generator=g),
              context_null=torch.randn(11, c.text_dim, generator=g),
              audio_emb=torch.randn(1, 25, c.audio_dim, frames, generator=g).to(pipe.dtype),
              ref_pixels=torch.rand(1, 3, 1, 64, 64, generator=g) * 2 - 1)
    out = list(pipe.run_clips(num_clips=1, **kw, sampling=SamplingOptions(
        num_frames=frames, num_inference_steps=steps)))
    return out[0].latents.float().cpu(), out[0].video.float().cpu()


def test_gpu_pipeline_offload_and_precision(tiny_dir):
    base = S2VPipeline.from_pretrained(tiny_dir, device="cuda")
    assert base.precision == "fast" and base.dtype == torch.bfloat16
    lat, video = _clip(base)
    assert torch.isfinite(lat).all() and torch.isfinite(video).all()
    for mode in ("cpu", "layerwise"):
        off = S2VPipeline.from_pretrained(tiny_dir, device="cuda", offload=mode)
        assert off.precision == "fast"
        lat_o, video_o = _clip(off)
        assert torch.equal(lat_o, lat), mode  # offload moves weights, never changes numbers
        assert torch.equal(video_o, video), mode
        del off
    ref = S2VPipeline.from_pretrained(tiny_dir, device="cuda", precision="reference")
    lat_r, _ = _clip(ref)
    rel = ((lat - lat_r).norm() / lat_r.norm()).item()
    assert rel < 2e-2, rel  # bf16 rounding order over 3 sampling steps


def test_gpu_pipeline_fp8_picks_fp8_self_attention(tiny_dir):
    """--quantization fp8 with the default `auto` attention runs self-attention in fp8; a backend
    the user named is kept."""
    from s2v_fast.kernels.attention import configured_backends
    from s2v_fast.quantization import quantized_linears

    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cuda", quantization="fp8")
    assert configured_backends(pipe.dit_module) == dict(self="fp8", text="auto", audio="auto",
                                                        causal="fp8")
    assert quantized_linears(pipe.dit_module)
    lat, video = _clip(pipe, steps=2)
    assert torch.isfinite(lat).all() and torch.isfinite(video).all()
    pipe = S2VPipeline.from_pretrained(tiny_dir, device="cuda", quantization="fp8", attention_backend="cudnn")
    assert configured_backends(pipe.dit_module)["self"] == "cudnn"
