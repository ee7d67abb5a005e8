"""Ctrl-C, signals and errors in the middle of a run: the MP4 keeps every finished clip.

:func:`keep_finished_clips` is called by both clip loops (``generate`` and the streaming mode's
block loop) when their loop raises; it closes the writer and re-raises as
:class:`GenerationInterrupted` or :class:`PartialOutputError`, which carry what was kept.
"""
from __future__ import annotations

from typing import Optional

from ..errors import S2VError


class SignalInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt raised by a signal handler (the CLI turns SIGINT, SIGTERM and SIGHUP
    into it): handled exactly like Ctrl-C, and carries the signal for the exit code (128 + n)."""

    def __init__(self, signum: int):
        import signal as _signal

        self.signum = int(signum)
        try:
            self.signal_name = _signal.Signals(self.signum).name
        except ValueError:  # pragma: no cover
            self.signal_name = f"signal {self.signum}"
        super().__init__(self.signal_name)


def interrupt_signal(exc: BaseException) -> Optional[int]:
    """The signal number behind a KeyboardInterrupt (None for a plain one, e.g. a callback's)."""
    for _ in range(8):  # the exception, or what it was raised from
        if exc is None:
            break
        if isinstance(exc, SignalInterrupt):
            return exc.signum
        exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _interrupted(exc: BaseException) -> str:
    """'interrupted' or 'interrupted by SIGTERM'."""
    sig = interrupt_signal(exc)
    return "interrupted" if sig is None else f"interrupted by {SignalInterrupt(sig).signal_name}"


class _PartialMixin:
    def _set(self, clips_done, num_clips, frames_written, output_path, cause):
        self.clips_done = clips_done
        self.num_clips = num_clips
        self.frames_written = frames_written
        self.output_path = output_path
        self.cause = cause


class GenerationInterrupted(KeyboardInterrupt, _PartialMixin):
    """Ctrl-C (or SIGTERM / SIGHUP through the CLI) after at least one clip was written: the MP4
    holds the finished clips. ``signum``: the signal, None for a plain KeyboardInterrupt."""

    def __init__(self, message, **info):
        super().__init__(message)
        self._set(**info)
        self.signum = interrupt_signal(self.cause)


class PartialOutputError(S2VError, _PartialMixin):
    """An error after at least one clip was written: the MP4 holds the finished clips."""

    def __init__(self, message, **info):
        super().__init__(message)
        self._set(**info)


def keep_finished_clips(exc, writer, clips_done, n_clips, unit="clips"):
    """Ctrl-C, a signal or an error mid-run: keep the finished clips in a valid MP4, else
    leave nothing.

    A ``KeyboardInterrupt`` (a :class:`SignalInterrupt` too) is re-raised as
    :class:`GenerationInterrupted` (a KeyboardInterrupt carrying what was kept); any other
    error after >= 1 written clip as :class:`PartialOutputError`. The writer is the judge of
    what was kept: it takes interrupt signals only between clips, so a clip it wrote is whole
    even when the interrupt came before the loop counted it. Returns (the caller re-raises
    ``exc``) when nothing was kept.
    """
    if writer is None:
        return
    if not (writer.chunks_written > 0 and isinstance(exc, (KeyboardInterrupt, Exception))):
        writer.abort()
        return
    try:
        writer.finish()  # (a no-op when the interrupt came right after the final finish)
    except Exception:
        writer.abort()
        return
    clips_done = max(clips_done, writer.chunks_written)
    info = dict(clips_done=clips_done, num_clips=n_clips, frames_written=writer.frames_written,
                output_path=writer.path, cause=exc)
    kept = (f"kept the {clips_done} finished {unit[:-1]}(s) ({writer.frames_written} frames) "
            f"in {writer.path}")
    if isinstance(exc, KeyboardInterrupt):
        raise GenerationInterrupted(f"{_interrupted(exc)} after {clips_done} of {n_clips} {unit}; "
                                    f"{kept}", **info) from exc
    raise PartialOutputError(f"generation failed after {clips_done} of {n_clips} {unit} "
                             f"({_one_line(exc)}); {kept}", **info) from exc


def _one_line(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {s[0]}" if s else type(exc).__name__
