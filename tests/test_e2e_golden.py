"""End-to-end parity with the official WanS2V.generate() clip loop (tests/fixtures/pipeline_utils).

The reference was run in float32 on the CPU with the tiny DiT of fixtures/dit and the tiny VAE of
fixtures/vae; T5 and wav2vec2 were replaced by the stored contexts / 50 Hz features and the noise
came from a CPU torch.Generator(seed + clip). We run S2VPipeline.generate() the same way and
compare every recorded tensor with the manifest's per-tensor tolerance.
"""
import json

import pytest
import torch

from s2v_fast.models.dit import S2VTransformer
from s2v_fast.models.vae import WanVAE
from s2v_fast.pipeline import PipelineCallback, S2VPipeline
from util import fixture, load_fixture, rel_err

RUNS = ["e2e_unipc_default", "e2e_dpmpp_init_first_frame"]


@pytest.fixture(scope="module")
def manifest():
    with open(fixture("manifest.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def golden_pipe():
    dit = S2VTransformer.from_pretrained(fixture("dit"), device="cpu", dtype=torch.float32)
    vae = WanVAE.from_file(fixture("vae", "Wan2.1_VAE.pth"), device="cpu", dtype=torch.float32)
    return S2VPipeline(dit, vae, device="cpu", dtype=torch.float32)


class Recorder(PipelineCallback):
    def __init__(self):
        self.clips = {}

    def _clip(self, r):
        return self.clips.setdefault(r, {"x_in": [], "v_cond": [], "v_uncond": []})

    def on_clip_start(self, r, info):
        c = self._clip(r)
        c["noise"] = info["noise"].clone()
        c["timesteps"] = info["timesteps"].clone()
        c["audio_input"] = info["audio_input"].clone()
        c["drop_motion_frames"] = info["drop_motion_frames"]
        m = info["motion_latents"]
        c["motion_latents"] = None if m is None else m.clone()
        c["ref_latents"] = info["ref_latents"].clone()

    def on_step_end(self, r, i, info):
        c = self._clip(r)
        c["x_in"].append(info["x_in"][0].clone())
        c["v_cond"].append(info["v_cond"][0].clone())
        c["v_uncond"].append(info["v_uncond"][0].clone())

    def on_clip_end(self, r, info):
        c = self._clip(r)
        c["latents"] = info["latents"][0].clone()
        c["motion_latents_out"] = None if info["motion_latents_out"] is None else info["motion_latents_out"][0].clone()


@pytest.mark.parametrize("run", RUNS)
def test_e2e_golden(run, golden_pipe, manifest):
    spec = manifest["components"]["pipeline_utils"]["end_to_end"]["runs"][run]
    tol = manifest["tolerance_per_tensor"]
    inp = load_fixture("pipeline_utils", "inputs.safetensors")
    exp = load_fixture("pipeline_utils", "outputs.safetensors")

    def check(key, got):
        want = exp[f"{run}_{key}"]
        bound = tol[f"pipeline_utils/outputs.safetensors:{run}_{key}"]["recommended"]
        assert tuple(got.shape) == tuple(want.shape), (key, got.shape, want.shape)
        if bound == "exact":
            assert torch.equal(got.to(want.dtype).cpu(), want), key
        else:
            err = rel_err(got, want)
            assert err <= bound, f"{run} {key}: rel err {err:.3g} > {bound}"

    pipe = golden_pipe  # default: both CFG branches as one batch-2 DiT call
    rec = Recorder()
    out = pipe.generate(
        inp[f"{run}_image"].numpy(), None,
        prompt_embeds=inp[f"{run}_context_pos"], negative_prompt_embeds=inp[f"{run}_context_neg"],
        audio_feats_50hz=inp[f"{run}_audio_feats_50hz"],
        max_area=spec["max_area"], num_frames=spec["infer_frames"], num_inference_steps=spec["steps"],
        guidance_scale=spec["guide_scale"], flow_shift=spec["shift"], sample_solver=spec["solver"],
        seed=spec["seed"], init_first_frame=spec["init_first_frame"], trim_to_audio=False,
        generator_device="cpu", callbacks=[rec])

    obs = spec["observed"]
    assert (out.height, out.width) == tuple(obs["size_hw"])
    assert out.num_clips == obs["num_clips"] == len(rec.clips)
    assert out.num_frames == obs["output_frames"]
    check("ref_latents", rec.clips[0]["ref_latents"][0])
    if rec.clips[0]["drop_motion_frames"]:
        # clip 0 drops its motion frames: the reference's encode of the zero buffer is never
        # read, so the pipeline does not run it (the video goldens below still hold)
        assert rec.clips[0]["motion_latents"] is None
    else:
        check("motion_latents_init", rec.clips[0]["motion_latents"][0])
    for r, c in rec.clips.items():
        check(f"clip{r}_noise", c["noise"])
        check(f"clip{r}_timesteps", c["timesteps"])
        check(f"clip{r}_audio_input", c["audio_input"])
        check(f"clip{r}_drop_motion_frames", torch.tensor(int(c["drop_motion_frames"])))
        check(f"clip{r}_x_in", torch.stack(c["x_in"]))
        check(f"clip{r}_v_cond", torch.stack(c["v_cond"]))
        check(f"clip{r}_v_uncond", torch.stack(c["v_uncond"]))
        check(f"clip{r}_latents", c["latents"])
        if r + 1 < out.num_clips:
            check(f"clip{r}_motion_latents_out", c["motion_latents_out"])
            # the next clip is conditioned on exactly these latents
            assert torch.equal(rec.clips[r + 1]["motion_latents"][0], c["motion_latents_out"])
    check("video", out.video)
