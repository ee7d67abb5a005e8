"""LiveAvatar streaming mode against fixtures made with upstream's code (fp32, CPU).

Three fixture sets share one tiny model, LoRA and inputs (tests/fixtures/liveavatar):

* ``liveavatar_upstream_offline`` / ``liveavatar_upstream_realtime``: upstream's
  ``CausalWanModel_S2V`` run on those files with the LoRA merged by PEFT
  (tests/tools/liveavatar_upstream.py), 2 clips x 4 blocks x 4 steps, in upstream's single-GPU
  offline mode and with the real-time mode's rolling sink frame. Our runner reproduces them bit for
  bit on the machine that made them; the tolerance (6e-4, in their manifests) is 10x the spread one
  fp32-equivalent change of evaluation order causes, so another CPU's rounding passes.
* ``liveavatar`` (the public golden set): its tensors do not follow from its own files. Upstream's
  code on its ``model.safetensors`` + ``lora.safetensors`` differs from them by 0.3-0.7 with the
  LoRA merged as its README says and by 1.4e-3-3e-3 without it; ours gives the same numbers. So
  here it checks what it can: the schedule, noise and audio slices exactly, and every other tensor
  within 5e-3 with the LoRA left out (that bound catches any bookkeeping error: a wrong cache slot,
  RoPE position, rd or audio window gives errors of order 0.1-1).
"""
import copy
import json

import pytest
import torch

from util import fixture

from s2v_fast.testing import liveavatar_golden as golden

UPSTREAM_SETS = ["liveavatar_upstream_offline", "liveavatar_upstream_realtime"]


@pytest.mark.parametrize("name", UPSTREAM_SETS)
def test_entry_point_passes_upstream_sets(name, capsys):
    assert golden.main([fixture(name)]) == 0
    assert "62/62 tensors within tolerance" in capsys.readouterr().out


@pytest.fixture(scope="module")
def public_run():
    build = golden.build_model

    def without_lora(directory, manifest):
        manifest = copy.deepcopy(manifest)
        manifest["files"].pop("lora")
        return build(directory, manifest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(golden, "build_model", without_lora)
        return golden.run_fixture(fixture("liveavatar"))


def test_public_set_structure(public_run):
    got, expected, manifest = public_run
    exact = [n for n in manifest["tensors"] if n.endswith(("/noise", "/audio_input"))]
    assert len(exact) == 10
    for name in exact:
        assert golden.rel_err(got[name].reshape(expected[name].shape), expected[name]) < 1e-6, name
    rows = golden.compare(got, expected, manifest)
    assert {n for n, ok, _ in rows if n.startswith("schedule/") and ok} == {"schedule/timesteps",
                                                                          "schedule/sigmas"}
    errs = {n: golden.rel_err(got[n].reshape(expected[n].shape), expected[n])
            for n in manifest["tensors"] if not n.startswith("inputs/")}
    assert len(errs) == 52
    worst = max(errs.values())
    assert worst < 5e-3, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_compare_reports_a_wrong_tensor(public_run):
    got, expected, manifest = public_run
    manifest = copy.deepcopy(manifest)
    for meta in manifest["tensors"].values():
        if meta["tolerance"] != "exact":
            meta["tolerance"] = 5e-3
    got = dict(got)
    name = "blocks/c1_b3/final_latents"
    got[name] = got[name] + 0.1 * got[name].abs().max()
    bad = [n for n, ok, _ in golden.compare(got, expected, manifest) if not ok]
    assert bad == [name]


def test_entry_point_exit_code_on_failure(tmp_path, capsys):
    """A set whose tensors are wrong exits 1 and names them (a copy with one tensor changed)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = fixture("liveavatar_upstream_realtime")
    dst = tmp_path / "set"
    shutil.copytree(src, dst)
    with open(dst / "manifest.json") as f:
        man = json.load(f)
    man["files"]["base_model"]["path"] = fixture("liveavatar", "model.safetensors")
    man["files"]["lora"]["path"] = fixture("liveavatar", "lora.safetensors")
    with open(dst / "manifest.json", "w") as f:
        json.dump(man, f)
    t = load_file(dst / "tensors.safetensors")
    t["blocks/c0_b2/final_latents"] = t["blocks/c0_b2/final_latents"] * 1.01
    save_file(t, dst / "tensors.safetensors")
    assert golden.main([str(dst)]) == 1
    out = capsys.readouterr().out
    assert "FAIL blocks/c0_b2/final_latents" in out and "61/62" in out


def test_runner_memory_is_flat_over_many_blocks():
    """The caches are fixed-size rings: 10 clips allocate what 1 clip does."""
    from s2v_fast.config import DiTConfig
    from s2v_fast.models.dit import S2VTransformer
    from s2v_fast.streaming.preset import StreamingSettings
    from s2v_fast.streaming.runner import StreamingRunner

    torch.manual_seed(0)
    cfg = DiTConfig.from_dict(json.load(open(fixture("liveavatar", "manifest.json")))["dit_config"])
    model = S2VTransformer(cfg).eval()
    settings = StreamingSettings(frames_per_clip=12, cache_frames=6, seed=1)
    runner = StreamingRunner(model, settings)
    clips = 10
    audio = torch.randn(1, 25, cfg.audio_dim, settings.frames_per_clip * clips)
    ref = torch.randn(1, 16, 1, 8, 8)
    motion = torch.randn(1, 16, 19, 8, 8)
    sizes = []
    for blk in runner.stream(context=torch.randn(5, cfg.text_dim), ref_latents=ref,
                             motion_latents=motion, audio=audio, num_clips=clips):
        assert torch.isfinite(blk.latents).all()
        sizes.append((sum(c.nbytes() for c in runner.caches), runner.cond.num_tokens))
    assert len(sizes) == clips * settings.blocks_per_clip
    assert len(set(sizes)) == 1
    assert blk.start_frame == (len(sizes) - 1) * settings.block_frames  # absolute, never wrapped
