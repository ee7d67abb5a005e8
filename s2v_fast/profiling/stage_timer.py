"""Device-synchronised pipeline stage timer (``--enable-diffusion-pipeline-profiler``).

Usage in the pipeline::

    timer = stage_timer or current_stage_timer()       # a disabled timer when none is active
    with timer.stage("text_encode"):
        ...
    for i in range(num_clips):
        with timer.stage("denoise", clip=i):
            ...
        timer.add_flops("denoise", denoise_flops(...))   # analytic FLOPs (optional)

Every ``stage()`` also emits a ``stage:<name>`` trace range (torch profiler + NVTX), whether or
not timing is enabled. When enabled, the device is synchronised before and after the stage so
the durations are real GPU time; durations accumulate per stage name over clips, and every call is
kept in a per-call list. ``table()`` renders a text table, ``to_json(path)`` saves everything.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time

import torch

from .ranges import STAGE_PREFIX, trace_range

__all__ = ["StageTimer", "current_stage_timer", "STAGE_ORDER", "stage_json_path"]

# Canonical stage names, in pipeline order (others are listed after these, in first-seen order).
STAGE_ORDER = (
    "model_load",
    "text_encode",
    "audio_features",
    "reference_encode",
    "pose_read",
    "pose_encode",
    "denoise",
    "vae_decode",
    "motion_encode",
    "video_write",
)

_current: list = []


def current_stage_timer() -> "StageTimer":
    """The innermost active timer (see :meth:`StageTimer.activate`), else a disabled one."""
    return _current[-1] if _current else _DISABLED


def stage_json_path(output_path: str) -> str:
    """Where the stage JSON goes beside a video: ``out.mp4`` -> ``out.stages.json``."""
    root, _ = os.path.splitext(output_path)
    return root + ".stages.json"


def _sync(device) -> None:
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type != "cpu":
        mod = getattr(torch, dev.type, None)
        if mod is not None and hasattr(mod, "synchronize"):
            mod.synchronize()


class StageTimer:
    """Accumulating, device-synchronised stage timer.

    ``enabled=False`` keeps only the trace ranges (no sync, no timing).
    ``device``: the device to synchronise (None: the current CUDA device if CUDA is initialised).
    ``verbose``: print one line per finished stage call.
    """

    def __init__(self, enabled: bool = True, device=None, sync: bool = True, verbose: bool = False):
        self.enabled = enabled
        self.device = device
        self.sync = sync
        self.verbose = verbose
        self._lock = threading.Lock()
        self.reset()

    # ------------------------------------------------------------------ recording
    def reset(self) -> None:
        with self._lock:
            self.calls: list[dict] = []
            self.totals: dict[str, float] = {}
            self.counts: dict[str, int] = {}
            self.flops: dict[str, float] = {}
            self._order: list[str] = []
            self._t0 = time.perf_counter()
            self._wall_end = None

    @contextlib.contextmanager
    def _timed(self, name: str, meta: dict):
        if self.sync:
            _sync(self.device)
        t0 = time.perf_counter()
        try:
            with trace_range(STAGE_PREFIX + name):
                yield self
        finally:
            if self.sync:
                _sync(self.device)
            t1 = time.perf_counter()
            self._record(name, t0, t1, meta)

    def stage(self, name: str, **meta):
        """Context manager timing one call of stage ``name``; ``meta`` (e.g. ``clip=0``) is kept per call."""
        if not self.enabled:
            return trace_range(STAGE_PREFIX + name)
        return self._timed(name, meta)

    def _record(self, name: str, t0: float, t1: float, meta: dict) -> None:
        dur = t1 - t0
        with self._lock:
            if name not in self.totals:
                self.totals[name] = 0.0
                self.counts[name] = 0
                self._order.append(name)
            self.totals[name] += dur
            self.counts[name] += 1
            rec = {"stage": name, "start_s": t0 - self._t0, "duration_s": dur}
            rec.update(meta)
            self.calls.append(rec)
            self._wall_end = t1
        if self.verbose:
            extra = "".join(f" {k}={v}" for k, v in meta.items())
            print(f"[s2v_fast.profiler] {name}{extra} took {dur:.3f} s", flush=True)

    def add_duration(self, name: str, seconds: float, **meta) -> None:
        """Record a duration measured elsewhere (e.g. on another thread)."""
        now = time.perf_counter()
        self._record(name, now - seconds, now, meta)

    def add_flops(self, name: str, flops: float) -> None:
        """Register analytic FLOPs for a stage (accumulates, e.g. once per clip)."""
        if not self.enabled:
            return
        with self._lock:
            self.flops[name] = self.flops.get(name, 0.0) + float(flops)

    # ------------------------------------------------------------------ activation
    @contextlib.contextmanager
    def activate(self):
        """Make this timer the one :func:`current_stage_timer` returns inside the block."""
        _current.append(self)
        try:
            yield self
        finally:
            _current.remove(self)

    # ------------------------------------------------------------------ reporting
    def stage_names(self) -> list[str]:
        known = [s for s in STAGE_ORDER if s in self.totals]
        return known + [s for s in self._order if s not in STAGE_ORDER]

    def rows(self) -> list[dict]:
        """One row per stage: stage, calls, total_s, mean_s, min_s, max_s, pct_of_total, flops."""
        total = sum(self.totals.values())
        out = []
        for name in self.stage_names():
            durs = [c["duration_s"] for c in self.calls if c["stage"] == name]
            out.append({
                "stage": name,
                "calls": self.counts[name],
                "total_s": self.totals[name],
                "mean_s": self.totals[name] / max(1, self.counts[name]),
                "min_s": min(durs) if durs else 0.0,
                "max_s": max(durs) if durs else 0.0,
                "pct_of_total": 100.0 * self.totals[name] / total if total > 0 else 0.0,
                "analytic_flops": self.flops.get(name),
            })
        return out

    @property
    def total_s(self) -> float:
        return sum(self.totals.values())

    @property
    def wall_s(self) -> float:
        """Seconds from reset to the end of the last recorded stage."""
        return (self._wall_end - self._t0) if self._wall_end is not None else 0.0

    def to_dict(self) -> dict:
        return {
            "stages": {r["stage"]: r for r in self.rows()},
            "stage_durations_s": {n: self.totals[n] for n in self.stage_names()},
            "calls": list(self.calls),
            "total_s": self.total_s,
            "wall_s": self.wall_s,
            "device_synchronised": bool(self.sync),
        }

    def to_json(self, path: str) -> str:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def table(self, title: str = "Pipeline stages (device-synchronised)") -> str:
        rows = self.rows()
        if not rows:
            return f"{title}: no stages recorded"
        w = max(12, max(len(r["stage"]) for r in rows))
        head = f"{'stage':<{w}} {'calls':>5} {'total s':>9} {'mean s':>9} {'max s':>9} {'%':>6}"
        lines = [title, head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['stage']:<{w}} {r['calls']:>5} {r['total_s']:>9.3f} {r['mean_s']:>9.3f} "
                         f"{r['max_s']:>9.3f} {r['pct_of_total']:>6.1f}")
        lines.append("-" * len(head))
        lines.append(f"{'total':<{w}} {'':>5} {self.total_s:>9.3f} {'':>9} {'':>9} {100.0:>6.1f}")
        return "\n".join(lines)

    def __repr__(self):
        return f"StageTimer(enabled={self.enabled}, stages={self.stage_names()})"


_DISABLED = StageTimer(enabled=False)
