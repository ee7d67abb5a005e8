"""wav2vec2 audio features on the GPU vs the CPU (the reference runs them in fp32 on the CPU).

Full-size wav2vec2-large-xlsr-53 structure (hidden 1024, 24 layers, 16 heads, FFN 4096, conv 512)
with random weights (seeded), 5 s of a synthetic speech-like signal (harmonics + noise, never
silence). The same weights run through ``AudioFeatureExtractor`` on the CPU (fp32) and on CUDA
(fp32, cuDNN TF32 off as the pipeline runs it); reported per hidden state: relative L2 and max abs
difference, plus both run times.

    python bench/bench_audio_features.py           # needs CUDA; writes audio_features-<dev>-<date>.json
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import write_results  # noqa: E402

from s2v_fast.models.audio_features import AudioFeatureExtractor  # noqa: E402


def full_size_model(seed: int = 0, **overrides):
    """Random-weight wav2vec2 of the full-size structure; ``overrides`` change config fields (the
    CPU smoke form of bench/test_bench_quick.py shrinks it)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    cfg = dict(
        vocab_size=32, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, hidden_act="gelu", conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_bias=True,
        feat_extract_norm="layer", feat_extract_activation="gelu", do_stable_layer_norm=True,
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        final_dropout=0.0, layerdrop=0.0)
    cfg = Wav2Vec2Config(**{**cfg, **overrides})
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(cfg).eval()
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                  do_normalize=True, return_attention_mask=True)
    return model, fe


def speech_like(seconds: float = 5.0, sr: int = 16000, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 30 * np.sin(2 * math.pi * 0.7 * t)  # gliding pitch
    phase = 2 * math.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * 3.1 * t) ** 2  # syllable-rate amplitude
    return (0.3 * envelope * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def main():
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    model, fe = full_size_model()
    wave = speech_like()
    cpu = AudioFeatureExtractor(model, fe, device="cpu")
    gpu = AudioFeatureExtractor(copy.deepcopy(model).to("cuda"), fe, device="cuda")
    t0 = time.perf_counter()
    a = cpu(wave)
    cpu_s = time.perf_counter() - t0
    torch.backends.cudnn.allow_tf32 = False  # as S2VPipeline.audio_features does
    gpu(wave)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    b = gpu(wave)
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    b = b.cpu()
    rows = []
    rel = [float((b[i] - a[i]).double().norm() / a[i].double().norm()) for i in range(a.shape[0])]
    mx = [float((b[i] - a[i]).abs().max()) for i in range(a.shape[0])]
    rows.append(dict(name="wav2vec2_features_gpu_vs_cpu", shape=list(a.shape), seconds_audio=5.0,
                     max_rel_l2=max(rel), mean_rel_l2=sum(rel) / len(rel), max_abs=max(mx),
                     rel_l2_per_state=rel, cpu_s=cpu_s, gpu_s=gpu_s,
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                     tf32_cudnn=torch.backends.cudnn.allow_tf32,
                     cpu_threads=torch.get_num_threads()))
    print(f"[audio] {list(a.shape)}: rel L2 max {max(rel):.2e} mean {sum(rel) / len(rel):.2e}, "
          f"max abs {max(mx):.2e}; CPU {cpu_s:.2f} s, GPU {gpu_s * 1e3:.1f} ms")
    print("[audio] wrote", write_results("audio_features", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
