"""Check the streaming mode against a LiveAvatar golden fixture set.

    python -m s2v_fast.testing.liveavatar_golden DIR [--verbose]

DIR holds what ``make_liveavatar_golden.py`` writes (``manifest.json``, ``model.safetensors``,
``lora.safetensors``, ``tensors.safetensors``; README.md there describes them). The base model
is built from ``manifest["dit_config"]``, the LoRA is merged with our loader, and upstream's
single-GPU offline path is replayed (reference latent = second latent of the 5-frame encode, sink
never refreshed, rd from the manifest) in float32 on the CPU. Every stored tensor is compared
with the manifest's metric (``max|C-E| / max|E|``) and tolerance. Exit 0 when all are within
tolerance, else 1, with one line per tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file

from ..checkpoint import load_dit
from ..config import DiTConfig
from ..lora import load_lora, merge_lora
from ..models.audio_features import bucket_features
from ..streaming.preset import OFFLINE, StreamingSettings
from ..streaming.runner import StreamingRunner


def rel_err(candidate: torch.Tensor, expected: torch.Tensor) -> float:
    c, e = candidate.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.abs().max().item()
    return (c - e).abs().max().item() / (denom if denom > 0 else 1.0)


def build_model(directory: str, manifest: dict):
    cfg = DiTConfig.from_dict(manifest["dit_config"], source="manifest dit_config")
    files = manifest["files"]
    model = load_dit(os.path.join(directory, files["base_model"]["path"]), dtype=torch.float32,
                     config=cfg)
    lora = manifest["files"].get("lora")
    if lora:
        weights = load_lora(os.path.join(directory, lora["path"]))
        merge_lora(model, [(weights, lora.get("scale", 1.0))])
    return model


def run_fixture(directory: str) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    """Replay the fixture's run -> (computed tensors by fixture name, expected, manifest)."""
    with open(os.path.join(directory, "manifest.json")) as f:
        manifest = json.load(f)
    expected = load_file(os.path.join(directory, manifest["files"]["tensors"]["path"]))
    cfg, run = manifest["config"], manifest["run"]
    model = build_model(directory, manifest)
    got: Dict[str, torch.Tensor] = {}

    sink = cfg.get("sink", OFFLINE)
    settings = StreamingSettings(steps=cfg["steps"], frames_per_clip=cfg["infer_frames"],
                                 seed=cfg["base_seed"], sink=sink)
    inp = {k[len("inputs/"):]: v for k, v in expected.items() if k.startswith("inputs/")}
    feats30 = inp["audio_features_30hz"].float()
    bucket, _ = bucket_features(feats30, fps=settings.fps, batch_frames=settings.frames_per_clip)
    audio = bucket.permute(1, 2, 0).unsqueeze(0)  # [1, 25, D, frames]
    # offline: the second latent of the 5-frame encode; real time: a 1-frame encode, which for
    # the causal VAE is the first latent of any longer encode
    t5 = inp["vae_encode_latents_T5"].float()[None]
    ref = t5[:, :, 1:2] if sink == OFFLINE else t5[:, :, 0:1]
    motion = inp["vae_encode_latents_T365"].float()[None]
    full = {(b["clip"], b["block"]) for b in run["blocks"] if b.get("full_step_tensors")}

    def on_step(ev):
        if (ev.clip, ev.block) in full:
            p = f"blocks/c{ev.clip}_b{ev.block}/step{ev.step}"
            got[f"{p}/dit_output"] = ev.velocity[0]
            if ev.step < settings.steps - 1:
                got[f"{p}/euler_output"] = ev.x_out[0]

    runner = StreamingRunner(model, settings, rd_sequence=run["rd_per_call"], on_step=on_step)
    for blk in runner.stream(context=inp["text_context"].float(), ref_latents=ref,
                             motion_latents=motion, audio=audio, num_clips=cfg["num_clip"]):
        p = f"blocks/c{blk.clip}_b{blk.block}"
        got[f"{p}/noise"] = blk.noise[0]
        got[f"{p}/final_latents"] = blk.latents[0]
        a0 = blk.clip * settings.frames_per_clip + blk.block * settings.video_frames_per_block
        got[f"{p}/audio_input"] = audio[..., a0:a0 + settings.video_frames_per_block]
        if blk.index == 0:
            n = blk.latents.shape[2] * (blk.latents.shape[3] // 2) * (blk.latents.shape[4] // 2)
            for s, cache in enumerate(runner.caches, start=1):
                for layer in range(len(cache.k)):
                    got[f"kv_after_block0/step{s}/layer{layer}/k_written"] = cache.k[layer][:, :n].clone()
                    got[f"kv_after_block0/step{s}/layer{layer}/v_written"] = cache.v[layer][:, :n].clone()
            for layer in range(len(runner.cond.k)):
                got[f"kv_after_block0/cond/layer{layer}/cond_k"] = runner.cond.k[layer]
                got[f"kv_after_block0/cond/layer{layer}/cond_v"] = runner.cond.v[layer]
    got["#timesteps"] = runner.schedule.timesteps
    got["#sigmas"] = runner.schedule.sigmas
    return got, expected, manifest


def compare(got: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
            manifest: dict) -> List[Tuple[str, bool, str]]:
    """(name, ok, detail) for every fixture tensor and the schedule."""
    rows = []
    for name, meta in manifest["tensors"].items():
        if name.startswith("inputs/"):
            continue
        exp = expected[name]
        if name not in got:
            rows.append((name, False, "not computed"))
            continue
        val = got[name].reshape(exp.shape)
        tol = meta["tolerance"]
        if tol == "exact" or not exp.is_floating_point():
            ok = torch.equal(val.to(exp.dtype), exp)
            rows.append((name, ok, "exact" if ok else "differs"))
        else:
            err = rel_err(val, exp)
            rows.append((name, err <= float(tol), f"rel err {err:.3g} (tolerance {tol})"))
    for blk in manifest["run"]["blocks"][:1]:
        for key in ("timesteps", "sigmas"):
            # scalar float32 arithmetic from numpy's linspace; 1e-6 relative, not bit equality
            err = rel_err(got[f"#{key}"], torch.tensor(blk[key]))
            rows.append((f"schedule/{key}", err <= 1e-6, f"rel err {err:.3g} (tolerance 1e-06)"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m s2v_fast.testing.liveavatar_golden",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", help="fixture directory (manifest.json, model/lora/tensors .safetensors)")
    ap.add_argument("--verbose", action="store_true", help="print every tensor, not only failures")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    got, expected, manifest = run_fixture(args.directory)
    rows = compare(got, expected, manifest)
    bad = [r for r in rows if not r[1]]
    for name, ok, detail in rows:
        if args.verbose or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    print(f"{len(rows) - len(bad)}/{len(rows)} tensors within tolerance")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
