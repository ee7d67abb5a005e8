"""umT5 text encoder: golden parity (tests/fixtures/t5), key map, tokenizer, cleaning, loader errors."""
import hashlib
import os
import shutil

import pytest
import torch

from s2v_fast.errors import CheckpointError
from s2v_fast.models import text_encoder as te
from s2v_fast.models.text_encoder import (
    DEFAULT_NEGATIVE_PROMPT,
    T5_CHECKPOINT_NAME,
    TextEncoder,
    clean_prompt,
    config_from_state_dict,
    make_tiny_tokenizer,
    map_official_key,
    map_official_state_dict,
)
from util import fixture, load_fixture, rel_err

CKPT = fixture("t5", T5_CHECKPOINT_NAME)
TOL = 1e-5


@pytest.fixture(scope="module")
def official_sd():
    return torch.load(CKPT, map_location="cpu", weights_only=True, mmap=True)


@pytest.fixture(scope="module")
def enc32(official_sd):
    return TextEncoder.from_state_dict(official_sd, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5ckpt")
    os.symlink(os.path.abspath(CKPT), d / T5_CHECKPOINT_NAME)
    make_tiny_tokenizer(str(d / "google" / "umt5-xxl"))
    return d


def test_golden_encoder_out(enc32):
    inp = load_fixture("t5", "inputs.safetensors")
    exp = load_fixture("t5", "outputs.safetensors")
    out = enc32.encode_ids(inp["ids"], inp["mask"])
    assert out.dtype == torch.float32 and out.shape == (2, 100, 64)
    assert rel_err(out, exp["encoder_out"]) <= TOL
    lens = inp["mask"].sum(1).tolist()
    assert lens == [97, 41]
    assert rel_err(out[0, : lens[0]], exp["context_0"]) <= TOL
    assert rel_err(out[1, : lens[1]], exp["context_1"]) <= TOL


def test_reference_attention_matches_eager_fp32(official_sd):
    # our registered attention (fp32 softmax, masked_fill bias) == transformers eager in fp32
    enc = TextEncoder.from_state_dict(official_sd, dtype=torch.float32)
    inp = load_fixture("t5", "inputs.safetensors")
    ids = torch.cat([inp["ids"], inp["ids"][:1, :97].repeat(1, 2)[:, :100]], 0)  # last row: no padding
    mask = torch.cat([inp["mask"], torch.ones(1, 100, dtype=torch.long)], 0)
    a = enc.encode_ids(ids, mask)
    enc.model.set_attn_implementation("eager")
    b = enc.encode_ids(ids, mask)
    assert rel_err(a, b) <= 1e-6


def test_config_inferred(official_sd):
    cfg = config_from_state_dict(official_sd)
    assert (cfg.vocab_size, cfg.d_model, cfg.d_kv, cfg.d_ff, cfg.num_layers, cfg.num_heads) == (256, 64, 16, 160, 3, 4)
    assert cfg.relative_attention_num_buckets == 32 and cfg.relative_attention_max_distance == 128
    assert cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"


def test_key_map_complete(official_sd, enc32):
    hf_keys = set(enc32.model.state_dict().keys())
    mapped = map_official_state_dict(official_sd)
    assert set(mapped) == hf_keys  # every HF key covered, nothing left over
    targets = [t for k in official_sd for t in map_official_key(k)]
    assert len(targets) == len(set(targets)) == len(hf_keys)
    assert enc32.model.encoder.embed_tokens.weight is enc32.model.shared.weight
    # values really assigned
    sd = enc32.model.state_dict()
    for k, v in official_sd.items():
        for t in map_official_key(k):
            assert torch.equal(sd[t], v.float()), t
    # full-size names (24 layers) map too
    assert map_official_key("blocks.23.ffn.gate.0.weight") == ["encoder.block.23.layer.1.DenseReluDense.wi_0.weight"]
    with pytest.raises(KeyError):
        map_official_key("blocks.0.ffn.gate.1.weight")


def test_bf16_load_keeps_checkpoint_dtype(official_sd):
    enc = TextEncoder.from_state_dict(official_sd)  # default bf16
    assert all(p.dtype == torch.bfloat16 for p in enc.model.parameters())
    inp = load_fixture("t5", "inputs.safetensors")
    exp = load_fixture("t5", "outputs.safetensors")
    out = enc.encode_ids(inp["ids"], inp["mask"])
    assert out.dtype == torch.bfloat16
    assert rel_err(out, exp["encoder_out"]) < 5e-2  # bf16 rounding only


def test_clean_prompt_and_negative():
    assert clean_prompt("  a &amp;amp; b \n\t c  ") == "a & b c"
    assert clean_prompt("caf\u00c3\u00a9  &lt;x&gt;") == "café <x>"  # ftfy mojibake fix + unescape
    assert DEFAULT_NEGATIVE_PROMPT.startswith("画面模糊，最差质量") and DEFAULT_NEGATIVE_PROMPT.endswith("倒着走")
    assert len(DEFAULT_NEGATIVE_PROMPT) == 116 and DEFAULT_NEGATIVE_PROMPT.count("，") == 20
    digest = hashlib.sha256(DEFAULT_NEGATIVE_PROMPT.encode("utf-8")).hexdigest()
    assert digest == "98afffdba82fbb1f87767b2e0d022cb2e4960f400d98c617f9b82bc707d09218"  # spec §3.1 string


def test_tiny_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    d1 = make_tiny_tokenizer(str(tmp_path / "a"))
    d2 = make_tiny_tokenizer(str(tmp_path / "b"))
    with open(os.path.join(d1, "spiece.model"), "rb") as f1, open(os.path.join(d2, "spiece.model"), "rb") as f2:
        assert f1.read() == f2.read()  # deterministic
    tok = AutoTokenizer.from_pretrained(d1, local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 150 <= len(tok) <= 256
    out = tok(["a young woman is singing", "x" * 2000], padding="max_length", max_length=512, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == (2, 512)
    n = int(mask[0].sum())
    assert 2 < n < 30 and ids[0, n - 1] == 1 and (ids[0, n:] == 0).all()
    assert int(mask[1].sum()) == 512 and ids[1, -1] == 1  # truncated, still ends with </s>
    assert int(ids.max()) < 256


def test_from_pretrained_and_encode(tiny_ckpt_dir):
    enc = TextEncoder.from_pretrained(str(tiny_ckpt_dir), dtype=torch.float32)
    prompts = ["A young woman   is singing on a bright stage.", DEFAULT_NEGATIVE_PROMPT]
    ctx = enc.encode(prompts)
    ids, mask = enc.tokenize(prompts)
    assert ids.shape == (2, 512)
    full = enc.encode_ids(ids, mask)
    for i, c in enumerate(ctx):
        n = int(mask[i].sum())
        assert c.shape == (n, 64) and c.dtype == torch.float32
        assert torch.equal(c, full[i, :n])
    # single-prompt batches (as the pipeline calls it) give the same rows
    c0 = enc.encode([prompts[0]])[0]
    assert rel_err(c0, ctx[0]) <= 1e-6


def test_loader_errors(tmp_path, tiny_ckpt_dir):
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.from_pretrained(str(tmp_path / "nope"))
    # tokenizer ok, checkpoint missing
    d = tmp_path / "ck"
    shutil.copytree(tiny_ckpt_dir / "google", d / "google")
    with pytest.raises(CheckpointError, match="T5 checkpoint not found"):
        TextEncoder.from_pretrained(str(d))
    # corrupt checkpoint
    (d / T5_CHECKPOINT_NAME).write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot read T5 checkpoint"):
        TextEncoder.from_pretrained(str(d))
    # wrong keys
    torch.save({"foo.weight": torch.zeros(2)}, d / T5_CHECKPOINT_NAME)
    with pytest.raises(CheckpointError):
        TextEncoder.from_pretrained(str(d))
    # not a dict of tensors
    torch.save([1, 2, 3], d / T5_CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="not a state dict"):
        TextEncoder.from_pretrained(str(d))
    # missing tensor
    sd = dict(torch.load(CKPT, weights_only=True))
    sd.pop("blocks.1.ffn.fc2.weight")
    torch.save(sd, d / T5_CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        TextEncoder.from_pretrained(str(d))
    # wrong shape
    sd = dict(torch.load(CKPT, weights_only=True))
    sd["blocks.1.attn.q.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    torch.save(sd, d / T5_CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="shape"):
        TextEncoder.from_pretrained(str(d))
    # tokenizer dir missing / broken
    e = tmp_path / "ck2"
    e.mkdir()
    os.symlink(os.path.abspath(CKPT), e / T5_CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="tokenizer directory not found"):
        TextEncoder.from_pretrained(str(e))
    (e / "google" / "umt5-xxl").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="cannot load T5 tokenizer"):
        TextEncoder.from_pretrained(str(e))


def test_error_messages_are_one_line(tmp_path):
    try:
        TextEncoder.from_pretrained(str(tmp_path))
    except CheckpointError as e:
        assert "\n" not in str(e)
    else:  # pragma: no cover
        pytest.fail("expected CheckpointError")


def test_module_api():
    for name in te.__all__:
        assert hasattr(te, name), name
