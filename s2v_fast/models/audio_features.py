"""Audio front-end (spec §5): waveform loading, wav2vec2 features, 30 fps resampling, bucketing.

* :func:`load_audio` -- ``librosa.load(path, sr=16000)`` mono float32, with one-line
  :class:`~s2v_fast.errors.InputError` messages for unusable files.
* :class:`AudioFeatureExtractor` -- ``Wav2Vec2FeatureExtractor`` (the audio half of the reference
  ``Wav2Vec2Processor``; ``do_normalize`` from ``preprocessor_config.json``) + ``Wav2Vec2ForCTC``
  loaded with ``from_pretrained(local_files_only=True)`` (official
  ``wav2vec2-large-xlsr-53-english`` key layout) from ``model.safetensors`` when the directory
  has it, else ``pytorch_model.bin`` read weights-only (never the full unpickler).
  ``__call__(wave) -> [25, T_a, D]`` fp32.
* :func:`interpolate_features` -- 50 Hz -> 30 fps, linear, ``align_corners=True``.
* :func:`bucket_features` -- ``get_audio_embed_bucket_fps`` semantics (round-half-to-even
  indices, zeros past the end, the extra all-zero clip when T30 is an exact multiple).

**transformers 5.x deviation, handled here**: in transformers 4.x the stable-layer-norm encoder
returned ``hidden_states[24]`` *after* the encoder's final LayerNorm (the reference relies on
this). In transformers 5.x ``output_hidden_states`` is collected by layer hooks and index 24 is the
raw output of the last layer (no final LayerNorm). We therefore do not use
``output_hidden_states``; the 25 states are collected with our own hooks: index 0 = the input of
layer 0 (feature projection + positional conv), 1..23 = outputs of layers 0..22, 24 =
``last_hidden_state`` (after ``encoder.layer_norm``), which matches the 4.x/reference layout.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from s2v_fast.errors import CheckpointError, InputError

__all__ = [
    "AUDIO_SR",
    "MIN_SAMPLES",
    "SILENCE_PEAK",
    "AudioFeatureExtractor",
    "bucket_features",
    "bucket_indices",
    "conv_output_length",
    "interpolate_features",
    "load_audio",
    "make_tiny_wav2vec2",
]

AUDIO_SR = 16000
MIN_SAMPLES = 400  # receptive field of the wav2vec2 conv stack: one frame
SILENCE_PEAK = 1e-4


def load_audio(path, sr: int = AUDIO_SR) -> np.ndarray:
    """Decode ``path`` (wav/mp3/flac/...) to mono float32 at ``sr`` Hz (librosa default resampler)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"audio file not found: {path}; check the --audio path")
    if os.path.isdir(path):
        raise InputError(f"audio path is a directory: {path}; pass an audio file (wav/mp3/flac)")
    import librosa

    try:
        with warnings.catch_warnings():  # librosa's audioread fallback warnings are noise here
            warnings.simplefilter("ignore")
            wave, _ = librosa.load(path, sr=sr, mono=True)
    except Exception as e:  # noqa: BLE001 - any decoder failure is the user's file
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise InputError(
            f"cannot decode audio file {path} ({type(e).__name__}: {msg}); convert it to WAV/MP3/FLAC"
        ) from None
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise InputError(f"audio file {path} contains no samples; pass a non-empty audio file")
    if not np.all(np.isfinite(wave)):
        raise InputError(f"audio file {path} contains NaN/Inf samples; re-encode the audio")
    if wave.size < MIN_SAMPLES:
        raise InputError(
            f"audio file {path} is too short ({wave.size} samples at {sr} Hz, need at least "
            f"{MIN_SAMPLES} = {1000 * MIN_SAMPLES / sr:.0f} ms); pass a longer audio file"
        )
    peak = float(np.abs(wave).max())
    if peak < SILENCE_PEAK:
        raise InputError(
            f"audio file {path} is silent (peak {peak:.2g} < {SILENCE_PEAK:g}); pass audio with speech or singing"
        )
    return wave


# ------------------------------------------------------------------------------------------------


def conv_output_length(num_samples: int, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)) -> int:
    n = int(num_samples)
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return n


def _weights_error(weights: str, e: BaseException) -> str:
    """One line naming the wav2vec2 weights file that could not be loaded, and why."""
    chain, cur = [], e
    while cur is not None and len(chain) < 5:  # transformers wraps torch's UnpicklingError
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(x) for x in chain)
    if "weights only load failed" in text.lower():  # torch's weights-only refusal
        m = re.search(r"unsupported GLOBAL ([\w.]+)", text, re.I)
        why = f"its pickle calls {m.group(1)}" if m else "it is corrupt or a pickle of more than tensors"
        return (f"refusing to load wav2vec2 weights {weights}: {why}, which needs Python's full "
                "unpickler (it can run code), and s2v_fast reads only plain tensor files; "
                "use the official wav2vec2-large-xlsr-53-english model.safetensors")
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return f"cannot load wav2vec2 weights {weights} ({msg}); re-download wav2vec2-large-xlsr-53-english"


class AudioFeatureExtractor:
    """wav2vec2 feature extractor + ``Wav2Vec2ForCTC``; ``__call__(wave) -> [25, T_a, D]`` float32."""

    def __init__(self, model, feature_extractor, device="cpu", dtype=torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(
                f"wav2vec2 directory not found: {path}; download wav2vec2-large-xlsr-53-english into the checkpoint dir"
            )
        for name in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"wav2vec2 directory {path} lacks {name}; re-download wav2vec2-large-xlsr-53-english")
        # safetensors whenever the directory has it (it holds no code); else pytorch_model.bin,
        # read weights-only (transformers' torch.load(weights_only=True)): never the full unpickler
        weights = os.path.join(path, "model.safetensors")
        use_safetensors = os.path.isfile(weights)
        if not use_safetensors:
            weights = os.path.join(path, "pytorch_model.bin")
            if not os.path.isfile(weights):
                raise CheckpointError(f"wav2vec2 directory {path} lacks model.safetensors; re-download wav2vec2-large-xlsr-53-english")
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

        try:
            fe = Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise CheckpointError(f"cannot load the wav2vec2 feature extractor from {path} ({msg}); re-download wav2vec2-large-xlsr-53-english") from None
        try:
            model = Wav2Vec2ForCTC.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                   use_safetensors=use_safetensors, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(_weights_error(weights, e)) from None
        if not model.config.do_stable_layer_norm:
            raise CheckpointError(
                f"wav2vec2 at {path} is not a stable-layer-norm (xlsr/large) model; use wav2vec2-large-xlsr-53-english"
            )
        model.to(device)
        return cls(model, fe, device=device, dtype=dtype)

    @property
    def num_hidden_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    def preprocess(self, wave) -> torch.Tensor:
        """Processor normalisation -> input_values [1, N] float32 (no attention mask)."""
        if isinstance(wave, torch.Tensor):
            wave = wave.detach().cpu().float().numpy()
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size < MIN_SAMPLES:
            raise InputError(f"audio is too short ({wave.size} samples, need at least {MIN_SAMPLES}); pass longer audio")
        sr = getattr(self.feature_extractor, "sampling_rate", AUDIO_SR)
        return self.feature_extractor(wave, sampling_rate=sr, return_tensors="pt").input_values

    @torch.inference_mode()
    def __call__(self, wave) -> torch.Tensor:
        input_values = self.preprocess(wave).to(self.device, self.dtype)
        base = self.model.wav2vec2
        layers = base.encoder.layers
        states: list = [None] * len(layers)

        def pre_hook(_mod, args, kwargs):
            states[0] = args[0] if args else kwargs["hidden_states"]

        def make_hook(i):
            def hook(_mod, _args, out):
                states[i + 1] = out[0] if isinstance(out, (tuple, list)) else out
            return hook

        handles = [layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]
        handles += [layers[i].register_forward_hook(make_hook(i)) for i in range(len(layers) - 1)]
        try:
            out = base(input_values, attention_mask=None)
        finally:
            for h in handles:
                h.remove()
        hidden = states + [out.last_hidden_state]  # 0: layer-0 input, 1..L-1: layer outputs, L: final LN
        return torch.cat([h.float() for h in hidden], dim=0)  # [L+1, T_a, D]


# ------------------------------------------------------------------------------------------------


def interpolate_features(feats: torch.Tensor, in_fps: float = 50, out_fps: float = 30,
                         out_len: int | None = None) -> torch.Tensor:
    """[N, T, D] at ``in_fps`` -> [N, int(T/in_fps*out_fps), D] (linear, align_corners=True)."""
    x = feats.transpose(1, 2)
    if out_len is None:
        out_len = int(x.shape[2] / float(in_fps) * out_fps)
    y = F.interpolate(x, size=out_len, mode="linear", align_corners=True)
    return y.transpose(1, 2)


def bucket_indices(num_frames_30: int, fps: int = 16, batch_frames: int = 80):
    """-> (indices [num_clips*batch_frames] int64 numpy, num_clips) like the reference
    ``get_sample_indices(30, T30 + pad, fps, num_clips*batch_frames, fixed_start=0)``."""
    scale = 30 / fps
    num_clips = int(num_frames_30 / (batch_frames * scale)) + 1
    n = num_clips * batch_frames
    total = num_frames_30 + (math.ceil(n / fps * 30) - num_frames_30)
    duration = n / fps
    t = np.linspace(0.0, duration, n, endpoint=False)
    idx = np.round(t * 30).astype(int)  # numpy round: half to even
    idx = np.clip(idx, 0, total - 1)
    return idx.astype(np.int64), num_clips


def bucket_features(feats30: torch.Tensor, fps: int = 16, batch_frames: int = 80, m: int = 0,
                    return_indices: bool = False):
    """``get_audio_embed_bucket_fps``: [N, T30, D] -> ([num_clips*batch_frames, N, (2m+1)*D], num_clips).

    Frame k uses 30 fps index ``round_half_even(k*30/fps)`` (with ``m`` neighbours at stride
    ``int(30/fps)``, clamped to [0, T30-1]); rows whose index is >= T30 are zeros. With
    ``return_indices`` the index array is returned as a third value."""
    num_layers, t30, dim = feats30.shape
    idx, num_clips = bucket_indices(t30, fps=fps, batch_frames=batch_frames)
    stride = int(30 / fps)
    offs = torch.arange(-m, m + 1, device=feats30.device) * stride
    idx_t = torch.as_tensor(idx, device=feats30.device)
    valid = idx_t < t30
    chosen = (idx_t[:, None] + offs[None, :]).clamp(0, max(t30 - 1, 0))  # [n, 2m+1]
    if t30 > 0:
        g = feats30[:, chosen.reshape(-1)]  # [N, n*(2m+1), D]
        g = g.reshape(num_layers, len(idx), 2 * m + 1, dim).permute(1, 0, 2, 3).reshape(len(idx), num_layers, -1)
        bucket = torch.where(valid[:, None, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
    else:
        bucket = feats30.new_zeros(len(idx), num_layers, (2 * m + 1) * dim)
    if return_indices:
        return bucket, num_clips, idx_t
    return bucket, num_clips


# ------------------------------------------------------------------------------------------------


def make_tiny_wav2vec2(directory: str, seed: int = 0, hidden_size: int = 32, num_hidden_layers: int = 24) -> str:
    """Write a tiny random ``Wav2Vec2ForCTC`` (xlsr-53 structure: 7 conv layers with the real
    kernels/strides, layer-norm feature extractor, stable layer norm; hidden 32, 2 heads, FFN 64,
    24 layers -> 25 hidden states) + ``preprocessor_config.json`` + ``vocab.json``. Deterministic."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'"):
        vocab[c] = 5 + i
    cfg = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=2, intermediate_size=2 * hidden_size, hidden_act="gelu",
        conv_dim=(hidden_size,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True, feat_extract_norm="layer", feat_extract_activation="gelu", do_stable_layer_norm=True,
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0, mask_time_prob=0.05, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ctc_loss_reduction="mean", architectures=["Wav2Vec2ForCTC"],
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = Wav2Vec2ForCTC(cfg).eval()
        # larger-than-default random weights so all 25 states differ visibly
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "pos_conv" not in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[1] if p.ndim == 2 else p[0].numel())))
    finally:
        torch.random.set_rng_state(state)
    os.makedirs(directory, exist_ok=True)
    model.config.save_pretrained(directory)
    # official wav2vec2-large-xlsr-53-english key layout: Wav2Vec2ForCTC names, weight-normed
    # positional conv stored as legacy ``weight_g`` / ``weight_v`` (transformers renames on load)
    from safetensors.torch import save_file

    legacy = {".parametrizations.weight.original0": ".weight_g", ".parametrizations.weight.original1": ".weight_v"}
    sd = {}
    for k, v in model.state_dict().items():
        for a, b in legacy.items():
            k = k.replace(a, b)
        sd[k] = v.detach().contiguous().clone()
    save_file(sd, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=AUDIO_SR, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=True)
    fe.save_pretrained(directory)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=2)
    with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Wav2Vec2CTCTokenizer", "word_delimiter_token": "|",
                   "do_lower_case": False, "unk_token": "<unk>", "pad_token": "<pad>",
                   "bos_token": "<s>", "eos_token": "</s>"}, f, indent=2)
    return directory
