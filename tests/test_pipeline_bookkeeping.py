"""Clip bookkeeping of spec §8.7 checked step by step with a spy VAE and a spy DiT.

The spy decoder marks every output frame with (decode call, frame index), so we can tell exactly
which decoded frames were kept, which frames fed the next clip's motion latents, and what each
DiT call received.
"""
import pytest
import torch

from s2v_fast.pipeline import CFGDenoiser, S2VPipeline, clips_for_frames, frames_for_clips

H = W = 64
NF = 8  # frames per clip
STEPS = 2


class SpyVAE:
    def __init__(self):
        self.encodes, self.decodes = [], []

    def encode(self, video):
        self.encodes.append(video.clone())
        b, _, t, h, w = video.shape
        tag = 100.0 * len(self.encodes)  # latents of encode call k are filled with 100*k
        return torch.full((b, 16, 1 + (t - 1) // 4, h // 8, w // 8), tag)

    def decode(self, z):
        self.decodes.append(z.clone())
        b, _, n, h, w = z.shape
        t = 1 + 4 * (n - 1)
        call = len(self.decodes) - 1
        frame_ids = torch.arange(t, dtype=torch.float32) + 1000.0 * call
        return frame_ids.view(1, 1, t, 1, 1).expand(b, 3, t, 8 * h, 8 * w).clone()


class SpyDiT(torch.nn.Module):
    """No prepare_conditions: exercises the plain forward path. Returns zero velocity."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context, ref_latents, motion_latents, cond_states, audio_input,
                drop_motion_frames=False):
        self.calls.append(dict(x=x.clone(), t=t.clone(), context=[c.clone() for c in context],
                               ref=ref_latents.clone(),
                               motion=None if motion_latents is None else motion_latents.clone(),
                               cond=cond_states, audio=audio_input.clone(), drop=drop_motion_frames))
        return torch.zeros((len(context), *x.shape[1:]), dtype=torch.float32)  # one row per branch


def frames_of(decode_call, idx):
    return [1000.0 * decode_call + i for i in idx]


def frame_values(video):  # [B, 3, T, H, W] -> list of per-frame marker values
    return video[0, 0, :, 0, 0].tolist()


def run(init_first_frame=False, cfg_batch=True, guidance=4.5, num_clips=3):
    vae, dit = SpyVAE(), SpyDiT()
    pipe = S2VPipeline(dit, vae, device="cpu", dtype=torch.float32)
    pipe.cfg_batch = cfg_batch
    g = torch.Generator().manual_seed(0)
    image = (torch.rand(H, W, 3, generator=g) * 255).to(torch.uint8).numpy()
    feats = torch.randn(25, 60, 4, generator=g)  # 60 frames at 50 Hz -> T30 = 36 -> 3 clips of 8
    ctx, ctx_neg = torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    out = pipe.generate(image, None, prompt_embeds=ctx, negative_prompt_embeds=ctx_neg,
                        audio_feats_50hz=feats, max_area=H * W, num_frames=NF,
                        num_inference_steps=STEPS, guidance_scale=guidance, seed=3,
                        init_first_frame=init_first_frame, num_clips=num_clips, trim_to_audio=False)
    return pipe, vae, dit, out, ctx, ctx_neg


def test_default_motion_drop_and_trim():
    pipe, vae, dit, out, ctx, ctx_neg = run()
    assert out.num_clips == 3
    # encodes: reference, motion after clip 0, after clip 1 (none after the last; the
    # reference's encode of the zero buffer for clip 0 is skipped: clip 0 drops its motion)
    assert [e.shape[2] for e in vae.encodes] == [1, 73, 73]
    ref_lat = torch.full((1, 16, 1, 8, 8), 100.0)

    # clip 0: decode [ref latent, 2 new latents] -> 9 frames, keep last 8, drop 3 -> frames 4..8
    assert vae.decodes[0].shape[2] == 1 + NF // 4
    assert torch.equal(vae.decodes[0][:, :, :1], ref_lat)
    clip0 = frames_of(0, range(4, 9))
    # motion window after clip 0: 68 zero frames then the 5 frames of clip 0
    m1 = vae.encodes[1]
    assert torch.count_nonzero(m1[:, :, :68]) == 0
    assert frame_values(m1[:, :, 68:]) == clip0

    # clip 1: decode [19 motion latents of encode #2, 2 new] -> 81 frames, keep the last 8
    assert vae.decodes[1].shape[2] == 19 + NF // 4
    assert torch.all(vae.decodes[1][:, :, :19] == 200.0)
    clip1 = frames_of(1, range(73, 81))
    m2 = vae.encodes[2]
    assert torch.count_nonzero(m2[:, :, :60]) == 0
    assert frame_values(m2[:, :, 60:]) == clip0 + clip1

    # clip 2 uses encode #3
    assert torch.all(vae.decodes[2][:, :, :19] == 300.0)
    clip2 = frames_of(2, range(73, 81))

    assert out.num_frames == frames_for_clips(3, NF, True) == 5 + 8 + 8
    assert frame_values(out.video.unsqueeze(0)) == clip0 + clip1 + clip2

    # DiT calls: one batch-2 call per step (one latent and batch-1 video inputs shared by the two
    # branches, two contexts and audios); motion latents and drop flag per clip
    assert len(dit.calls) == 3 * STEPS
    for r in range(3):
        for c in dit.calls[r * STEPS:(r + 1) * STEPS]:
            assert c["x"].shape[0] == 1 and c["t"].numel() == 1 and len(c["context"]) == 2
            assert c["drop"] == (r == 0)
            if r == 0:
                assert c["motion"] is None  # dropped: never computed
            else:
                assert torch.all(c["motion"] == [200.0, 300.0][r - 1]) and c["motion"].shape[0] == 1
            assert torch.equal(c["ref"], ref_lat)
            assert c["cond"] is None  # no pose: zero condition
            assert torch.equal(c["context"][0], ctx) and torch.equal(c["context"][1], ctx_neg)
            assert torch.count_nonzero(c["audio"][1]) == 0 and torch.count_nonzero(c["audio"][0]) > 0
            assert c["audio"].shape[-1] == NF


def test_audio_columns_per_clip():
    pipe, vae, dit, out, *_ = run(num_clips=2)
    from s2v_fast.models.audio_features import bucket_features, interpolate_features

    g = torch.Generator().manual_seed(0)
    torch.rand(H, W, 3, generator=g)
    feats = torch.randn(25, 60, 4, generator=g)
    bucket, _ = bucket_features(interpolate_features(feats, 50, 30), fps=16, batch_frames=NF)
    emb = bucket.permute(1, 2, 0).unsqueeze(0)
    for r in range(2):
        assert torch.equal(dit.calls[r * STEPS]["audio"][0:1], emb[..., r * NF:(r + 1) * NF])


def test_init_first_frame():
    pipe, vae, dit, out, *_ = run(init_first_frame=True)
    m0 = vae.encodes[1]
    ref = vae.encodes[0]
    assert torch.count_nonzero(m0[:, :, :67]) == 0
    assert torch.equal(m0[:, :, 67:], ref.expand(-1, -1, 6, -1, -1))
    # clip 0 keeps its motion: decode [19 motion latents, 2 new], keep the last 8, nothing dropped
    assert vae.decodes[0].shape[2] == 19 + NF // 4
    assert torch.all(vae.decodes[0][:, :, :19] == 200.0)
    assert all(c["drop"] is False for c in dit.calls)
    assert out.num_frames == frames_for_clips(3, NF, False) == 24
    assert frame_values(vae.encodes[2][:, :, -8:]) == frames_of(0, range(73, 81))


def test_two_call_cfg_and_no_cfg():
    _, _, dit, _, ctx, ctx_neg = run(cfg_batch=False, num_clips=1)
    assert len(dit.calls) == 2 * STEPS
    cond, uncond = dit.calls[0], dit.calls[1]
    assert torch.equal(cond["x"], uncond["x"]) and cond["x"].shape[0] == 1
    assert torch.equal(cond["context"][0], ctx) and torch.equal(uncond["context"][0], ctx_neg)
    assert torch.count_nonzero(uncond["audio"]) == 0
    _, _, dit, _, _, _ = run(guidance=1.0, num_clips=1)
    assert len(dit.calls) == STEPS and dit.calls[0]["x"].shape[0] == 1


def test_frame_count_rules():
    assert [frames_for_clips(n, 80, True) for n in (1, 2, 3)] == [77, 157, 237]
    assert [frames_for_clips(n, 80, False) for n in (1, 2, 3)] == [80, 160, 240]
    assert clips_for_frames(77, 80, True) == 1 and clips_for_frames(78, 80, True) == 2
    assert clips_for_frames(157, 80, True) == 2 and clips_for_frames(158, 80, True) == 3
    assert clips_for_frames(80, 80, False) == 1 and clips_for_frames(81, 80, False) == 2


def test_cfg_batch_matches_two_calls_on_golden_dit():
    """The batch-2 CFG call gives the same velocities as two batch-1 calls (golden tiny DiT)."""
    from s2v_fast.models.dit import S2VTransformer
    from util import fixture, load_fixture

    dit = S2VTransformer.from_pretrained(fixture("dit"), device="cpu", dtype=torch.float32)
    inp = load_fixture("dit", "inputs.safetensors")
    kw = dict(context=inp["context_pos"], context_null=inp["context_neg"],
              ref_latents=inp["ref_latents"], motion_latents=inp["motion_latents"], cond=None,
              audio_input=inp["audio_clip1"], drop_motion=False)
    x, t = inp["x_clip1"].unsqueeze(0), inp["t_clip1"]
    v2, c2, u2 = CFGDenoiser(dit, torch.float32, 4.5, True, **kw)(x, t)
    v1, c1, u1 = CFGDenoiser(dit, torch.float32, 4.5, False, **kw)(x, t)
    exp_c = load_fixture("dit", "case_clip1_with_motion.safetensors")["output"]
    exp_u = load_fixture("dit", "case_clip1_uncond.safetensors")["output"]
    from util import rel_err

    for got_c, got_u in ((c2, u2), (c1, u1)):
        assert rel_err(got_c[0], exp_c) < 1e-5 and rel_err(got_u[0], exp_u) < 1e-5
    assert rel_err(v2, v1) < 1e-5


def test_sampling_options_are_checked_once_as_one_value():
    """generate's sampler keywords become one SamplingOptions, checked once (one-line errors,
    seed -1 drawn), which is what the clip loop takes."""
    from s2v_fast.errors import InputError
    from s2v_fast.pipeline import SamplingOptions

    s = SamplingOptions(num_frames=8, seed=-1).checked()
    assert 0 <= s.seed < 2**31 and s.num_frames == 8 and s.cfg
    assert not SamplingOptions(guidance_scale=1.0).cfg
    with pytest.raises(InputError, match="^--num-frames 6 is not a positive multiple of 4"):
        SamplingOptions(num_frames=6).checked()
    with pytest.raises(InputError, match="^--sample-solver 'euler' is not supported"):
        SamplingOptions(sample_solver="euler").checked()
