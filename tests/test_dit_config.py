"""DiTConfig parsing, presets and validation; 14B structure on the meta device."""
import json

import pytest
import torch

from util import fixture

from s2v_fast.config import DiTConfig
from s2v_fast.errors import CheckpointError


def test_fixture_config_reads_all_keys():
    cfg = DiTConfig.from_json(fixture("dit", "config.json"))
    assert (cfg.dim, cfg.num_heads, cfg.num_layers, cfg.ffn_dim) == (128, 2, 4, 256)
    assert cfg.text_dim == 48 and cfg.audio_dim == 32 and cfg.audio_inject_layers == (0, 2, 3)
    assert cfg.patch_size == (1, 2, 2) and cfg.window_size == (-1, -1) and cfg.head_dim == 64


def test_presets():
    big = DiTConfig.preset("wan2.2-s2v-14b")
    assert (big.dim, big.ffn_dim, big.num_heads, big.num_layers, big.text_dim) == (5120, 13824, 40, 40, 4096)
    assert big.audio_inject_layers == (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    assert big.audio_dim == 1024 and big.cond_dim == 16 and big.text_len == 512 and big.eps == 1e-6
    tiny = DiTConfig.preset("tiny")
    assert (tiny.dim, tiny.num_heads, tiny.num_layers, tiny.text_dim) == (128, 2, 4, 64)
    with pytest.raises(CheckpointError):
        DiTConfig.preset("huge")


def test_official_config_without_text_dim_defaults_to_4096(tmp_path):
    d = {"_class_name": "WanModel_S2V", "_diffusers_version": "0.35.0", **DiTConfig.preset("tiny").to_dict()}
    for k in ("text_dim", "patch_size", "window_size", "qk_norm", "cross_attn_norm"):
        d.pop(k)
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    assert DiTConfig.from_json(str(tmp_path)).text_dim == 4096


def test_roundtrip(tmp_path):
    cfg = DiTConfig.preset("tiny")
    cfg.to_json(str(tmp_path / "config.json"))
    assert DiTConfig.from_json(str(tmp_path / "config.json")) == cfg


@pytest.mark.parametrize("override, words", [
    ({"bogus_key": 1}, "bogus_key"),
    ({"dim": 129}, "divisible"),
    ({"audio_inject_layers": [0, 4]}, "out of range"),
    ({"enable_motioner": True}, "enable_motioner"),
    ({"framepack_drop_mode": "drop"}, "framepack_drop_mode"),
    ({"window_size": [4, 4]}, "window_size"),
    ({"adain_mode": "attn_norm_v2"}, "adain_mode"),
    ({"model_type": "t2v"}, "model_type"),
])
def test_bad_configs_raise(override, words):
    d = DiTConfig.preset("tiny").to_dict()
    d.update(override)
    with pytest.raises(CheckpointError) as ei:
        DiTConfig.from_dict(d)
    msg = str(ei.value)
    assert words in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(CheckpointError, match="hf download"):
        DiTConfig.from_json(str(tmp_path))


def test_14b_structure_on_meta_device():
    from s2v_fast.models.dit import S2VTransformer

    with torch.device("meta"):
        model = S2VTransformer(DiTConfig.preset("wan2.2-s2v-14b"))
    sd = model.state_dict()
    assert len(sd) == 1260
    assert sum(t.numel() for t in sd.values()) == 16_295_755_609
    assert not any("freqs" in k for k in sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["casual_audio_encoder.encoder.conv1_local.conv.weight"] == (5120, 1024, 3)
    assert shapes["casual_audio_encoder.encoder.conv1_global.conv.weight"] == (1280, 1024, 3)
    assert shapes["audio_injector.injector_adain_layers.11.linear.weight"] == (10240, 5120)
    assert shapes["frame_packer.proj_4x.weight"] == (5120, 16, 4, 8, 8)
    assert shapes["head.head.weight"] == (64, 5120) and shapes["head.modulation"] == (1, 2, 5120)
    assert shapes["blocks.39.modulation"] == (1, 6, 5120)
    assert shapes["time_projection.1.weight"] == (30720, 5120)
    assert shapes["trainable_cond_mask.weight"] == (3, 5120)
