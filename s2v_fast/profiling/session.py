"""ProfilerSession: torch.profiler + stage timer + artifacts, per rank.

CLI use (``generate`` and ``profile`` share the flags)::

    from s2v_fast.profiling import ProfileOptions, ProfilerSession, add_profiling_arguments

    add_profiling_arguments(parser)                  # --profile-dir, --profile-record-shapes, ...
    opts = ProfileOptions.from_args(args)            # validates the dir -> InputError before any run
    with ProfilerSession(opts, output_path=args.output) as prof:
        video = pipe.generate(..., stage_timer=prof.stage_timer)
    for p in prof.paths:
        print(p)

Artifacts in ``profile_dir`` (r = global rank, from torch.distributed when initialised, else
``$RANK``, else 0): ``trace_rank{r}.json.gz``, ``ops_rank{r}.xlsx``, ``summary_rank{r}.txt``,
``stages_rank{r}.json``, with stacks ``stacks_cpu_rank{r}.txt`` (+ ``stacks_cuda_rank{r}.txt`` on
CUDA), with memory on CUDA ``memory_snapshot_rank{r}.pickle`` (open at
https://pytorch.org/memory_viz). With ``enable_pipeline_profiler`` the stage table is printed and
saved as ``<output>.stages.json`` beside the video (rank 0).
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError
from . import export as _ex
from .flops import current_device_name, device_peak_tflops
from .ranges import nvtx_enabled, range_names, set_nvtx_enabled
from .stage_timer import StageTimer, stage_json_path

__all__ = [
    "ProfileOptions",
    "ProfilerSession",
    "validate_profile_dir",
    "global_rank",
    "add_profiling_arguments",
    "flops_table",
    "format_flops_summary",
    "run_profiled",
]

STACK_ROWS = 2000  # rows of the by_stack sheet (the (op, stack) pairs with the most time)


def global_rank() -> int:
    """Global rank: torch.distributed when initialised, else ``$RANK``, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # pragma: no cover
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def validate_profile_dir(path) -> str:
    """Create ``path`` if needed and check that files can be written there.

    Raises :class:`~s2v_fast.errors.InputError` (one line: problem + fix) when it cannot be used.
    Returns the absolute path.
    """
    if path is None or str(path).strip() == "":
        raise InputError("--profile-dir is empty: pass a directory to write profiler traces into")
    p = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(p) and not os.path.isdir(p):
        raise InputError(f"--profile-dir {p} is an existing file, not a directory: pass a directory path")
    anc = p
    while not os.path.exists(anc):
        parent = os.path.dirname(anc)
        if parent == anc:
            break
        anc = parent
    if os.path.exists(anc) and not os.path.isdir(anc):
        raise InputError(f"--profile-dir {p} cannot be created because {anc} is a file: choose another directory")
    try:
        os.makedirs(p, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".s2v_write_probe_", dir=p)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--profile-dir {p} is not writable ({e.strerror or e}): choose a writable directory") from None
    return p


@dataclass
class ProfileOptions:
    """What to profile. ``profile_dir=None`` disables the torch profiler."""

    profile_dir: str | None = None
    record_shapes: bool = False
    with_stack: bool = False
    with_memory: bool = False
    with_flops: bool = False
    enable_pipeline_profiler: bool = False  # stage table + <output>.stages.json
    nvtx: bool = True  # emit NVTX ranges while the torch profiler runs (for nsys too)
    memory_history_max_entries: int = 100_000
    table_row_limit: int = 60
    verbose: bool = False  # print one line per stage call

    @property
    def torch_profiler(self) -> bool:
        return self.profile_dir is not None

    @property
    def any(self) -> bool:
        return self.torch_profiler or self.enable_pipeline_profiler

    def validate(self) -> "ProfileOptions":
        if self.profile_dir is not None:
            self.profile_dir = validate_profile_dir(self.profile_dir)
        elif self.record_shapes or self.with_stack or self.with_memory or self.with_flops:
            raise InputError("--profile-record-shapes/--profile-with-* need --profile-dir DIR: add --profile-dir")
        return self

    @classmethod
    def from_args(cls, args, profile_dir=None) -> "ProfileOptions":
        """Build from argparse args (missing attributes -> defaults) and validate."""
        g = lambda k, d=False: getattr(args, k, d)  # noqa: E731
        opts = cls(
            profile_dir=profile_dir if profile_dir is not None else g("profile_dir", None),
            record_shapes=bool(g("profile_record_shapes")),
            with_stack=bool(g("profile_with_stack")),
            with_memory=bool(g("profile_with_memory")),
            with_flops=bool(g("profile_with_flops")),
            enable_pipeline_profiler=bool(g("enable_diffusion_pipeline_profiler")),
        )
        return opts.validate()


def add_profiling_arguments(parser, require_dir: bool = False, include_dir: bool = True) -> None:
    """Add the profiling flags to an argparse parser (``generate`` and ``profile`` subcommands)."""
    g = parser.add_argument_group("profiling")
    if include_dir:
        g.add_argument("--profile-dir", default=None, required=require_dir, metavar="DIR",
                       help="run under torch.profiler; write trace_rank{r}.json.gz and ops_rank{r}.xlsx here")
    g.add_argument("--profile-record-shapes", action="store_true", help="record op input shapes (by_shape sheet)")
    g.add_argument("--profile-with-stack", action="store_true",
                   help="record Python stacks (by_stack sheet, flame-graph stack files)")
    g.add_argument("--profile-with-memory", action="store_true",
                   help="record memory (op memory columns; CUDA memory snapshot pickle)")
    g.add_argument("--profile-with-flops", action="store_true",
                   help="count FLOPs and report achieved TFLOP/s per stage vs device peak (flops sheet)")
    g.add_argument("--enable-diffusion-pipeline-profiler", action="store_true",
                   help="device-synchronised stage durations: table at the end, JSON beside the output")


# ---------------------------------------------------------------------------- FLOP/s summary
def flops_table(stage_rows: list[dict], profiler_flops: dict | None, peak_tflops: float | None):
    """Achieved TFLOP/s per stage (+ a DiT row and a total), combining analytic and profiler FLOPs.

    ``stage_rows``: StageTimer.rows()-like dicts (stage, total_s, analytic_flops).
    Analytic counts win where registered (the profiler misses SDPA / flash attention).
    """
    import pandas as pd

    pf = profiler_flops or {}
    rows = []

    def row(label, dur, analytic, prof):
        if analytic:
            used, src = analytic, "analytic"
        elif prof:
            used, src = prof, "profiler (matmul/conv only)"
        else:
            used, src = None, ""
        tf = used / dur / 1e12 if used and dur > 0 else None
        return {
            "stage": label, "duration_s": dur, "analytic_flops": analytic or None,
            "profiler_flops": prof or None, "flops_used": used, "flops_source": src,
            "achieved_tflops": tf, "peak_tflops": peak_tflops,
            "pct_of_peak": (100.0 * tf / peak_tflops) if tf is not None and peak_tflops else None,
        }

    tot_d = tot_f = 0.0
    for r in stage_rows:
        st, d, a = r["stage"], float(r["total_s"]), r.get("analytic_flops")
        x = row(st, d, a, pf.get(st))
        rows.append(x)
        tot_d += d
        tot_f += x["flops_used"] or 0.0
    den = next((x for x in rows if x["stage"] == "denoise"), None)
    if den is not None:
        dit = dict(den)
        dit["stage"] = "DiT (denoise loop)"
        rows.append(dit)
    outside = pf.get(None)
    if outside and not stage_rows:
        rows.append(row("(no stages recorded)", 0.0, None, outside))
    rows.append(row("total (all stages)", tot_d, tot_f or None, None))
    rows[-1]["flops_source"] = "sum of the rows above"
    return pd.DataFrame(rows)


def format_flops_summary(df, device: str | None, peak: float | None) -> str:
    dev = device or "CPU / unknown device"
    head = f"Achieved FLOP/s ({dev}; peak {peak:.0f} TFLOP/s bf16 dense)" if peak else \
        f"Achieved FLOP/s ({dev}; no known peak, no % of peak)"
    lines = [head, f"{'stage':<22} {'time s':>9} {'TFLOP':>11} {'TFLOP/s':>9} {'% peak':>7}  source"]
    for r in df.to_dict("records"):
        fl = r["flops_used"]
        tf, pct = r["achieved_tflops"], r["pct_of_peak"]
        tf_s = f"{tf:>9.4g}" if tf is not None and tf == tf else f"{'-':>9}"
        pct_s = f"{pct:>7.1f}" if pct is not None and pct == pct else f"{'-':>7}"
        lines.append(f"{r['stage']:<22} {r['duration_s']:>9.3f} {(fl / 1e12 if fl else 0):>11.4g} "
                     f"{tf_s} {pct_s}  {r['flops_source']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the session
class ProfilerSession:
    """Context manager around one generation (or any block).

    ``stage_timer``: the pipeline's timer; a new enabled one when None (``.stage_timer``); it is
    also made current (:func:`~s2v_fast.profiling.current_stage_timer`) inside the block.
    ``output_path``: the video path; the stage JSON goes beside it.
    ``rank``: override the global rank (default: resolved at stop).
    ``print_fn``: where summaries go (default ``print``; rank 0 only).
    """

    def __init__(self, options: ProfileOptions | None = None, *, stage_timer: StageTimer | None = None,
                 output_path: str | None = None, rank: int | None = None, print_fn=print,
                 run_options: dict | None = None, **kw):
        if options is None:
            options = ProfileOptions(**kw)
        elif kw:
            raise TypeError("pass either options or keyword options, not both")
        self.options = options.validate()
        self.stage_timer = stage_timer if stage_timer is not None else StageTimer(
            enabled=options.any, verbose=options.verbose)
        if options.any:
            self.stage_timer.enabled = True
        self.output_path = output_path
        self.run_options = dict(run_options or {})  # the effective options of the profiled run
        self._rank = rank
        self.print_fn = print_fn
        self.paths: list[str] = []
        self.prof = None
        self._activation = None
        self._nvtx_prev = None
        self._mem_history = False
        self._running = False
        self.summary_text = ""

    # ------------------------------------------------------------------ control
    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else global_rank()

    @property
    def cuda(self) -> bool:
        return torch.cuda.is_available()

    def start(self) -> "ProfilerSession":
        if self._running:
            raise RuntimeError("ProfilerSession already started")
        o = self.options
        self.stage_timer.reset()
        self._activation = self.stage_timer.activate()
        self._activation.__enter__()
        if o.torch_profiler:
            if o.nvtx:
                self._nvtx_prev = nvtx_enabled()
                set_nvtx_enabled(True)
            if o.with_memory and self.cuda:
                try:
                    torch.cuda.memory._record_memory_history(max_entries=o.memory_history_max_entries)
                    self._mem_history = True
                except Exception as e:  # pragma: no cover - backend without history support
                    warnings.warn(f"CUDA memory history unavailable: {e}")
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            kwargs = dict(activities=acts, record_shapes=o.record_shapes, profile_memory=o.with_memory,
                          with_stack=o.with_stack, with_flops=o.with_flops)
            if o.with_stack:
                # stacks for export_stacks / group_by_stack_n need the verbose experimental config;
                # it also puts a "Call stack" on every trace event (export_trace_gz trims that)
                kwargs["experimental_config"] = torch._C._profiler._ExperimentalConfig(verbose=True)
            self.prof = torch.profiler.profile(**kwargs)
            self.prof.start()
        self._t0 = time.perf_counter()
        self._running = True
        return self

    def stop(self, raise_errors: bool = True) -> list[str]:
        """Stop profiling and write every artifact; returns the paths written."""
        if not self._running:
            return self.paths
        self._running = False
        self.wall_s = time.perf_counter() - self._t0
        if self.cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if self.prof is not None:
            self.prof.stop()
        if self._nvtx_prev is not None:
            set_nvtx_enabled(self._nvtx_prev)
            self._nvtx_prev = None
        if self._activation is not None:
            self._activation.__exit__(None, None, None)
            self._activation = None
        try:
            self._write_all()
        except Exception as e:
            if raise_errors:
                raise
            warnings.warn(f"profiler export failed: {type(e).__name__}: {e}")
        finally:
            if self._mem_history:
                try:
                    torch.cuda.memory._record_memory_history(enabled=None)
                except Exception:  # pragma: no cover
                    pass
                self._mem_history = False
        return self.paths

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        # on an exception still write what we have, but never mask the original error
        self.stop(raise_errors=exc_type is None)
        return False

    # ------------------------------------------------------------------ artifacts
    def run_options_text(self) -> str:
        """``run options: precision=fast attention=self=cuda,... quantization=none``."""
        if not self.run_options:
            return ""
        return "run options: " + " ".join(f"{k}={v}" for k, v in self.run_options.items())

    def _emit(self, text: str) -> None:
        if self.rank == 0 and self.print_fn is not None and text:
            self.print_fn(text)

    def _stage_rows(self):
        rows = self.stage_timer.rows()
        if rows:
            for r in rows:
                r["source"] = "StageTimer (device-synchronised)"
            return rows
        if self.prof is None:
            return []
        out = []
        durs = _ex.profiler_stage_durations(self.prof)
        total = sum(t for _, t in durs.values())
        for st, (n, t) in durs.items():
            out.append({"stage": st, "calls": n, "total_s": t, "mean_s": t / n, "min_s": None, "max_s": None,
                        "pct_of_total": 100 * t / total if total else 0.0, "analytic_flops": None,
                        "source": "profiler stage: ranges (host time, not synchronised)"})
        return out

    def _write_all(self) -> None:
        o = self.options
        r = self.rank
        texts = [self.run_options_text()]
        if o.enable_pipeline_profiler and self.stage_timer.rows():
            texts.append(self.stage_timer.table())
            if self.output_path and r == 0:
                self.paths.append(self.stage_timer.to_json(stage_json_path(self.output_path)))
        if self.prof is not None:
            texts.extend(self._write_profiler_artifacts(r))
        self.summary_text = "\n\n".join(t for t in texts if t)
        self._emit(self.summary_text)

    def _write_profiler_artifacts(self, r: int) -> list[str]:
        import pandas as pd

        o, prof, d = self.options, self.prof, self.options.profile_dir
        texts = []
        self.trace_stats = {}
        self.paths.append(_ex.export_trace_gz(prof, os.path.join(d, f"trace_rank{r}.json.gz"),
                                              stats=self.trace_stats))
        self.dropped_events = _ex.ensure_events(prof)

        user = range_names()
        sheets = {"summary": _ex.op_table(prof, user_ranges=user)}
        if o.record_shapes:
            sheets["by_shape"] = _ex.op_table(prof, group_by_input_shape=True, user_ranges=user)
        if o.with_stack:
            # the rows with the most time: a CPU run of the tiny model already has ~18k (op,
            # stack) pairs, which took 8 s to write; every stack is in stacks_*.txt anyway
            sheets["by_stack"] = _ex.op_table(prof, group_by_stack_n=8, user_ranges=user,
                                              max_rows=STACK_ROWS)

        stage_rows = self._stage_rows()
        stage_cols = ["stage", "calls", "total_s", "mean_s", "min_s", "max_s", "pct_of_total",
                      "analytic_flops", "source"]
        sheets["stages"] = pd.DataFrame(stage_rows, columns=stage_cols)
        if self.stage_timer.calls:
            sheets["stage_calls"] = pd.DataFrame(self.stage_timer.calls)

        kernels = _ex.device_kernel_records(prof)
        if kernels:
            ktab = _ex.kernel_category_table(kernels, source="gpu")
        else:
            ktab = _ex.kernel_category_table(_ex.cpu_op_records(prof, exclude=user), source="cpu")
        sheets["kernels"] = ktab

        device = current_device_name()
        peak = device_peak_tflops(device)
        if o.with_flops:
            ftab = flops_table(stage_rows, _ex.profiler_flops_by_stage(prof), peak)
            sheets["flops"] = ftab
            texts.append(format_flops_summary(ftab, device, peak))

        sheets["info"] = pd.DataFrame([
            ("rank", r), ("world_size", _world_size()), ("device", device or "cpu"),
            ("peak_bf16_tflops", peak if peak else "unknown"),
            ("torch", torch.__version__), ("cuda", torch.version.cuda or "none"),
            ("python", sys.version.split()[0]), ("host", platform.node()),
            ("wall_s", round(self.wall_s, 6)), ("options", str(asdict(o))),
            *((f"run.{k}", v) for k, v in self.run_options.items()),
            ("kernels_source", ktab["source"].iloc[0]),
            ("dropped_events", self.dropped_events),
            ("trace", _trace_note(self.trace_stats)),
            ("note", "profiler with_flops counts matmul/conv only; attention FLOPs come from analytic counts"),
        ], columns=["key", "value"]).astype({"value": str})

        charts = [
            ("kernels", "category", "time_ms", "Time by kernel category (ms)"
             + ("" if kernels else " - CPU op self time"), "ms"),
            ("stages", "stage", "total_s", "Stage durations (s)", "s"),
        ]
        if o.with_flops:
            charts.append(("flops", "stage", "achieved_tflops", "Achieved TFLOP/s", "TFLOP/s"))
        self.paths.append(_ex.write_workbook(os.path.join(d, f"ops_rank{r}.xlsx"), sheets, charts))

        sort_key = "self_cuda_time_total" if kernels else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_key, row_limit=o.table_row_limit)
        p = os.path.join(d, f"summary_rank{r}.txt")
        with open(p, "w") as f:
            f.write(table)
        self.paths.append(p)
        if self.stage_timer.rows():
            self.paths.append(self.stage_timer.to_json(os.path.join(d, f"stages_rank{r}.json")))

        if o.with_stack:
            self.paths.extend(_ex.export_stack_files(prof, d, r, cuda=bool(kernels)))
        if o.with_memory and self._mem_history:
            p = os.path.join(d, f"memory_snapshot_rank{r}.pickle")
            torch.cuda.memory._dump_snapshot(p)
            self.paths.append(p)

        texts.append(_kernel_summary(ktab))
        return texts


def _world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _trace_note(st: dict) -> str:
    """One line on what the trace export did (sizes, stacks kept / repaired / dropped)."""
    if not st:
        return ""
    mb = 1e6
    return (f"raw {st['bytes_in'] / mb:.1f} MB -> json {st['bytes_out'] / mb:.1f} MB, gz {st['gz_bytes'] / mb:.1f} MB; "
            f"call stacks kept {st['stacks_kept']} ({st['stacks_invalid_utf8']} with invalid UTF-8 repaired, "
            f"{st['stacks_escaped']} escaped), python_function stacks dropped {st['python_stacks_dropped']} "
            f"(their events nest into the same stack)")


def _kernel_summary(ktab) -> str:
    src = ktab["source"].iloc[0] if len(ktab) else ""
    lines = [f"Time by kernel category ({src})", f"{'category':<20} {'ms':>10} {'%':>6} {'count':>8}"]
    for r in ktab.to_dict("records"):
        if r["time_ms"] > 0:
            lines.append(f"{r['category']:<20} {r['time_ms']:>10.2f} {r['pct_of_time']:>6.1f} {r['count']:>8}")
    return "\n".join(lines)


def run_profiled(fn, options: ProfileOptions, *, output_path: str | None = None,
                 stage_timer: StageTimer | None = None, print_fn=print,
                 run_options: dict | None = None):
    """Call ``fn(stage_timer)`` under a :class:`ProfilerSession`; returns ``(result, paths)``.

    The CLI's ``profile`` / ``generate --profile-dir`` path: validate first with
    ``ProfileOptions.from_args(args)`` (InputError before loading any model), then
    ``video, paths = run_profiled(lambda t: pipe.generate(..., stage_timer=t), opts, output_path=out)``
    and print ``paths``. ``run_options``: the run's effective options (precision, attention per
    site, ...), printed with the summary and written to the workbook's info sheet.
    """
    sess = ProfilerSession(options, stage_timer=stage_timer, output_path=output_path,
                           print_fn=print_fn, run_options=run_options)
    with sess:
        result = fn(sess.stage_timer)
    return result, list(sess.paths)
