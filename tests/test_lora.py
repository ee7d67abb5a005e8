"""LoRA loading and merging (s2v_fast/lora.py): every key format against an independent float64
merge, PEFT's own merge, the LiveAvatar golden LoRA, and one-line errors raised before any weight
changes (never unpickling a file)."""
import copy
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from s2v_fast import lora as L
from s2v_fast.errors import InputError

GOLDEN_LORA = os.path.join(os.path.dirname(__file__), "fixtures", "liveavatar", "lora.safetensors")
DIM, FFN, RANK = 8, 16, 4


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = _Attn()
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN), nn.GELU(), nn.Linear(FFN, DIM))
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM))


class _Model(nn.Module):
    """The DiT's naming (blocks.N.self_attn.q, blocks.N.ffn.0) at toy size."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        for p in self.parameters():
            nn.init.normal_(p)  # non-trivial norm weights and biases too
        self.to(dtype)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return _Model(dtype)


def _pair(out_f=DIM, in_f=DIM, rank=RANK, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)  # up, down


def _save(tmp_path, tensors, name="lora.safetensors"):
    path = str(tmp_path / name)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, path)  # no shared memory
    return path


def _expected(weight, s, up=None, down=None, diff=None):
    """Independent reference: the merge in float64, rounded to the weight's dtype."""
    w = weight.detach().double()
    if up is not None:
        w = w + s * (up.double() @ down.double())
    if diff is not None:
        w = w + s * diff.double()
    return w.to(weight.dtype)


def _close(actual, expected):
    tol = 1e-5 if actual.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("prefix", ["", "base_model.model.", "diffusion_model.",
                                    "base_model.model.diffusion_model."])
@pytest.mark.parametrize("adapter", ["", ".default"])
def test_peft_keys_merge(tmp_path, prefix, adapter):
    model = _model()
    base = copy.deepcopy(model)
    targets = {"blocks.0.self_attn.q": _pair(seed=1), "blocks.1.ffn.0": _pair(FFN, DIM, seed=2),
               "blocks.1.ffn.2": _pair(DIM, FFN, seed=3)}
    tensors = {}
    for name, (up, down) in targets.items():
        tensors[f"{prefix}{name}.lora_A{adapter}.weight"] = down
        tensors[f"{prefix}{name}.lora_B{adapter}.weight"] = up
    lora = L.load_lora(_save(tmp_path, tensors))
    assert sorted(lora.targets) == sorted(targets) and lora.ranks == [RANK]
    report = L.merge_lora(model, [(lora, 0.7)])
    assert report.loras[0].low_rank == 3 and report.parameters == 3
    for name, (up, down) in targets.items():
        w = base.get_submodule(name).weight
        _close(model.get_submodule(name).weight, _expected(w, 0.7, up, down))
    untouched = model.blocks[0].self_attn.k.weight
    assert torch.equal(untouched, base.blocks[0].self_attn.k.weight)


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_wan_lightx2v_keys_merge(tmp_path, prefix):
    """lora_down/up with alpha (factor alpha/rank), plus full weight/bias deltas on a Linear, a
    LayerNorm and a bare parameter (blocks.N.modulation), as lightx2v/ComfyUI files carry."""
    model = _model()
    base = copy.deepcopy(model)
    up, down = _pair(seed=4)
    g = torch.Generator().manual_seed(5)
    diff_ffn, diff_b_ffn = torch.randn(FFN, DIM, generator=g), torch.randn(FFN, generator=g)
    diff_norm, diff_b_norm = torch.randn(DIM, generator=g), torch.randn(DIM, generator=g)
    diff_mod = torch.randn(1, 6, DIM, generator=g)
    p = prefix
    tensors = {f"{p}blocks.0.self_attn.v.lora_down.weight": down,
               f"{p}blocks.0.self_attn.v.lora_up.weight": up,
               f"{p}blocks.0.self_attn.v.alpha": torch.tensor(2.0),
               f"{p}blocks.0.self_attn.v.diff_b": diff_b_norm,  # a bias delta next to the pair
               f"{p}blocks.1.ffn.0.diff": diff_ffn, f"{p}blocks.1.ffn.0.diff_b": diff_b_ffn,
               f"{p}blocks.1.norm3.diff": diff_norm, f"{p}blocks.1.norm3.diff_b": diff_b_norm,
               f"{p}blocks.1.modulation.diff": diff_mod}
    report = L.merge_lora(model, [(L.load_lora(_save(tmp_path, tensors)), 0.5)])
    m, b = model.blocks, base.blocks
    _close(m[0].self_attn.v.weight, _expected(b[0].self_attn.v.weight, 0.5 * 2.0 / RANK, up, down))
    _close(m[0].self_attn.v.bias, _expected(b[0].self_attn.v.bias, 0.5, diff=diff_b_norm))
    _close(m[1].ffn[0].weight, _expected(b[1].ffn[0].weight, 0.5, diff=diff_ffn))
    _close(m[1].ffn[0].bias, _expected(b[1].ffn[0].bias, 0.5, diff=diff_b_ffn))
    _close(m[1].norm3.weight, _expected(b[1].norm3.weight, 0.5, diff=diff_norm))
    _close(m[1].norm3.bias, _expected(b[1].norm3.bias, 0.5, diff=diff_b_norm))
    _close(m[1].modulation, _expected(b[1].modulation, 0.5, diff=diff_mod))
    info = report.loras[0]
    assert (info.low_rank, info.diff, info.diff_b, info.alpha_factors) == (1, 3, 3, (0.5,))
    assert report.parameters == 7


def test_kohya_keys_merge(tmp_path):
    model = _model()
    base = copy.deepcopy(model)
    q, ffn2 = _pair(seed=6), _pair(DIM, FFN, rank=2, seed=7)
    tensors = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": q[1],
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": q[0],
               "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(8.0),
               "lora_unet_blocks_1_ffn_2.lora_down.weight": ffn2[1],
               "lora_unet_blocks_1_ffn_2.lora_up.weight": ffn2[0],
               "lora_unet_blocks_1_ffn_2.alpha": torch.tensor(1.0, dtype=torch.bfloat16)}
    lora = L.load_lora(_save(tmp_path, tensors))
    assert lora.ranks == [2, RANK]
    report = L.merge_lora(model, [(lora, None)])  # no scale given: 1.0
    _close(model.blocks[0].self_attn.q.weight,
           _expected(base.blocks[0].self_attn.q.weight, 8.0 / RANK, *q))
    _close(model.blocks[1].ffn[2].weight, _expected(base.blocks[1].ffn[2].weight, 1.0 / 2, *ffn2))
    assert report.loras[0].scale == 1.0 and report.loras[0].alpha_factors == (0.5, 2.0)
    assert "x1" in report.summary() and "2 low-rank" in report.summary()


def test_peft_exact_key_names_without_peft(tmp_path):
    """The names get_peft_model's state_dict() uses for our DiT: base_model.model.<module>.lora_A.default.weight."""
    model = _model()
    base = copy.deepcopy(model)
    up, down = _pair(seed=8)
    path = _save(tmp_path, {"base_model.model.blocks.0.self_attn.q.lora_A.default.weight": down,
                            "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": up})
    L.merge_lora(model, [(L.load_lora(path), 0.25)])
    _close(model.blocks[0].self_attn.q.weight,
           _expected(base.blocks[0].self_attn.q.weight, 0.25, up, down))


def test_bf16_merge_is_fp32_merge_rounded(tmp_path):
    """A bf16 weight is merged in fp32 and rounded once: it equals the fp32 model's merge
    rounded to bf16, bit for bit, also with two LoRAs on one layer (no intermediate rounding)."""
    m16 = _model(torch.bfloat16)
    m32 = _model(torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})
    a = _save(tmp_path, {"blocks.0.self_attn.o.lora_A.weight": _pair(seed=9)[1],
                         "blocks.0.self_attn.o.lora_B.weight": _pair(seed=9)[0]}, "a.safetensors")
    b = _save(tmp_path, {"blocks.0.self_attn.o.lora_down.weight": _pair(seed=10)[1].bfloat16(),
                         "blocks.0.self_attn.o.lora_up.weight": _pair(seed=10)[0].bfloat16(),
                         "blocks.0.self_attn.o.alpha": torch.tensor(2.0)}, "b.safetensors")
    loras = [(L.load_lora(a), 0.3), (L.load_lora(b), -0.6)]
    w16 = m16.blocks[0].self_attn.o.weight
    report = L.merge_lora(m16, loras)
    L.merge_lora(m32, loras)
    assert m16.blocks[0].self_attn.o.weight is w16 and w16.dtype == torch.bfloat16
    assert torch.equal(w16, m32.blocks[0].self_attn.o.weight.to(torch.bfloat16))
    assert report.parameters == 1 and len(report.loras) == 2


def test_merge_keeps_parameter_identity_and_grad_flags(tmp_path):
    model = _model()
    params = dict(model.named_parameters())
    up, down = _pair(seed=11)
    path = _save(tmp_path, {"blocks.1.self_attn.k.lora_A.weight": down,
                            "blocks.1.self_attn.k.lora_B.weight": up})
    L.merge_lora(model, [(L.load_lora(path), 1.0)])
    after = dict(model.named_parameters())
    assert all(after[k] is params[k] and after[k].requires_grad for k in params)


def test_peft_round_trip(tmp_path):
    """Our merge of PEFT's saved adapter equals PEFT's own merge_and_unload()."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    model = _model()
    ours = copy.deepcopy(model)
    r, alpha = 4, 2
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "k", "v", "o", "ffn.0", "ffn.2"])
    pm = peft.get_peft_model(model, config)
    torch.manual_seed(12)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()
    saved = get_peft_model_state_dict(pm)  # base_model.model.<module>.lora_A.weight
    full = {k: v for k, v in pm.state_dict().items() if "lora_" in k}  # ... .lora_A.default.weight
    assert any(".default." in k for k in full) and not any(".default." in k for k in saved)
    lora = L.load_lora(_save(tmp_path, saved))
    assert len(lora.targets) == 12 and len(L.load_lora(_save(tmp_path, full, "f.safetensors")).targets) == 12
    L.merge_lora(ours, [(lora, alpha / r)])  # PEFT files carry no alpha: the scale is alpha/r
    merged = pm.merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)


def test_golden_liveavatar_lora():
    """The LiveAvatar golden LoRA: PEFT keys, rank 8, no alpha in the file; 52 targets that all
    resolve in the tiny-shaped S2V DiT (dim 128, ffn 256, audio injected after layers 0, 2, 3)."""
    from s2v_fast.config import DiTConfig
    from s2v_fast.models.dit import S2VTransformer

    lora = L.load_lora(GOLDEN_LORA)
    assert (len(lora.targets), lora.num_tensors, lora.ranks) == (52, 104, [8])
    assert all(t.alpha is None and t.diff is None for t in lora.targets.values())
    torch.manual_seed(0)
    model = S2VTransformer(DiTConfig.preset("tiny"))
    before = model.blocks[2].cross_attn.o.weight.detach().clone()
    report = L.merge_lora(model, [(lora, 0.5)])
    assert report.parameters == 52 and report.loras[0].alpha_factors == (1.0,)
    t = lora.targets["blocks.2.cross_attn.o"]
    _close(model.blocks[2].cross_attn.o.weight, _expected(before, 0.5, t.up, t.down))


# -------------------------------------------------------------------------------------- errors
class _MakesMarker:
    """Unpickling this creates ``path`` (it calls open(path, "w"))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_pickle_file_is_refused_unread(tmp_path, kind):
    marker = tmp_path / "unpickled"
    path = str(tmp_path / "lora.pt")
    payload = {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(1), "x": _MakesMarker(str(marker))}
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(InputError) as e:
        L.load_lora(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot read LoRA file {path}: it is a PyTorch pickle") and "\n" not in msg
    assert msg.endswith("(fix: pass a .safetensors LoRA file)")
    assert not marker.exists()


def _valid_file(tmp_path):
    up, down = _pair()
    return _save(tmp_path, {"blocks.0.self_attn.q.lora_A.weight": down,
                            "blocks.0.self_attn.q.lora_B.weight": up})


@pytest.mark.parametrize("damage, reason", [("truncate", "not a valid safetensors file"),
                                            ("garbage", "not a valid safetensors file"),
                                            ("empty", "the file is empty"),
                                            ("no_tensors", "it holds no tensors")])
def test_damaged_file(tmp_path, damage, reason):
    path = _valid_file(tmp_path)
    data = open(path, "rb").read()
    if damage == "no_tensors":
        save_file({}, path)
    else:
        with open(path, "wb") as f:
            f.write({"truncate": data[: len(data) - 40], "garbage": b"\x13" * 64, "empty": b""}[damage])
    with pytest.raises(InputError, match=f"^cannot read LoRA file .*: {reason}.*fix: pass a .safetensors"):
        L.load_lora(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"^LoRA file not found: .*nope.safetensors \(fix: "):
        L.load_lora(str(tmp_path / "nope.safetensors"))
    with pytest.raises(InputError, match=r"^LoRA file not found: loras/nope.safetensors \(fix: "):
        L.resolve_lora_file("loras/nope.safetensors")  # looks like owner/name, but is a file name


def test_unknown_key_format(tmp_path):
    path = _save(tmp_path, {"blocks.0.self_attn.q.weight": torch.zeros(DIM, DIM),
                            "blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(DIM),
                            "blocks.0.self_attn.k.lora_A.weight": torch.zeros(RANK, DIM)})
    with pytest.raises(InputError, match=r"2 of 3 tensors have an unknown key format \(e\.g\. "
                                         r"blocks\.0\.self_attn\.q\.lora_magnitude_vector, "
                                         r"blocks\.0\.self_attn\.q\.weight\)"):
        L.load_lora(path)


def test_keys_matching_no_layer(tmp_path):
    up, down = _pair()
    tensors = {"blocks.0.self_attn.q.lora_A.weight": down, "blocks.0.self_attn.q.lora_B.weight": up,
               "blocks.40.self_attn.q.lora_A.weight": down, "blocks.40.self_attn.q.lora_B.weight": up,
               "blocks.0.norm3.lora_A.weight": down, "blocks.0.norm3.lora_B.weight": up,  # not Linear
               "lora_unet_blocks_7_ffn_0.lora_down.weight": down,
               "lora_unet_blocks_7_ffn_0.lora_up.weight": up}
    with pytest.raises(InputError) as e:
        L.merge_lora(_model(), [(L.load_lora(_save(tmp_path, tensors)), 1.0)])
    msg = str(e.value)
    assert "6 of 8 tensors match no layer of the model (e.g. " in msg and "\n" not in msg
    named = msg.split("(e.g. ")[1].split(")")[0].split(", ")
    assert len(named) == 3 and set(named) <= set(tensors) - {k for k in tensors if k.startswith("blocks.0.self")}
    assert "is it made for this model?" in msg


@pytest.mark.parametrize("key, shape, expected", [
    ("blocks.0.ffn.0.lora_A.weight", (RANK, FFN), [RANK, DIM]),
    ("blocks.0.ffn.0.lora_B.weight", (DIM, RANK), [FFN, RANK]),
    ("blocks.0.ffn.0.diff", (DIM, FFN), [FFN, DIM]),
    ("blocks.0.ffn.0.diff_b", (DIM,), [FFN]),
])
def test_shape_mismatch_names_the_tensor(tmp_path, key, shape, expected):
    up, down = _pair(FFN, DIM)
    tensors = {"blocks.0.ffn.0.lora_A.weight": down, "blocks.0.ffn.0.lora_B.weight": up,
               key: torch.zeros(shape)}
    with pytest.raises(InputError, match=rf"tensor {key} has shape \[{', '.join(map(str, shape))}\], "
                                         rf"expected \[{', '.join(map(str, expected))}\] for layer blocks\.0\.ffn\.0"):
        L.merge_lora(_model(), [(L.load_lora(_save(tmp_path, tensors)), 1.0)])


def test_rank_mismatch_in_the_file(tmp_path):
    path = _save(tmp_path, {"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, DIM),
                            "blocks.0.self_attn.q.lora_B.weight": torch.zeros(DIM, 3)})
    with pytest.raises(InputError, match=r"\[4, 8\] and .*lora_B.weight \[8, 3\] are not a \[r, in\] / \[out, r\]"):
        L.load_lora(path)


@pytest.mark.parametrize("tensors, lone", [
    ({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(RANK, DIM)}, "lora_A.weight has no matching up"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(DIM, RANK)},
     "lora_up.weight has no matching down"),
    ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(1.0)}, "alpha has no lora_down/lora_up"),
])
def test_incomplete_pair(tmp_path, tensors, lone):
    with pytest.raises(InputError, match=lone):
        L.load_lora(_save(tmp_path, tensors))


def test_one_layer_named_twice(tmp_path):
    up, down = _pair()
    path = _save(tmp_path, {"blocks.0.self_attn.q.lora_A.weight": down,
                            "blocks.0.self_attn.q.lora_B.weight": up,
                            "lora_unet_blocks_0_self_attn_q.lora_down.weight": down,
                            "lora_unet_blocks_0_self_attn_q.lora_up.weight": up})
    with pytest.raises(InputError, match="both target layer blocks.0.self_attn.q"):
        L.merge_lora(_model(), [(L.load_lora(path), 1.0)])
    dup = _save(tmp_path, {"blocks.0.self_attn.q.lora_A.weight": down,
                           "diffusion_model.blocks.0.self_attn.q.lora_A.default.weight": down}, "d.safetensors")
    with pytest.raises(InputError, match="are the same down of blocks.0.self_attn.q"):
        L.load_lora(dup)


def test_failing_merge_changes_nothing(tmp_path):
    """The second LoRA's last tensor is wrong: the first LoRA must not be half-merged."""
    model = _model()
    before = copy.deepcopy(model.state_dict())
    good = L.load_lora(_valid_file(tmp_path))
    up, down = _pair()
    bad = L.load_lora(_save(tmp_path, {"blocks.1.self_attn.q.lora_A.weight": down,
                                       "blocks.1.self_attn.q.lora_B.weight": up,
                                       "blocks.1.ffn.2.diff": torch.zeros(3, 3)}, "bad.safetensors"))
    with pytest.raises(InputError, match="blocks.1.ffn.2.diff has shape"):
        L.merge_lora(model, [(good, 1.0), (bad, 1.0)])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------- CLI form, hub
@pytest.mark.parametrize("text, source, scale", [
    ("a.safetensors", "a.safetensors", None),
    ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("dir/a.safetensors:-1e-1", "dir/a.safetensors", -0.1),
    ("Quark-Vision/Live-Avatar", "Quark-Vision/Live-Avatar", None),
    ("Quark-Vision/Live-Avatar:2", "Quark-Vision/Live-Avatar", 2.0),
    (r"C:\x\y.safetensors", r"C:\x\y.safetensors", None),
    (r"C:\x\y.safetensors:0.75", r"C:\x\y.safetensors", 0.75),
    ("C:y.safetensors", "C:y.safetensors", None),
    ("  b.safetensors:1 ", "b.safetensors", 1.0),
])
def test_parse_lora_spec(text, source, scale):
    assert L.parse_lora_spec(text) == L.LoraSpec(source, scale)


@pytest.mark.parametrize("text, match", [("a.safetensors:abc", "bad LoRA scale 'abc'"),
                                         ("a.safetensors:", "bad LoRA scale ''"),
                                         ("a.safetensors:nan", "finite number"),
                                         (":0.5", "empty LoRA source"), ("", "empty LoRA source")])
def test_parse_lora_spec_errors(text, match):
    with pytest.raises(InputError, match=match):
        L.parse_lora_spec(text)


def test_parse_lora_spec_existing_path_with_colon(tmp_path):
    path = tmp_path / "odd:name.safetensors"
    path.write_bytes(b"")
    assert L.parse_lora_spec(str(path)) == L.LoraSpec(str(path), None)


def test_resolve_local_file_and_directory(tmp_path):
    path = _valid_file(tmp_path)
    assert L.resolve_lora_file(path) == path
    assert L.resolve_lora_file(str(tmp_path)) == path
    (tmp_path / "notes.txt").write_text("x")
    assert L.resolve_lora_file(str(tmp_path)) == path
    _save(tmp_path, {"x.lora_A.weight": torch.zeros(1, 1)}, "other.safetensors")
    with pytest.raises(InputError, match=r"holds several \.safetensors files \(lora\.safetensors, "
                                         r"other\.safetensors\)"):
        L.resolve_lora_file(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .safetensors file in"):
        L.resolve_lora_file(str(empty))


def _fake_hub(monkeypatch, files=None, fail=None):
    """hf_hub_download / list_repo_files without network; returns the list of download calls."""
    import huggingface_hub

    calls = []

    def download(repo_id, filename, cache_dir=None, **_):
        if fail:
            raise fail
        calls.append((repo_id, filename, cache_dir))
        return f"/cache/{repo_id}/{filename}"

    def list_files(repo_id, **_):
        if fail:
            raise fail
        return files

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_files)
    return calls


def test_resolve_known_hf_repo(monkeypatch):
    calls = _fake_hub(monkeypatch, files=None)  # a known repo is never listed
    path = L.resolve_lora_file("Quark-Vision/Live-Avatar", cache_dir="/c")
    assert path == "/cache/Quark-Vision/Live-Avatar/liveavatar.safetensors"
    assert calls == [("Quark-Vision/Live-Avatar", "liveavatar.safetensors", "/c")]


def test_resolve_unknown_hf_repo_lists_its_files(monkeypatch):
    calls = _fake_hub(monkeypatch, files=["README.md", "sub/my_lora.safetensors", "config.json"])
    assert L.resolve_lora_file("someone/some-lora") == "/cache/someone/some-lora/sub/my_lora.safetensors"
    assert calls == [("someone/some-lora", "sub/my_lora.safetensors", None)]
    _fake_hub(monkeypatch, files=["a.safetensors", "b.safetensors"])
    with pytest.raises(InputError, match=r"Hugging Face repo someone/x holds several .* \(a\.safetensors, b"):
        L.resolve_lora_file("someone/x")


def test_hub_failure_says_how_to_download_by_hand(monkeypatch):
    _fake_hub(monkeypatch, fail=OSError("connection refused\nmore detail"))
    with pytest.raises(InputError) as e:
        L.resolve_lora_file("Quark-Vision/Live-Avatar")
    msg = str(e.value)
    assert "OSError: connection refused" in msg and "\n" not in msg
    assert "`hf download Quark-Vision/Live-Avatar liveavatar.safetensors --local-dir DIR`" in msg
