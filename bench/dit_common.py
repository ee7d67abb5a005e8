"""Shared setup for DiT benchmarks: a full-size DiT with random bf16 weights and S2V inputs.

Random weights are drawn directly on the target device (no 32 GB CPU init): the model is built
on the meta device, materialised with ``to_empty`` and filled tensor by tensor with values of a
realistic scale (so activations, norms and softmax behave like a trained model's, never zeros).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from s2v_fast.config import DiTConfig
from s2v_fast.kernels.attention import configure_attention
from s2v_fast.models.dit import S2VTransformer


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith((".norm_q.weight", ".norm_k.weight", "norm3.weight")):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32))
        elif name.endswith(".bias"):
            p.copy_(0.02 * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32))
        elif "modulation" in name or name.endswith("padding_tokens"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32))
        elif p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
                    .div_(math.sqrt(fan_in)))
        else:
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32))


def build_random_dit(preset: str = "wan2.2-s2v-14b", device="cuda", dtype=torch.bfloat16,
                     seed: int = 0, layers: int | None = None, attention="auto") -> S2VTransformer:
    """``layers``: a section of the preset's full width with that many blocks, audio injected
    after blocks 0, 2 and 3 (those below ``layers``), as bench/gpu_smoke.py's section.
    ``attention``: the backend (name or AttentionChoice) of every site, as the pipeline's
    ``--attention-backend`` (default auto, the pipeline's default)."""
    cfg = DiTConfig.preset(preset)
    if layers:
        cfg = dataclasses.replace(cfg, num_layers=layers,
                                  audio_inject_layers=tuple(i for i in (0, 2, 3) if i < layers))
    with torch.device("meta"):
        model = S2VTransformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    random_init_(model, seed)
    configure_attention(model, attention)
    return model.eval()


def make_inputs(model: S2VTransformer, height: int, width: int, frames: int = 80, batch: int = 2,
                motion: bool = True, seed: int = 1, text_lens=(37, 118)) -> dict:
    """Keyword arguments of ``model(...)`` for one CFG step (batch 2 = cond + uncond), as the
    denoiser passes them: one latent x [1, ...] and one timestep for both branches, batch-1
    reference / motion / pose inputs, one context and audio per branch."""
    c = model.config
    dev, dt = model.device, model.compute_dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    F_, lh, lw = frames // 4, height // 8, width // 8

    def rnd(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    context = [rnd(text_lens[i % len(text_lens)], c.text_dim) for i in range(batch)]
    audio = rnd(batch, 25, c.audio_dim, frames)
    if batch == 2:
        audio[1].zero_()  # the uncond branch sees zero audio (spec §8.5)
    return dict(
        x=rnd(1, c.in_dim, F_, lh, lw),
        t=torch.full((1,), 749, device=dev, dtype=torch.long),
        context=context,
        ref_latents=rnd(1, c.in_dim, 1, lh, lw, dtype=torch.float32),
        motion_latents=rnd(1, c.in_dim, 19, lh, lw, dtype=torch.float32),
        cond_states=torch.zeros(1, c.in_dim, F_, lh, lw, device=dev, dtype=dt),
        audio_input=audio,
        drop_motion_frames=not motion,
    )


def step_fn(model: S2VTransformer, inp: dict):
    """One CFG step as the pipeline runs it: conditions prepared once per clip (here, now), then
    the returned callable runs ``forward_step`` (bench/test_bench_quick.py, test_bench_full.py)."""
    x, t = inp["x"], inp["t"]
    kw = {k: v for k, v in inp.items() if k not in ("x", "t")}
    cond = model.prepare_conditions(num_frames=x.shape[2], batch_size=x.shape[0], **kw)
    return lambda: model.forward_step(x, t, cond)


def token_count(height: int, width: int, frames: int = 80, motion: bool = True) -> int:
    th, tw = height // 16, width // 16
    lv = frames // 4 * th * tw
    ref = th * tw
    mot = th * tw + (height // 32) * (width // 32) + 4 * (height // 64) * (width // 64) if motion else 0
    return lv + ref + mot
