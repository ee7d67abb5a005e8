"""The profiler's Chrome trace is valid UTF-8 JSON (issue 23, item 3).

torch writes the ``Call stack`` argument of ``--profile-with-stack`` traces raw: quotes and
backslashes unescaped, and for some Cython frames bytes from freed memory (invalid UTF-8, control
characters). ``export.repair_chrome_trace`` re-encodes those values while streaming the trace.
"""
import gzip
import io
import json
import os
import subprocess
import sys
import time

import pytest

from s2v_fast.profiling.export import repair_chrome_trace, repair_stack_value
from test_pipeline_tiny import tiny_cache  # noqa: F401

GARBAGE = b'av/__init__.py(0): \xb0\xfb\x01"\\\n\x7f\xc3;<built-in function exec>;'
VALID = "s2v_fast/pipeline.py(12): generate;caf\u00e9/\u6a21\u578b.py(3): f\u20ac;<module>;"


def repair_text():
    return GARBAGE.decode("utf-8", "replace")


def _event(cat, args_line, name="x"):
    name = name.encode("utf-8", "surrogateescape")
    return (b'  {\n    "ph": "X",\n    "cat": "' + cat + b'",\n    "name": "' + name + b'",\n'
            b'    "pid": 1,\n    "tid": 1,\n    "ts": 10.000,\n    "dur": 1.000\n    ,\n'
            b'    "args": {\n      ' + args_line + b'\n    }\n  }')


def _trace(*events):
    return (b'{\n  "schemaVersion": 1,\n  "traceEvents": [\n' + b",\n".join(events)
            + b'\n  ],"traceName": "/tmp/tmpabc.json" }')


def _repair(raw, **kw):
    dst = io.BytesIO()
    st = repair_chrome_trace(io.BytesIO(raw), dst, **kw)
    out = dst.getvalue()
    return json.loads(out.decode("utf-8")), st, out


def test_repair_stack_value():
    # valid UTF-8 without quotes/backslashes: the very same bytes
    raw = VALID.encode()
    body, bad = repair_stack_value(raw)
    assert body is raw and not bad
    # quotes, backslashes and control characters of valid text are escaped, the text kept
    tricky = 'a"b\\c\td\x01e;\u00fc'
    body, bad = repair_stack_value(tricky.encode())
    assert not bad and json.loads(b'"' + body + b'"') == tricky
    # invalid UTF-8 becomes U+FFFD, everything valid around it survives
    body, bad = repair_stack_value(GARBAGE)
    text = json.loads(b'"' + body + b'"')
    assert bad and text.startswith("av/__init__.py(0): \ufffd\ufffd\x01\"\\\n\x7f\ufffd;")
    assert text.endswith(";<built-in function exec>;")


def test_repair_trace_keeps_valid_and_repairs_invalid():
    raw = _trace(
        _event(b"cpu_op", b'"External id": 1, "Call stack": "' + VALID.encode() + b'", "Ev Idx": 0', "aten::mm"),
        _event(b"cpu_op", b'"External id": 2, "Call stack": "' + GARBAGE + b'", "Ev Idx": 1', "aten::add"),
        _event(b"user_annotation", b'"Call stack": "' + GARBAGE + b'"', "stage:denoise"),
        _event(b"python_function", b'"Python id": 3, "Call stack": "' + GARBAGE + b'", "Ev Idx": 2'),
        _event(b"python_function", b'"Python id": 4, "Call stack": "' + VALID.encode() + b'"'),
        _event(b"cpu_op", b'"Input Dims": [[2, 3]], "Concrete Inputs": ["a\\"b\\\\"], "Ev Idx": 5',
               "aten::\u00e9"),
    )
    with pytest.raises(ValueError):
        json.loads(raw)  # what torch writes
    for kw in ({}, {"chunk_size": 7}):  # tiny chunks: values and multi-byte characters cut anywhere
        d, st, out = _repair(raw, trace_name="trace_rank0.json", **kw)
        ev = d["traceEvents"]
        assert d["traceName"] == "trace_rank0.json"
        assert ev[0]["args"] == {"External id": 1, "Call stack": VALID, "Ev Idx": 0}
        assert VALID.encode() in out  # valid multi-byte UTF-8 passes through byte for byte
        assert ev[1]["args"]["Call stack"] == repair_text() and ev[1]["args"]["Ev Idx"] == 1
        assert ev[2]["args"] == {"Call stack": repair_text()}
        # python_function events drop their stack copy (their nesting is the stack), nothing else
        assert ev[3]["args"] == {"Python id": 3, "Ev Idx": 2}
        assert ev[4]["args"] == {"Python id": 4}
        # escaped strings elsewhere are left alone
        assert ev[5]["name"] == "aten::\u00e9" and ev[5]["args"]["Concrete Inputs"] == ['a"b\\']
        assert st["stacks"] == 5 and st["stacks_kept"] == 3 and st["python_stacks_dropped"] == 2
        assert st["stacks_invalid_utf8"] == 2 and st["other_repaired"] == 0
    d, st, _ = _repair(raw, python_function_stacks=True)
    assert d["traceEvents"][3]["args"]["Call stack"] == repair_text()
    assert d["traceEvents"][4]["args"]["Call stack"] == VALID
    assert st["stacks_kept"] == 5 and st["python_stacks_dropped"] == 0


def test_repair_plain_text_outside_stacks():
    # a stray invalid byte or control character outside the stacks still gives valid JSON
    raw = _trace(_event(b"cpu_op", b'"Ev Idx": 0', "bad\x01name\udcff"))
    d, st, _ = _repair(raw)
    assert d["traceEvents"][0]["name"] == "bad\x01name\ufffd" and st["other_repaired"] == 2
    # valid JSON passes through unchanged
    ok = json.dumps({"traceEvents": [{"name": "\u00e9\u6a21", "args": {"Call stack": "a;b;"}}]},
                    ensure_ascii=False, indent=2).encode()
    _, _, out = _repair(ok)
    assert out == ok


def test_export_trace_gz_real_profiler_odd_frames(tmp_path):
    """A real torch profile whose stack has a quote, a backslash, a tab, a control character and
    non-ASCII text in a frame: torch's own file is not JSON, ours is, with the frame intact."""
    import torch

    from s2v_fast.profiling.export import export_trace_gz

    fname, fn = 'we"ird\\path\x01\u00e9\u20ac.py', 'na"me\\x\t\u00fc'
    g = {"torch": torch}
    exec(compile("def f(x):\n    return torch.relu(x) + 1\n", fname, "exec"), g)
    f = g["f"]
    f.__code__ = f.__code__.replace(co_name=fn)

    def profiled():
        cfg = torch._C._profiler._ExperimentalConfig(verbose=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True,
                                    experimental_config=cfg) as p:
            f(torch.randn(4))
        return p

    profiled().export_chrome_trace(str(tmp_path / "torch.json"))  # a trace saves once: two runs
    with pytest.raises(ValueError):
        json.loads((tmp_path / "torch.json").read_bytes())
    st = {}
    path = export_trace_gz(profiled(), str(tmp_path / "trace_rank0.json"), stats=st)
    assert path.endswith("trace_rank0.json.gz")
    assert sorted(os.listdir(tmp_path)) == ["torch.json", "trace_rank0.json.gz"]  # no temporary files left
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        d = json.load(fh)
    frame = f"{fname}(1): {fn}"
    frames = {frame, frame.replace("\\", "/")}  # torch writes backslashes in frames as "/"
    ops = [e for e in d["traceEvents"] if e.get("cat") == "cpu_op" and e["name"] in ("aten::relu", "aten::add")]
    assert ops and all(frames & set(e["args"]["Call stack"].split(";")) for e in ops)
    assert st["stacks_escaped"] >= len(ops) and st["python_stacks_dropped"] > 0 and st["gz_bytes"] > 0


def _inputs(d):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    img = os.path.join(d, "face.png")
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(img)
    wav = os.path.join(d, "a.wav")
    t = np.arange(16000 // 2) / 16000
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return img, wav


@pytest.mark.slow  # ~55 s on 2 idle cores (4 min when they are shared): torch parses ~190k events
def test_cli_profile_with_stack_trace_loads(tmp_path, tiny_cache):
    """The real CLI: the gzip trace opens with the standard library's strict json."""
    img, wav = _inputs(str(tmp_path))
    prof = tmp_path / "prof"
    env = dict(os.environ, S2V_FAST_CACHE=tiny_cache, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "s2v_fast", "profile", "--model", "tiny", "--device", "cpu",
           "--image", img, "--audio", wav, "--output", str(tmp_path / "o.mp4"), "--height", "64",
           "--width", "64", "--num-frames", "4", "--guidance-scale", "1", "--quiet",
           "--profile-dir", str(prof), "--profile-with-stack"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trace = prof / "trace_rank0.json.gz"
    with gzip.open(trace, "rb") as f:
        raw = f.read()
    raw.decode("utf-8")  # strict
    with gzip.open(trace, "rt", encoding="utf-8") as f:
        d = json.load(f)
    ev = d["traceEvents"]
    assert ev and d["traceName"] == "trace_rank0.json"
    ops = [e for e in ev if e.get("cat") == "cpu_op"]
    py = [e for e in ev if e.get("cat") == "python_function"]
    assert ops and py
    # the stacks the user asked for are there (ops), the python events' copies are not
    assert sum("Call stack" in e.get("args", {}) for e in ops) > 0.9 * len(ops)
    assert not any("Call stack" in e.get("args", {}) for e in py)
    assert {"stage:denoise", "stage:vae_decode"} <= {e["name"] for e in ev}
    assert not [p for p in os.listdir(prof) if p.startswith(".trace_raw_") or p.endswith(".part")]
    print(f"\nprofile --profile-with-stack: {wall:.1f} s, trace {len(raw) / 1e6:.1f} MB json, "
          f"{trace.stat().st_size / 1e6:.1f} MB gz, {len(ev)} events")
