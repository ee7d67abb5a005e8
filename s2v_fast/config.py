"""DiT configuration (`WanModel_S2V` constructor values, spec §3.2).

`DiTConfig` reads the official diffusers `config.json`. Diffusers metadata keys (those starting
with ``_``, e.g. ``_class_name``) are ignored. Keys the official loader never writes but some
copies carry (``text_dim``, ``patch_size``, ``window_size``, ``qk_norm``, ``cross_attn_norm``) are
honoured when present. Unknown keys, contradictory values and flags selecting code paths this
implementation does not provide raise :class:`s2v_fast.errors.CheckpointError`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


@dataclass
class DiTConfig:
    model_type: str = "s2v"
    patch_size: tuple = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 40
    num_layers: int = 40
    window_size: tuple = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    audio_inject_layers: tuple = field(default=_14B_INJECT_LAYERS)
    zero_init: bool = True  # training-time initialisation only
    zero_timestep: bool = True
    enable_motioner: bool = False
    add_last_motion: bool = True
    enable_tsm: bool = False
    trainable_token_pos_emb: bool = False
    motion_token_num: int = 1024  # only used by the (disabled) motioner
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        self.patch_size = tuple(int(v) for v in self.patch_size)
        self.window_size = tuple(int(v) for v in self.window_size)
        self.audio_inject_layers = tuple(int(v) for v in self.audio_inject_layers)
        self.validate()

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for k, v in d.items():
            if k.startswith("_"):
                continue  # diffusers metadata (_class_name, _diffusers_version, ...)
            if k in names:
                kwargs[k] = v
            else:
                unknown.append(k)
        if unknown:
            raise CheckpointError(
                f"{source}: unknown DiT config key(s) {sorted(unknown)}; this is not a Wan2.2-S2V "
                "(WanModel_S2V) config.json - point to the Wan2.2-S2V-14B checkpoint directory")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid DiT config value ({exc})") from None

    @classmethod
    def from_json(cls, path: str) -> "DiTConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(
                f"missing DiT config {path}; download the weights with "
                "`hf download Wan-AI/Wan2.2-S2V-14B --local-dir DIR`")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read DiT config {path} ({exc}); re-download it") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"DiT config {path} is not a JSON object; re-download it")
        return cls.from_dict(d, source=path)

    @classmethod
    def preset(cls, name: str) -> "DiTConfig":
        key = name.lower()
        if key in ("wan2.2-s2v-14b", "s2v-14b", "14b"):
            return cls()
        if key == "tiny":
            return cls(dim=128, ffn_dim=256, num_heads=2, num_layers=4, text_dim=64,
                       audio_dim=32, audio_inject_layers=(0, 2, 3))
        raise CheckpointError(f"unknown DiT preset {name!r}; use 'wan2.2-s2v-14b' or 'tiny'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("patch_size", "window_size", "audio_inject_layers"):
            d[k] = list(d[k])
        return d

    def to_json(self, path: str) -> None:
        d = {"_class_name": "WanModel_S2V", **self.to_dict()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_hidden_dim(self) -> int:
        """Channel width of the first global conv of the audio encoder (dim / num_audio_token)."""
        return self.dim // self.num_audio_token

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(msg):
            raise CheckpointError(f"unsupported DiT config: {msg}")

        for k in ("dim", "ffn_dim", "freq_dim", "text_dim", "in_dim", "out_dim", "num_heads",
                  "num_layers", "audio_dim", "num_audio_token", "text_len", "cond_dim"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(f"{k}={v!r} must be a positive integer")
        if self.model_type != "s2v":
            bad(f"model_type={self.model_type!r} (only 's2v')")
        if self.patch_size != (1, 2, 2):
            bad(f"patch_size={list(self.patch_size)} (only [1, 2, 2])")
        if self.dim % self.num_heads:
            bad(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            bad(f"head dim {self.head_dim} must be even and >= 6 for 3-axis RoPE")
        if self.dim % self.num_audio_token:
            bad(f"dim={self.dim} is not divisible by num_audio_token={self.num_audio_token}")
        if self.freq_dim % 2:
            bad(f"freq_dim={self.freq_dim} must be even")
        if self.window_size != (-1, -1):
            bad(f"window_size={list(self.window_size)} (only global attention [-1, -1])")
        if not self.qk_norm or not self.cross_attn_norm:
            bad("qk_norm and cross_attn_norm must be true")
        if not (isinstance(self.eps, (int, float)) and 0 < self.eps < 1):
            bad(f"eps={self.eps!r}")
        if not self.enable_adain or self.adain_mode != "attn_norm":
            bad(f"enable_adain={self.enable_adain}, adain_mode={self.adain_mode!r} "
                "(only enable_adain=true with adain_mode='attn_norm')")
        if self.enable_motioner:
            bad("enable_motioner=true (only the FramePack motion path is implemented)")
        if not self.enable_framepack:
            bad("enable_framepack=false (only the FramePack motion path is implemented)")
        if self.framepack_drop_mode != "padd":
            bad(f"framepack_drop_mode={self.framepack_drop_mode!r} (only 'padd')")
        if not self.add_last_motion:
            bad("add_last_motion=false (only true)")
        if self.enable_tsm or self.trainable_token_pos_emb:
            bad("enable_tsm / trainable_token_pos_emb must be false")
        if not self.zero_timestep:
            bad("zero_timestep=false (only true)")
        layers = self.audio_inject_layers
        if not layers or len(set(layers)) != len(layers) or list(layers) != sorted(layers):
            bad(f"audio_inject_layers={list(layers)} must be non-empty, unique and increasing")
        if layers[0] < 0 or layers[-1] >= self.num_layers:
            bad(f"audio_inject_layers={list(layers)} out of range for num_layers={self.num_layers}")
