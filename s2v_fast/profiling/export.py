"""Profiler artifact export: gzipped Chrome trace, op tables, kernel categories, xlsx workbook.

Everything that turns a finished ``torch.profiler.profile`` into files lives here; the pure
functions (``categorize_kernel``, ``kernel_category_table``, ``write_workbook``) take plain data so
they are testable without a GPU.
"""
from __future__ import annotations

import json
import os
import re

__all__ = [
    "CATEGORIES",
    "categorize_kernel",
    "kernel_category_table",
    "op_table",
    "device_kernel_records",
    "cpu_op_records",
    "profiler_stage_durations",
    "profiler_flops_by_stage",
    "export_trace_gz",
    "repair_chrome_trace",
    "repair_stack_value",
    "export_stack_files",
    "write_workbook",
    "ensure_events",
    "python_function_names",
]

CATEGORIES = ("attention", "GEMM", "norm and modulation", "elementwise", "copies", "communication", "other")

# Ordered rules: first match wins. Patterns run on the lower-cased name.
_RULES = [
    ("communication", re.compile(
        r"nccl|all_to_all|alltoall|allreduce|all_reduce|allgather|all_gather|reduce_scatter|reducescatter"
        r"|c10d::|ncclkernel|sendrecv|gloo")),
    ("copies", re.compile(r"memcpy|memset|\[memory\]")),
    # our fused Triton kernels (names from s2v_fast.kernels)
    ("norm and modulation", re.compile(
        r"norm_modulate|qk_norm_rope|gated_residual|residual_norm|residual_add|rms_norm_kernel|modulat")),
    ("attention", re.compile(r"_frame_attn|_frame_probs|fp8_attn|_attn_fwd")),
    ("attention", re.compile(
        r"flash|fmha|sdpa|_attn_fwd|attn_fwd|attention|softmax|cudnn_generated_fort_native|xformers|sageattn|sage_attn|qk_int8")),
    ("norm and modulation", re.compile(
        r"audio|layer_?norm|layernorm|rms_?norm|rmsnorm|group_?norm|groupnorm|rowwisemoments"
        r"|batch_?norm|instance_?norm|adain")),
    ("GEMM", re.compile(
        r"gemm|nvjet|cutlass|xmma|wgmma|cublas|\bmatmul|aten::(mm|addmm|bmm|baddbmm|linear|matmul|_scaled_mm"
        r"|einsum|addbmm)\b|_scaled_mm|mkldnn_|onednn|conv(?!ert)|fprop|dgrad|wgrad|implicit|\bsm\d+_|ampere_|volta_"
        r"|turing_|hopper_|s\d{3,4}gemm|splitk|triton_tem|triton_mm")),
    ("copies", re.compile(
        r"copy|aten::cat\b|catarray|aten::stack\b|aten::contiguous|aten::clone|aten::to\b|aten::_to|"
        r"aten::index|gather|scatter|aten::pad|constant_pad|reflection_pad|replication_pad|pad_kernel")),
    ("elementwise", re.compile(
        r"elementwise|vectorized|triton_poi|triton_red|triton_per|unrolled|pointwise|reduce_kernel|"
        r"aten::(add|add_|sub|sub_|mul|mul_|div|div_|gelu|silu|sigmoid|tanh|exp|neg|pow|rsqrt|sqrt|where|"
        r"clamp|clamp_|fill_|zero_|zeros|ones|full|empty_like|lerp|addcmul|addcdiv|abs|sin|cos|mean|sum|"
        r"var|std|amax|max|min|softplus|erf|relu|leaky_relu|hardtanh|round|floor|ceil|sign|eq|ne|gt|lt|"
        r"ge|le|rsub|reciprocal|log|masked_fill|masked_fill_|polar|view_as_real|view_as_complex|"
        r"complex|float|bfloat16|half|copysign|upsample_\w+|interpolate|randn|rand|normal_|uniform_|"
        r"cumsum|arange|linspace)\b")),
]


def categorize_kernel(name: str) -> str:
    """Map a GPU kernel name (or a CPU op name, for the CPU-only fallback) to one of CATEGORIES."""
    n = (name or "").lower()
    for cat, pat in _RULES:
        if pat.search(n):
            return cat
    return "other"


def kernel_category_table(records, source: str = "gpu"):
    """Group ``(name, time_us)`` records by category.

    Returns a DataFrame with one row per category in CATEGORIES order (zero rows kept so charts are
    stable): category, time_ms, count, distinct_kernels, pct_of_time, top_kernel, source, note.
    ``source``: "gpu" (kernel time) or "cpu" (CPU op self time fallback on CPU-only runs).
    """
    import pandas as pd

    agg = {c: {"time_us": 0.0, "count": 0, "names": {}} for c in CATEGORIES}
    for name, t_us, *cnt in records:
        c = categorize_kernel(name)
        a = agg[c]
        a["time_us"] += float(t_us)
        a["count"] += int(cnt[0]) if cnt else 1
        a["names"][name] = a["names"].get(name, 0.0) + float(t_us)
    total = sum(a["time_us"] for a in agg.values())
    if source == "gpu":
        src, note = "GPU kernel time", "share of total GPU kernel time"
    else:
        src = "CPU op self time (no GPU kernels recorded)"
        note = "CPU-only run: CPU op self time grouped by the GPU kernel categories"
    rows = []
    for c in CATEGORIES:
        a = agg[c]
        top = max(a["names"].items(), key=lambda kv: kv[1])[0] if a["names"] else ""
        rows.append({
            "category": c,
            "time_ms": a["time_us"] / 1000.0,
            "count": a["count"],
            "distinct_kernels": len(a["names"]),
            "pct_of_time": 100.0 * a["time_us"] / total if total > 0 else 0.0,
            "top_kernel": top[:200],
            "source": src,
            "note": note,
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- profiler readers
class _SafeEvent:
    """Proxy for a Kineto event whose name decoded; ``stack()`` entries that do not decode are dropped."""

    __slots__ = ("_e", "_name")

    def __init__(self, e, name):
        self._e = e
        self._name = name

    def name(self):
        return self._name

    def stack(self):
        try:
            return self._e.stack()
        except UnicodeDecodeError:
            return []

    def __getattr__(self, k):
        return getattr(self._e, k)


class _SafeResult:
    def __init__(self, result):
        self._r = result
        self.dropped = 0

    def events(self):
        out = []
        for e in self._r.events():
            try:
                out.append(_SafeEvent(e, e.name()))
            except UnicodeDecodeError:
                self.dropped += 1
        return out

    def __getattr__(self, k):
        return getattr(self._r, k)


def ensure_events(prof) -> int:
    """Parse the profiler's events once, surviving undecodable event names.

    Some torch builds record garbage names for a few events when ``with_stack`` and
    ``profile_memory`` are combined (``UnicodeDecodeError`` inside ``key_averages()``); those events
    are dropped. Returns how many were dropped.
    """
    ap = getattr(prof, "profiler", None)
    if ap is None or getattr(ap, "_function_events", None) is not None:
        return 0
    try:
        ap._ensure_function_events()
        return 0
    except UnicodeDecodeError:
        res = ap.kineto_results
        safe = _SafeResult(res)
        ap._function_events = None
        ap.kineto_results = safe
        try:
            ap._ensure_function_events()
        finally:
            ap.kineto_results = res
        return safe.dropped


def _attr(obj, *names, default=0):
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return v
    return default


def _is_device_event(e) -> bool:
    dt = getattr(e, "device_type", None)
    return dt is not None and getattr(dt, "name", str(dt)).upper() not in ("CPU",)


def device_kernel_records(prof):
    """``[(kernel name, device time us)]`` for every device-side event (kernels, memcpy, memset)."""
    from .ranges import range_names

    ours = range_names()
    out = []
    for e in prof.events():
        # GPU-side copies of our named ranges (gpu_user_annotation) span kernels: not kernels
        if (_is_device_event(e) and not getattr(e, "is_user_annotation", False)
                and e.name not in ours and not e.name.startswith("stage:")):
            t = e.time_range.elapsed_us() if getattr(e, "time_range", None) is not None else 0
            out.append((e.name, float(t)))
    return out


def python_function_names(prof) -> set:
    """Names of Python-function events (recorded with ``with_stack``)."""
    return {e.name for e in prof.events() if getattr(e, "is_python_function", False)}


def _kind(a, user_ranges, py_names) -> str:
    if _is_device_event(a):
        return "kernel"
    if a.key in py_names:
        return "python"
    if getattr(a, "is_user_annotation", False) or a.key in user_ranges or a.key.startswith(
            ("stage:", "ProfilerStep", "[")):
        return "range"
    return "op"


def cpu_op_records(prof, exclude=()):
    """``[(op name, self CPU time us, count)]`` from key_averages: real ops only (no user ranges,
    Python functions or profiler bookkeeping)."""
    ex = set(exclude)
    py = python_function_names(prof)
    out = []
    for a in prof.key_averages():
        if _kind(a, ex, py) != "op":
            continue
        out.append((a.key, float(_attr(a, "self_cpu_time_total")), int(a.count)))
    return out


_OP_COLUMNS = [
    "name", "count", "device_type", "category", "self_cpu_time_total_us", "cpu_time_total_us",
    "cpu_time_avg_us", "self_device_time_total_us", "device_time_total_us", "device_time_avg_us",
    "pct_self_cpu", "pct_self_device", "self_cpu_memory_usage_bytes", "cpu_memory_usage_bytes",
    "self_device_memory_usage_bytes", "device_memory_usage_bytes", "flops", "tflops_per_s",
    "input_shapes", "stack", "overload_name", "kind",
]


def op_table(prof, group_by_input_shape: bool = False, group_by_stack_n: int = 0, user_ranges=(),
             max_rows: int | None = None):
    """``key_averages()`` as a DataFrame, sorted by self device time then self CPU time;
    ``max_rows``: keep only that many rows (percentages stay of the whole profile)."""
    import pandas as pd

    avgs = prof.key_averages(group_by_input_shape=group_by_input_shape, group_by_stack_n=group_by_stack_n)
    ur = set(user_ranges)
    py = python_function_names(prof)
    rows = []
    for a in avgs:
        dev_total = float(_attr(a, "device_time_total", "cuda_time_total"))
        self_dev = float(_attr(a, "self_device_time_total", "self_cuda_time_total"))
        fl = int(_attr(a, "flops") or 0)
        t_for_flops = dev_total if dev_total > 0 else float(_attr(a, "cpu_time_total"))
        kind = _kind(a, ur, py)
        rows.append({
            "name": a.key,
            "count": int(a.count),
            "device_type": getattr(getattr(a, "device_type", None), "name", str(getattr(a, "device_type", ""))),
            "category": categorize_kernel(a.key) if kind in ("op", "kernel") else "",
            "self_cpu_time_total_us": float(_attr(a, "self_cpu_time_total")),
            "cpu_time_total_us": float(_attr(a, "cpu_time_total")),
            "cpu_time_avg_us": float(_attr(a, "cpu_time_total")) / max(1, a.count),
            "self_device_time_total_us": self_dev,
            "device_time_total_us": dev_total,
            "device_time_avg_us": dev_total / max(1, a.count),
            "pct_self_cpu": 0.0,
            "pct_self_device": 0.0,
            "self_cpu_memory_usage_bytes": int(_attr(a, "self_cpu_memory_usage")),
            "cpu_memory_usage_bytes": int(_attr(a, "cpu_memory_usage")),
            "self_device_memory_usage_bytes": int(_attr(a, "self_device_memory_usage", "self_cuda_memory_usage")),
            "device_memory_usage_bytes": int(_attr(a, "device_memory_usage", "cuda_memory_usage")),
            "flops": fl,
            "tflops_per_s": (fl / (t_for_flops * 1e-6) / 1e12) if fl and t_for_flops > 0 else None,
            "input_shapes": str(a.input_shapes) if group_by_input_shape and getattr(a, "input_shapes", None) else "",
            "stack": "\n".join(a.stack) if group_by_stack_n and getattr(a, "stack", None) else "",
            "overload_name": getattr(a, "overload_name", "") or "",
            "kind": kind,
        })
    df = pd.DataFrame(rows, columns=_OP_COLUMNS)
    if len(df):
        real = df["kind"].isin(["op", "kernel"])
        tc = df.loc[real, "self_cpu_time_total_us"].sum()
        td = df.loc[real, "self_device_time_total_us"].sum()
        if tc > 0:
            df["pct_self_cpu"] = 100.0 * df["self_cpu_time_total_us"] / tc
        if td > 0:
            df["pct_self_device"] = 100.0 * df["self_device_time_total_us"] / td
        df = df.sort_values(["self_device_time_total_us", "self_cpu_time_total_us"], ascending=False)
    if max_rows is not None:
        df = df.head(max_rows)
    return df.reset_index(drop=True)


def _stage_of(e, prefix="stage:"):
    p = e
    while p is not None:
        if p.name.startswith(prefix):
            return p.name[len(prefix):]
        p = getattr(p, "cpu_parent", None)
    return None


def profiler_flops_by_stage(prof) -> dict:
    """Profiler-counted FLOPs (matmul/conv only) per ``stage:<name>`` range; key None = outside stages."""
    out: dict = {}
    for e in prof.events():
        fl = getattr(e, "flops", 0) or 0
        if fl:
            s = _stage_of(e)
            out[s] = out.get(s, 0) + int(fl)
    return out


def profiler_stage_durations(prof) -> dict:
    """``{stage: (calls, total seconds)}`` from ``stage:<name>`` ranges (CPU wall time, not synced)."""
    out: dict = {}
    for e in prof.events():
        if e.name.startswith("stage:") and not _is_device_event(e):
            n, t = out.get(e.name[6:], (0, 0.0))
            out[e.name[6:]] = (n + 1, t + e.time_range.elapsed_us() * 1e-6)
    return out


# ---------------------------------------------------------------------------- trace repair
# Kineto writes every string of the trace JSON-escaped except the "Call stack" argument (recorded
# with ``with_stack`` + the verbose experimental config): torch joins the frames with ";" and puts
# the raw bytes between two quotes. A frame name with a quote or a backslash breaks the JSON, and
# Cython frames (``av``, ...) sometimes carry bytes read from freed memory: invalid UTF-8 and
# control characters. The raw value ends at the quote followed by the next argument
# (``, "Ev Idx": 12``) or by the end of the args object.
_STACK_KEY = b'"Call stack": "'
_STACK_END = re.compile(rb'"(?=, "[A-Za-z][A-Za-z0-9 _.-]{0,63}": |[ \t]*\r?\n[ \t]*\})')
_STACK_ESCAPE = re.compile(rb'["\\\x00-\x1f]')  # bytes a raw stack may hold that JSON must escape
_PLAIN_CTRL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # never valid outside whitespace
_TRACE_NAME = re.compile(rb'"traceName": "(?:[^"\\]|\\.)*"')
_MAX_STACK_BYTES = 1 << 22  # a stack value this long without its end is left as it is


def repair_stack_value(raw: bytes) -> tuple[bytes, bool]:
    """JSON string body for one raw ``Call stack`` value; ``(body, had invalid UTF-8)``.

    Valid UTF-8 text is kept exactly (``json.loads`` gives the frames back byte for byte);
    ``"``, ``\\`` and control characters are escaped; invalid UTF-8 sequences become U+FFFD.
    """
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", "replace"), True
    if not bad and not _STACK_ESCAPE.search(raw):
        return raw, False
    return json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"), bad


def _repair_plain(b: bytes, st: dict) -> bytes:
    """Text outside the stack values: already JSON; invalid UTF-8 and raw control bytes fixed."""
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        b = b.decode("utf-8", "replace").encode("utf-8")
        st["other_repaired"] += 1
    if _PLAIN_CTRL.search(b):
        b = _PLAIN_CTRL.sub(lambda m: b"\\u%04x" % m.group()[0], b)
        st["other_repaired"] += 1
    return b


def repair_chrome_trace(src, dst, *, python_function_stacks: bool = False, trace_name: str | None = None,
                        chunk_size: int = 8 << 20) -> dict:
    """Stream a Kineto Chrome trace from binary file ``src`` to ``dst`` as valid UTF-8 JSON.

    Every ``Call stack`` value is re-encoded by :func:`repair_stack_value` (valid ones unchanged in
    content). ``python_function_stacks=False`` drops the ``Call stack`` argument of
    ``python_function`` events: with ``with_stack`` each Python call is itself an event, so these
    events already nest into the stack on the thread's track, and their copies of the stack are
    most of the trace (about 70% of the bytes). Op events (``cpu_op``, ``user_annotation``) keep
    theirs. ``trace_name`` replaces the ``traceName`` field (torch puts its temporary file there).
    Reads ``chunk_size`` bytes at a time; memory stays around a few chunks.

    Returns counts: bytes_in, bytes_out, stacks (values seen), stacks_kept,
    python_stacks_dropped, stacks_invalid_utf8 (kept, with U+FFFD), stacks_escaped (kept, valid
    UTF-8 with quotes / backslashes / control characters escaped), other_repaired (pieces outside
    the stacks that needed a fix; 0 for torch's own output).
    """
    st = dict(bytes_in=0, bytes_out=0, stacks=0, stacks_kept=0, python_stacks_dropped=0,
              stacks_invalid_utf8=0, stacks_escaped=0, other_repaired=0)
    name_field = None
    if trace_name is not None:
        name_field = b'"traceName": ' + json.dumps(trace_name, ensure_ascii=False).encode("utf-8")
    out: list[bytes] = []
    pending = 0

    def emit(b: bytes) -> None:
        nonlocal pending
        if b:
            out.append(b)
            pending += len(b)
            if pending >= chunk_size:
                flush()

    def flush() -> None:
        nonlocal pending
        if out:
            data = b"".join(out)
            dst.write(data)
            st["bytes_out"] += len(data)
            out.clear()
            pending = 0

    def plain(b: bytes) -> None:
        if not b:
            return
        b = _repair_plain(b, st)
        if name_field is not None and b'"traceName"' in b:
            b = _TRACE_NAME.sub(lambda m: name_field, b)
        emit(b)

    buf, pos, eof = b"", 0, False
    cat = None  # category of the event being read: "cat" comes before "args" in each event
    klen = len(_STACK_KEY)

    def track(region: bytes) -> None:
        nonlocal cat
        p_ph, p_cat = region.rfind(b'"ph": '), region.rfind(b'"cat": "')
        if p_cat > p_ph:
            cat = region[p_cat + 8:region.find(b'"', p_cat + 8)]
        elif p_ph >= 0:
            cat = None

    def read_more() -> bool:
        nonlocal buf, pos, eof
        data = src.read(chunk_size)
        if not data:
            eof = True
            return False
        st["bytes_in"] += len(data)
        buf, pos = buf[pos:] + data, 0
        return True

    read_more()
    while True:
        i = buf.find(_STACK_KEY, pos)
        if i < 0:
            if eof:
                plain(buf[pos:])
                break
            cut = buf.rfind(b"\n", pos) + 1  # a key never spans a newline; UTF-8 never splits there
            if cut <= pos and len(buf) - pos > max(2 * chunk_size, _MAX_STACK_BYTES):  # a huge line: cut at ASCII
                cut = len(buf) - klen
                while cut > pos and buf[cut] >= 0x80:
                    cut -= 1
            if cut > pos:
                track(buf[pos:cut])
                plain(buf[pos:cut])
                pos = cut
            read_more()
            continue
        v0 = i + klen
        m = _STACK_END.search(buf, v0, v0 + _MAX_STACK_BYTES)
        if m is None:
            if not eof and len(buf) - v0 < _MAX_STACK_BYTES + 64:
                read_more()
                continue
            track(buf[pos:i])
            plain(buf[pos:v0])  # no end in sight: leave this one to the plain repair
            pos = v0
            continue
        region = buf[pos:i]
        track(region)
        v1 = m.start()
        st["stacks"] += 1
        if cat == b"python_function" and not python_function_stacks:
            st["python_stacks_dropped"] += 1
            if buf.startswith(b", ", v1 + 1):  # drop '"Call stack": "...", '
                plain(region)
                pos = v1 + 3
            else:  # the last argument: drop the comma before it
                region = region.rstrip(b" \t")
                plain(region[:-1] if region.endswith(b",") else region)
                pos = v1 + 1
            continue
        raw = buf[v0:v1]
        body, bad = repair_stack_value(raw)
        st["stacks_kept"] += 1
        st["stacks_invalid_utf8"] += bad
        st["stacks_escaped"] += body is not raw and not bad
        plain(region)
        emit(_STACK_KEY)
        emit(body)
        emit(b'"')
        pos = v1 + 1
    flush()
    return st


# ---------------------------------------------------------------------------- files
def export_trace_gz(prof, path: str, *, python_function_stacks: bool = False, compresslevel: int = 6,
                    stats: dict | None = None) -> str:
    """Gzipped Chrome trace (opens in Perfetto / chrome://tracing / HTA); valid UTF-8 JSON.

    torch writes the raw trace to a temporary file beside ``path``; it is streamed through
    :func:`repair_chrome_trace` into ``path`` (see there for ``python_function_stacks``) and
    removed. ``stats``: a dict to receive the repair counts (plus ``gz_bytes``).
    """
    import gzip
    import tempfile

    if not path.endswith(".gz"):
        path += ".gz"
    d = os.path.dirname(os.path.abspath(path))
    fd, raw = tempfile.mkstemp(prefix=".trace_raw_", suffix=".json", dir=d)
    os.close(fd)
    part = path + ".part"
    try:
        prof.export_chrome_trace(raw)
        with open(raw, "rb") as src, open(part, "wb") as f, \
                gzip.GzipFile(filename=os.path.basename(path), mode="wb", fileobj=f,
                              compresslevel=compresslevel, mtime=0) as gz:
            st = repair_chrome_trace(src, gz, python_function_stacks=python_function_stacks,
                                     trace_name=os.path.basename(path)[:-3])
        os.replace(part, path)
        st["gz_bytes"] = os.path.getsize(path)
        if stats is not None:
            stats.update(st)
    finally:
        for p in (raw, part):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
    return path


def export_stack_files(prof, out_dir: str, rank: int, cuda: bool) -> list[str]:
    """Flame-graph stack files (``flamegraph.pl`` / speedscope "collapsed" format)."""
    paths = []
    metrics = [("cpu", "self_cpu_time_total")] + ([("cuda", "self_cuda_time_total")] if cuda else [])
    for tag, metric in metrics:
        p = os.path.join(out_dir, f"stacks_{tag}_rank{rank}.txt")
        prof.export_stacks(p, metric)
        if not os.path.exists(p):  # torch writes nothing when no stacks were collected
            open(p, "w").close()
        paths.append(p)
    return paths


def _format_sheet(ws, df, max_width: int = 80, min_width: int = 10) -> None:
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter

    ws.freeze_panes = "A2"
    if ws.max_row >= 1 and ws.max_column >= 1:
        ws.auto_filter.ref = ws.dimensions
    for cell in ws[1]:
        cell.font = Font(bold=True)
        cell.alignment = Alignment(wrap_text=False, vertical="top")
    for idx, col in enumerate(df.columns, start=1):
        letter = get_column_letter(idx)
        width = len(str(col))
        for cell in ws[letter][1:200]:
            v = cell.value
            if v is None:
                continue
            if isinstance(v, float):
                s = f"{v:.4g}"
            else:
                s = str(v).split("\n", 1)[0]
            width = max(width, len(s))
        ws.column_dimensions[letter].width = max(min_width, min(max_width, width + 2))
        if df[col].dtype.kind == "f":
            for cell in ws[letter][1:]:
                cell.number_format = "0.000"


def _bar_chart(ws, df, cat_col: str, val_col: str, title: str, y_title: str, anchor: str):
    from openpyxl.chart import BarChart, Reference

    n = len(df)
    if n == 0:
        return None
    ci = list(df.columns).index(cat_col) + 1
    vi = list(df.columns).index(val_col) + 1
    chart = BarChart()
    chart.type = "bar"  # horizontal bars read better with long labels
    chart.style = 10
    chart.title = title
    chart.y_axis.title = y_title
    chart.x_axis.title = cat_col
    data = Reference(ws, min_col=vi, min_row=1, max_row=n + 1)
    cats = Reference(ws, min_col=ci, min_row=2, max_row=n + 1)
    chart.add_data(data, titles_from_data=True)
    chart.set_categories(cats)
    chart.legend = None
    chart.height = max(7.5, 0.6 * n + 3)
    chart.width = 18
    ws.add_chart(chart, anchor)
    return chart


def write_workbook(path: str, sheets: dict, charts=()) -> str:
    """Write DataFrames to an xlsx: one sheet each (in order), frozen header, auto filter, widths.

    ``charts``: iterable of ``(sheet, category column, value column, title, axis title)``; each
    becomes a native Excel bar chart placed to the right of the sheet's data.
    """
    import pandas as pd
    from openpyxl.utils import get_column_letter

    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    def clean(v):
        return ILLEGAL_CHARACTERS_RE.sub("?", v)[:32000] if isinstance(v, str) else v

    with pd.ExcelWriter(path, engine="openpyxl") as xw:
        for name, df in sheets.items():
            df = df.copy()
            for c in df.columns:
                if df[c].dtype == object or str(df[c].dtype).startswith(("string", "str")):
                    df[c] = df[c].map(clean)
            df.to_excel(xw, sheet_name=name[:31], index=False)
        for name, df in sheets.items():
            _format_sheet(xw.sheets[name[:31]], df)
        for sheet, cat_col, val_col, title, y_title in charts:
            df = sheets.get(sheet)
            if df is None:
                continue
            anchor = f"{get_column_letter(len(df.columns) + 2)}2"
            _bar_chart(xw.sheets[sheet[:31]], df, cat_col, val_col, title, y_title, anchor)
    return path
