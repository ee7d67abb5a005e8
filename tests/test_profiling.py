"""Profiling: trace ranges, stage timer, ProfilerSession artifacts, kernel categories, FLOPs."""
import gzip
import json
import os
import stat

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from s2v_fast.errors import InputError
from s2v_fast.profiling import (
    ProfileOptions,
    ProfilerSession,
    StageTimer,
    categorize_kernel,
    current_stage_timer,
    run_profiled,
    stage_json_path,
    trace_range,
    traced,
    validate_profile_dir,
)
from s2v_fast.profiling import ranges as R
from s2v_fast.profiling.export import CATEGORIES, kernel_category_table, write_workbook
from s2v_fast.profiling.flops import denoise_flops, device_peak_tflops, dit_forward_flops, s2v_token_counts
from s2v_fast.profiling.session import flops_table


# ----------------------------------------------------------------------------- a tiny "DiT"
class TinyBlock(nn.Module):
    def __init__(self, c=32, heads=2):
        super().__init__()
        self.h = heads
        self.norm = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.o = nn.Linear(c, c)
        self.ffn = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        b, l, c = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        sh = lambda t: t.view(b, l, self.h, c // self.h).transpose(1, 2)  # noqa: E731
        with trace_range("attention"):
            a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
        x = x + self.o(a.transpose(1, 2).reshape(b, l, c))
        with trace_range("audio_injection"):
            x = x + 0.1 * x
        return x + self.ffn(x)


class TinyDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])

    def forward(self, x):
        for i, blk in enumerate(self.blocks):
            with trace_range(f"block{i}"):
                x = blk(x)
        return x


RANGES = ["stage:text_encode", "stage:denoise", "stage:vae_decode", "clip0", "clip1", "step0", "step1",
          "cfg:cond", "cfg:uncond", "block0", "block1", "attention", "audio_injection"]


def fake_pipeline(timer: StageTimer):
    torch.manual_seed(0)
    model = TinyDiT()
    x = torch.randn(1, 16, 32)
    with torch.no_grad():
        with timer.stage("text_encode"):
            torch.tanh(x @ x.transpose(1, 2))
        for clip in range(2):
            with timer.stage("denoise", clip=clip), trace_range(f"clip{clip}"):
                for step in range(2):
                    with trace_range(f"step{step}"):
                        for br in ("cond", "uncond"):
                            with trace_range(f"cfg:{br}"):
                                model(x)
            timer.add_flops("denoise", 4 * 2 * 1e6)
            with timer.stage("vae_decode", clip=clip):
                F.conv2d(torch.randn(1, 4, 16, 16), torch.randn(8, 4, 3, 3), padding=1)
    return "video"


def _names_in_trace(path):
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    assert "traceEvents" in trace
    return {e.get("name") for e in trace["traceEvents"]}


# ----------------------------------------------------------------------------- ProfilerSession
COMBOS = [
    dict(),
    dict(record_shapes=True),
    dict(with_stack=True),
    dict(with_memory=True, with_flops=True),
    dict(record_shapes=True, with_stack=True, with_memory=True, with_flops=True),
]


@pytest.mark.parametrize("opts", COMBOS, ids=lambda o: "+".join(o) or "plain")
def test_session_artifacts(tmp_path, opts):
    from openpyxl import load_workbook

    d = tmp_path / "prof"
    printed = []
    options = ProfileOptions(profile_dir=str(d), enable_pipeline_profiler=True, **opts)
    result, paths = run_profiled(fake_pipeline, options, output_path=str(tmp_path / "out.mp4"),
                                 print_fn=printed.append)
    assert result == "video"
    for p in paths:
        assert os.path.isfile(p), p
    names = {os.path.basename(p) for p in paths}
    assert {"trace_rank0.json.gz", "ops_rank0.xlsx", "stages_rank0.json", "summary_rank0.txt"} <= names
    assert "out.stages.json" in names
    assert ("stacks_cpu_rank0.txt" in names) == bool(opts.get("with_stack"))
    if opts.get("with_stack"):
        assert os.path.getsize(d / "stacks_cpu_rank0.txt") > 0
    assert "memory_snapshot_rank0.pickle" not in names  # CUDA only

    # trace: gzipped Chrome JSON with our named ranges
    assert set(RANGES) <= _names_in_trace(d / "trace_rank0.json.gz")

    # workbook
    wb = load_workbook(d / "ops_rank0.xlsx")
    sheets = set(wb.sheetnames)
    assert {"summary", "stages", "kernels"} <= sheets
    assert ("by_shape" in sheets) == bool(opts.get("record_shapes"))
    assert ("by_stack" in sheets) == bool(opts.get("with_stack"))
    assert ("flops" in sheets) == bool(opts.get("with_flops"))
    for name in wb.sheetnames:
        ws = wb[name]
        assert ws.freeze_panes == "A2", name
        assert ws.auto_filter.ref, name
        assert all((ws.column_dimensions[c.column_letter].width or 0) >= 10 for c in ws[1])
    header = lambda ws: [c.value for c in ws[1]]  # noqa: E731
    for col in ("name", "count", "category", "self_cpu_time_total_us", "self_device_time_total_us",
                "input_shapes", "stack", "kind"):
        assert col in header(wb["summary"])
    assert header(wb["stages"])[:4] == ["stage", "calls", "total_s", "mean_s"]
    assert header(wb["kernels"])[:5] == ["category", "time_ms", "count", "distinct_kernels", "pct_of_time"]
    assert len(wb["kernels"]._charts) == 1 and len(wb["stages"]._charts) == 1
    cats = [wb["kernels"].cell(row=i, column=1).value for i in range(2, 2 + len(CATEGORIES))]
    assert cats == list(CATEGORIES)
    assert "CPU" in wb["kernels"].cell(row=2, column=7).value  # CPU-only fallback is labelled
    if opts.get("record_shapes"):
        shapes = [c.value for c in wb["by_shape"]["S"]][1:]
        assert any(s and s != "[]" for s in shapes)
    if opts.get("with_stack"):
        stacks = [c.value for c in wb["by_stack"]["T"]][1:]
        assert any(s for s in stacks)
    if opts.get("with_flops"):
        rows = {wb["flops"].cell(row=i, column=1).value: i for i in range(2, wb["flops"].max_row + 1)}
        assert {"denoise", "DiT (denoise loop)", "total (all stages)"} <= set(rows)
        assert len(wb["flops"]._charts) == 1
        assert any("Achieved FLOP/s" in t for t in printed)

    # stage JSON: every stage, positive durations, per-call list with clip indices
    st = json.loads((tmp_path / "out.stages.json").read_text())
    assert set(st["stage_durations_s"]) == {"text_encode", "denoise", "vae_decode"}
    assert all(v > 0 for v in st["stage_durations_s"].values())
    assert st["stages"]["denoise"]["calls"] == 2
    assert [c["clip"] for c in st["calls"] if c["stage"] == "denoise"] == [0, 1]
    assert st["stages"]["denoise"]["analytic_flops"] == pytest.approx(1.6e7)
    assert any("Pipeline stages" in t for t in printed)


def test_session_rank_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with ProfilerSession(profile_dir=str(tmp_path)) as s:
        fake_pipeline(s.stage_timer)
    assert os.path.basename(s.paths[0]) == "trace_rank3.json.gz"
    assert (tmp_path / "ops_rank3.xlsx").is_file()


def test_pipeline_profiler_only(tmp_path):
    out = tmp_path / "v.mp4"
    printed = []
    with ProfilerSession(enable_pipeline_profiler=True, output_path=str(out), print_fn=printed.append) as s:
        assert current_stage_timer() is s.stage_timer
        fake_pipeline(current_stage_timer())
    assert s.paths == [stage_json_path(str(out))] and os.path.isfile(s.paths[0])
    assert "denoise" in printed[0] and "vae_decode" in printed[0]
    assert current_stage_timer().enabled is False


def test_session_writes_on_exception(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with ProfilerSession(profile_dir=str(tmp_path), print_fn=None) as s:
            with s.stage_timer.stage("denoise"):
                torch.ones(4) @ torch.ones(4)
                1 / 0
    assert (tmp_path / "trace_rank0.json.gz").is_file()


# ----------------------------------------------------------------------------- validation
def test_profile_dir_validation(tmp_path, monkeypatch):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError):
        validate_profile_dir(str(f))
    with pytest.raises(InputError):
        validate_profile_dir(str(f / "sub" / "dir"))
    with pytest.raises(InputError):
        ProfilerSession(profile_dir=str(f / "sub"))
    with pytest.raises(InputError):
        ProfileOptions(with_flops=True).validate()  # flag without --profile-dir
    ok = validate_profile_dir(str(tmp_path / "a" / "b"))
    assert os.path.isdir(ok)

    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(InputError, match="not writable"):
        validate_profile_dir(str(tmp_path / "c"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write read-only dirs")
def test_profile_dir_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(InputError):
            validate_profile_dir(str(ro))
        with pytest.raises(InputError):
            validate_profile_dir(str(ro / "sub"))
    finally:
        ro.chmod(stat.S_IRWXU)


def test_options_from_args(tmp_path):
    import argparse

    from s2v_fast.profiling import add_profiling_arguments

    p = argparse.ArgumentParser()
    add_profiling_arguments(p)
    a = p.parse_args(["--profile-dir", str(tmp_path / "p"), "--profile-with-flops",
                      "--enable-diffusion-pipeline-profiler"])
    o = ProfileOptions.from_args(a)
    assert o.with_flops and o.enable_pipeline_profiler and not o.with_stack and os.path.isdir(o.profile_dir)


# ----------------------------------------------------------------------------- ranges / timer
def test_trace_range_noop_and_decorator():
    assert not R.profiler_active()
    prev = R.nvtx_enabled()
    R.set_nvtx_enabled(False)
    try:
        assert trace_range("x") is trace_range("y")  # shared no-op object

        @traced("my_fn")
        def f(a):
            return a + 1

        @traced
        def g(a):
            return a * 2

        assert f(1) == 2 and g(2) == 4
        with torch.profiler.profile() as prof:
            f(torch.ones(2))
            g(torch.ones(2))
        names = {e.name for e in prof.events()}
        assert "my_fn" in names and any(n.endswith("g") for n in names)
        R.set_nvtx_enabled(True)  # NVTX path (nvtx package; no collector attached) must not fail
        with trace_range("nvtx_only"):
            pass
        assert f(1) == 2
    finally:
        R.set_nvtx_enabled(prev)


def test_stage_timer(tmp_path):
    t = StageTimer()
    for i in range(3):
        with t.stage("denoise", clip=i):
            sum(range(1000))
    with t.stage("text_encode"):
        pass
    t.add_flops("denoise", 1e12)
    assert t.stage_names() == ["text_encode", "denoise"]  # canonical order
    assert t.counts["denoise"] == 3 and t.totals["denoise"] > 0
    assert "denoise" in t.table() and "total" in t.table()
    d = json.loads(open(t.to_json(str(tmp_path / "s.json"))).read())
    assert d["stages"]["denoise"]["calls"] == 3 and d["stages"]["denoise"]["analytic_flops"] == 1e12
    off = StageTimer(enabled=False)
    with off.stage("x"):
        pass
    assert off.rows() == [] and stage_json_path("/a/b/out.mp4") == "/a/b/out.stages.json"


# ----------------------------------------------------------------------------- categories
KERNELS = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "GEMM"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8::Params)", "GEMM"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "GEMM"),
    ("aten::addmm", "GEMM"),
    ("void cudnn::engines_precompiled::sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "GEMM"),
    ("aten::conv3d", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>>", "attention"),
    ("void flash::flash_fwd_splitkv_kernel<>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("_attn_fwd", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("_norm_modulate_kernel", "norm and modulation"),
    ("_qk_norm_rope_kernel", "norm and modulation"),
    ("gated_residual_norm_modulate_fwd", "norm and modulation"),
    ("audio_inject_scale_kernel", "norm and modulation"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm and modulation"),
    ("aten::native_layer_norm", "norm and modulation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise"),
    ("void at::native::unrolled_elementwise_kernel<at::native::MulFunctor<float>>", "elementwise"),
    ("triton_poi_fused_add_mul_0", "elementwise"),
    ("aten::add", "elementwise"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"),
    ("Memset (Device)", "copies"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copies"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 4, 64, 64>", "copies"),
    ("aten::copy_", "copies"),
    ("aten::cat", "copies"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("ncclKernel_AllReduce_RING_LL_Sum_float", "communication"),
    ("c10d::all_to_all_single", "communication"),
    ("aten::view", "other"),
    ("cudaLaunchKernel", "other"),
]


@pytest.mark.parametrize("name,cat", KERNELS)
def test_categorize_kernel(name, cat):
    assert categorize_kernel(name) == cat


def test_kernel_table_and_workbook_charts(tmp_path):
    from openpyxl import load_workbook

    recs = [(n, 10.0 * (i + 1)) for i, (n, _) in enumerate(KERNELS)]
    tab = kernel_category_table(recs, source="gpu")
    assert list(tab["category"]) == list(CATEGORIES)
    assert tab["pct_of_time"].sum() == pytest.approx(100.0)
    assert tab["source"].iloc[0] == "GPU kernel time"
    import pandas as pd

    bad = pd.DataFrame({"name": ["ok", "bad\x01name"], "v": [1.0, 2.0]})
    p = write_workbook(str(tmp_path / "w.xlsx"), {"kernels": tab, "misc": bad},
                       [("kernels", "category", "time_ms", "t", "ms")])
    wb = load_workbook(p)
    assert len(wb["kernels"]._charts) == 1 and wb["misc"]["A3"].value == "bad?name"


# ----------------------------------------------------------------------------- FLOPs
def test_dit_flops_match_spec():
    tc = s2v_token_counts(448, 832)
    assert (tc["video"], tc["ref"], tc["motion"], tc["total"]) == (29120, 1456, 2184, 32760)
    assert s2v_token_counts(448, 832, drop_motion=True)["total"] == 30576
    f480 = dit_forward_flops(tokens=32760, video_tokens=29120)
    assert f480.total / 1e12 == pytest.approx(1715, rel=0.005)
    assert f480.attention / f480.total == pytest.approx(0.51, abs=0.01)
    tc7 = s2v_token_counts(704, 1280)
    assert tc7["total"] == 79200
    assert dit_forward_flops(tokens=79200, video_tokens=70400).total / 1e12 == pytest.approx(7156, rel=0.005)
    assert denoise_flops(height=448, width=832) / 1e15 == pytest.approx(137, rel=0.005)
    tiny = {"dim": 128, "ffn_dim": 256, "num_layers": 4, "audio_inject_layers": [0, 2, 3]}
    t = dit_forward_flops(tiny, tokens=100, video_tokens=80)
    assert t.audio == 3 * 4 * 80 * 128 * 128


def test_device_peak_and_flops_table():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H200") == 989.0
    assert device_peak_tflops("NVIDIA H20") == 148.0
    assert device_peak_tflops("Some Future GPU") is None
    rows = [{"stage": "denoise", "total_s": 2.0, "analytic_flops": 989e12},
            {"stage": "vae_decode", "total_s": 1.0, "analytic_flops": None}]
    df = flops_table(rows, {"vae_decode": 1e12, "denoise": 5e11}, 989.0)
    r = df.set_index("stage")
    assert r.loc["denoise", "pct_of_peak"] == pytest.approx(50.0)
    assert r.loc["vae_decode", "flops_source"].startswith("profiler")
    assert r.loc["DiT (denoise loop)", "achieved_tflops"] == pytest.approx(494.5)
    assert flops_table(rows, None, None)["pct_of_peak"].isna().all()
