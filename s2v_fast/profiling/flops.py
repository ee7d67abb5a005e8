"""Analytic FLOP counts for the S2V DiT (spec §9) and device peak throughput.

The torch profiler's ``with_flops`` counts matmul / conv only and misses SDPA / flash attention,
which is more than half of the DiT's work at 480p and ~72% at 720p. The pipeline therefore
registers analytic counts per stage (``stage_timer.add_flops("denoise", flops)``) and the
profiling report combines both.

Per block, forward, one CFG branch, L tokens, width C, FFN width f, 2 FLOPs per MAC::

    8·L·C²  (self-attention q/k/v/o)   + 4·L²·C (QKᵀ and PV)
  + 4·L·C²  (cross-attention q/o)      + 4·512·C² (cross k/v on 512 text tokens)
  + 4·L·512·C (cross-attention core)   + 4·L·C·f (FFN)

plus audio injection: n_inject × 4·Lv·C² (Lv = noisy video tokens).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "DiTFlops",
    "dit_block_flops",
    "audio_injection_flops",
    "dit_forward_flops",
    "streaming_forward_flops",
    "s2v_token_counts",
    "denoise_flops",
    "PEAK_TFLOPS_BF16",
    "device_peak_tflops",
    "current_device_name",
]

# Wan2.2-S2V-14B defaults (used when no config is given or a field is missing).
_DEFAULTS = {"dim": 5120, "ffn_dim": 13824, "num_layers": 40, "text_len": 512, "num_audio_injections": 12}


@dataclass
class DiTFlops:
    """FLOPs of one DiT forward (one CFG branch), split by kind."""

    self_attn_proj: float
    attention: float  # QKᵀ and PV of full self-attention (missed by profiler with_flops)
    cross_attn: float  # q/o projections, text k/v projections and the cross-attention core
    ffn: float
    audio: float
    tokens: int
    video_tokens: int

    @property
    def total(self) -> float:
        return self.self_attn_proj + self.attention + self.cross_attn + self.ffn + self.audio

    @property
    def gemm(self) -> float:
        """FLOPs in GEMMs (everything except the attention cores)."""
        return self.total - self.attention - self._cross_core

    _cross_core: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_cross_core", None)
        d["total"] = self.total
        d["attention_share"] = self.attention / self.total if self.total else 0.0
        return d

    def __mul__(self, k: float) -> "DiTFlops":
        return DiTFlops(
            self.self_attn_proj * k, self.attention * k, self.cross_attn * k, self.ffn * k,
            self.audio * k, self.tokens, self.video_tokens, self._cross_core * k,
        )

    __rmul__ = __mul__


def _cfg(config, key):
    if config is None:
        return _DEFAULTS[key]
    if key == "num_audio_injections":
        layers = _get(config, "audio_inject_layers", None)
        return len(layers) if layers is not None else _DEFAULTS[key]
    v = _get(config, key, None)
    return _DEFAULTS[key] if v is None else v


def _get(config, key, default):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def dit_block_flops(L: int, C: int, ffn_dim: int, text_len: int = 512) -> float:
    """FLOPs of one DiT block (spec §9), without audio injection."""
    L, C, f, T = float(L), float(C), float(ffn_dim), float(text_len)
    return 8 * L * C * C + 4 * L * L * C + 4 * L * C * C + 4 * T * C * C + 4 * L * T * C + 4 * L * C * f


def audio_injection_flops(Lv: int, C: int, num_injections: int = 12) -> float:
    """FLOPs of all audio-injection layers: num_injections × 4·Lv·C²."""
    return float(num_injections) * 4.0 * float(Lv) * float(C) * float(C)


def _forward_flops(config, overrides, *, queries: int, keys: int, video_tokens: int,
                   text_kv: bool) -> DiTFlops:
    """``queries`` tokens through every block, self-attention over ``keys`` keys; ``text_kv``:
    the text K/V projections are part of the forward (else cached per prompt)."""
    get = lambda k: overrides.get(k) if overrides.get(k) is not None else _cfg(config, k)  # noqa: E731
    C, f, n, T, na = get("dim"), get("ffn_dim"), get("num_layers"), get("text_len"), get("num_audio_injections")
    L, Lk = float(queries), float(keys)
    cross_core = n * 4 * L * T * C
    return DiTFlops(
        self_attn_proj=n * 8 * L * C * C,
        attention=n * 4 * L * Lk * C,
        cross_attn=n * (4 * L * C * C + (4 * T * C * C if text_kv else 0.0)) + cross_core,
        ffn=n * 4 * L * C * f,
        audio=audio_injection_flops(video_tokens, C, na),
        tokens=int(queries),
        video_tokens=int(video_tokens),
        _cross_core=cross_core,
    )


def dit_forward_flops(config=None, *, tokens: int, video_tokens: int, **overrides) -> DiTFlops:
    """FLOPs of one DiT forward for one CFG branch.

    ``config``: a ``DiTConfig``, a dict (e.g. the checkpoint's ``config.json``) or None (14B).
    ``tokens``: L, all tokens in self-attention (noisy + ref + motion); ``video_tokens``: Lv.
    ``overrides``: dim, ffn_dim, num_layers, text_len, num_audio_injections.
    """
    return _forward_flops(config, overrides, queries=tokens, keys=tokens,
                          video_tokens=video_tokens, text_kv=True)


def streaming_forward_flops(config=None, *, block_tokens: int, key_tokens: int,
                            **overrides) -> DiTFlops:
    """FLOPs of one block-causal forward of the streaming mode (LiveAvatar): ``block_tokens``
    queries (the noisy block; no ref/motion tokens in the sequence) against ``key_tokens`` keys
    (the filled part of the rolling cache + the cond tokens). The text K/V are computed once per
    prompt, so only the cross-attention q/o projections and core count."""
    return _forward_flops(config, overrides, queries=block_tokens, keys=key_tokens,
                          video_tokens=block_tokens, text_kv=False)


def s2v_token_counts(height: int, width: int, num_frames: int = 80, drop_motion: bool = False,
                     vae_stride: int = 8, patch: int = 2, temporal_stride: int = 4) -> dict:
    """Token counts of one DiT call (spec §9 table).

    Returns ``{"tokens_per_frame", "video", "ref", "motion", "total"}``; ``motion`` is 0 when the
    motion frames are dropped (clip 0 without an initial frame).
    """
    tpf = (height // (vae_stride * patch)) * (width // (vae_stride * patch))
    video = (num_frames // temporal_stride) * tpf
    ref = tpf
    motion = 0 if drop_motion else tpf + 2 * (tpf // 4)  # framepack: post + 2x + 4x
    return {"tokens_per_frame": tpf, "video": video, "ref": ref, "motion": motion,
            "total": video + ref + motion}


def denoise_flops(config=None, *, height: int, width: int, num_frames: int = 80, steps: int = 40,
                  cfg: bool = True, drop_motion: bool = False) -> float:
    """Analytic FLOPs of one clip's denoise loop (all steps, both CFG branches when ``cfg``)."""
    tc = s2v_token_counts(height, width, num_frames, drop_motion)
    per_call = dit_forward_flops(config, tokens=tc["total"], video_tokens=tc["video"]).total
    return per_call * steps * (2 if cfg else 1)


# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets. Matched by
# substring of torch.cuda.get_device_name(), first match wins (so H200 before H20, NVL/PCIe before
# the generic H100 = SXM entry).
PEAK_TFLOPS_BF16 = [
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
]


def current_device_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # pragma: no cover
        pass
    return None


def device_peak_tflops(name: str | None = None) -> float | None:
    """Peak dense bf16 TFLOP/s of a device name (default: the current CUDA device); None if unknown."""
    if name is None:
        name = current_device_name()
    if not name:
        return None
    up = name.upper()
    for key, peak in PEAK_TFLOPS_BF16:
        if key in up:
            return peak
    return None
