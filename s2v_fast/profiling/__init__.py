"""Profiling for s2v_fast: named ranges, stage timer, torch.profiler session and reports.

* :func:`trace_range` / :func:`traced` - cheap named ranges (torch profiler + NVTX) for model code.
* :class:`StageTimer` - device-synchronised stage durations (``--enable-diffusion-pipeline-profiler``).
* :class:`ProfilerSession` / :class:`ProfileOptions` - ``--profile-dir`` and ``--profile-*`` flags:
  per-rank gzipped Chrome trace, xlsx op workbook with charts, stacks, memory snapshot, FLOP/s.
* :mod:`.flops` - analytic DiT FLOP counts (spec §9) and device peaks.

Importing this package is cheap: ranges and the stage timer only; pandas/openpyxl load at export.
"""
from .ranges import (
    STAGE_PREFIX,
    nvtx_enabled,
    profiler_active,
    range_names,
    set_nvtx_enabled,
    trace_range,
    traced,
)
from .stage_timer import STAGE_ORDER, StageTimer, current_stage_timer, stage_json_path

__all__ = [
    "trace_range",
    "traced",
    "nvtx_enabled",
    "set_nvtx_enabled",
    "profiler_active",
    "range_names",
    "STAGE_PREFIX",
    "StageTimer",
    "current_stage_timer",
    "stage_json_path",
    "STAGE_ORDER",
    "ProfilerSession",
    "ProfileOptions",
    "validate_profile_dir",
    "add_profiling_arguments",
    "run_profiled",
    "global_rank",
    "categorize_kernel",
]

_LAZY = {
    "ProfilerSession": "session",
    "ProfileOptions": "session",
    "validate_profile_dir": "session",
    "add_profiling_arguments": "session",
    "run_profiled": "session",
    "global_rank": "session",
    "categorize_kernel": "export",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
