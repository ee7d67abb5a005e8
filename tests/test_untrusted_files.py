"""No file we read can run code (issue 30, item 1), and the hints say what to do (item 5).

A ``.pth`` / ``.bin`` whose pickle calls ``os.system`` is put where each loader reads (VAE, T5,
DiT shard, wav2vec2) and the loader must refuse it with a one-line error naming the file, without
running the command. The download hint is ``hf download ...``; a damaged tiny model set is
rebuilt (the cache) or answered with how to rebuild it (any other directory).
"""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest

from s2v_fast.models.tiny import TINY_VERSION
import torch

from s2v_fast import hub
from s2v_fast.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(REPO, "s2v_fast")


class _RunsCommand:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_malicious(path, marker, kind="torch"):
    """A pickle that runs ``touch marker`` when fully unpickled: ``torch.save`` zip format with
    the payload as a state-dict value, or a bare ``pickle.dump`` (legacy format)."""
    payload = _RunsCommand(f"touch {marker}")
    if kind == "torch":
        torch.save({"encoder.conv1.weight": payload}, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    return str(path)


def assert_refused(exc_info, path, marker):
    msg = str(exc_info.value)
    assert not os.path.exists(marker), "the pickle's command ran"
    assert "\n" not in msg
    assert str(path) in msg, msg
    return msg


@pytest.fixture(scope="module")
def tiny_master(tmp_path_factory):
    from s2v_fast.models.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(str(tmp_path_factory.mktemp("untrusted") / TINY_VERSION))


@pytest.fixture
def model_dir(tiny_master, tmp_path):
    """A copy of the tiny set without its manifest: an ordinary checkpoint directory."""
    d = tmp_path / "model"
    shutil.copytree(tiny_master, d)
    os.remove(d / hub.TINY_MANIFEST)
    return d


@pytest.fixture
def marker(tmp_path):
    return str(tmp_path / "PWNED")


# ----------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_vae_pickle_with_code_is_refused(model_dir, marker, kind):
    from s2v_fast.models.vae import WanVAE

    path = write_malicious(model_dir / hub.VAE_CHECKPOINT, marker, kind)
    with pytest.raises(CheckpointError) as ei:
        WanVAE.from_file(path)
    msg = assert_refused(ei, path, marker)
    assert "full unpickler" in msg
    if kind == "torch":
        assert "posix.system" in msg or "nt.system" in msg


@pytest.mark.parametrize("kind", ["torch", "raw"])
def test_t5_pickle_with_code_is_refused(model_dir, marker, kind):
    from s2v_fast.models.text_encoder import TextEncoder

    path = write_malicious(model_dir / hub.T5_CHECKPOINT, marker, kind)
    with pytest.raises(CheckpointError) as ei:
        TextEncoder.from_pretrained(str(model_dir))
    assert "full unpickler" in assert_refused(ei, path, marker)


def test_dit_shard_pickle_is_never_unpickled(model_dir, marker):
    from s2v_fast.checkpoint import INDEX_NAME, load_dit

    index = model_dir / INDEX_NAME
    meta = json.loads(index.read_text())
    shard = sorted(set(meta["weight_map"].values()))[0]
    path = write_malicious(model_dir / shard, marker)  # a pickle under a .safetensors name
    with pytest.raises(CheckpointError) as ei:
        load_dit(str(model_dir))
    assert_refused(ei, path, marker)

    # an index that points at a .bin shard: still read as safetensors only
    evil = write_malicious(model_dir / "diffusion_pytorch_model-evil.bin", marker)
    meta["weight_map"] = {k: os.path.basename(evil) for k in meta["weight_map"]}
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as ei:
        load_dit(str(model_dir))
    assert_refused(ei, evil, marker)

    # and no shard outside the directory
    meta["weight_map"] = {k: "../elsewhere.safetensors" for k in meta["weight_map"]}
    index.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="outside"):
        load_dit(str(model_dir))


def test_wav2vec2_bin_pickle_is_refused(model_dir, marker):
    from s2v_fast.models.audio_features import AudioFeatureExtractor

    w2v = model_dir / hub.WAV2VEC_DIR
    safe = w2v / "model.safetensors"
    # both files present: the safetensors one is used, the .bin is never opened
    write_malicious(w2v / "pytorch_model.bin", marker)
    assert AudioFeatureExtractor.from_pretrained(str(w2v)).num_hidden_states == 25
    assert not os.path.exists(marker)
    # only the .bin: read weights-only and refused
    os.remove(safe)
    with pytest.raises(CheckpointError) as ei:
        AudioFeatureExtractor.from_pretrained(str(w2v))
    msg = assert_refused(ei, w2v / "pytorch_model.bin", marker)
    assert "full unpickler" in msg


def test_plain_pth_still_loads_and_corrupt_one_says_redownload(model_dir):
    from s2v_fast.checkpoint import load_tensor_file

    sd = load_tensor_file(str(model_dir / hub.VAE_CHECKPOINT), "VAE checkpoint")
    assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    p = model_dir / hub.VAE_CHECKPOINT
    p.write_bytes(p.read_bytes()[:5000])  # truncated
    from s2v_fast.models.vae import WanVAE

    with pytest.raises(CheckpointError) as ei:
        WanVAE.from_file(str(p))
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg
    assert "hf download Wan-AI/Wan2.2-S2V-14B --local-dir DIR" in msg
    p.write_bytes(bytes(range(256)) * 16)  # garbage: the weights-only unpickler stops at once
    with pytest.raises(CheckpointError) as ei:
        WanVAE.from_file(str(p))
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and "corrupt" in msg


def test_no_unsafe_reader_in_the_package():
    """Every pickle read goes through checkpoint.load_tensor_file (weights_only=True, no
    fallback); nothing else calls torch.load / pickle.load / np.load(allow_pickle=True)."""
    bad = []
    for root, _, names in os.walk(PKG):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, REPO)
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    code = line.split("#", 1)[0]
                    if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True"
                                 r"|torch\.jit\.load|dill\.|joblib\.load", code):
                        bad.append(f"{rel}:{n}: {line.strip()}")
                    if (re.search(r"(?<![`\w.])torch\.load\(", code)  # not ``torch.load(`` prose
                            and rel != os.path.join("s2v_fast", "checkpoint.py")):
                        bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, "unsafe readers:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- the CLI


def test_cli_generate_refuses_malicious_vae(model_dir, marker, tmp_path):
    from test_pipeline_tiny import write_image, write_wav

    path = write_malicious(model_dir / hub.VAE_CHECKPOINT, marker)
    image = write_image(tmp_path / "face.png")
    audio = write_wav(tmp_path / "a.wav", 1.0)
    env = dict(os.environ, S2V_FAST_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "s2v_fast", "generate", "--model", str(model_dir),
           "--image", image, "--audio", audio, "--output", str(tmp_path / "o.mp4"),
           "--max-area", "64*64", "--num-frames", "8", "--num-inference-steps", "1",
           "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert not os.path.exists(marker), "the pickle's command ran"
    assert not os.path.exists(tmp_path / "o.mp4")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refusing to load VAE checkpoint " + path), r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- hints


def test_download_hint_is_hf_download(tmp_path):
    from s2v_fast.checkpoint import DOWNLOAD_HINT, checkpoint_files
    from s2v_fast.config import DiTConfig

    want = "hf download Wan-AI/Wan2.2-S2V-14B --local-dir"
    assert hub.download_hint() == "hf download Wan-AI/Wan2.2-S2V-14B --local-dir DIR"
    assert want in DOWNLOAD_HINT
    msgs = []
    for call in (lambda: hub.resolve_model(str(tmp_path)), lambda: DiTConfig.from_json(str(tmp_path)),
                 lambda: checkpoint_files(str(tmp_path))):
        with pytest.raises(CheckpointError) as ei:
            call()
        msgs.append(str(ei.value))
    for msg in msgs:
        assert want in msg and "huggingface-cli" not in msg and "\n" not in msg


def test_damaged_tiny_dir_says_how_to_rebuild(tiny_master, tmp_path, marker):
    d = tmp_path / "my-tiny"
    shutil.copytree(tiny_master, d)
    write_malicious(d / hub.VAE_CHECKPOINT, marker)
    with pytest.raises(CheckpointError) as ei:
        hub.resolve_model(str(d))
    msg = str(ei.value)
    assert not os.path.exists(marker)
    assert "\n" not in msg and "Wan2.1_VAE.pth" in msg
    assert f"python -m s2v_fast.models.tiny {d}" in msg and "hf download" not in msg
    # a loader error on a file of a tiny set points at the rebuild as well
    assert "python -m s2v_fast.models.tiny" in hub.repair_hint(
        str(d / hub.WAV2VEC_DIR / "model.safetensors"))
    # the command rebuilds it
    from s2v_fast.models.tiny import main, verify_tiny_checkpoint

    assert main([str(d)]) == 0
    assert verify_tiny_checkpoint(str(d)) is None and hub.resolve_model(str(d)) == str(d)


def test_tiny_cache_rebuilds_itself(tiny_master, tmp_path, monkeypatch, capsys, marker):
    from s2v_fast.models.tiny import default_cache_dir, verify_tiny_checkpoint
    from s2v_fast.models.vae import WanVAE

    monkeypatch.setenv("S2V_FAST_CACHE", str(tmp_path / "cache"))
    cache = default_cache_dir()
    shutil.copytree(tiny_master, cache)
    assert hub.resolve_model("tiny") == cache
    assert capsys.readouterr().err == ""  # an intact cache is reused silently
    write_malicious(os.path.join(cache, hub.VAE_CHECKPOINT), marker)
    assert hub.resolve_model("tiny") == cache
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rebuilding the tiny model set" in err[0] and "Wan2.1_VAE.pth" in err[0]
    assert verify_tiny_checkpoint(cache) is None
    WanVAE.from_file(os.path.join(cache, hub.VAE_CHECKPOINT))
    assert not os.path.exists(marker)
    # --model <the cache directory> is the cache too: rebuilt, not refused
    with open(os.path.join(cache, hub.T5_CHECKPOINT), "r+b") as f:
        f.truncate(1000)
    assert hub.resolve_model(cache) == cache
    assert verify_tiny_checkpoint(cache) is None
    assert "rebuilding" in capsys.readouterr().err


def test_tiny_cache_that_cannot_be_rebuilt(tiny_master, tmp_path, monkeypatch):
    from s2v_fast.models import tiny

    monkeypatch.setenv("S2V_FAST_CACHE", str(tmp_path / "cache"))
    cache = tiny.default_cache_dir()
    shutil.copytree(tiny_master, cache)
    with open(os.path.join(cache, hub.VAE_CHECKPOINT), "r+b") as f:
        f.truncate(100)

    def readonly(directory, seed=0):
        raise PermissionError(13, "Permission denied", directory)

    monkeypatch.setattr(tiny, "write_tiny_checkpoint", readonly)
    with pytest.raises(CheckpointError) as ei:
        hub.resolve_model("tiny")
    msg = str(ei.value)
    assert "\n" not in msg and cache in msg and "Wan2.1_VAE.pth" in msg
    assert "--model tiny" in msg and "hf download" not in msg


def test_tiny_verification_reasons(tiny_master, tmp_path):
    from s2v_fast.models.tiny import ensure_tiny_checkpoint, verify_tiny_checkpoint

    assert verify_tiny_checkpoint(tiny_master) is None
    d = tmp_path / "old"
    shutil.copytree(tiny_master, d)
    os.remove(d / hub.TINY_MANIFEST)
    assert "older s2v_fast" in verify_tiny_checkpoint(str(d))
    os.remove(d / hub.VAE_CHECKPOINT)
    assert "Wan2.1_VAE.pth" in verify_tiny_checkpoint(str(d))
    # a directory that is not a tiny set is never replaced
    real = tmp_path / "real"
    real.mkdir()
    (real / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="refusing to replace"):
        ensure_tiny_checkpoint(str(real))
    assert (real / "weights.safetensors").exists()
