"""Checkpoint save/load in the official sharded layout, error reporting, bf16 smoke test."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2v_fast.checkpoint import (INDEX_NAME, SINGLE_NAME, iter_checkpoint_tensors, load_dit,
                                 save_pretrained)
from s2v_fast.config import DiTConfig
from s2v_fast.errors import CheckpointError
from s2v_fast.models.dit import S2VTransformer


def _tiny(seed=0):
    torch.manual_seed(seed)
    return S2VTransformer(DiTConfig.preset("tiny"))


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny()


@pytest.fixture
def sharded(tmp_path, tiny_model):
    save_pretrained(tiny_model, str(tmp_path), max_shard_size="2MB")
    return tmp_path


def _shards(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def test_roundtrip_sharded(sharded, tiny_model):
    files = _shards(sharded)
    assert len(files) >= 2 and files[0] == f"diffusion_pytorch_model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict())
    loaded = S2VTransformer.from_pretrained(str(sharded))
    ref = tiny_model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert not any(p.is_meta for p in loaded.parameters())


def test_load_casts_dtype(sharded):
    m = load_dit(str(sharded), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_single_file_layout(tmp_path, tiny_model):
    save_pretrained(tiny_model, str(tmp_path), max_shard_size="1GB")
    assert _shards(tmp_path) == [SINGLE_NAME]
    m = load_dit(str(tmp_path))
    assert torch.equal(m.head.head.weight, tiny_model.head.head.weight)


def test_iter_checkpoint_tensors_select_and_slice(sharded, tiny_model):
    names = ["blocks.1.ffn.0.weight", "head.modulation"]
    got = dict(iter_checkpoint_tensors(str(sharded), select=names,
                                       slices=lambda n, s: (slice(0, 10),) if n.endswith("ffn.0.weight") else None))
    assert set(got) == set(names)
    assert torch.equal(got["blocks.1.ffn.0.weight"], tiny_model.blocks[1].ffn[0].weight[:10])
    assert torch.equal(got["head.modulation"], tiny_model.head.modulation)


def _shard_with(d, key):
    index = json.loads((d / INDEX_NAME).read_text())
    return d / index["weight_map"][key]


def test_missing_shard_file(sharded):
    os.remove(sharded / _shards(sharded)[-1])
    with pytest.raises(CheckpointError) as ei:
        load_dit(str(sharded))
    assert "of-" in str(ei.value) and "hf download" in str(ei.value)


def test_missing_config(sharded):
    os.remove(sharded / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_dit(str(sharded))


def test_unreadable_index(sharded):
    (sharded / INDEX_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        load_dit(str(sharded))


def test_missing_unexpected_and_wrong_shape_reported_together(sharded):
    f1 = _shard_with(sharded, "blocks.2.norm3.bias")
    sd = load_file(str(f1))
    del sd["blocks.2.norm3.bias"]
    sd["blocks.2.extra.weight"] = torch.zeros(3)
    save_file(sd, str(f1))
    f2 = _shard_with(sharded, "head.head.weight")
    sd = load_file(str(f2))
    sd["head.head.weight"] = torch.zeros(32, 128)
    save_file(sd, str(f2))
    with pytest.raises(CheckpointError) as ei:
        load_dit(str(sharded))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "blocks.2.norm3.bias" in msg and "missing" in msg
    assert "blocks.2.extra.weight" in msg and "unexpected" in msg
    assert "head.head.weight" in msg and "[32, 128]" in msg


def test_long_missing_list_is_truncated(sharded):
    f1 = _shard_with(sharded, "blocks.0.modulation")
    sd = load_file(str(f1))
    dropped = [k for k in sd if k.startswith("blocks.0.")]
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(f1))
    with pytest.raises(CheckpointError) as ei:
        load_dit(str(sharded))
    assert f"+{len(dropped) - 10} more" in str(ei.value)


def test_bf16_reference_mode_smoke(tiny_model):
    """bf16 weights, precision="reference": runs, finite, close to the fp32 model."""
    torch.manual_seed(1)
    F_, lh, lw = 2, 16, 16
    args = dict(
        x=torch.randn(2, 16, F_, lh, lw), t=torch.tensor([700, 700]),
        context=[torch.randn(7, 64), torch.randn(12, 64)],
        ref_latents=torch.randn(1, 16, 1, lh, lw), motion_latents=torch.randn(1, 16, 19, lh, lw),
        cond_states=torch.randn(1, 16, F_, lh, lw), audio_input=torch.randn(2, 25, 32, 4 * F_))
    ref = tiny_model(**args)
    m16 = _tiny().to(torch.bfloat16)
    assert m16.precision == "reference"
    out = m16(**args)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel_l2 = ((out - ref).norm() / ref.norm()).item()
    assert rel_l2 < 2e-2, rel_l2
