"""Attention per site (self / text / audio / causal), the seams of the plain model, and the fast
path as a transform (issue 24).

The golden fp32 cases run through both block runners with each site's backend named; a counting
backend shows that a choice reaches every site it names, on the plain and on the fast path.
"""
import ast
import inspect
from pathlib import Path

import pytest
import torch

from s2v_fast import S2VTransformer
from s2v_fast.attention_sites import SITES, AttentionChoice, AttentionSlot
from s2v_fast.fast import apply_fast_path, remove_fast_path, set_precision
from s2v_fast.kernels import attention as attn
from s2v_fast.kernels.registry import _BACKENDS, _INFO, register_attention_backend
from s2v_fast.models.dit import S2VTransformer as _Plain
from util import fixture, load_fixture, rel_err

PKG = Path(__file__).resolve().parents[1] / "s2v_fast"


def _golden():
    model = S2VTransformer.from_pretrained(fixture("dit"), dtype=torch.float32)
    inp = load_fixture("dit", "inputs.safetensors")
    args = (inp["x_clip1"][None], inp["t_clip1"], [inp["context_pos"]], inp["ref_latents"],
            inp["motion_latents"], inp["cond_zero"], inp["audio_clip1"])
    exp = load_fixture("dit", "case_clip1_with_motion.safetensors")["output"]
    return model, args, exp


@pytest.fixture
def spy_backend():
    """A registered backend "spy" (SDPA) that records the site shape of each call."""
    calls = []

    def spy(q, k, v):
        calls.append((q.shape[1], k.shape[1]))
        return attn.sdpa_attention(q, k, v)

    register_attention_backend("spy", spy)
    try:
        yield calls
    finally:
        _BACKENDS.pop("spy", None)
        _INFO.pop("spy", None)


# ----------------------------------------------------------------------------- structure
def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield ("." * node.level) + (node.module or "")
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_plain_model_imports_no_transform():
    """models/ is the reference math: no kernel, quantisation, offload, parallel, profiling or
    fast-path import (lazy imports inside functions included)."""
    banned = ("kernels", "quantization", "offload", "parallel", "profiling", "fast", "runtime")
    bad = []
    for path in sorted((PKG / "models").glob("*.py")):
        for mod in _imports(path):
            parts = mod.lstrip(".").split(".")
            if mod.startswith("..") and parts[0] in banned or mod.startswith("s2v_fast.") and parts[1] in banned:
                bad.append(f"{path.name}: {mod}")
    assert not bad, bad


def test_run_blocks_has_no_precision_branch():
    src = inspect.getsource(_Plain.run_blocks)
    assert "precision" not in src.split('"""')[-1] and "fast" not in src.split('"""')[-1]


def test_precision_is_the_runner_and_cannot_be_assigned():
    model = S2VTransformer(__import__("s2v_fast.config", fromlist=["DiTConfig"]).DiTConfig.preset("tiny"))
    assert model.precision == "reference" and model.rope_dtype == torch.float64
    with pytest.raises(AttributeError):
        model.precision = "fast"
    apply_fast_path(model)
    assert model.precision == "fast" and model.rope_dtype == torch.float32
    remove_fast_path(model)
    assert model.precision == "reference"
    with pytest.raises(ValueError, match="turbo"):
        set_precision(model, "turbo")


# ----------------------------------------------------------------------------- choice
def test_choice_parse_and_errors():
    c = AttentionChoice.parse("cudnn", ["text=triton", " audio = sdpa "])
    assert c.explicit("text") == "triton" and c.explicit("audio") == "sdpa" and c.explicit("self") is None
    assert c.with_site("text", "sdpa").explicit("text") == "sdpa"
    for bad in ("text", "=sdpa", "text="):
        with pytest.raises(ValueError, match="SITE=BACKEND"):
            AttentionChoice.parse("auto", [bad])
    with pytest.raises(ValueError, match="unknown site"):
        AttentionChoice.parse("auto", ["cross=sdpa"])
    with pytest.raises(ValueError, match="unknown attention site"):
        AttentionSlot("cross")


def test_effective_backends_follow_declared_sites():
    eff = attn.effective_backends(AttentionChoice("fp8"))
    # fp8 declares the long-key sites only: as the default the cross-attention sites take auto
    assert eff == dict(self="fp8", text="auto", audio="auto", causal="fp8")
    with pytest.raises(ValueError, match="does not serve the text site"):
        attn.effective_backends(AttentionChoice("auto", (("text", "fp8"),)))
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attn.effective_backends(AttentionChoice("nope"))
    assert attn.backend_info("triton").key_bias and not attn.backend_info("sdpa").key_bias


def test_runtime_choice_is_one_line_input_error():
    from s2v_fast.errors import InputError
    from s2v_fast.runtime import attention_choice

    assert attention_choice("sdpa", ["text=sdpa"], "cpu").explicit("text") == "sdpa"
    with pytest.raises(InputError, match="^attention backend cudnn needs a CUDA device"):
        attention_choice("auto", ["self=cudnn"], "cpu")
    with pytest.raises(InputError, match="^--attention-site 'self': use SITE=BACKEND"):
        attention_choice("auto", ["self"], "cpu")


# ----------------------------------------------------------------------------- reaching sites
@pytest.mark.parametrize("runner", ["reference", "fast"])
def test_backend_reaches_every_site(spy_backend, runner):
    """The golden clip-1 case with every site on "spy": each site calls it (self over all tokens,
    text over the 512 padded rows, audio over its per-frame tokens), on both runners, and the
    output stays the golden's (spy is SDPA: the same math as the reference slots)."""
    model, args, exp = _golden()
    eff = attn.configure_attention(model, "spy")
    assert eff == {s: "spy" for s in SITES}
    set_precision(model, runner)
    out = model(*args)[0]
    assert rel_err(out, exp) <= 1e-5
    c = model.config
    keys = {k for _, k in spy_backend}
    assert c.text_len in keys  # text: every padded key (spy takes no key bias: no compaction)
    assert c.num_audio_token + 1 in keys or any(k <= 8 for k in keys)  # audio: a few keys per frame
    n_sites = {"self": len(model.blocks), "text": len(model.blocks),
               "audio": len(model.audio_injector.injector)}
    assert len(spy_backend) == sum(n_sites.values())


def test_per_site_override_only_touches_its_site(spy_backend):
    model, args, exp = _golden()
    attn.configure_attention(model, AttentionChoice("sdpa", (("audio", "spy"),)))
    assert attn.configured_backends(model) == dict(self="sdpa", text="sdpa", audio="spy", causal="sdpa")
    apply_fast_path(model)
    out = model(*args)[0]
    assert rel_err(out, exp) <= 1e-5
    assert len(spy_backend) == len(model.audio_injector.injector)


def test_two_models_keep_their_own_backends(spy_backend):
    """No process-wide backend: configuring one model leaves another alone."""
    a, args, _ = _golden()
    b, _, _ = _golden()
    attn.configure_attention(a, "spy")
    b(*args)
    assert not spy_backend
    a(*args)
    assert spy_backend
    assert attn.configured_backends(b) == {s: "reference" for s in SITES}


def test_attention_config_restores_the_slots(spy_backend):
    model, _, _ = _golden()
    attn.configure_attention(model, "sdpa")
    with attn.attention_config(model, "spy") as eff:
        assert eff["self"] == "spy" and attn.configured_backends(model)["text"] == "spy"
    assert attn.configured_backends(model) == {s: "sdpa" for s in SITES}


def test_fast_path_fills_unconfigured_slots_with_auto():
    model, _, _ = _golden()
    attn.configure_attention(model, AttentionChoice("auto", (("self", "sdpa"),)))
    model.blocks[0].cross_attn.attn.set("reference", model.blocks[0].cross_attn.attn.fn)
    apply_fast_path(model)
    assert model.blocks[0].cross_attn.attn.backend == "auto"
    assert model.blocks[0].self_attn.attn.backend == "sdpa"  # a configured site stays


def test_plan_reads_declared_facts():
    from s2v_fast.fast.plan import build_plan

    model, _, _ = _golden()
    plan = build_plan(model)
    inj = model.audio_injector.layer_to_index
    n = len(model.blocks)
    assert plan.fuse_next == tuple(i not in inj and i + 1 < n for i in range(n))
    assert plan.rows_out_last and plan.streamer is None and plan.text == plan.audio == "fused"
    assert not any(plan.fp8_ffn_out)
    model.block_streamer = object()  # layerwise offload declares itself so
    model.parallel_strategy = object()  # and sequence parallelism so
    attn.configure_attention(model, AttentionChoice("auto", (("text", "triton"), ("audio", "sdpa"))))
    plan = build_plan(model)
    assert not any(plan.fuse_next) and not plan.rows_out_last
    assert plan.text == "bias" and plan.audio == "dense"
    attn.configure_attention(model, AttentionChoice("auto", (("text", "sdpa"),)))
    assert build_plan(model).text == "dense"
